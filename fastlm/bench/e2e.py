"""End-to-end training step: the fused path against the reference path on the same model.

Both paths build a Trainer from the same GPT config, batch and seed, so they start from the
same weights and see the same batches; only the backends differ:
  reference  attn_backend torch, ce_backend torch, fused_linear_ce off, optim_backend torch
  fused      every backend "auto", fused_linear_ce on (what `python -m fastlm.train` runs)
One training step is Trainer.train_step: forward, backward, clipping and the AdamW update.
Step time is the median over repeats after warm-up steps. Peak memory is how far one steady
step rises above the resident model, optimizer state and batch: on CPU the RSS high-water mark
in a fresh subprocess per case, on CUDA torch.cuda.max_memory_allocated. MFU (CUDA only) is
flops_per_token * tokens/s over the device's dense bf16 peak.
"""
import argparse
import contextlib
import gc
import os
import tempfile

import torch

from fastlm.bench.common import peak_memory_mb, save_figure, save_report, time_ms

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
COLUMNS = [("name", "config", ""), ("ref_ms", "ref step ms", ".1f"), ("fused_ms", "fused step ms", ".1f"),
           ("speedup", "speed-up", ".2f"), ("ref_tokens_per_s", "ref tok/s", ".0f"),
           ("fused_tokens_per_s", "fused tok/s", ".0f"), ("ref_peak_mb", "ref peak MB", ".0f"),
           ("fused_peak_mb", "fused peak MB", ".0f"), ("fused_mfu", "fused MFU", ".1%"),
           ("max_err", "loss rel diff", ".1e"), ("backend", "fused backends", ""), ("skipped", "skipped", "")]


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


def fused_backends(trainer):
    """What the fused path's "auto" resolved to, e.g. 'causal_attention sdpa, linear_cross_entropy cpp, adamw cpp'."""
    return ", ".join(f"{op} {name}" for op, name in trainer.backends.items())


# --------------------------------------------------------------------------------------------
# Peak memory of one steady training step
# --------------------------------------------------------------------------------------------

def setup_step(case, path, dtype, device_type):
    """Module-level (picklable) setup for peak_memory_mb: a trainer after one warm-up step.

    The warm-up step creates the optimizer state, so the measured step is a steady one.
    """
    tmp = tempfile.TemporaryDirectory()
    trainer = make_trainer(case, path, device_type, dtype, tmp.name)
    trainer.train_step()
    gc.collect()

    def step():
        trainer.train_step()
        return tmp  # keeps the out_dir alive as long as the step

    return step


@contextlib.contextmanager
def _freed_memory_returned_at_once():
    """Spawned children inherit this: glibc hands large freed blocks straight back to the OS, so
    the warm-up step leaves no cached memory the measured step could reuse unseen by VmHWM."""
    previous = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = previous


def step_peak_mb(case, path, device, dtype):
    """Peak memory one steady training step adds (a fresh subprocess on CPU)."""
    with _freed_memory_returned_at_once():
        return peak_memory_mb(setup_step, device=device, case=case, path=path, dtype=dtype,
                              device_type=device.type)


# --------------------------------------------------------------------------------------------
# One case, both paths
# --------------------------------------------------------------------------------------------

def measure_path(case, path, device, dtype):
    """{step_ms, first_loss, peak_mb, flops_per_token, params} of one path on one case."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(case, path, device, dtype, tmp)
        first_loss, _, _ = trainer.train_step()
        step_ms = time_ms(trainer.train_step, device=device, warmup=max(case["warmup"] - 1, 0),
                          repeats=case["repeats"])
        result = {"step_ms": step_ms, "first_loss": first_loss, "params": trainer.raw_model.num_params(),
                  "flops_per_token": trainer.raw_model.flops_per_token(), "backends": fused_backends(trainer)}
        del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    result["peak_mb"] = step_peak_mb(case, path, device, dtype)
    return result


def measure_case(case, device, dtype):
    """One summary row: both paths on `case`."""
    from fastlm.config import ConfigError
    from fastlm.metrics import peak_flops

    tokens = case["batch_size"] * case["block_size"]
    row = {"name": case["name"], "shape": [case["batch_size"], case["block_size"], case["d_model"],
                                           case["n_layer"], case["vocab_size"]],
           "backend": None, "dtype": dtype, "tokens_per_step": tokens,
           "ref_ms": None, "fused_ms": None, "speedup": None, "ref_peak_mb": None, "fused_peak_mb": None,
           "max_err": None, "ref_tokens_per_s": None, "fused_tokens_per_s": None, "ref_mfu": None,
           "fused_mfu": None, "skipped": None}
    try:
        ref = measure_path(case, "reference", device, dtype)
        fused = measure_path(case, "fused", device, dtype)
    except (ConfigError, RuntimeError, MemoryError) as exc:  # e.g. out of memory
        row["skipped"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"
        return row
    peak = peak_flops(device)
    row.update(backend=fused["backends"], ref_ms=ref["step_ms"], fused_ms=fused["step_ms"], speedup=ref["step_ms"] / fused["step_ms"],
               ref_peak_mb=ref["peak_mb"], fused_peak_mb=fused["peak_mb"],
               max_err=abs(fused["first_loss"] - ref["first_loss"]) / abs(ref["first_loss"]),
               ref_tokens_per_s=tokens / ref["step_ms"] * 1e3, fused_tokens_per_s=tokens / fused["step_ms"] * 1e3,
               params=ref["params"], flops_per_token=ref["flops_per_token"])
    if peak:
        row["ref_mfu"] = ref["flops_per_token"] * row["ref_tokens_per_s"] / peak
        row["fused_mfu"] = fused["flops_per_token"] * row["fused_tokens_per_s"] / peak
    return row


def run(quick=False, device="cpu", dtype=None, out_dir=None):
    """Both paths on every case; returns the rows (also saved as e2e.json and e2e.png)."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but CUDA is not available")
    dtype = dtype or ("bfloat16" if device.type == "cuda" else "float32")
    cases = CASES["quick"] if quick else CASES[device.type]
    rows = [measure_case(case, device, dtype) for case in cases]
    name = "e2e_quick" if quick else "e2e"
    save_report(name, rows, COLUMNS, device=device, out_dir=out_dir,
                extra={"paths": PATHS, "dtype": dtype, "cases": cases,
                       "max_err": "relative difference of the first step's loss, fused vs reference",
                       "peak_mb": "rise of one steady step over the resident model, optimizer state and batch"})
    _plot(rows, name, device, out_dir)
    return rows


def _plot(rows, name, device, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["fused_ms"] is not None]
    if not done:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = range(len(done))
    width = 0.38
    for ax, (ref_key, fused_key, label) in zip(axes, (("ref_tokens_per_s", "fused_tokens_per_s", "tokens/s"),
                                                      ("ref_peak_mb", "fused_peak_mb", "step peak memory (MiB)"))):
        ax.bar([i - width / 2 for i in x], [r[ref_key] for r in done], width, label="reference (torch)")
        ax.bar([i + width / 2 for i in x], [r[fused_key] for r in done], width, label="fused (auto)")
        ax.set_xticks(list(x), [r["name"] for r in done], fontsize=8)
        ax.set_ylabel(label)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"end-to-end training step, {done[0]['dtype']}, {torch.device(device).type}")
    save_figure(fig, name, device=device, out_dir=out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one tiny model, for a smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="autocast dtype; default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/<device slug>/")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, f"{parser.prog}: error: --device cuda but CUDA is not available\n")
    run(quick=args.quick, device=args.device, dtype=args.dtype, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
