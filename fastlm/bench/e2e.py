"""End-to-end training step: the fused path against the reference path on the same model.

Both paths build a Trainer from the same GPT config, batch and seed, so they start from the
same weights and see the same batches; only the backends differ:
  reference  attn_backend torch, ce_backend torch, fused_linear_ce off, optim_backend torch
  fused      every backend "auto", fused_linear_ce on (what `python -m fastlm.train` runs);
             extra backends says what auto resolved to (Trainer.backends)
One training step is Trainer.train_step: forward, backward, clipping and the AdamW update.
Step time is the median over repeats after warm-up steps. Peak memory is how far one steady
step rises above the resident model, optimizer state and batch: on CPU the RSS high-water mark
in a fresh subprocess per case, on CUDA torch.cuda.max_memory_allocated. max_err: relative
difference of the first step's loss. extra: tokens/s of both paths and (CUDA only) MFU,
flops_per_token * tokens/s over the device's dense bf16 peak (fastlm.metrics.peak_flops).
"""
import gc
import os
import tempfile
from unittest import mock

import torch

from fastlm.bench.common import Row, peak_memory_mb, time_ms

DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
PATHS = {
    "reference": {"attn_backend": "torch", "ce_backend": "torch", "fused_linear_ce": False, "optim_backend": "torch"},
    "fused": {"attn_backend": "auto", "ce_backend": "auto", "fused_linear_ce": True, "optim_backend": "auto"},
}
MODEL_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "d_model")
# The default training config, and one with GPT-2's width and vocabulary (depth and batch cut
# so that a CPU run takes about a minute).
CASES = {
    "cpu": [
        dict(name="default d128 L4", vocab_size=256, block_size=128, n_layer=4, n_head=4, d_model=128, batch_size=32,
             warmup=2, repeats=5),
        dict(name="gpt2-width d768 L2 V50257", vocab_size=50257, block_size=128, n_layer=2, n_head=12, d_model=768,
             batch_size=4, warmup=1, repeats=3),
    ],
    "cuda": [
        dict(name="default d128 L4", vocab_size=256, block_size=128, n_layer=4, n_head=4, d_model=128, batch_size=32,
             warmup=5, repeats=20),
        dict(name="gpt2-small d768 L12 V50257", vocab_size=50257, block_size=1024, n_layer=12, n_head=12,
             d_model=768, batch_size=8, warmup=3, repeats=10),
    ],
    # One tiny model, with GPT-2's vocabulary so that the fused loss's memory saving shows.
    "quick": [
        dict(name="tiny d64 L2 V50257", vocab_size=50257, block_size=32, n_layer=2, n_head=2, d_model=64,
             batch_size=4, warmup=1, repeats=3),
    ],
}


def make_trainer(case, path, device, dtype, out_dir, *, seed=1337, dropout=None, lr=3e-4, warmup_steps=10,
                 max_steps=10**6):
    """A Trainer for `case` (a CASES entry) on the reference or fused `path`, quiet and seeded."""
    from fastlm.config import GPTConfig, KernelConfig, RunConfig, TrainConfig
    from fastlm.train import Trainer

    model_cfg = GPTConfig(**{k: case[k] for k in MODEL_KEYS if k in case})
    train_cfg = TrainConfig(batch_size=case["batch_size"], max_steps=max_steps, lr=lr, warmup_steps=warmup_steps,
                            device=str(device), dtype=dtype, out_dir=out_dir, seed=seed, progress=False,
                            sample_tokens=0, overwrite=True, **({} if dropout is None else {"dropout": dropout}))
    return Trainer(RunConfig(model_cfg, KernelConfig(**PATHS[path]), train_cfg).validate())


def resolved_backends(trainer):
    """What the trainer's "auto" resolved to, e.g. 'causal_attention sdpa, linear_cross_entropy cpp, adamw cpp'."""
    return ", ".join(f"{op} {name}" for op, name in trainer.backends.items())


def setup_step(case, path, dtype, on):
    """Module-level (picklable) setup for peak_memory_mb: a trainer after one warm-up step,
    which creates the optimizer state, so that the measured step is a steady one."""
    tmp = tempfile.TemporaryDirectory()
    trainer = make_trainer(case, path, on, dtype, tmp.name)
    trainer.train_step()
    gc.collect()

    def step():
        trainer.train_step()
        return tmp  # keeps the out_dir alive as long as the step
    return step


def measure_path(case, path, device, dtype):
    """{step_ms, first_loss, peak_mb, flops_per_token, params, backends} of one path on one case."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(case, path, device, dtype, tmp)
        first_loss, _, _ = trainer.train_step()
        step_ms = time_ms(trainer.train_step, device=device, warmup=max(case["warmup"] - 1, 0),
                          repeats=case["repeats"])
        result = {"step_ms": step_ms, "first_loss": first_loss, "params": trainer.raw_model.num_params(),
                  "flops_per_token": trainer.raw_model.flops_per_token(), "backends": resolved_backends(trainer)}
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    # The spawned child inherits this: glibc hands large freed blocks straight back to the OS, so
    # the warm-up step leaves no cached memory the measured step could reuse unseen by VmHWM.
    with mock.patch.dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"):
        result["peak_mb"] = peak_memory_mb(setup_step, device=device, case=case, path=path, dtype=dtype,
                                           on=str(device))
    return result


def measure_case(case, device, dtype):
    """One row: both paths on `case`."""
    from fastlm.config import ConfigError
    from fastlm.metrics import peak_flops

    row = Row("e2e", case["name"], "auto")
    try:
        ref = measure_path(case, "reference", device, dtype)
        fused = measure_path(case, "fused", device, dtype)
    except (ConfigError, RuntimeError, MemoryError) as exc:  # e.g. out of memory
        row.skipped = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        return row
    tokens = case["batch_size"] * case["block_size"]
    row.ref_ms, row.fused_ms = ref["step_ms"], fused["step_ms"]
    row.ref_peak_mb, row.fused_peak_mb = ref["peak_mb"], fused["peak_mb"]
    row.max_err = abs(fused["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"])
    ref_tps, fused_tps, peak = tokens / ref["step_ms"] * 1e3, tokens / fused["step_ms"] * 1e3, peak_flops(device)
    row.extra = {"ref_tokens_per_s": ref_tps, "fused_tokens_per_s": fused_tps,
                 "ref_mfu": ref["flops_per_token"] * ref_tps / peak if peak else None,
                 "fused_mfu": fused["flops_per_token"] * fused_tps / peak if peak else None,
                 "backends": fused["backends"], "tokens_per_step": tokens, "params": ref["params"],
                 "flops_per_token": ref["flops_per_token"]}
    return row


def run(quick, device, dtype):
    device = torch.device(device)
    return [measure_case(case, device, dtype) for case in CASES["quick" if quick else device.type]]
