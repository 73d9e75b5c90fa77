"""layer_norm and rms_norm: fwd+bwd of the fused Triton kernels against PyTorch, as the GPT runs them.

Mixed precision (the model under autocast): x is the fp32 residual stream, weight and bias fp32,
and the result is read by a bf16 matmul. The reference is what PyTorch does there:
F.layer_norm / F.rms_norm in fp32 (autocast's policy) and the matmul's cast of the result to bf16,
then in the backward the cast's and the norm's gradients. The fused op writes bf16 directly
(out_dtype) and forms dx, dw and db in one kernel. Also one case with x, weight and output all
bf16 (pure bf16 training), where the reference is F.layer_norm alone.

extra: fwd_ms and bwd_ms of each side; gbs, the fused fwd+bwd's bandwidth counting x read twice,
y written, dy read and dx written once (the least any implementation moves), and copy_fraction,
that over the device's copy bandwidth measured in the same run. max_err: the larger of the
output's and dx's max relative error against a float64 reference. Peak memory: one fwd+bwd.
On CPU the Triton kernels only run under the interpreter, which is not timed: CPU rows hold the
reference's time alone.
"""
import torch
import torch.nn.functional as F

from fastlm.bench.common import (Row, copy_bandwidth_gbs, max_rel_error, peak_memory_mb, report_rows, time_ms,
                                 timed_backends)
from fastlm.ops import layer_norm, rms_norm

DTYPE = {"cpu": "bfloat16", "cuda": "bfloat16"}
# (op, N rows, D, x dtype): GPT-2 small at 32 x 1024 tokens, GPT-2 XL-like width, Llama widths.
CASES = {"cuda": [("layer_norm", 32768, 768, "float32"), ("layer_norm", 16384, 1600, "float32"),
                  ("rms_norm", 8192, 4096, "float32"), ("rms_norm", 4096, 8192, "float32"),
                  ("layer_norm", 8192, 4096, "bfloat16")],
         "cpu": [("layer_norm", 8192, 768, "float32"), ("rms_norm", 2048, 4096, "float32")]}
QUICK_CASES = [("layer_norm", 512, 768, "float32"), ("rms_norm", 256, 1000, "bfloat16")]


def make_inputs(op, n, dim, x_dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    x_dtype = getattr(torch, x_dtype)
    x = (torch.randn(n, dim, device=device, generator=gen) * 2 + 0.5).to(x_dtype).requires_grad_()
    weight = (torch.randn(dim, device=device, generator=gen) * 0.1 + 1).to(x_dtype).requires_grad_()
    bias = torch.randn(dim, device=device, generator=gen).to(x_dtype).requires_grad_() if op == "layer_norm" else None
    return [t for t in (x, weight, bias) if t is not None]


def forward_fn(op, backend, out_dtype):
    """The forward a step times: backend "reference" (PyTorch's norm in the inputs' precision, then
    the cast to out_dtype the next matmul would make) or an ops backend writing out_dtype."""
    if backend == "reference":
        def forward(x, weight, bias=None):
            dim = (x.shape[-1],)
            y = F.layer_norm(x, dim, weight, bias) if op == "layer_norm" else F.rms_norm(x, dim, weight, 1e-5)
            return y.to(out_dtype)
    else:
        def forward(x, weight, bias=None):
            if op == "layer_norm":
                return layer_norm(x, weight, bias, out_dtype=out_dtype, backend=backend)
            return rms_norm(x, weight, out_dtype=out_dtype, backend=backend)
    return forward


def setup_fwd_bwd(op, backend, n, dim, x_dtype, out_dtype, on):
    """Module-level (picklable) setup for peak_memory_mb: returns one fwd+bwd step."""
    inputs = make_inputs(op, n, dim, x_dtype, torch.device(on))
    out_dtype = getattr(torch, out_dtype)
    grad_out = torch.randn(n, dim, device=on).to(out_dtype)
    forward = forward_fn(op, backend, out_dtype)
    return lambda: torch.autograd.grad(forward(*inputs), inputs, grad_out)


def measure(op, backend, n, dim, x_dtype, out_dtype, device, warmup, repeats):
    """(fwd, bwd, fwd+bwd) ms and the output's and dx's error of one backend on one case."""
    inputs = make_inputs(op, n, dim, x_dtype, device)
    grad_out = torch.randn(n, dim, device=device).to(out_dtype)
    forward = forward_fn(op, backend, out_dtype)
    timing = dict(device=device, warmup=warmup, repeats=repeats)
    fwd_ms = time_ms(lambda: forward(*inputs), **timing)
    out = forward(*inputs)
    bwd_ms = time_ms(lambda: torch.autograd.grad(out, inputs, grad_out, retain_graph=True), **timing)
    ms = time_ms(lambda: torch.autograd.grad(forward(*inputs), inputs, grad_out), **timing)
    dx = torch.autograd.grad(out, inputs[0], grad_out)[0]
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    ref = forward_fn(op, "reference", torch.float64)(*ref_inputs)
    (ref_dx,) = torch.autograd.grad(ref, ref_inputs[0], grad_out.double())
    return fwd_ms, bwd_ms, ms, max(max_rel_error(out, ref), max_rel_error(dx, ref_dx))


def run(quick, device, dtype):
    device = torch.device(device)
    warmup, repeats = (5, 20) if device.type == "cuda" else (1, 5)
    out_dtype = getattr(torch, dtype)
    rows = []
    for op, n, dim, x_dtype in QUICK_CASES if quick else CASES[device.type]:
        case = f"N={n} D={dim} x {x_dtype}"
        common = dict(n=n, dim=dim, x_dtype=x_dtype, out_dtype=out_dtype, device=device)
        ref_fwd, ref_bwd, ref_ms, _ = measure(op, "reference", **common, warmup=warmup, repeats=repeats)
        ref_peak = peak_memory_mb(setup_fwd_bwd, device=device, op=op, backend="reference", n=n, dim=dim,
                                  x_dtype=x_dtype, out_dtype=dtype, on=str(device))
        for backend, reason in timed_backends(op, device, ("triton",)).items():
            row = Row(op, case, backend, ref_ms=ref_ms, ref_peak_mb=ref_peak, skipped=reason,
                      extra=dict(ref_fwd_ms=ref_fwd, ref_bwd_ms=ref_bwd))
            rows.append(row)
            if reason is not None:
                continue
            fwd_ms, bwd_ms, row.fused_ms, row.max_err = measure(op, backend, **common, warmup=warmup,
                                                                repeats=repeats)
            row.fused_peak_mb = peak_memory_mb(setup_fwd_bwd, device=device, op=op, backend=backend, n=n, dim=dim,
                                               x_dtype=x_dtype, out_dtype=dtype, on=str(device))
            x_bytes, y_bytes = getattr(torch, x_dtype).itemsize, out_dtype.itemsize
            gbs = n * dim * (3 * x_bytes + 2 * y_bytes) / (row.fused_ms * 1e-3) / 1e9
            row.extra.update(fwd_ms=fwd_ms, bwd_ms=bwd_ms, gbs=gbs)
            if device.type == "cuda":
                row.extra["copy_fraction"] = gbs / copy_bandwidth_gbs(device)
        report_rows(rows)
        print(f"  done {op} {case}", flush=True)
    return rows
