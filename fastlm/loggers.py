"""Where a run's numbers go besides metrics.jsonl: TensorBoard, Weights & Biases, and the
per-step statistics long runs need (grad norm before clipping, clip rate, update/weight ratios,
loss spikes).

Every record that fastlm.metrics.MetricsLog writes ({"type": "train" | "eval" | "final", "step",
...}) is also sent to each backend as scalars named "<type>/<key>" (train/loss, eval/val_loss,
train/grad_norm, train/tokens_per_s, train/mfu, train/memory_gb, ...).

  --tensorboard         out_dir/tensorboard/ event files (needs the `tensorboard` package:
                        pip install 'fastlm[logging]')
  --wandb_project NAME  a Weights & Biases run; without WANDB_API_KEY (or a login) it runs in
                        offline mode under out_dir/wandb (sync later with `wandb sync`); skipped
                        with one line when wandb is not installed
"""
import collections
import math
import os
import sys

import torch

from fastlm.config import ConfigError


# --------------------------------------------------------------------------- backends

def record_scalars(record):
    """{"<type>/<key>": float} of a metrics record's finite numbers (bools as 0/1)."""
    kind = record.get("type", "train")
    scalars = {}
    for key, value in record.items():
        if key in ("type", "step") or value is None or isinstance(value, str):
            continue
        if isinstance(value, (bool, int, float)) and math.isfinite(float(value)):
            scalars[f"{kind}/{key}"] = float(value)
        elif isinstance(value, dict):  # e.g. update/weight ratios per layer group
            scalars.update({f"{kind}/{key}/{k}": float(v) for k, v in value.items() if v is not None})
    return scalars


class TensorBoardLogger:
    def __init__(self, log_dir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install 'fastlm[logging]')") from None
        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, scalars, step):
        for name, value in scalars.items():
            self.writer.add_scalar(name, value, global_step=step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbLogger:
    def __init__(self, wandb, project, out_dir, config=None):
        offline = not os.environ.get("WANDB_API_KEY") and os.environ.get("WANDB_MODE") is None
        self.wandb = wandb
        self.run = wandb.init(project=project, dir=out_dir, config=config, mode="offline" if offline else None,
                              reinit=True)

    def log(self, scalars, step):
        self.run.log(scalars, step=step)

    def flush(self):
        pass

    def close(self):
        self.run.finish()


class Loggers:
    """The backends of one run; log_record() sends a metrics record to all of them."""

    def __init__(self, backends=()):
        self.backends = list(backends)

    def log_record(self, record):
        if not self.backends:
            return
        scalars = record_scalars(record)
        step = int(record.get("step", 0))
        for backend in self.backends:
            backend.log(scalars, step)
            if record.get("type") != "train":
                backend.flush()

    def close(self):
        for backend in self.backends:
            backend.close()
        self.backends = []


def make_loggers(out_dir, tensorboard=False, wandb_project=None, config=None, enabled=True, warn=None):
    """The run's Loggers (none on processes other than the main one). A missing wandb package is
    one line on stderr (or to `warn`) and no wandb logging; a missing tensorboard is a ConfigError."""
    warn = warn or (lambda line: print(line, file=sys.stderr))
    backends = []
    if not enabled:
        return Loggers()
    if tensorboard:
        backends.append(TensorBoardLogger(os.path.join(out_dir, "tensorboard")))
    if wandb_project:
        try:
            import wandb
        except ImportError:
            warn(f"fastlm: wandb is not installed; --wandb_project {wandb_project} skipped (pip install wandb)")
        else:
            backends.append(WandbLogger(wandb, wandb_project, out_dir, config))
    return Loggers(backends)


class LoggedMetrics:
    """A MetricsLog whose log(record) also goes to the Loggers; everything else is the MetricsLog's."""

    def __init__(self, metrics, loggers):
        self._metrics, self.loggers = metrics, loggers

    def log(self, record):
        self._metrics.log(record)
        if getattr(self._metrics, "enabled", True):
            self.loggers.log_record(record)
            if record.get("type") == "final":
                self.loggers.close()

    def __getattr__(self, name):
        return getattr(self._metrics, name)


# --------------------------------------------------------------------------- per-step statistics

def memory_gb(device):
    """Peak GPU memory allocated (GiB) on CUDA; the process's peak resident set size elsewhere."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss / (2**30 if sys.platform == "darwin" else 2**20)
    except ImportError:  # Windows
        return None


def layer_group(name):
    """The group a parameter's update/weight ratio is reported under: embedding, blocks.i.attn,
    blocks.i.mlp, or norm."""
    parts = name.split(".")
    if parts[0] in ("wte", "wpe", "lm_head"):
        return "embedding"
    if parts[0] == "blocks" and len(parts) > 2 and parts[2] in ("attn", "mlp"):
        return f"blocks.{parts[1]}.{parts[2]}"
    return "norm"


class StepStats:
    """Statistics of the optimizer steps between two log lines, for long runs.

    observe(step, loss, grad_norm) after every step: counts clipping (the pre-clip norm above
    grad_clip) and flags a loss spike (more than `spike_sigmas` standard deviations above the
    mean of the last `window` losses, once `warmup` losses are in it). record_extras() adds
    clip_rate, loss_spikes and memory to a train record. Around the step before an eval,
    snapshot() and update_ratios() give ||new - old|| / ||old|| of each layer group's weights.
    """

    def __init__(self, grad_clip, device="cpu", spike_sigmas=4.0, window=100, warmup=20, warn=None):
        self.grad_clip, self.device = grad_clip, device
        self.spike_sigmas, self.warmup = spike_sigmas, warmup
        self.warn = warn or (lambda line: print(line, file=sys.stderr))
        self.recent = collections.deque(maxlen=window)  # the last `window` finite losses
        self.steps = self.clipped = 0
        self.spikes = []
        self._snapshot = None

    def observe(self, step, loss, grad_norm):
        """Returns True when this step's loss is flagged as a spike."""
        self.steps += 1
        if grad_norm is not None and self.grad_clip and grad_norm > self.grad_clip:
            self.clipped += 1
        if not math.isfinite(loss):
            return False
        spike = False
        if len(self.recent) >= self.warmup:
            mean = sum(self.recent) / len(self.recent)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / (len(self.recent) - 1))
            # The floor keeps a flat loss (std ~ 0) from flagging every rounding wobble.
            spike = loss > mean + self.spike_sigmas * max(std, 1e-3 * abs(mean))
            if spike:
                self.spikes.append(step)
                self.warn(f"fastlm: loss spike at step {step}: {loss:.4f} against a mean of {mean:.4f} "
                          f"(std {std:.4f}) over the last {len(self.recent)} steps")
        self.recent.append(loss)
        return spike

    def record_extras(self):
        """clip_rate and loss_spikes since the last call, and memory_gb; resets the counts."""
        extras = {"clip_rate": self.clipped / self.steps if self.steps else 0.0, "loss_spikes": len(self.spikes),
                  "memory_gb": memory_gb(self.device)}
        self.steps = self.clipped = 0
        self.spikes = []
        return extras

    @torch.no_grad()
    def snapshot(self, model):
        self._snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update_ratios(self, model):
        """{group: ||update|| / ||weights||} since snapshot(), or {} without one."""
        if self._snapshot is None:
            return {}
        update, weight = {}, {}
        for name, p in model.named_parameters():
            group = layer_group(name)
            old = self._snapshot[name].float()
            update[group] = update.get(group, 0.0) + float((p.float() - old).pow(2).sum())
            weight[group] = weight.get(group, 0.0) + float(old.pow(2).sum())
        self._snapshot = None
        return {g: math.sqrt(update[g]) / math.sqrt(weight[g]) if weight[g] > 0 else None for g in update}
