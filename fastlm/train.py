"""The Trainer and `python -m fastlm.train`.

One process trains on one device; under `torchrun` every process is a DistributedDataParallel
rank (nccl on CUDA, gloo on CPU) drawing its own batches, and rank 0 alone logs and saves.

out_dir holds: ckpt.pt (atomic writes), config.json, metrics.jsonl, loss.png, tokenizer.json.
A resumed run (--resume) continues exactly: model, optimizer, grad scaler, RNGs, data sampler
and step all come back from the checkpoint.
"""
import contextlib
import hashlib
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from fastlm import ops
from fastlm.config import ConfigError, GPTConfig, TrainConfig, as_dict, fail, parse_args
from fastlm.data import BatchSampler, load_data, tokenizer_from_dict
from fastlm.files import atomic_write
from fastlm.model import GPT, decay_groups
from fastlm.optim import AdamW
from fastlm.plots import ascii_curve, save_loss_plot

PROG = "python -m fastlm.train"
CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = "fastlm-checkpoint-1"
# Fields that shape the parameters: a checkpoint must agree on these to be loaded.
ARCH_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "d_model", "bias",
               "pos_emb", "norm", "mlp")
# Dense bf16 peak FLOP/s of common training GPUs, for MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); nothing bad has been saved."""


def get_lr(step, cfg):
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to cfg.min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return cfg.min_lr
    ratio = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def peak_flops(device):
    """The device's dense bf16 peak FLOP/s if known (for MFU), else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def resolve_device(name, local_rank=0):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def atomic_torch_save(obj, path):
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_write_text(path, text):
    with atomic_write(path, "w") as f:
        f.write(text)


def load_checkpoint(path):
    """Load a fastlm checkpoint safely (weights_only); any problem is a ConfigError."""
    if os.path.isdir(path):
        path = os.path.join(path, CKPT_NAME)
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ConfigError(f"checkpoint {path} is corrupt or not a fastlm checkpoint "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{path} is not a fastlm checkpoint")
    return ckpt


def model_config_from_checkpoint(ckpt):
    return GPTConfig(**ckpt["model_config"])


class Trainer:
    def __init__(self, model_cfg: GPTConfig, cfg: TrainConfig, explicit=frozenset()):
        self.cfg = cfg
        self._setup_distributed()
        self.device = resolve_device(cfg.device, self.local_rank)
        if cfg.dtype == "float16" and self.device.type != "cuda":
            raise ConfigError("dtype float16 needs a CUDA device (use bfloat16 on CPU)")
        self.out_dir = cfg.out_dir
        ckpt = self._prepare_out_dir()
        if ckpt is not None:
            model_cfg = self._merge_resumed_config(model_cfg, ckpt, explicit)
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt is not None else None
        self.data = load_data(cfg.data, cfg.tokenizer, model_cfg.vocab_size, model_cfg.block_size, tokenizer)
        self.tokenizer = self.data.tokenizer
        self.model_cfg = model_cfg

        torch.manual_seed(cfg.seed)
        self.model = GPT(model_cfg).to(self.device)
        self._check_backends()
        self.optimizer = AdamW(decay_groups(self.model, cfg.weight_decay), lr=cfg.lr,
                               betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                               max_grad_norm=cfg.grad_clip or None, backend=cfg.optim_backend)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.dtype == "float16" else None
        self.autocast = (torch.autocast(self.device.type, dtype=getattr(torch, cfg.dtype))
                         if cfg.dtype != "float32" else contextlib.nullcontext())
        # Each rank draws its own windows: the sampler seed depends on the rank.
        self.train_batches = BatchSampler(self.data.train, model_cfg.block_size, cfg.batch_size,
                                          seed=cfg.seed + 1 + self.rank, device=self.device)
        self.step = 0
        if ckpt is not None:
            self._restore(ckpt)
        self.raw_model = self.model
        if self.ddp:
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            self.model = torch.compile(self.model)
        self._stop_signal = None

    # ----------------------------------------------------------------- setup

    def _setup_distributed(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.ddp = self.world_size > 1
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.is_main = self.rank == 0
        if self.ddp and not dist.is_initialized():
            use_cuda = self.cfg.device.startswith("cuda") or (self.cfg.device == "auto" and torch.cuda.is_available())
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")

    def _prepare_out_dir(self):
        """Check out_dir before anything is written; return the checkpoint to resume, if any."""
        path = os.path.join(self.out_dir, CKPT_NAME)
        if self.cfg.resume:
            if not os.path.isfile(path):
                raise ConfigError(f"--resume: no checkpoint at {path}")
            ckpt = load_checkpoint(path)
        else:
            if os.path.exists(path) and not self.cfg.overwrite:
                raise ConfigError(f"{self.out_dir} already holds a run ({CKPT_NAME}); pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out_dir")
            ckpt = None
        if self.is_main:
            try:
                os.makedirs(self.out_dir, exist_ok=True)
                probe = os.path.join(self.out_dir, f".write-test-{os.getpid()}")
                with open(probe, "w"):
                    pass
                os.remove(probe)
            except OSError as exc:
                raise ConfigError(f"out_dir {self.out_dir} is not writable ({exc.strerror})") from None
        return ckpt

    def _merge_resumed_config(self, model_cfg, ckpt, explicit):
        """The checkpoint's architecture wins unless the user set a field that contradicts it."""
        saved = ckpt["model_config"]
        for name in ARCH_FIELDS:
            if name in explicit and getattr(model_cfg, name) != saved[name]:
                raise ConfigError(f"checkpoint in {self.out_dir} is incompatible: it has {name}={saved[name]!r}, "
                                  f"this run asks for {getattr(model_cfg, name)!r}")
        merged = dict(saved)
        merged.update({k: getattr(model_cfg, k) for k in as_dict(model_cfg) if k in explicit and k not in ARCH_FIELDS})
        return GPTConfig(**merged)

    def _check_backends(self):
        """Fail fast, with one line, when an explicitly chosen backend cannot run here."""
        reasons = ops.available_backends(self.device)
        picks = (("causal_attention", self.model_cfg.attn_backend),
                 ("linear_cross_entropy" if self.model_cfg.fused_linear_ce else "cross_entropy", self.model_cfg.ce_backend),
                 ("adamw", self.cfg.optim_backend))
        for op, backend in picks:
            if backend != "auto" and reasons[op].get(backend, "unknown backend") is not None:
                raise ConfigError(f"{op} backend {backend!r} cannot run on {self.device.type}: "
                                  f"{reasons[op].get(backend, 'unknown backend')}")

    # ----------------------------------------------------------------- checkpoints

    def _rng_state(self):
        state = {"torch": torch.get_rng_state(), "sampler": self.train_batches.state_dict()["generator"]}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        if not self.ddp:
            return [state]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, state)
        return gathered

    def _restore(self, ckpt):
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        states = ckpt["rng"]
        if len(states) != self.world_size:
            print(f"{PROG}: warning: checkpoint was written by {len(states)} process(es), resuming with "
                  f"{self.world_size}; batches and dropout will not match the original run exactly", file=sys.stderr)
        state = states[self.rank % len(states)]
        torch.set_rng_state(state["torch"])
        self.train_batches.load_state_dict({"generator": state["sampler"]})
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def save_checkpoint(self):
        rng = self._rng_state()  # collective under DDP: every rank must call save_checkpoint
        if not self.is_main:
            return
        ckpt = {
            "format": CKPT_FORMAT,
            "model_config": as_dict(self.model_cfg),
            "train_config": as_dict(self.cfg),
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "rng": rng,
            "tokenizer": self.tokenizer.to_dict(),
        }
        atomic_torch_save(ckpt, os.path.join(self.out_dir, CKPT_NAME))

    # ----------------------------------------------------------------- logging

    def _metrics_path(self):
        return os.path.join(self.out_dir, "metrics.jsonl")

    def _start_metrics(self):
        """Fresh run: empty metrics. Resume: keep only records up to the checkpoint's step."""
        path = self._metrics_path()
        kept = []
        if self.cfg.resume and os.path.exists(path):
            kept = [line for line in read_metrics(path) if line.get("step", 0) <= self.step and line.get("type") != "final"]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def log(self, record):
        if self.is_main:
            with open(self._metrics_path(), "a") as f:
                f.write(json.dumps(record) + "\n")

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, splits=("train", "val")):
        """Mean loss over eval_iters batches of each split (the same batches at every eval)."""
        self.raw_model.eval()
        tokens_of = {"train": self.data.train, "val": self.data.val}
        result = {}
        for split in splits:
            batches = BatchSampler(tokens_of[split], self.model_cfg.block_size, self.cfg.batch_size,
                                   seed=self.cfg.seed + 10_000 + self.rank, device=self.device)
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for _ in range(self.cfg.eval_iters):
                x, y = batches.next()
                with self.autocast:
                    _, loss = self.raw_model(x, y)
                total += loss.double()
            if self.ddp:
                dist.all_reduce(total)
            result[split] = total.item() / (self.cfg.eval_iters * self.world_size)
        self.raw_model.train()
        return result

    # ----------------------------------------------------------------- training

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _should_stop(self):
        flag = self._stop_signal is not None
        if self.ddp:
            t = torch.tensor([1.0 if flag else 0.0], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            flag = t.item() > 0
        return flag

    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches; returns (loss, grad norm)."""
        cfg = self.cfg
        lr = get_lr(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(cfg.grad_accum_steps):
            x, y = self.train_batches.next()
            last = micro == cfg.grad_accum_steps - 1
            sync = self.model.no_sync() if self.ddp and not last else contextlib.nullcontext()
            with sync, self.autocast:
                _, loss = self.model(x, y)
                loss = loss / cfg.grad_accum_steps
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach()
        if self.scaler is not None:
            norm = self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            norm = self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"loss became {loss_value} at step {self.step}; stopping without saving "
                                f"(the last good checkpoint in {self.out_dir} is kept). Try a lower --lr.")
        self.step += 1
        return loss_value, (float(norm) if norm is not None else None), lr

    def train(self):
        cfg = self.cfg
        tokens_per_step = cfg.batch_size * self.model_cfg.block_size * cfg.grad_accum_steps * self.world_size
        flops_per_step = self.raw_model.flops_per_token() * tokens_per_step
        peak = peak_flops(self.device)
        if self.is_main:
            atomic_write_text(os.path.join(self.out_dir, "config.json"),
                              json.dumps({"model": as_dict(self.model_cfg), "train": as_dict(cfg)}, indent=2) + "\n")
            atomic_write_text(os.path.join(self.out_dir, "tokenizer.json"), json.dumps(self.tokenizer.to_dict()) + "\n")
            self._start_metrics()
            self._print_header(tokens_per_step)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.is_main and cfg.progress), file=sys.stderr)
        started = time.perf_counter()
        self._window_losses = []
        window_start, window_steps = time.perf_counter(), 0
        tokens_per_s = 0.0
        try:
            if self.step == 0:  # a resumed run already evaluated at its checkpoint's step
                self._eval_and_report(bar, tokens_per_s, started)
            while self.step < cfg.max_steps:
                loss, norm, lr = self.train_step()
                self._window_losses.append(loss)
                window_steps += 1
                now = time.perf_counter()
                if now - window_start > 0:
                    tokens_per_s = window_steps * tokens_per_step / (now - window_start)
                bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s / 1e3:.1f}k tok/s", refresh=False)
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    record = {"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                              "tokens_per_s": tokens_per_s, "elapsed_s": now - started}
                    if peak:
                        record["mfu"] = flops_per_step * tokens_per_s / tokens_per_step / peak
                    self.log(record)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    self._eval_and_report(bar, tokens_per_s, started)
                if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
                if self._should_stop():
                    break
        finally:
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.save_checkpoint()
        if self._stop_signal is None:
            self._finish(started)
        elif self.is_main:
            print(f"{PROG}: stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved in "
                  f"{self.out_dir} (continue with --resume)", file=sys.stderr)
        if self.ddp:
            dist.barrier()  # no rank tears the process group down while another is still using it
        return 0 if self._stop_signal is None else 128 + self._stop_signal

    def _print_header(self, tokens_per_step):
        n = self.raw_model.num_params()
        print(f"fastlm: {n / 1e6:.2f}M parameters, {self.data.tokenizer.kind} tokenizer (vocab {self.data.vocab_size}), "
              f"data {self.data.source}: {len(self.data.train):,} train / {len(self.data.val):,} val tokens")
        print(f"fastlm: device {self.device}, dtype {self.cfg.dtype}, world size {self.world_size}, "
              f"{tokens_per_step:,} tokens/step, steps {self.step} -> {self.cfg.max_steps}, out_dir {self.out_dir}")
        print(f"{'step':>6} | {'train loss':>10} | {'val loss':>8} | {'val ppl':>8} | {'lr':>9} | {'tok/s':>8} | {'elapsed':>8}")

    def _eval_and_report(self, bar, tokens_per_s, started):
        """Evaluate val loss (and, with --eval_train_split, train loss) and print a table row.

        Without --eval_train_split the train column is the mean training-batch loss since the
        previous eval, which costs nothing; the val loss is always measured in eval mode.
        """
        splits = ("train", "val") if self.cfg.eval_train_split else ("val",)
        losses = self.evaluate(splits)
        if "train" not in losses:
            window = self._window_losses
            losses["train"] = sum(window) / len(window) if window else None
        self._window_losses = []
        lr = get_lr(max(self.step - 1, 0), self.cfg)
        record = {"type": "eval", "step": self.step, "train_loss": losses["train"], "val_loss": losses["val"],
                  "val_ppl": math.exp(min(losses["val"], 50)), "lr": lr}
        self.log(record)
        if self.is_main:
            train = f"{losses['train']:>10.4f}" if losses["train"] is not None else f"{'-':>10}"
            line = (f"{self.step:>6} | {train} | {losses['val']:>8.4f} | {record['val_ppl']:>8.2f} | "
                    f"{lr:>9.2e} | {tokens_per_s:>8.0f} | {time.perf_counter() - started:>7.1f}s")
            bar.write(line, file=sys.stdout)
            sys.stdout.flush()

    def _finish(self, started):
        final = {"type": "final", "step": self.step, "elapsed_s": time.perf_counter() - started,
                 "world_size": self.world_size}
        if self.ddp:
            digest = weights_digest(self.raw_model)
            digests = [None] * self.world_size
            dist.all_gather_object(digests, digest)
            final["ranks_identical"] = len(set(digests)) == 1
            if not final["ranks_identical"]:
                print(f"{PROG}: warning: ranks ended with different weights: {digests}", file=sys.stderr)
        self.log(final)
        if not self.is_main:
            return
        records = read_metrics(self._metrics_path())
        save_loss_plot(records, os.path.join(self.out_dir, "loss.png"))
        print()
        print(ascii_curve([(r["step"], r["val_loss"]) for r in records if r.get("type") == "eval"], label="val loss"))
        print(f"\nwrote {os.path.join(self.out_dir, CKPT_NAME)}, metrics.jsonl and loss.png in {self.out_dir}")
        if self.cfg.sample_tokens:
            print("\nsample:\n" + sample_text(self.raw_model, self.tokenizer, "\n", self.cfg.sample_tokens,
                                             temperature=0.8, top_k=20, seed=self.cfg.seed, device=self.device))


def weights_digest(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_metrics(path):
    records = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def sample_text(model, tokenizer, prompt, max_new_tokens, temperature=0.8, top_k=None, top_p=None, seed=None,
                device="cpu"):
    """Continue `prompt` by max_new_tokens sampled tokens; returns prompt + continuation as text."""
    ids = tokenizer.encode(prompt) or tokenizer.encode("\n")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return tokenizer.decode(out[0].tolist())


def main(argv=None):
    try:
        model_cfg, cfg, explicit = parse_args(argv, prog=PROG, description="Train a GPT with fastlm.")
        trainer = Trainer(model_cfg, cfg, explicit)
        code = trainer.train()
    except (ConfigError, ops.BackendUnavailable) as exc:
        fail(PROG, str(exc), code=2)
    except TrainingError as exc:
        fail(PROG, str(exc), code=1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
