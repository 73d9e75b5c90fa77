"""AdamW step time: torch for-loop / foreach / fused against fastlm's cpp and cuda backends.

Parameters are GPT-shaped sets of fp32 tensors (~10M and GPT-2 small's 124M; quick: ~2M),
each timed as one optimizer step, without and with global-norm clipping at 1.0 (torch:
clip_grad_norm_ then step; fastlm: max_grad_norm inside the step). The reference of every
row is torch.optim.AdamW(fused=True), whose own row holds only ref_ms; extra
speedup_vs_foreach compares with the foreach path. Peak memory: one steady step (state exists).
max_err: max relative error of the parameters after one clipped step against the torch for-loop
(clip_grad_norm_ + step). fastlm sums squares in double, torch in fp32: on a 38M-element
tensor torch's norm is ~0.3% low, which alone shows up as ~1e-6 here at 124M. On CUDA, every
measured row: extra host_ms = the median host time of one step call (perf_counter around it, no
synchronize, the device idle at its start: the time to launch the work), beside the CUDA-event
times, so a step bound by its host shows as host_ms close to them. On CUDA, fp32: extra
gbs = BYTES_PER_PARAM x params / time, copy_fraction = gbs over the copy bandwidth measured in
the same run.
"""
import gc
import statistics
import time

import torch

from fastlm.bench.common import (Row, copy_bandwidth_gbs, max_rel_error, peak_memory_mb, report_rows, synchronize,
                                 time_ms, timed_backends)
from fastlm.optim import AdamW

DTYPE = {"cpu": "float32", "cuda": "float32"}
LR, BETAS, WEIGHT_DECAY, MAX_NORM = 6e-4, (0.9, 0.95), 0.1, 1.0
TORCH_VARIANTS = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True),
                  "torch-fused": dict(fused=True)}
REFERENCE = "torch-fused"
BYTES_PER_PARAM = 28  # the fewest an fp32 step moves: 3 x (read + write) + the grad read, 4 bytes each
CONFIGS = {
    "2M": dict(n_layer=2, n_embd=256, vocab_size=4096, block_size=256),
    "10M": dict(n_layer=4, n_embd=384, vocab_size=8192, block_size=256),
    "124M": dict(n_layer=12, n_embd=768, vocab_size=50257, block_size=1024),
}


def gpt_shapes(n_layer, n_embd, vocab_size, block_size):
    """Parameter shapes of a GPT-2 style model (tied embeddings), in model order."""
    shapes = [(vocab_size, n_embd), (block_size, n_embd)]
    for _ in range(n_layer):
        shapes += [(n_embd,), (n_embd,), (3 * n_embd, n_embd), (3 * n_embd,), (n_embd, n_embd), (n_embd,),
                   (n_embd,), (n_embd,), (4 * n_embd, n_embd), (4 * n_embd,), (n_embd, 4 * n_embd), (n_embd,)]
    return shapes + [(n_embd,), (n_embd,)]


def make_params(shapes, device, dtype, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen).mul_(0.02).to(device=device, dtype=dtype).requires_grad_()
        p.grad = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
        params.append(p)
    return params


def make_step(backend, params, clip):
    """A zero-argument callable running one optimizer step (with clipping when clip)."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    if backend in TORCH_VARIANTS:
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, **TORCH_VARIANTS[backend])

        def step():
            if clip:
                torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
        return step
    return AdamW(groups, lr=LR, betas=BETAS, max_grad_norm=MAX_NORM if clip else None, backend=backend).step


def setup_step(backend, config, dtype, clip, on):
    """Module-level setup for peak_memory_mb: inputs plus one warm step (state allocated)."""
    params = make_params(gpt_shapes(**CONFIGS[config]), torch.device(on), getattr(torch, dtype))
    step = make_step(backend, params, clip)
    step()
    return step


def after_one_clipped_step(backend, shapes, device, dtype):
    params = make_params(shapes, device, dtype)
    make_step(backend, params, clip=True)()
    return [p.detach() for p in params]


def interleaved_times(steps, device, warmup, repeats):
    """Median ms of each step, timed in interleaved rounds: on a shared machine every backend
    sees the same load."""
    samples = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            elapsed = time_ms(step, device=device, warmup=0, repeats=1)
            if round_ >= warmup:
                samples[name].append(elapsed)
    return {name: statistics.median(times) for name, times in samples.items()}


def host_times(steps, device, warmup, repeats):
    """Median host ms of one call of each step, in interleaved rounds: perf_counter around the call
    without waiting for the device, which is synchronized before each call so that no launch waits
    for room in a full queue. On CUDA: the time step() takes to launch its work."""
    samples = {name: [] for name in steps}
    for round_ in range(warmup + repeats):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            elapsed = (time.perf_counter() - start) * 1e3
            if round_ >= warmup:
                samples[name].append(elapsed)
    synchronize(device)
    return {name: statistics.median(times) for name, times in samples.items()}


def run(quick, device, dtype):
    device, torch_dtype = torch.device(device), getattr(torch, dtype)
    backends = {**dict.fromkeys(TORCH_VARIANTS), **timed_backends("adamw", device, ("cpp", "cuda"))}
    runnable = [name for name, reason in backends.items() if reason is None]
    warmup, repeats = (1, 3) if quick else (3, 10)
    rows = []
    for config in ["2M"] if quick else ["10M", "124M"]:
        shapes = gpt_shapes(**CONFIGS[config])
        n_params = sum(torch.Size(s).numel() for s in shapes)
        label = f"{config} ({n_params / 1e6:.1f}M, {len(shapes)} tensors)"
        expected = after_one_clipped_step("torch-forloop", shapes, device, torch_dtype)
        errors = {name: max(max_rel_error(p, e) for p, e in zip(
            after_one_clipped_step(name, shapes, device, torch_dtype), expected)) for name in runnable}
        del expected
        # Every backend steps the same parameters and grads, each with its own optimizer state.
        params = make_params(shapes, device, torch_dtype)
        for clip in (False, True):
            steps = {name: make_step(name, params, clip) for name in runnable}
            times = interleaved_times(steps, device, warmup, repeats)
            # On CPU the host time is the step time; on CUDA it shows how much of it is launching.
            host = host_times(steps, device, warmup, repeats) if device.type == "cuda" else {}
            del steps
            gc.collect()
            peaks = {name: peak_memory_mb(setup_step, device=device, backend=name, config=config, dtype=dtype,
                                          clip=clip, on=str(device)) for name in runnable}
            for name, reason in backends.items():
                row = Row("adamw", f"{label}, clip" if clip else label, name, skipped=reason,
                          max_err=errors.get(name) if clip else None)
                if reason is None:
                    row.ref_ms, row.ref_peak_mb = times[REFERENCE], peaks[REFERENCE]
                    if name != REFERENCE:
                        row.fused_ms, row.fused_peak_mb = times[name], peaks[name]
                    row.extra["speedup_vs_foreach"] = times["torch-foreach"] / times[name]
                    if name in host:
                        row.extra["host_ms"] = host[name]
                    if device.type == "cuda" and torch_dtype == torch.float32:
                        # Each fp32 param: param, exp_avg, exp_avg_sq read and written, grad read.
                        gbs = BYTES_PER_PARAM * n_params / (times[name] * 1e-3) / 1e9
                        row.extra.update(gbs=gbs, copy_fraction=gbs / copy_bandwidth_gbs(device))
                rows.append(row)
            report_rows(rows)
            print(f"  done adamw {row.case}", flush=True)
        del params
        gc.collect()
    return rows
