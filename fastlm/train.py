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
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fastlm import ops
from fastlm.checkpoint import (CKPT_FORMAT, CKPT_NAME, check_same_data, checkpoint_files, fault_trace, load_checkpoint,
                               remove_checkpoints, resume_config, save_checkpoint)
from fastlm.checkpoint_sharded import (SHARDED_NAME, load_full, load_meta, load_sharded, save_sharded,
                                      sharded_to_resume)
from fastlm.config import ConfigError, fail, one_line_warnings, parse_args
from fastlm.data import BatchSampler, eval_batches, load_data, tokenizer_from_dict
from fastlm.distributed import any_rank, end_world, gather, init_world, resolve_device
from fastlm.eval import hellaswag_metrics, read_hellaswag
from fastlm.export import init_run
from fastlm.files import DirectoryLock, atomic_write_text, remove_stale_temporaries
from fastlm.loggers import LoggedMetrics, StepStats, make_loggers
from fastlm.metrics import TABLE_HEADER, MetricsLog, Throughput, eval_record, peak_flops, table_row
from fastlm.model import GPT, decay_groups
from fastlm.optim import AdamW
from fastlm.parallel import apply_activation_checkpointing, apply_fsdp, reshard
from fastlm.sample import sample_text

PROG = "python -m fastlm.train"


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, a full disk); nothing bad has been saved."""


class Interrupted(BaseException):
    """A second SIGINT/SIGTERM: leave at once, without writing (raised by the signal handler)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def get_lr(step, train_cfg):
    """Linear warm-up to lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < train_cfg.warmup_steps:
        return train_cfg.lr * (step + 1) / train_cfg.warmup_steps
    if step >= train_cfg.max_steps:
        return train_cfg.min_lr
    ratio = (step - train_cfg.warmup_steps) / max(1, train_cfg.max_steps - train_cfg.warmup_steps)
    return train_cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (train_cfg.lr - train_cfg.min_lr)


@dataclass
class PendingStep:
    """A finished step whose loss and grad norm are still device tensors (not read yet)."""

    step: int
    lr: float
    loss: torch.Tensor
    grad_norm: Optional[torch.Tensor]
    skipped: Optional[torch.Tensor]  # 1.0 where --skip_nonfinite_steps skipped the update


class Trainer:
    def __init__(self, run):
        self.world = init_world(run.train.device)
        self.device = resolve_device(run.train.device, self.world.local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # kernels launch on the run's GPU, whichever is current
        self.out_dir = run.train.out_dir
        self._lock, self._made_out_dir, self._made_lock_file = None, False, False
        try:
            self._setup(run)
        except BaseException:
            self.close(discard=True)
            raise

    def _setup(self, run):
        ckpt = self._prepare_out_dir(run.train)
        if ckpt is not None:
            run, changes = resume_config(run, ckpt, self.out_dir)
            if run.train.max_steps < int(ckpt["step"]):
                raise ConfigError(f"--max_steps {run.train.max_steps} is below step {ckpt['step']} of the checkpoint "
                                  f"in {self.out_dir}: nothing to train; pass a larger --max_steps to go on")
            if self.world.is_main and changes:
                print(f"fastlm: resuming with changes: {'; '.join(changes)}")
        init_state = init_tokenizer = None
        if run.train.init_from and ckpt is None:  # a resumed run has its own weights
            run, init_state, init_tokenizer = init_run(run, run.train.init_from)
        self.run, self.model_cfg, self.train_cfg = run, run.model, run.train
        train_cfg = run.train
        if train_cfg.dtype == "float16" and self.device.type != "cuda":
            raise ConfigError("dtype float16 needs a CUDA device (use bfloat16 on CPU)")
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"]) if ckpt is not None else init_tokenizer
        # A vocab_size left at its default is the tokenizer's (gpt2: 50257; a nanoGPT character vocabulary: its
        # size, not 256 rows that no token of the data ever uses).
        fit_vocab = ckpt is None and init_state is None and "vocab_size" not in run.explicit
        self.data = load_data(train_cfg.data, train_cfg.tokenizer, self.model_cfg.vocab_size,
                              self.model_cfg.block_size, tokenizer, tokenizer_file=train_cfg.tokenizer_file,
                              fit_vocab=fit_vocab)
        if fit_vocab:  # otherwise load_data has refused a tokenizer larger than vocab_size
            self.model_cfg.vocab_size = self.data.vocab_size
        self.tokenizer = self.data.tokenizer
        if ckpt is None and "tokenizer" in run.explicit and self.tokenizer.kind != train_cfg.tokenizer \
                and self.world.is_main:  # (a resumed run's tokenizer is checked against its checkpoint's)
            origin = train_cfg.init_from if init_tokenizer is not None else self.data.source
            print(f"fastlm: --tokenizer {train_cfg.tokenizer} ignored: {origin} comes with its own "
                  f"{self.tokenizer.kind} tokenizer, which the run uses", file=sys.stderr)
        if ckpt is not None:
            change = check_same_data(ckpt, self.data, train_cfg.override_resume_config)
            if change and self.world.is_main:
                print(f"fastlm: resuming with changes: {change}")

        compute_dtype = getattr(torch, train_cfg.dtype)
        torch.manual_seed(train_cfg.seed)  # the same initial weights on every rank
        self.model = GPT(self.model_cfg, dropout=train_cfg.dropout, kernels=run.kernels,
                         compute_dtype=compute_dtype).to(self.device)
        self.model.resolve_backends()  # built on the CPU: an explicit backend is checked on the run's device
        if init_state is not None:
            self.model.load_state_dict(init_state)
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
        self.peak_flops = peak_flops(self.device)  # the denominator of MFU, None if unknown
        self.scaler = torch.amp.GradScaler("cuda") if train_cfg.dtype == "float16" else None
        self.autocast = (torch.autocast(self.device.type, dtype=compute_dtype)
                         if train_cfg.dtype != "float32" else contextlib.nullcontext())
        # Every rank shares the seed and takes its own slice of each step's windows (disjoint draws).
        self.train_batches = BatchSampler(self.data.train, self.model_cfg.block_size, train_cfg.batch_size,
                                          seed=train_cfg.seed + 1, device=self.device, order=train_cfg.data_order,
                                          rank=self.world.rank, world_size=self.world.size)
        self.step = 0
        # The loop's running totals, part of the checkpoint so that a resumed run reports what an
        # uninterrupted one would: the train losses since the last eval, and the skipped steps.
        self.window_loss_sum, self.window_steps, self.skipped_steps = 0.0, 0, 0
        self._pending = []  # PendingStep of the steps since the values were last read
        self._saved_step = None  # the step of the newest checkpoint in out_dir
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
        self.metrics = LoggedMetrics(self.metrics, make_loggers(
            self.out_dir, train_cfg.tensorboard, train_cfg.wandb_project, run.as_dict(), enabled=self.world.is_main))
        self.stats = StepStats(train_cfg.grad_clip, self.device, warn=None if self.world.is_main else (lambda line: None))
        self.hellaswag = (read_hellaswag(train_cfg.hellaswag, train_cfg.hellaswag_limit or None)
                          if train_cfg.hellaswag else None)
        self._stop_signal = None

    def close(self, discard=False):
        """Release out_dir (the lock); the Trainer cannot train afterwards. discard: the run failed
        before it wrote anything (bad data, a bad flag): remove the lock file too, and out_dir when
        this run made them and out_dir is left empty, so that a refused run leaves nothing behind."""
        if getattr(self, "raw_model", None) is not None:
            self.model = self.raw_model  # the DDP and compile wrappers go first: see end_world
        if self._lock is None:
            return
        if discard and self._made_lock_file:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(self.out_dir, DirectoryLock.NAME))
        self._lock.release()
        self._lock = None
        if discard and self._made_out_dir:
            with contextlib.suppress(OSError):
                os.rmdir(self.out_dir)

    # ----------------------------------------------------------------- setup and checkpoints

    def _prepare_out_dir(self, train_cfg):
        """Check and lock out_dir before anything is written; return the checkpoint to resume, if any."""
        existing = checkpoint_files(self.out_dir)
        sharded = sharded_to_resume(self.out_dir)  # ckpt.dcp of an fsdp run, when newer than ckpt.pt
        if train_cfg.resume and not existing and sharded is None:
            raise ConfigError(f"--resume: no checkpoint in {self.out_dir}")
        if not train_cfg.resume and (existing or sharded is not None) and not train_cfg.overwrite:
            held = os.path.basename(existing[0]) if existing else SHARDED_NAME
            raise ConfigError(f"{self.out_dir} already holds a run ({held}); pass --resume "
                              "to continue it, --overwrite to replace it, or choose another --out_dir")
        self._lock_out_dir()
        if self.world.is_main:
            remove_stale_temporaries(self.out_dir)  # left by a writer killed mid-write; we hold the lock
        if not train_cfg.resume:
            return None
        if sharded is not None:
            return load_meta(sharded)
        return load_checkpoint(self.out_dir, warn=_warn if self.world.is_main else None)

    def _lock_out_dir(self):
        """Create out_dir and take its lock (rank 0 alone); every rank fails if that fails."""
        error = None
        if self.world.is_main:
            try:
                self._made_out_dir = not os.path.isdir(self.out_dir)
                os.makedirs(self.out_dir, exist_ok=True)
                self._made_lock_file = not os.path.exists(os.path.join(self.out_dir, DirectoryLock.NAME))
                lock = DirectoryLock(self.out_dir)
                if lock.acquire():
                    self._lock = lock
                else:
                    owner = lock.owner()
                    error = (f"{self.out_dir} is in use by another run{f' ({owner})' if owner else ''}; wait for it "
                             "to finish or choose another --out_dir")
            except OSError as exc:
                error = (f"out_dir {self.out_dir} is a file; give a directory" if os.path.isfile(self.out_dir)
                         else f"out_dir {self.out_dir} is not writable ({exc.strerror})")
        if any_rank(error is not None, self.world, self.device):
            raise ConfigError(error or f"rank 0 could not take out_dir {self.out_dir} (see its error)")

    def _rng_state(self):
        state = {"torch": torch.get_rng_state(), "sampler": self.train_batches.state_dict()}
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
        self.step = self._saved_step = int(ckpt["step"])
        loop = ckpt.get("loop") or {}
        self.window_loss_sum = float(loop.get("window_loss_sum", 0.0))
        self.window_steps = int(loop.get("window_steps", 0))
        self.skipped_steps = int(loop.get("skipped_steps", 0))
        states = ckpt["rng"]
        if len(states) != self.world.size and self.world.is_main:  # every rank meets it: rank 0 says it
            print(f"{PROG}: warning: checkpoint was written by {len(states)} process(es), resuming with "
                  f"{self.world.size}; batches and dropout will not match the original run exactly", file=sys.stderr)
        state = states[self.world.rank % len(states)]
        torch.set_rng_state(state["torch"])
        self.train_batches.load_state_dict(state["sampler"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def save_checkpoint(self):
        """Write a checkpoint of the current step (all ranks call this: it gathers their RNG states).

        Only checked weights are saved: the pending steps are read and checked for NaN/inf first.
        A failed write (full disk, unwritable directory) is a TrainingError on every rank, and
        leaves the previous checkpoint as it was.
        """
        if self._pending:
            self._read_pending()
        rng = gather(self._rng_state(), self.world)  # collective under DDP: every rank must call this
        error = None
        run = self.run.as_dict()
        meta = {"model_config": run["model"], "kernel_config": run["kernels"], "train_config": run["train"],
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "step": self.step, "rng": rng, "tokenizer": self.tokenizer.to_dict(),
                "data": {"source": self.data.source, "fingerprint": self.data.fingerprint},
                "loop": {"window_loss_sum": self.window_loss_sum, "window_steps": self.window_steps,
                         "skipped_steps": self.skipped_steps}}
        if self.fsdp:  # collective: every rank writes its shards into out_dir/ckpt.dcp
            fault_trace("save", self.step)
            try:
                save_sharded(os.path.join(self.out_dir, SHARDED_NAME), self.model, self.optimizer, meta)
            except OSError as exc:
                error = f"cannot write a checkpoint ({exc.strerror or exc}); {self._kept()}"
            fault_trace("saved", self.step)
        elif self.world.is_main:
            fault_trace("save", self.step)
            state = {"format": CKPT_FORMAT, **meta, "model": self.raw_model.state_dict(),
                     "optimizer": self.optimizer.state_dict()}
            try:
                save_checkpoint(state, self.out_dir, keep=self.train_cfg.keep_checkpoints)
            except OSError as exc:
                error = f"cannot write a checkpoint ({exc.strerror or exc}); {self._kept()}"
            fault_trace("saved", self.step)
        if any_rank(error is not None, self.world, self.device):
            raise TrainingError(error or "a rank could not write its checkpoint (see its error)")
        self._saved_step = self.step

    # ----------------------------------------------------------------- evaluation

    @torch.no_grad()
    def evaluate(self, splits=("train", "val")):
        """Mean loss over eval_iters batches of each split (the same batches at every eval)."""
        self.raw_model.eval()
        tokens_of = {"train": self.data.train, "val": self.data.val}
        result = {}
        for split in splits:
            batches = eval_batches(tokens_of[split], self.model_cfg.block_size, self.train_cfg.batch_size,
                                   self.train_cfg.eval_iters, self.device, self.world.rank, self.world.size)
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            for x, y in batches:
                with self.autocast:
                    _, loss = self.raw_model(x, y)
                total += loss.double()
            if self.world.distributed:
                dist.all_reduce(total)
            result[split] = total.item() / (self.train_cfg.eval_iters * self.world.size)
        if self.fsdp:
            reshard(self.raw_model)  # sharded again, as the optimizer and the checkpoint expect them
        self.raw_model.train()
        return result

    # ----------------------------------------------------------------- training

    def train_step(self):
        """One optimizer step, read at once (a host sync): returns (loss, grad norm or None, lr)
        as Python floats. For benchmarks and tests; the loop calls advance() and reads later."""
        self.advance()
        return self._read_pending()

    def _loss_scale(self, accum):
        """The factor each micro-batch's loss is multiplied by before backward: 1/accum (the mean
        over micro-batches) times the GradScaler's scale as it stands (a device tensor: no host
        sync); None when it is 1. The fused losses store their gradient already scaled by it, so it
        is rounded once, in the forward, and the backward's incoming gradient divided by it is 1."""
        scale = None
        if self.scaler is not None:
            # GradScaler keeps the scale on the device in _scale; before its first scale() call,
            # get_scale() returns the initial scale without touching the device.
            scale = self.scaler._scale if self.scaler._scale is not None else self.scaler.get_scale()
        if accum == 1:
            return scale
        return 1.0 / accum if scale is None else scale / accum

    def advance(self):
        """One optimizer step over grad_accum_steps micro-batches.

        Nothing here waits for the device: the loss and grad norm stay device tensors, queued as
        a PendingStep until the loop reads them (_read_pending) at a log, eval or checkpoint step.
        With --skip_nonfinite_steps, a NaN/inf loss or grad norm (agreed across ranks) reaches the
        optimizer as its found_inf flag, which skips the whole update on the device.
        """
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
                _, loss = self.model(x, y, grad_scale=self._loss_scale(accum))
                loss = loss / accum
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            loss_sum += loss.detach()
        skipped = self._nonfinite_flag(loss_sum) if self.train_cfg.skip_nonfinite_steps else None
        if self.scaler is not None:
            norm = self.scaler.step(self.optimizer)  # the scaler skips non-finite grads itself
            self.scaler.update()
        else:
            if skipped is not None:
                self.optimizer.found_inf = skipped  # as GradScaler hands it over: nonzero skips the update
            try:
                norm = self.optimizer.step()
            finally:
                self.optimizer.found_inf = None
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._pending.append(PendingStep(self.step, lr, loss_sum, norm, skipped))

    def _nonfinite_flag(self, loss_sum):
        """1.0 (a device scalar) when this step's loss or gradients hold a NaN/inf on any rank."""
        bad = ~torch.isfinite(loss_sum)
        if self.scaler is None:  # with a scaler, inf grads are routine and the scaler skips them
            grads = [p.grad for p in self.raw_model.parameters() if p.grad is not None]
            bad = bad | ~torch.isfinite(torch.nn.utils.get_total_norm(grads))
        flag = bad.float()
        if self.world.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag

    def _read_pending(self):
        """Read the queued steps' values (one host sync), check them, and fold them into the
        eval window. Returns the last step's (loss, grad norm, lr); raises TrainingError at the first
        non-finite step that was not skipped, or when more steps were skipped than allowed."""
        pending, self._pending = self._pending, []
        columns = [torch.stack([p.loss.float() for p in pending])]
        has_norm = pending[0].grad_norm is not None
        if has_norm:
            columns.append(torch.stack([p.grad_norm.float().to(self.device) for p in pending]))
        has_skip = pending[0].skipped is not None
        if has_skip:
            columns.append(torch.stack([p.skipped for p in pending]))
        rows = list(zip(*torch.stack(columns).tolist()))  # the sync
        cfg, loss, norm = self.train_cfg, None, None
        for item, row in zip(pending, rows):
            loss = row[0]
            norm = row[1] if has_norm else None
            bad = None
            if not math.isfinite(loss):
                bad = f"loss became {loss}"
            elif norm is not None and self.scaler is None and not math.isfinite(norm):
                bad = f"grad norm became {norm}"
            if has_skip and row[-1]:
                self.skipped_steps += 1
                if self.skipped_steps > cfg.skip_nonfinite_steps:
                    raise TrainingError(f"{bad or 'a non-finite value on another rank'} at step {item.step}, "
                                        f"more than --skip_nonfinite_steps {cfg.skip_nonfinite_steps} bad steps; "
                                        f"stopping without saving ({self._kept()})")
                if self.world.is_main:
                    _warn(f"{bad or 'a non-finite value on another rank'} at step {item.step}: update skipped "
                          f"({self.skipped_steps} of at most {cfg.skip_nonfinite_steps})")
                continue
            if bad:
                raise TrainingError(f"{bad} at step {item.step}; stopping without saving ({self._kept()}). "
                                    "Try a lower --lr, or --skip_nonfinite_steps N")
            self.window_loss_sum += loss
            self.window_steps += 1
            self.stats.observe(item.step, loss, norm)
        return loss, norm, pending[-1].lr

    def _kept(self):
        if self._saved_step is None:
            return f"no checkpoint written in {self.out_dir} yet"
        return f"the last good checkpoint in {self.out_dir}, step {self._saved_step}, is kept"

    def train(self):
        """Train to max_steps (or a signal); returns the process exit code.

        The loop reads the device (one host sync) only at log, eval and checkpoint steps, or every
        step with --check_every_step: that is where losses are logged, NaN/inf is caught and,
        under torchrun, the ranks agree to stop on a signal. A single process stops right after
        the step in flight; under torchrun, at the next of those steps.
        """
        cfg = self.train_cfg
        tokens_per_step = cfg.batch_size * self.model_cfg.block_size * cfg.grad_accum_steps * self.world.size
        if self.world.is_main:
            if cfg.overwrite:  # only now that every setting and the data passed: a refused run replaces nothing
                remove_checkpoints(self.out_dir)
                shutil.rmtree(os.path.join(self.out_dir, SHARDED_NAME), ignore_errors=True)
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
        throughput = Throughput(tokens_per_step)
        try:
            if self.step == 0:  # a resumed run already evaluated at its checkpoint's step
                with throughput.excluded():
                    self._eval_and_report(bar, throughput.tokens_per_s, started)
            while self.step < cfg.max_steps:
                fault_trace("step", self.step)
                if (self.step + 1) % cfg.eval_interval == 0 or self.step + 1 == cfg.max_steps:
                    self.stats.snapshot(self.raw_model)  # for the update/weight ratios of the eval record
                self.advance()
                throughput.count_step()
                bar.update(1)
                at_log = self.step % cfg.log_interval == 0 or self.step == cfg.max_steps
                at_eval = self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps
                at_ckpt = bool(cfg.ckpt_interval) and self.step % cfg.ckpt_interval == 0 and self.step < cfg.max_steps
                signalled_alone = self._stop_signal is not None and not self.world.distributed
                stop = False
                if at_log or at_eval or at_ckpt or cfg.check_every_step or signalled_alone:
                    loss, norm, lr = self._read_pending()
                    if at_log:
                        self._log_train(loss, norm, lr, throughput.measure(), time.perf_counter() - started, bar)
                    stop = self._should_stop()
                if at_eval:  # the device was just read, so an eval between log steps measures its own window
                    tokens_per_s = throughput.tokens_per_s if at_log else throughput.measure()
                    with throughput.excluded():
                        self._eval_and_report(bar, tokens_per_s, started)
                if at_ckpt:
                    with throughput.excluded():
                        self.save_checkpoint()
                if stop:
                    break
            if self._saved_step != self.step:
                self.save_checkpoint()  # a second signal during this write leaves the previous checkpoint
        finally:
            bar.close()
            for s, handler in previous_handlers.items():
                signal.signal(s, handler)
        if self._stop_signal is None:
            self._finish(started)
        elif self.world.is_main:
            print(f"{PROG}: stopped by signal {self._stop_signal} at step {self.step}; checkpoint saved in "
                  f"{self.out_dir} (continue with --resume)", file=sys.stderr)
        if self.world.distributed:
            dist.barrier()  # no rank tears the process group down while another is still using it
        return 0 if self._stop_signal is None else 128 + self._stop_signal

    def _on_signal(self, signum, frame):
        if self._stop_signal is not None:  # the second one: leave now, whatever is in flight
            raise Interrupted(signum)
        self._stop_signal = signum

    def _should_stop(self):
        """Whether any rank got a signal (an all-reduce under torchrun: call at the agreed steps only)."""
        return any_rank(self._stop_signal is not None, self.world, self.device)

    # ----------------------------------------------------------------- reporting

    def _config_json(self):
        settings = self.run.as_dict()
        # --resume, --overwrite and --override_resume_config act on this invocation's out_dir, they
        # are no settings of the run: recorded true, `--config out/config.json --out_dir out2` would
        # resume out2, or replace the run out2 holds without being asked to.
        settings["train"].update(resume=False, overwrite=False, override_resume_config=False)
        return json.dumps({**settings, "backends": self.backends}, indent=2) + "\n"

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

    def _log_train(self, loss, norm, lr, tokens_per_s, elapsed, bar):
        """The metrics.jsonl record of a log step, and the progress bar's values (the last logged)."""
        finite = math.isfinite(loss)  # not, only on a step --skip_nonfinite_steps skipped
        record = {"type": "train", "step": self.step, "loss": loss if finite else None, "lr": lr,
                  "grad_norm": norm if norm is None or math.isfinite(norm) else None,
                  "tokens_per_s": tokens_per_s, "elapsed_s": elapsed}
        if self.peak_flops:
            record["mfu"] = self.raw_model.flops_per_token() * tokens_per_s / self.peak_flops
        if self.train_cfg.skip_nonfinite_steps:
            record["skipped_steps"] = self.skipped_steps
        record.update(self.stats.record_extras())
        self.metrics.log(record)
        if finite:
            bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {tokens_per_s / 1e3:.1f}k tok/s", refresh=False)

    def _eval_and_report(self, bar, tokens_per_s, started):
        """Evaluate val loss (and, with --eval_train_split, train loss) and print a table row.

        Without --eval_train_split the train column is the mean training-batch loss since the
        previous eval, which costs nothing; the val loss is always measured in eval mode.
        """
        fault_trace("eval", self.step)
        losses = self.evaluate(("train", "val") if self.train_cfg.eval_train_split else ("val",))
        if "train" not in losses:
            losses["train"] = self.window_loss_sum / self.window_steps if self.window_steps else None
        self.window_loss_sum, self.window_steps = 0.0, 0
        record = eval_record(self.step, losses, get_lr(max(self.step - 1, 0), self.train_cfg))
        record["update_ratio"] = self.stats.update_ratios(self.raw_model)
        if self.hellaswag is not None and self.world.is_main:
            record.update(hellaswag_metrics(self.raw_model, self.tokenizer, self.hellaswag))
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
        kept = len(checkpoint_files(self.out_dir))
        saved = SHARDED_NAME if self.fsdp else CKPT_NAME + (f" (the newest of {kept} kept)" if kept > 1 else "")
        print(f"\nwrote {saved}, metrics.jsonl and loss.png in {self.out_dir}")
        if self.train_cfg.sample_tokens and self.fsdp:  # generate would need every rank's shards
            print(f"\nsample: skipped under --parallel fsdp; python -m fastlm.consolidate {self.out_dir}, "
                  "then python -m fastlm.sample")
        elif self.train_cfg.sample_tokens:
            try:
                print("\nsample:\n" + sample_text(self.raw_model, self.tokenizer, "\n", self.train_cfg.sample_tokens,
                                                 temperature=0.8, top_k=20, seed=self.train_cfg.seed,
                                                 device=self.device))
            except ValueError as exc:  # NaN/inf logits, e.g. after --skip_nonfinite_steps skipped every step
                _warn(f"no sample: {exc}")


def weights_digest(model):
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _warn(message):
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _out_of_memory(exc):
    """Whether `exc` is an allocation that failed: CUDA's OutOfMemoryError or the CPU allocator's."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "DefaultCPUAllocator" in str(exc)


def _out_of_memory_message(exc, trainer):
    """One line for a run that ran out of memory: where, what torch said, and what to change."""
    said = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    said = said.split("DefaultCPUAllocator: ", 1)[-1].split(". GPU ", 1)[0]  # the allocation, not torch's details
    if trainer is None:
        return f"out of memory building the model: {said}; choose a smaller model (--d_model, --n_layer, --vocab_size)"
    kept = "" if trainer._saved_step is None else f"; the checkpoint of step {trainer._saved_step} is kept"
    return (f"out of memory at step {trainer.step} on {trainer.device}: {said}{kept}; lower --batch_size "
            "(--grad_accum_steps keeps the tokens per step), use --activation_checkpointing full, or choose a "
            "smaller model")


def main(argv=None):
    code, run, trainer = 2, None, None
    try:
        run = parse_args(argv, prog=PROG, description="Train a GPT with fastlm.")
        trainer = Trainer(run)
        code = trainer.train()
    except (ConfigError, ops.BackendUnavailable) as exc:
        # Without a run, the error is the command line's or the config file's: under torchrun every
        # rank meets it, and rank 0 alone says so. Later errors may be one rank's own (its device).
        fail(PROG, str(exc), code=2, same_on_every_rank=run is None)
    except TrainingError as exc:
        fail(PROG, str(exc), code=1)
    except OSError as exc:  # e.g. a full disk while writing metrics: one line, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        fail(PROG, f"cannot write{where}: {exc.strerror or exc}", code=1)
    except RuntimeError as exc:
        if not _out_of_memory(exc):
            raise
        fail(PROG, _out_of_memory_message(exc, trainer), code=1)
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        saved = f" (step {trainer._saved_step})" if trainer is not None and trainer._saved_step is not None else ""
        print(f"{PROG}: interrupted by signal {signum}: exiting at once; the last good checkpoint{saved} is kept",
              file=sys.stderr)
        code = 128 + signum
    finally:
        if trainer is not None:
            trainer.close()
        end_world()
    return code


if __name__ == "__main__":
    one_line_warnings(PROG)  # the command line only: main() called in-process leaves warnings as they are
    sys.exit(main())
