"""Benchmark causal_attention: forward, backward and fwd+bwd time and TFLOP/s per backend.

Causal FLOPs: 4*B*H*T*T*D/2 forward, 2.5x that backward. Every backend is compared with sdpa
(on CUDA pinned to its flash kernel): ref_ms is sdpa's fwd+bwd time, fused_ms the backend's, and
speedup = ref_ms / fused_ms. max_err is the forward output's max relative error against a
float64 reference on the first (batch, head), so it costs no T x T memory at scale.
On CPU only the torch paths are timed (torch vs sdpa): Triton runs there under its interpreter,
which checks correctness but is no performance path.
"""
import argparse
import contextlib

import torch

from fastlm.bench.common import max_rel_error, peak_memory_mb, save_figure, save_report, time_ms
from fastlm.ops import available_backends, causal_attention
from fastlm.ops.attention import attention_reference

BACKENDS = ("sdpa", "triton", "torch")  # the first is the baseline of every comparison
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COLUMNS = [("name", "case", ""), ("backend", "backend", ""), ("fwd_ms", "fwd ms", ".2f"), ("bwd_ms", "bwd ms", ".2f"),
           ("fused_ms", "fwd+bwd ms", ".2f"), ("fwd_tflops", "fwd TF/s", ".3f"), ("bwd_tflops", "bwd TF/s", ".3f"),
           ("fwdbwd_tflops", "f+b TF/s", ".3f"), ("ref_ms", "sdpa f+b ms", ".2f"), ("speedup", "vs sdpa", ".2f"),
           ("fused_peak_mb", "peak MB", ".0f"), ("max_err", "max err", ".1e"), ("skipped", "skipped", "")]
# The torch reference holds a few fp32 (B, H, T, T) tensors; past this many bytes per tensor it is skipped.
REFERENCE_SCORE_LIMIT = {"cuda": 4 * 2**30, "cpu": 2**29}


def flops(B, H, T, D):
    """(forward, backward) causal attention FLOPs."""
    fwd = 4 * B * H * T * T * D / 2
    return fwd, 2.5 * fwd


def cases(device, quick):
    """(B, H, T, D): a fixed budget of tokens per step, heads of D summing to a fixed width."""
    if device.type == "cuda":
        tokens, width, lengths, dims = 16384, 2048, (512, 1024, 2048, 4096, 8192), (64, 128)
        if quick:
            tokens, lengths, dims = 4096, (512, 2048), (64,)
    else:
        # T = 8192 is left out on CPU: one fwd+bwd takes tens of seconds on a few cores.
        tokens, width, lengths, dims = 1024, 256, (512, 1024, 2048, 4096), (64, 128)
        if quick:
            tokens, width, lengths, dims = 512, 256, (256, 512), (64,)
    return [(max(1, tokens // T), width // D, T, D) for D in dims for T in lengths]


def make_inputs(B, H, T, D, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, device=device, dtype=dtype, generator=gen).requires_grad_() for _ in range(3))
    return q, k, v


def _sdpa_kernel_context(backend, device):
    """Pin sdpa to the flash kernel on CUDA, the baseline the Triton kernel is measured against."""
    if backend != "sdpa" or device.type != "cuda":
        return contextlib.nullcontext()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    except ImportError:
        return contextlib.nullcontext()


def setup_fwd_bwd(backend, B, H, T, D, dtype_name, device_type):
    """Module-level (picklable) setup for peak_memory_mb: returns one fwd+bwd step."""
    device = torch.device(device_type)
    q, k, v = make_inputs(B, H, T, D, DTYPES[dtype_name], device)
    grad_out = torch.randn_like(q)

    def step():
        with _sdpa_kernel_context(backend, device):
            out = causal_attention(q, k, v, backend=backend)
            torch.autograd.grad(out, (q, k, v), grad_out)

    return step


def measure(backend, B, H, T, D, dtype, device, *, warmup, repeats):
    """Times (ms) and error of one backend on one shape."""
    q, k, v = make_inputs(B, H, T, D, dtype, device)
    grad_out = torch.randn_like(q)
    with _sdpa_kernel_context(backend, device):
        forward = lambda: causal_attention(q, k, v, backend=backend)  # noqa: E731
        fwd_ms = time_ms(lambda: forward(), device=device, warmup=warmup, repeats=repeats)
        out = forward()
        bwd_ms = time_ms(lambda: torch.autograd.grad(out, (q, k, v), grad_out, retain_graph=True),
                         device=device, warmup=warmup, repeats=repeats)
        del out
        fwdbwd_ms = time_ms(lambda: torch.autograd.grad(forward(), (q, k, v), grad_out),
                            device=device, warmup=warmup, repeats=repeats)
        with torch.no_grad():
            sample = forward()[:1, :1]
    sl = (slice(0, 1), slice(0, 1))
    ref = attention_reference(q[sl].detach().double(), k[sl].detach().double(), v[sl].detach().double(), D ** -0.5)
    return fwd_ms, bwd_ms, fwdbwd_ms, max_rel_error(sample, ref)


def skip_reason(backend, B, H, T, D, device, reasons):
    if backend == "triton" and device.type == "cpu":
        return "CPU Triton is the interpreter: correctness only"
    if reasons.get(backend) is not None:
        return reasons[backend]
    if backend == "torch" and B * H * T * T * 4 > REFERENCE_SCORE_LIMIT[device.type]:
        gib = B * H * T * T * 4 / 2**30
        return f"(B, H, T, T) fp32 scores of {gib:.1f} GiB, several live: too large"
    return None


def run(quick=False, device="cpu", dtype=None, out_dir=None):
    """Benchmark every backend over the standard shapes; returns the rows (also saved as JSON + PNG)."""
    device = torch.device(device)
    if dtype is None:
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    torch_dtype = DTYPES[dtype]
    warmup, repeats = (5, 20) if device.type == "cuda" else (1, 5)
    reasons = available_backends(device)["causal_attention"]
    # Peak memory first: a CPU child process starts with its parent's resident size as its
    # high-water mark, so it is measured while this process is still small.
    shapes = cases(device, quick)
    peaks = {}
    for B, H, T, D in shapes:
        for backend in BACKENDS:
            if skip_reason(backend, B, H, T, D, device, reasons) is None:
                try:
                    peaks[backend, B, H, T, D] = peak_memory_mb(setup_fwd_bwd, device=device, backend=backend, B=B,
                                                                H=H, T=T, D=D, dtype_name=dtype, device_type=device.type)
                except (RuntimeError, MemoryError):
                    peaks[backend, B, H, T, D] = None
    rows = []
    for B, H, T, D in shapes:
        fwd_flops, bwd_flops = flops(B, H, T, D)
        group = []
        for backend in BACKENDS:
            row = {"name": f"B{B} H{H} T{T} D{D}", "shape": [B, H, T, D], "backend": backend, "dtype": dtype,
                   "ref_ms": None, "fused_ms": None, "speedup": None, "ref_peak_mb": None, "fused_peak_mb": None,
                   "max_err": None, "fwd_ms": None, "bwd_ms": None, "fwd_tflops": None, "bwd_tflops": None,
                   "fwdbwd_tflops": None, "skipped": skip_reason(backend, B, H, T, D, device, reasons)}
            group.append(row)
            if row["skipped"]:
                continue
            try:
                fwd_ms, bwd_ms, fwdbwd_ms, err = measure(backend, B, H, T, D, torch_dtype, device,
                                                         warmup=warmup, repeats=repeats)
            except (RuntimeError, MemoryError) as exc:  # e.g. out of memory: record it, keep going
                row["skipped"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                continue
            row.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms, fused_ms=fwdbwd_ms, fused_peak_mb=peaks.get((backend, B, H, T, D)),
                       max_err=err, fwd_tflops=fwd_flops / fwd_ms / 1e9, bwd_tflops=bwd_flops / bwd_ms / 1e9,
                       fwdbwd_tflops=(fwd_flops + bwd_flops) / fwdbwd_ms / 1e9)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        base = group[0]
        for row in group:
            if row["fused_ms"] is not None and base["fused_ms"] is not None:
                row.update(ref_ms=base["fused_ms"], ref_peak_mb=base["fused_peak_mb"],
                           speedup=base["fused_ms"] / row["fused_ms"])
        rows.extend(group)
    name = "attention_quick" if quick else "attention"
    save_report(name, rows, COLUMNS, device=device, out_dir=out_dir,
                extra={"flops": "4*B*H*T*T*D/2 forward, 2.5x that backward", "dtype": dtype,
                       "baseline": "sdpa (flash kernel on CUDA)",
                       "peak_mb": "fwd+bwd step, over the inputs (CPU: RSS rise in a fresh process)",
                       "note": None if device.type == "cuda" else "T = 8192 not run on CPU (tens of seconds per step)"})
    _plot(rows, name, device, out_dir)
    return rows


def _plot(rows, name, device, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = sorted({r["shape"][3] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(5.5 * len(dims), 4), squeeze=False)
    for ax, D in zip(axes[0], dims):
        for backend in BACKENDS:
            pts = [(r["shape"][2], r["fwdbwd_tflops"], r["fwd_tflops"]) for r in rows
                   if r["shape"][3] == D and r["backend"] == backend and r["fwdbwd_tflops"] is not None]
            if not pts:
                continue
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{backend} fwd+bwd")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker=".", linestyle="--", color=line.get_color(),
                    label=f"{backend} fwd")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("TFLOP/s (causal)")
        ax.set_title(f"causal attention, D={D}, {rows[0]['dtype']}, {torch.device(device).type}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, name, device=device, out_dir=out_dir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, for a smoke test")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/<device slug>/")
    args = parser.parse_args(argv)
    run(quick=args.quick, device=args.device, dtype=args.dtype, out_dir=args.out_dir)


if __name__ == "__main__":
    main()
