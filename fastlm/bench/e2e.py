"""End-to-end training step: fastlm's fused path against the best plain-PyTorch setup.

Both paths build the same GPT (same config, seed, weights and batch) and run the same lean step:
forward under autocast, backward, clip the gradients to norm 1, AdamW, zero the gradients.
  pytorch  attention by F.scaled_dot_product_attention (flash on CUDA), PyTorch's LayerNorm,
           lm_head + F.cross_entropy, torch.optim.AdamW(fused=True) (foreach on CPU) after
           clip_grad_norm_
  fastlm   every backend "auto" and the fused linear cross-entropy, fastlm AdamW with the clip
           fused (what `python -m fastlm.train` runs); extra backends says what auto resolved to
Each is measured eager and, on CUDA, under torch.compile (the model; the optimizer step stays
eager in both). Step time is the median over repeats after warm-up steps (compile included in
the warm-up). Peak memory is how far one steady step rises above the resident model, optimizer
state and batch: on CPU the RSS high-water mark in a fresh subprocess per case, on CUDA
torch.cuda.max_memory_allocated. max_err: relative difference of the first step's loss. extra:
tokens/s of both paths and (CUDA only) MFU = flops_per_token * tokens/s over the device's dense
bf16 peak (fastlm.metrics.PEAK_BF16_FLOPS: 989 TFLOP/s for an H100 SXM or H200).
"""
import contextlib
import gc
import os
from unittest import mock

import torch

from fastlm.bench.common import Row, peak_memory_mb, report_rows, time_ms

DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
# The trainer paths of the parity check (fastlm/bench/parity.py): the reference is the explicit
# math of every op, so any difference comes from the kernels.
PATHS = {
    "reference": {"attn_backend": "torch", "norm_backend": "torch", "ce_backend": "torch", "fused_linear_ce": False,
                  "optim_backend": "torch"},
    "fused": {"attn_backend": "auto", "norm_backend": "auto", "ce_backend": "auto", "fused_linear_ce": True,
              "optim_backend": "auto"},
}
# The benchmark's paths (the optimizer is chosen in make_step).
STEP_PATHS = {
    "pytorch": {"attn_backend": "sdpa", "norm_backend": "torch", "ce_backend": "torch", "fused_linear_ce": False},
    "fastlm": {"attn_backend": "auto", "norm_backend": "auto", "ce_backend": "auto", "fused_linear_ce": True},
}
MODEL_KEYS = ("vocab_size", "block_size", "n_layer", "n_head", "d_model")
# The default training config, and one with GPT-2's width and vocabulary (depth and batch cut
# so that a CPU run takes about a minute). On CUDA, GPT-2 small itself (124M) at T = 1024 with the
# batch that fills an 80 GB card for the plain path (32 x 1024 tokens a step).
CASES = {
    "cpu": [
        dict(name="default d128 L4", vocab_size=256, block_size=128, n_layer=4, n_head=4, d_model=128, batch_size=32,
             warmup=2, repeats=5),
        dict(name="gpt2-width d768 L2 V50257", vocab_size=50257, block_size=128, n_layer=2, n_head=12, d_model=768,
             batch_size=4, warmup=1, repeats=3),
    ],
    "cuda": [
        dict(name="gpt2-small 124M T1024", vocab_size=50257, block_size=1024, n_layer=12, n_head=12, d_model=768,
             batch_size=int(os.environ.get("FASTLM_E2E_BATCH", "32")), warmup=3, repeats=10),
    ],
    # One tiny model, with GPT-2's vocabulary so that the fused loss's memory saving shows.
    "quick": [
        dict(name="tiny d64 L2 V50257", vocab_size=50257, block_size=32, n_layer=2, n_head=2, d_model=64,
             batch_size=4, warmup=1, repeats=3),
    ],
}
MODES = {"cpu": ("eager",), "cuda": ("eager", "compiled")}


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


def describe_backends(backends):
    """{op: backend} as one line, e.g. 'causal_attention sdpa, linear_cross_entropy cpp, adamw cpp'."""
    return ", ".join(f"{op} {name}" for op, name in backends.items())


def make_step(case, path, device, dtype, mode, seed=1337):
    """(step, model, backends): one lean training step of `path` ("pytorch" or "fastlm") on `case`,
    and what each op runs on, e.g.
    'causal_attention sdpa, layer_norm triton, linear_cross_entropy triton, adamw cuda'."""
    from fastlm.config import GPTConfig, KernelConfig
    from fastlm.model import GPT
    from fastlm.optim import AdamW

    device = torch.device(device)
    torch.manual_seed(seed)
    # The backends are resolved for the dtype the ops see under autocast, as the trainer does: fp32
    # weights under bf16 autocast run bf16 attention (resolved for fp32, auto would pick sdpa).
    compute_dtype = getattr(torch, dtype)
    model = GPT(GPTConfig(**{k: case[k] for k in MODEL_KEYS}), kernels=KernelConfig(**STEP_PATHS[path]),
                compute_dtype=compute_dtype).to(device)
    if path == "pytorch":
        on_cuda = device.type == "cuda"
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=on_cuda or None,
                                      foreach=None if on_cuda else True)
    else:
        optimizer = AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, max_grad_norm=1.0)
    adamw = f"torch {'fused' if device.type == 'cuda' else 'foreach'}" if path == "pytorch" else \
        optimizer._backend_for(device)
    backends = describe_backends({**model.backends, "adamw": adamw})
    forward = torch.compile(model) if mode == "compiled" else model
    gen = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, case["vocab_size"], (case["batch_size"], case["block_size"] + 1), generator=gen)
    x, y = tokens[:, :-1].to(device), tokens[:, 1:].to(device)
    autocast = (torch.autocast(device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else contextlib.nullcontext())

    def step():
        with autocast:
            _, loss = forward(x, y)
        loss.backward()
        if path == "pytorch":  # fastlm's AdamW clips inside its step, with the fused norm
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step, model, backends


def setup_step(case, path, dtype, on, mode):
    """Module-level (picklable) setup for peak_memory_mb: a step after one warm-up call, which
    creates the optimizer state (and compiles), so that the measured step is a steady one."""
    step, _, _ = make_step(case, path, on, dtype, mode)
    step()
    gc.collect()
    return step


def measure_path(case, path, device, dtype, mode):
    """{step_ms, first_loss, peak_mb, flops_per_token, params, backends} of one path on one case."""
    step, model, backends = make_step(case, path, device, dtype, mode)
    first_loss = float(step())
    step_ms = time_ms(step, device=device, warmup=max(case["warmup"] - 1, 0), repeats=case["repeats"])
    result = {"step_ms": step_ms, "first_loss": first_loss, "params": model.num_params(),
              "flops_per_token": model.flops_per_token(), "backends": backends}
    if device.type == "cuda":  # the same (compiled) step, steady: no second build or compile
        result["peak_mb"] = peak_memory_mb(lambda: step, device=device)
    del step, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return result
    # The spawned child inherits this: glibc hands large freed blocks straight back to the OS, so
    # the warm-up step leaves no cached memory the measured step could reuse unseen by VmHWM.
    with mock.patch.dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536"):
        result["peak_mb"] = peak_memory_mb(setup_step, device=device, case=case, path=path, dtype=dtype,
                                           on=str(device), mode=mode)
    return result


def measure_case(case, device, dtype, mode):
    """One row: both paths on `case`, eager or compiled."""
    from fastlm.metrics import peak_flops

    row = Row("e2e", f"{case['name']} {mode}", "auto")
    try:
        ref = measure_path(case, "pytorch", device, dtype, mode)
        fused = measure_path(case, "fastlm", device, dtype, mode)
    except (RuntimeError, MemoryError) as exc:  # e.g. out of memory
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
                 "flops_per_token": ref["flops_per_token"], "mode": mode}
    return row


def run(quick, device, dtype):
    device = torch.device(device)
    rows = []
    for case in CASES["quick" if quick else device.type]:
        for mode in MODES[device.type]:
            rows.append(measure_case(case, device, dtype, mode))
            report_rows(rows)
    return rows
