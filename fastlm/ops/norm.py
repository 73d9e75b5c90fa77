"""LayerNorm and RMSNorm over the last dimension: two public functions, one fused kernel.

layer_norm(x, weight, bias) = F.layer_norm(x, (D,), weight, bias, eps)
rms_norm(x, weight)         = F.rms_norm(x, (D,), weight, eps)
both computed in fp32 (float64 for float64 inputs) and returned in `out_dtype` (default: x's).

Backends (the same for both ops):
  torch   F.layer_norm / F.rms_norm, PyTorch's own kernels, then a cast to out_dtype: the reference.
  triton  fastlm/triton_kernels/norm.py: the forward reads x once and writes y once, already in
          out_dtype; the backward forms dx and the weight and bias gradients in one kernel.
  auto    triton on CUDA for rows of up to MAX_DIM values, torch otherwise (PyTorch's CPU kernels
          are already single-pass; the Triton interpreter is for tests).
There is no compiled C++/CUDA norm: "cpp" and "cuda" report why.

out_dtype: under autocast PyTorch runs a norm in fp32 and returns fp32, which the next matmul then
casts to the autocast dtype: a separate pass over the activations, and its gradient cast back in
the backward. The model passes out_dtype = the autocast dtype instead, so the fused forward writes
the rounded values directly and the backward reads the 16-bit gradient. The values are the same
as the cast's. x is never cast: the statistics are always those of x as given.

Mixed dtypes: x, weight and bias may differ (fp32 parameters with 16-bit activations, outside
autocast); the math is in fp32 and each gradient comes back in its input's dtype.

torch.compile: the Triton path traces without graph breaks (the launches are custom ops with
fake implementations and an autograd formula); plain eager calls launch directly.
"""
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from fastlm.ops.backends import launches_directly, register_op, resolve_backend, triton_unusable_reason
from fastlm.ops.checks import FLOAT_DTYPES, check_same_device, check_tensor, dtype_name

LAYER_NORM = "layer_norm"
RMS_NORM = "rms_norm"
# float64 is accepted by the torch backend so that tests can build a float64 oracle.
DTYPES = FLOAT_DTYPES + (torch.float64,)
# Widest row the Triton kernels take (fastlm.triton_kernels.norm.MAX_DIM, without importing triton).
MAX_TRITON_DIM = 8192


def backend_reasons(device, dtype=None, head_dim=None):
    """{backend: None if usable on `device` (for this dtype, when given), else why not}."""
    triton = triton_unusable_reason(device)
    if triton is None and dtype == torch.float64:
        triton = "the triton backend takes fp32/bf16/fp16, got float64"
    return {
        "torch": None,
        "triton": triton,
        "cpp": "no compiled C++ norm kernel exists; PyTorch's own CPU kernel (backend 'torch') is single-pass",
        "cuda": "no compiled CUDA norm kernel exists; use backend 'triton'",
    }


def auto_preference(device, dtype=None):
    # The Triton interpreter is usable on CPU but far too slow to be picked automatically.
    return ("triton",) if device.type == "cuda" else ("torch",)


register_op(LAYER_NORM, backend_reasons, auto_preference)
register_op(RMS_NORM, backend_reasons, auto_preference)


def layer_norm(x, weight=None, bias=None, *, eps=1e-5, out_dtype=None, backend="auto"):
    """LayerNorm of x over its last dimension D: (x - mean) / sqrt(var + eps) * weight + bias,
    with the biased variance, as F.layer_norm(x, (D,), weight, bias, eps).

    x: (..., D), fp32/bf16/fp16 (float64 on the torch backend), any strides; weight, bias: (D,)
    or None, any float dtype. out_dtype: the result's dtype (default x's). Differentiable in x,
    weight and bias on every backend.
    """
    return _norm(LAYER_NORM, x, weight, bias, eps, out_dtype, backend)


def rms_norm(x, weight=None, *, eps=1e-5, out_dtype=None, backend="auto"):
    """RMSNorm of x over its last dimension D: x / sqrt(mean(x**2) + eps) * weight, as
    F.rms_norm(x, (D,), weight, eps). Arguments and result as in layer_norm (no bias)."""
    return _norm(RMS_NORM, x, weight, None, eps, out_dtype, backend)


def _norm(op, x, weight, bias, eps, out_dtype, backend):
    eps = _check_inputs(op, x, weight, bias, eps, out_dtype)
    out_dtype = out_dtype or x.dtype
    dim = x.shape[-1]
    name = resolve_backend(op, x.device, backend, dtype=x.dtype)
    if name == "triton" and (dim > MAX_TRITON_DIM or torch.float64 in _dtypes(weight, bias, out_dtype)):
        if backend == "triton":
            raise ValueError(f"{op}: backend 'triton' takes rows of D <= {MAX_TRITON_DIM} and fp32/bf16/fp16 "
                             f"weights and output, got x {tuple(x.shape)}, {_dtype_listing(weight, bias, out_dtype)}")
        name = "torch"
    is_rms = op == RMS_NORM
    if name == "torch":
        return norm_reference(x, weight, bias, eps, is_rms, out_dtype)
    rows = x.reshape(-1, dim)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return _triton(rows, weight, bias, eps, is_rms, out_dtype).view(x.shape)


def _dtypes(*items):
    return {t.dtype if isinstance(t, torch.Tensor) else t for t in items if t is not None}


def _dtype_listing(weight, bias, out_dtype):
    parts = [f"{name} {dtype_name(t.dtype)}" for name, t in (("weight", weight), ("bias", bias)) if t is not None]
    return ", ".join(parts + [f"out_dtype {dtype_name(out_dtype)}"])


def _check_inputs(op, x, weight, bias, eps, out_dtype):
    """Validate shapes/dtypes/devices/options; return eps as a float."""
    check_tensor(op, "x", x, dtypes=DTYPES)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{op}: x must have a non-empty last dimension, got shape {tuple(x.shape)}")
    dim = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        check_tensor(op, name, t, dtypes=DTYPES)
        if tuple(t.shape) != (dim,):
            raise ValueError(f"{op}: {name} must have shape ({dim},) (the last dim of x {tuple(x.shape)}), "
                             f"got {tuple(t.shape)}")
    check_same_device(op, x=x, weight=weight, bias=bias)
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"{op}: eps must be a finite float >= 0, got {eps!r}")
    if out_dtype is not None and out_dtype not in DTYPES:
        raise TypeError(f"{op}: out_dtype must be None or one of float32, bfloat16, float16, float64, "
                        f"got {out_dtype!r}")
    return float(eps)


def norm_reference(x, weight, bias, eps, is_rms, out_dtype):
    """PyTorch's F.layer_norm / F.rms_norm (fp32 math for 16-bit inputs), cast to out_dtype. With
    mixed dtypes every input is first cast to fp32 (float64 if any is float64)."""
    dim = (x.shape[-1],)
    if len(_dtypes(x, weight, bias)) > 1:
        compute = torch.float64 if torch.float64 in _dtypes(x, weight, bias) else torch.float32
        x, weight, bias = (None if t is None else t.to(compute) for t in (x, weight, bias))
    y = F.rms_norm(x, dim, weight, eps) if is_rms else F.layer_norm(x, dim, weight, bias, eps)
    return y.to(out_dtype)


# The Triton path. Plain eager calls take _FusedNorm (the launchers under an autograd.Function);
# torch.compile, export, dispatch modes and functorch see two custom ops with a registered
# autograd formula, each one opaque call. Kernels are imported on first call.

def _triton(rows, weight, bias, eps, is_rms, out_dtype):
    if launches_directly(rows, weight, bias):
        return _FusedNorm.apply(rows, weight, bias, eps, is_rms, out_dtype)
    y, _, _ = _norm_forward(rows, weight, bias, eps, is_rms, out_dtype)
    return y


class _FusedNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, bias, eps, is_rms, out_dtype):
        from fastlm.triton_kernels.norm import norm_forward

        y, mean, rstd = norm_forward(rows, weight, bias, eps, is_rms, out_dtype)
        ctx.save_for_backward(rows, weight, mean, rstd)
        ctx.is_rms, ctx.bias_dtype = is_rms, None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        rows, weight, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the custom op, so that differentiating the gradients again raises
            # there (it has no autograd formula) instead of treating them as constants.
            dx, dw, db = _norm_backward(dy, rows, weight, ctx.bias_dtype is not None, _or_empty(mean, rstd), rstd,
                                        ctx.is_rms)
        else:
            from fastlm.triton_kernels.norm import norm_backward

            dx, dw, db = norm_backward(dy, rows, weight, ctx.bias_dtype is not None, mean, rstd, ctx.is_rms)
        return (dx, _cast(dw, weight), _cast(db, ctx.bias_dtype), None, None, None)


def _cast(grad, like):
    """A parameter's fp32 gradient sum in its dtype (`like` a tensor or a dtype); None when absent."""
    if grad is None or like is None:
        return None
    return grad.to(like.dtype if isinstance(like, torch.Tensor) else like)


def _or_empty(mean, like):
    """RMSNorm has no mean: the custom ops take an empty tensor in its place."""
    return like.new_empty(0) if mean is None else mean


@torch.library.custom_op("fastlm::norm_forward", mutates_args=())
def _norm_forward(rows: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float,
                  is_rms: bool, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastlm.triton_kernels.norm import norm_forward

    y, mean, rstd = norm_forward(rows, weight, bias, eps, is_rms, out_dtype)
    return y, _or_empty(mean, rstd), rstd


@_norm_forward.register_fake
def _(rows, weight, bias, eps, is_rms, out_dtype):
    n_rows = rows.shape[0]
    stats = rows.new_empty((n_rows,), dtype=torch.float32)
    mean = rows.new_empty((0 if is_rms else n_rows,), dtype=torch.float32)
    return rows.new_empty(rows.shape, dtype=out_dtype), mean, stats


@torch.library.custom_op("fastlm::norm_backward", mutates_args=())
def _norm_backward(dy: torch.Tensor, rows: torch.Tensor, weight: Optional[torch.Tensor], has_bias: bool,
                   mean: torch.Tensor, rstd: torch.Tensor,
                   is_rms: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastlm.triton_kernels.norm import norm_backward

    dx, dw, db = norm_backward(dy, rows, weight, has_bias, None if is_rms else mean, rstd, is_rms)
    # Absent gradients as empty tensors: a custom op returns tensors only.
    return dx, _or_empty(dw, rstd), _or_empty(db, rstd)


@_norm_backward.register_fake
def _(dy, rows, weight, has_bias, mean, rstd, is_rms):
    dim = rows.shape[1]
    return (torch.empty_like(rows, memory_format=torch.contiguous_format),
            rows.new_empty((0 if weight is None else dim,), dtype=torch.float32),
            rows.new_empty((dim if has_bias else 0,), dtype=torch.float32))


def _norm_setup_context(ctx, inputs, output):
    rows, weight, bias, eps, is_rms, out_dtype = inputs
    _, mean, rstd = output
    ctx.save_for_backward(rows, weight, mean, rstd)
    ctx.is_rms, ctx.bias_dtype = is_rms, None if bias is None else bias.dtype
    ctx.set_materialize_grads(False)  # mean and rstd have no gradient: no zeros made for them


def _norm_grad(ctx, dy, grad_mean, grad_rstd):
    rows, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _norm_backward(dy, rows, weight, ctx.bias_dtype is not None, mean, rstd, ctx.is_rms)
    return dx, _cast(dw, weight), _cast(db, ctx.bias_dtype), None, None, None


_norm_forward.register_autograd(_norm_grad, setup_context=_norm_setup_context)
