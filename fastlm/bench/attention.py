"""causal_attention: forward, backward and fwd+bwd time and TFLOP/s per backend, against sdpa.

Causal FLOPs: 4*B*H*T*T*D/2 forward, 2.5x that backward. sdpa (on CUDA pinned to its flash
kernel) is the reference: its own row holds ref_ms, its fwd+bwd time, and every other backend's
row compares its fwd+bwd time with it. extra: fwd_ms, bwd_ms and fwd/bwd/fwdbwd TFLOP/s; on CUDA
also sdpa's fwd+bwd unpinned (unpinned_ms: the kernel PyTorch picks itself, cuDNN's on sm_90, as
the GPT's `auto` attention runs it) and each other backend's speed-up against that
(speedup_vs_unpinned); the triton row, when tuned, also the config each of its kernels ran with for
that shape (configs: fwd, dkdv, dq).
max_err is the forward output's max relative error against a float64 reference on the first
(batch, head), so it costs no T x T memory at scale. Peak memory: one fwd+bwd step.
On CPU only the torch paths are timed (torch vs sdpa): Triton runs there under its interpreter,
which checks correctness but is no performance path. T = 8192 is left out on CPU. On CUDA: sdpa
and triton at B*H*T from 64K to 512K query rows, T 1024..8192, D 64 and 128 (H*D = 2048).
"""
import contextlib
import re

import torch

from fastlm.bench.common import Row, max_rel_error, peak_memory_mb, report_rows, time_ms, timed_backends
from fastlm.ops import causal_attention
from fastlm.ops.attention import attention_reference

DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
REFERENCE = "sdpa"
BACKENDS = (REFERENCE, "triton", "torch")
# The torch reference holds a few fp32 (B, H, T, T) tensors; past this many bytes per tensor it is skipped.
REFERENCE_SCORE_LIMIT = {"cuda": 4 * 2**30, "cpu": 2**29}


def flops(B, H, T, D):
    """(forward, backward) causal attention FLOPs."""
    fwd = 4 * B * H * T * T * D / 2
    return fwd, 2.5 * fwd


def cases(device, quick):
    """(B, H, T, D): a fixed budget of tokens per step, heads of D summing to a fixed width."""
    if device.type == "cuda":
        # B * H * T from 64K to 512K query rows (H = 2048 / D heads, so 16 or 32 heads):
        # 32K..16K tokens per step at T 1024..8192.
        if quick:
            return [(max(1, 4096 // T), 2048 // 64, T, 64) for T in (512, 2048)]
        return [(B, 2048 // D, T, D) for D in (64, 128) for T in (1024, 2048, 4096, 8192)
                for B in sorted({max(1, 64 * 1024 // (T * 2048 // D)), max(1, 512 * 1024 // (T * 2048 // D))})]
    else:
        # T = 8192 is left out on CPU: one fwd+bwd takes tens of seconds on a few cores.
        tokens, width, lengths, dims = 1024, 256, (512, 1024, 2048, 4096), (64, 128)
        if quick:
            tokens, width, lengths, dims = 512, 256, (256, 512), (64,)
    return [(max(1, tokens // T), width // D, T, D) for D in dims for T in lengths]


def make_inputs(B, H, T, D, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3)]


def kernel_context(backend, device):
    """Pin sdpa to the flash kernel on CUDA, the baseline the Triton kernel is measured against."""
    if backend != "sdpa" or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def setup_fwd_bwd(backend, shape, dtype, on, pinned=True):
    """Module-level (picklable) setup for peak_memory_mb: returns one fwd+bwd step. pinned=False:
    sdpa runs the kernel PyTorch picks for it, not the flash kernel (kernel_context)."""
    device = torch.device(on)
    q, k, v = make_inputs(*shape, getattr(torch, dtype), device)
    grad_out = torch.randn_like(q)

    def step():
        with kernel_context(backend, device) if pinned else contextlib.nullcontext():
            torch.autograd.grad(causal_attention(q, k, v, backend=backend), (q, k, v), grad_out)
    return step


def tuned_kernels(backend, device):
    """fastlm.triton_kernels.attention when `backend`'s launches on `device` go through the
    autotuner (triton on CUDA, FASTLM_AUTOTUNE not 0), else None."""
    if backend != "triton" or device.type != "cuda":
        return None
    from fastlm.triton_kernels import attention

    return attention if attention.autotune_enabled() else None


def measure(backend, shape, dtype, device, warmup, repeats):
    """fwd, bwd and fwd+bwd ms and the forward's error of one backend on one shape."""
    q, k, v = make_inputs(*shape, getattr(torch, dtype), device)
    grad_out = torch.randn_like(q)
    timing = dict(device=device, warmup=warmup, repeats=repeats)
    with kernel_context(backend, device):
        def forward():
            return causal_attention(q, k, v, backend=backend)
        fwd_ms = time_ms(forward, **timing)
        out = forward()
        bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True), **timing)
        del out
        fwdbwd_ms = time_ms(lambda: torch.autograd.grad(forward(), (q, k, v), grad_out), **timing)
        with torch.no_grad():
            sample = forward()[:1, :1]
    first = [t[:1, :1].detach().double() for t in (q, k, v)]
    return fwd_ms, bwd_ms, fwdbwd_ms, max_rel_error(sample, attention_reference(*first, shape[3] ** -0.5))


def run(quick, device, dtype):
    device = torch.device(device)
    warmup, repeats = (5, 20) if device.type == "cuda" else (1, 5)
    # On CUDA the explicit-math torch path is no contender (and the GPU window is short).
    available = timed_backends("causal_attention", device, BACKENDS if device.type == "cpu" else BACKENDS[:2])
    rows = []
    for B, H, T, D in cases(device, quick):
        fwd_flops, bwd_flops = flops(B, H, T, D)
        reference = unpinned = None
        for backend, reason in available.items():
            if reason is None and backend == "torch" and B * H * T * T * 4 > REFERENCE_SCORE_LIMIT[device.type]:
                reason = f"(B, H, T, T) fp32 scores of {B * H * T * T * 4 / 2**30:.1f} GiB, several live: too large"
            row = Row("attention", f"B{B} H{H} T{T} D{D}", backend, skipped=reason)
            rows.append(row)
            if reason is not None:
                continue
            tuner = tuned_kernels(backend, device)
            if tuner is not None:
                tuner.forget_tuned_picks()
            try:
                peak = peak_memory_mb(setup_fwd_bwd, device=device, backend=backend, shape=(B, H, T, D), dtype=dtype,
                                      on=str(device))
                fwd_ms, bwd_ms, ms, row.max_err = measure(backend, (B, H, T, D), dtype, device, warmup, repeats)
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: record it, keep going
                row.skipped = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                continue
            row.extra = dict(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=fwd_flops / fwd_ms / 1e9,
                             bwd_tflops=bwd_flops / bwd_ms / 1e9, fwdbwd_tflops=(fwd_flops + bwd_flops) / ms / 1e9)
            if tuner is not None:
                row.extra["configs"] = tuner.tuned_picks()
            if backend == REFERENCE:
                reference = (ms, peak)
                if device.type == "cuda":
                    unpinned = row.extra["unpinned_ms"] = time_ms(
                        setup_fwd_bwd(REFERENCE, (B, H, T, D), dtype, str(device), pinned=False), device=device,
                        warmup=warmup, repeats=repeats)
            else:
                row.fused_ms, row.fused_peak_mb = ms, peak
                if unpinned is not None:
                    row.extra["speedup_vs_unpinned"] = unpinned / ms
            row.ref_ms, row.ref_peak_mb = reference or (None, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        report_rows(rows)
    return rows


def plot(rows, label):
    """TFLOP/s against T per head size, fwd+bwd and fwd, one line per backend; label: dtype and device."""
    import matplotlib.pyplot as plt

    def dims(row):  # the case label is "B{B} H{H} T{T} D{D}"
        return {k: int(v) for k, v in re.findall(r"([BHTD])(\d+)", row["case"])}

    measured = [r for r in rows if r["extra"].get("fwdbwd_tflops") is not None]
    head_dims = sorted({dims(r)["D"] for r in measured})
    if not head_dims:
        return None
    fig, axes = plt.subplots(1, len(head_dims), figsize=(5.5 * len(head_dims), 4), squeeze=False)
    for ax, D in zip(axes[0], head_dims):
        for backend in BACKENDS:
            mine = [r for r in measured if r["backend"] == backend and dims(r)["D"] == D]
            if mine:
                lengths = [dims(r)["T"] for r in mine]
                line, = ax.plot(lengths, [r["extra"]["fwdbwd_tflops"] for r in mine], marker="o",
                                label=f"{backend} fwd+bwd")
                ax.plot(lengths, [r["extra"]["fwd_tflops"] for r in mine], marker=".", linestyle="--",
                        color=line.get_color(), label=f"{backend} fwd")
        ax.set_xscale("log", base=2)
        ax.set(xlabel="sequence length T", ylabel="TFLOP/s (causal)", title=f"causal attention, D={D}, {label}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return fig
