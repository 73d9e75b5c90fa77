"""The Trainer and `python -m fastlm.train`.

One process trains on one device; under `torchrun` every process is a DistributedDataParallel
rank drawing its own batches, and rank 0 alone logs and saves. Checkpoints (fastlm.checkpoint),
metrics and plots (fastlm.metrics) and the device and ranks (fastlm.distributed) live in their
own modules: this file is the loop and the command line.
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
from fastlm.checkpoint import CKPT_FORMAT, CKPT_NAME, load_checkpoint, resume_config, save_checkpoint
from fastlm.checkpoint_sharded import (SHARDED_NAME, load_full, load_meta, load_sharded, save_sharded,
                                      sharded_to_resume)
from fastlm.config import ConfigError, fail, parse_args
from fastlm.data import BatchSampler, load_data, tokenizer_from_dict
from fastlm.distributed import any_rank, gather, init_world, resolve_device
from fastlm.files import atomic_write_text
from fastlm.metrics import TABLE_HEADER, MetricsLog, eval_record, peak_flops, table_row
from fastlm.model import GPT, decay_groups
from fastlm.optim import AdamW
from fastlm.parallel import apply_activation_checkpointing, apply_fsdp
from fastlm.sample import sample_text

PROG = "python -m fastlm.train"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. the loss became NaN); nothing bad has been saved."""


def get_lr(step, train_cfg):
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    if step >= train_cfg.max_steps:
        return train_cfg.min_lr
    ratio = (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps)
    return train_cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train_cfg.lr - train_cfg.min_lr)


class Trainer:
    def __init__(self, run):
        train_cfg = run.train
        self.world = init_world(train_cfg.device)
        self.device = resolve_device(train_cfg.device, self.world.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # kernels launch on the run's GPU, whichever is current
        self.out_dir = train_cfg.out_dir
        ckpt = self._prepare_out_dir(train_cfg)
        if ckpt is not None:
            run, changes = resume_config(run, ckpt, self.out_dir)
            if self.world.is_main and changes:
                print(f"fastlm: resuming with changes: {'; '.join(changes)}")
        self.run, self.model_cfg, self.train_cfg = run, run.model, run.train
        train_cfg = run.train
        if train_cfg.dtype == "float16" and self.device.type != "cuda":
            raise ConfigError("dtype float16 needs a CUDA device (use bfloat16 on CPU)")
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt is not None else None
        self.data = load_data(train_cfg.data, train_cfg.tokenizer, self.model_cfg.vocab_size,
                              self.model_cfg.block_size, tokenizer)
        self.tokenizer = self.data.tokenizer

        compute_dtype = getattr(torch, train_cfg.dtype)
        torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
        self.model = GPT(self.model_cfg, dropout=train_cfg.dropout, kernels=run.kernels,
                         compute_dtype=compute_dtype).to(self.device)
        self.fsdp = train_cfg.parallel == "fsdp"
        apply_activation_checkpointing(self.model, train_cfg.activation_checkpointing)
        if self.fsdp:  # before the optimizer, which must see the sharded (DTensor) parameters
            apply_fsdp(self.model, self.device, param_dtype=compute_dtype,
                       reshard_after_forward=train_cfg.reshard_after_forward)
        if self.world.rank:
            torch.manual_seed(train_cfg.seed + self.world.rank)  # each rank its own dropout masks
        self.optimizer = AdamW(decay_groups(self.model, train_cfg.weight_decay), lr=train_cfg.lr,
                               betas=(train_cfg.beta1, train_cfg.beta2), eps=1e-8,
                               max_grad_norm=train_cfg.grad_clip or None, backend=run.kernels.optim_backend)
        self.backends = {**self.model.backends, "adamw": self.optimizer._backend_for(self.device)}
        self.scaler = torch.amp.GradScaler("cuda") if train_cfg.dtype == "float16" else None
        self.autocast = (torch.autocast(self.device.type, dtype=compute_dtype)
                         if train_cfg.dtype != "float32" else contextlib.nullcontext())
        # Each rank draws its own windows: the sampler seed depends on the rank.
        self.train_batches = BatchSampler(self.data.train, self.model_cfg.block_size, train_cfg.batch_size,
                                          seed=train_cfg.seed + 1 + self.world.rank, device=self.device)
        self.step = 0
        if ckpt is not None:
            self._restore(ckpt)
        self.raw_model = self.model
        if self.world.distributed and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=device_ids)
        if train_cfg.compile:
            self.model = torch.compile(self.model)
        self.metrics = MetricsLog(self.out_dir, enabled=self.world.is_main)
        self._stop_signal = None

    # ----------------------------------------------------------------- setup and checkpoints

    def _prepare_out_dir(self, train_cfg):
        """Check out_dir before anything is written; return the checkpoint to resume, if any."""
        path = os.path.join(self.out_dir, CKPT_NAME)
        sharded = sharded_to_resume(self.out_dir)  # ckpt.dcp of an fsdp run, when newer than ckpt.pt
        if train_cfg.resume and sharded is not None:
            return load_meta(sharded)
        if train_cfg.resume:
            if not os.path.isfile(path):
                raise ConfigError(f"--resume: no checkpoint at {path}")
            ckpt = load_checkpoint(path)
        else:
            if (os.path.exists(path) or sharded is not None) and not train_cfg.overwrite:
                raise ConfigError(f"{self.out_dir} already holds a run ({CKPT_NAME}); pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out_dir")
            ckpt = None
        if self.world.is_main:
            try:
                os.makedirs(self.out_dir, exist_ok=True)
                probe = os.path.join(self.out_dir, f".write-test-{os.getpid()}")
                with open(probe, "w"):
                    pass
                os.remove(probe)
            except OSError as exc:
                raise ConfigError(f"out_dir {self.out_dir} is not writable ({exc.strerror})") from None
        return ckpt

    def _rng_state(self):
        state = {"torch": torch.get_rng_state(), "sampler": self.train_batches.state_dict()["generator"]}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore(self, ckpt):
        if ckpt.get("sharded"):  # any number of ranks, FSDP or not: DCP reshards
            load_sharded(ckpt["path"], self.model, self.optimizer)
        elif self.fsdp:  # a DDP or one-process run goes on sharded: each rank keeps its part
            load_full(self.model, self.optimizer, ckpt)
        else:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        states = ckpt["rng"]
        if len(states) != self.world.size:
            print(f"{PROG}: warning: checkpoint was written by {len(states)} process(es), resuming with "
                  f"{self.world.size}; batches and dropout will not match the original run exactly", file=sys.stderr)
        state = states[self.world.rank % len(states)]
        torch.set_rng_state(state["torch"])
        self.train_batches.load_state_dict({"generator": state["sampler"]})
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def save_checkpoint(self):
        rng = gather(self._rng_state(), self.world)  # collective under DDP: every rank must call this
        run = self.run.as_dict()
        if self.fsdp:  # collective: every rank writes its shards into out_dir/ckpt.dcp
            save_sharded(os.path.join(self.out_dir, SHARDED_NAME), self.model, self.optimizer, {
                "model_config": run["model"], "kernel_config": run["kernels"], "train_config": run["train"],
                "scaler": None, "step": self.step, "rng": rng, "tokenizer": self.tokenizer.to_dict()})
            return
        if not self.world.is_main:
            return
        save_checkpoint({
            "format": CKPT_FORMAT,
            "model_config": run["model"], "kernel_config": run["kernels"], "train_config": run["train"],
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "rng": rng,
            "tokenizer": self.tokenizer.to_dict(),
        }, os.path.join(self.out_dir, CKPT_NAME))

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, splits=("train", "val")):
        """Mean loss over eval_iters batches of each split (the same batches at every eval)."""
        self.raw_model.eval()
        tokens_of = {"train": self.data.train, "val": self.data.val}
        result = {}
        for split in splits:
            batches = BatchSampler(tokens_of[split], self.model_cfg.block_size, self.train_cfg.batch_size,
                                   seed=self.train_cfg.seed + 10_000 + self.world.rank, device=self.device)
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for _ in range(self.train_cfg.eval_iters):
                x, y = batches.next()
                with self.autocast:
                    _, loss = self.raw_model(x, y)
                total += loss.double()
            if self.world.distributed:
                dist.all_reduce(total)
            result[split] = total.item() / (self.train_cfg.eval_iters * self.world.size)
        self.raw_model.train()
        return result

    # ----------------------------------------------------------------- training

    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches; returns (loss, grad norm, lr)."""
        accum = self.train_cfg.grad_accum_steps
        lr = get_lr(self.step, self.train_cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.train_batches.next()
            # Under DDP, gradients are all-reduced only in the last micro-batch's backward.
            skip_sync = self.world.distributed and micro < accum - 1
            if self.fsdp:  # FSDP reduce-scatters in every backward unless told not to
                self.raw_model.set_requires_gradient_sync(not skip_sync)
                skip_sync = False
            with self.model.no_sync() if skip_sync else contextlib.nullcontext(), self.autocast:
                _, loss = self.model(x, y)
                loss = loss / accum
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
        """Train to max_steps (or a signal); returns the process exit code."""
        cfg = self.train_cfg
        tokens_per_step = cfg.batch_size * self.model_cfg.block_size * cfg.grad_accum_steps * self.world.size
        flops_per_token, peak = self.raw_model.flops_per_token(), peak_flops(self.device)
        if self.world.is_main:
            atomic_write_text(os.path.join(self.out_dir, "config.json"), self._config_json())
            atomic_write_text(os.path.join(self.out_dir, "tokenizer.json"),
                              json.dumps(self.tokenizer.to_dict()) + "\n")
            self.metrics.start(resumed_step=self.step if cfg.resume else None)
            self._print_header(tokens_per_step)
        previous_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=not (self.world.is_main and cfg.progress), file=sys.stderr)
        started = time.perf_counter()
        self._window_losses = []
        window_start, window_steps, tokens_per_s = time.perf_counter(), 0, 0.0
        try:
            if self.step == 0:  # a resumed run already evaluated at its checkpoint's step
                self._eval_and_report(bar, tokens_per_s, started)
            while self.step < cfg.max_steps:
                loss, norm, lr = self.train_step()
                self._window_losses.append(loss)
                window_steps += 1
                now = time.perf_counter()
                if now > window_start:
                    tokens_per_s = window_steps * tokens_per_step / (now - window_start)
                bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s / 1e3:.1f}k tok/s", refresh=False)
                bar.update(1)
                if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                    record = {"type": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": norm,
                              "tokens_per_s": tokens_per_s, "elapsed_s": now - started}
                    if peak:
                        record["mfu"] = flops_per_token * tokens_per_s / peak
                    self.metrics.log(record)
                    window_start, window_steps = time.perf_counter(), 0
                if self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps:
                    self._eval_and_report(bar, tokens_per_s, started)
                if cfg.ckpt_interval and self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
                if self._should_stop():
                    break
        finally:
            bar.close()
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
        self.save_checkpoint()
        if self._stop_signal is None:
            self._finish(started)
        elif self.world.is_main:
            print(f"{PROG}: stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved in "
                  f"{self.out_dir} (continue with --resume)", file=sys.stderr)
        if self.world.distributed:
            dist.barrier()  # no rank tears the process group down while another is still using it
        return 0 if self._stop_signal is None else 128 + self._stop_signal

    def _on_signal(self, signum, frame):
        self._stop_signal = signum

    def _should_stop(self):
        return any_rank(self._stop_signal is not None, self.world, self.device)

    # ----------------------------------------------------------------- reporting

    def _config_json(self):
        return json.dumps({**self.run.as_dict(), "backends": self.backends}, indent=2) + "\n"

    def _print_header(self, tokens_per_step):
        n = self.raw_model.num_params()
        backends = ", ".join(f"{op} {name}" for op, name in self.backends.items())
        print(f"fastlm: {n / 1e6:.2f}M parameters, {self.data.tokenizer.kind} tokenizer (vocab {self.data.vocab_size}), "
              f"data {self.data.source}: {len(self.data.train):,} train / {len(self.data.val):,} val tokens")
        print(f"fastlm: device {self.device}, dtype {self.train_cfg.dtype}, world size {self.world.size}, "
              f"{tokens_per_step:,} tokens/step, steps {self.step} -> {self.train_cfg.max_steps}, "
              f"out_dir {self.out_dir}")
        print(f"fastlm: backends: {backends}")
        print(TABLE_HEADER)

    def _eval_and_report(self, bar, tokens_per_s, started):
        """Evaluate val loss (and, with --eval_train_split, train loss) and print a table row.

        Without --eval_train_split the train column is the mean training-batch loss since the
        previous eval, which costs nothing; the val loss is always measured in eval mode.
        """
        losses = self.evaluate(("train", "val") if self.train_cfg.eval_train_split else ("val",))
        if "train" not in losses:
            window = self._window_losses
            losses["train"] = sum(window) / len(window) if window else None
        self._window_losses = []
        record = eval_record(self.step, losses, get_lr(max(self.step - 1, 0), self.train_cfg))
        self.metrics.log(record)
        if self.world.is_main:
            bar.write(table_row(record, tokens_per_s, time.perf_counter() - started), file=sys.stdout)
            sys.stdout.flush()

    def _finish(self, started):
        final = {"type": "final", "step": self.step, "elapsed_s": time.perf_counter() - started,
                 "world_size": self.world.size}
        if self.world.distributed and not self.fsdp:  # FSDP ranks hold different shards by design
            digests = gather(weights_digest(self.raw_model), self.world)
            final["ranks_identical"] = len(set(digests)) == 1
            if not final["ranks_identical"]:
                print(f"{PROG}: warning: ranks ended with different weights: {digests}", file=sys.stderr)
        self.metrics.log(final)
        if not self.world.is_main:
            return
        print()
        print(self.metrics.finish(self.train_cfg.eval_train_split))
        print(f"\nwrote {os.path.join(self.out_dir, SHARDED_NAME if self.fsdp else CKPT_NAME)}, metrics.jsonl and "
              f"loss.png in {self.out_dir}")
        if self.train_cfg.sample_tokens and self.fsdp:  # generate would need every rank's shards
            print(f"\nsample: skipped under --parallel fsdp; python -m fastlm.consolidate {self.out_dir}, "
                  "then python -m fastlm.sample")
        elif self.train_cfg.sample_tokens:
            print("\nsample:\n" + sample_text(self.raw_model, self.tokenizer, "\n", self.train_cfg.sample_tokens,
                                             temperature=0.8, top_k=20, seed=self.train_cfg.seed,
                                             device=self.device))


def weights_digest(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def main(argv=None):
    code = 2
    try:
        run = parse_args(argv, prog=PROG, description="Train a GPT with fastlm.")
        code = Trainer(run).train()
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
