"""Causal self-attention: one public function, three backends.

causal_attention(q, k, v) computes softmax(q k^T * scale + causal mask) v per head, with
grouped-query attention: q has H heads, k and v have H_kv heads, H_kv divides H, and query
head h reads key/value head h // (H // H_kv).

Backends
  torch   explicit float math (scores, mask, softmax in fp32 or wider, weighted sum); the oracle.
  sdpa    torch.nn.functional.scaled_dot_product_attention(is_causal=True).
  triton  FlashAttention-2 style kernels (fastlm/triton_kernels/attention.py): O(T) memory, the
          T x T matrix is never stored; forward and backward.
  auto    sdpa, which picks PyTorch's fastest kernel itself (cuDNN's or flash's on CUDA): on an
          H200 at GPT-2's training shapes it beat the Triton kernel (see auto_preference). The
          Triton kernel is for backend="triton" (bf16/fp16; fp32 runs its dots without tensor
          cores).
There is no compiled C++/CUDA attention: "cpp" and "cuda" report why.
"""
import math
import numbers

import torch
import torch.nn.functional as F

from fastlm.ops.backends import launches_directly, register_op, resolve_backend, triton_unusable_reason
from fastlm.ops.checks import check_same_device, check_tensor, dtype_name

OP = "causal_attention"
TRITON_HEAD_DIMS = (16, 32, 64, 128)
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# float64 is accepted by the torch and sdpa paths so tests can build a float64 oracle.
DTYPES = TRITON_DTYPES + (torch.float64,)


def backend_reasons(device, dtype=None, head_dim=None):
    """{backend: None if usable on `device` for this dtype and head size (when given), else why not}."""
    triton = triton_unusable_reason(device)
    if triton is None and head_dim is not None and head_dim not in TRITON_HEAD_DIMS:
        triton = f"head size D={head_dim} is not one of {TRITON_HEAD_DIMS}"
    if triton is None and dtype is not None and dtype not in TRITON_DTYPES:
        triton = f"dtype {dtype_name(dtype)} is not one of float16, bfloat16, float32"
    return {
        "torch": None,
        "sdpa": None,
        "triton": triton,
        "cpp": "no compiled C++ attention kernel exists; use sdpa or triton",
        "cuda": "no compiled CUDA attention kernel exists; use triton (FlashAttention-2 style) or sdpa",
    }


def auto_preference(device, dtype=None):
    # SDPA everywhere, the Triton kernel by name. On an H200 (2026-11-27) in the GPT-2 small
    # training step (B32 H12 T1024 D64, bf16) SDPA's own pick, cuDNN's flash kernels, took 7.2 ms of
    # device time a step and the Triton kernels 9.7 ms; against SDPA pinned to its flash-attention
    # kernel the Triton kernel leads only from about 256K tokens a call (1.08-1.21x).
    return ("sdpa",)


register_op(OP, backend_reasons, auto_preference)


def causal_attention(q, k, v, *, scale=None, backend="auto"):
    """Causal (GQA-capable) scaled dot-product attention.

    q: (B, H, T, D); k, v: (B, H_kv, T, D) with H % H_kv == 0; same dtype (fp16, bf16, fp32;
    fp64 on the torch/sdpa backends) and device. scale defaults to 1/sqrt(D).
    Returns (B, H, T, D) in q's dtype. Differentiable in q, k and v on every backend.
    """
    scale = _check_inputs(q, k, v, scale)
    if backend == "triton" and (q.shape[-1] not in TRITON_HEAD_DIMS or q.dtype not in TRITON_DTYPES):
        # A bad input rather than a missing backend: a ValueError naming the shape and dtype.
        raise ValueError(f"{OP}: backend 'triton' supports D in {TRITON_HEAD_DIMS} and dtypes float16, "
                         f"bfloat16, float32; got q {tuple(q.shape)} {_dt(q)}")
    name = resolve_backend(OP, q.device, backend, dtype=q.dtype, head_dim=q.shape[-1])
    if name == "torch":
        return attention_reference(q, k, v, scale)
    if name == "sdpa":
        return _sdpa(q, k, v, scale)
    return _triton(q, k, v, scale)


def _check_inputs(q, k, v, scale):
    """Validate shapes/dtypes/devices; return the scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, ndims=(4,), dtypes=DTYPES)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{OP}: q, k and v must share one dtype, got q {_dt(q)}, k {_dt(k)}, v {_dt(v)}")
    check_same_device(OP, q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"{OP}: k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    B, H, T, D = q.shape
    Bk, Hkv, Tk, Dk = k.shape
    if (Bk, Tk, Dk) != (B, T, D):
        raise ValueError(f"{OP}: k/v must be (B, H_kv, T, D) = ({B}, H_kv, {T}, {D}) to match q "
                         f"{tuple(q.shape)}, got {tuple(k.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{OP}: the number of q heads ({H}) must be a multiple of the number of "
                         f"k/v heads ({Hkv}); q {tuple(q.shape)}, k {tuple(k.shape)}")
    if T == 0 or D == 0:
        raise ValueError(f"{OP}: T and D must be >= 1, got q {tuple(q.shape)}")
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"{OP}: scale must be a finite real number or None, got {scale!r}")
    return float(scale)


def _dt(t):
    return dtype_name(t.dtype)


def attention_reference(q, k, v, scale):
    """Explicit math: scores = q k^T * scale, causal mask, softmax in fp32 (fp64 for fp64), @ v.

    Runs with autocast off so the softmax really is fp32 under mixed precision; the result is
    cast back to q's dtype. Materialises the (B, H, T, T) scores: a reference, not a fast path.
    """
    group = q.shape[1] // k.shape[1]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.autocast(q.device.type, enabled=False):
        qf, kf, vf = q.to(compute), k.to(compute), v.to(compute)
        if group > 1:
            kf = kf.repeat_interleave(group, dim=1)
            vf = vf.repeat_interleave(group, dim=1)
        scores = torch.matmul(qf, kf.transpose(-2, -1)) * scale
        T = q.shape[2]
        future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, vf)
    return out.to(q.dtype)


def _sdpa(q, k, v, scale):
    group = q.shape[1] // k.shape[1]
    causal = dict(is_causal=True)
    if scale == 0.0:
        # torch's fused CPU kernel returns nan for is_causal with scale=0 (0 * -inf); an explicit
        # mask takes the path that gives the uniform average over the prefix, as the reference does.
        T = q.shape[2]
        causal = dict(attn_mask=torch.ones(T, T, dtype=torch.bool, device=q.device).tril_())
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **causal)
    try:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **causal)
    except (RuntimeError, TypeError):
        # Kernels without GQA support: repeat k/v per group (autograd sums dk/dv back).
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, dim=1),
                                              v.repeat_interleave(group, dim=1), scale=scale, **causal)


def _triton(q, k, v, scale):
    if launches_directly(q, k, v):
        return _FlashAttention.apply(q, k, v, scale)
    out, _ = _flash_forward(q, k, v, scale)
    return out


# The Triton path is two custom ops with a registered autograd formula, so torch.compile treats
# each as one opaque call (no graph break, no tracing into the launcher), and autograd saves
# only q, k, v, O and the (B, H, T) log-sum-exp. Plain eager calls (launches_directly) take
# _FlashAttention instead: the same launchers and formula without the custom ops' dispatch.
# Kernels are imported on first call.

class _FlashAttention(torch.autograd.Function):
    # forward(ctx, ...) rather than a separate setup_context: with the latter, every apply() binds
    # its arguments through inspect.signature (tens of microseconds). Only O is an output.
    @staticmethod
    def forward(ctx, q, k, v, scale):
        from fastlm.triton_kernels.attention import attention_forward

        out, lse = attention_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from fastlm.triton_kernels.attention import attention_backward

        q, k, v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the custom op, so that differentiating the gradients again raises
            # there (it has no autograd formula) instead of treating them as constants.
            return (*_flash_backward(grad_out, q, k, v, out, lse, ctx.scale), None)
        return (*attention_backward(grad_out, q, k, v, out, lse, ctx.scale), None)


@torch.library.custom_op("fastlm::flash_attention_forward", mutates_args=())
def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from fastlm.triton_kernels.attention import attention_forward

    return attention_forward(q, k, v, scale)


@_flash_forward.register_fake
def _(q, k, v, scale):
    B, H, T, _ = q.shape
    from fastlm.triton_kernels._launch import attention_output_like

    return attention_output_like(q), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("fastlm::flash_attention_backward", mutates_args=())
def _flash_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from fastlm.triton_kernels.attention import attention_backward

    return attention_backward(grad_out, q, k, v, out, lse, scale)


@_flash_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    from fastlm.triton_kernels._launch import attention_output_like

    return attention_output_like(q), attention_output_like(k), attention_output_like(k)


def _flash_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    # lse has no gradient: no (B, H, T) zeros for it (a memset launch per backward).
    ctx.set_materialize_grads(False)


def _flash_grad(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = _flash_backward(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_flash_forward.register_autograd(_flash_grad, setup_context=_flash_setup_context)
