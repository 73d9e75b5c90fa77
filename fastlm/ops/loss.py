"""Cross-entropy over a vocabulary, and the fused lm_head matmul + cross-entropy.

cross_entropy(logits, targets)            = F.cross_entropy(logits.float(), targets) (+ z-loss)
linear_cross_entropy(hidden, weight, t)   = cross_entropy(hidden @ weight.T + bias, t),
                                            without ever holding all N x V logits

Backends:
  torch   the reference: F.cross_entropy on fp32 logits; linear_cross_entropy in row chunks
          with the per-chunk gradient written by plain PyTorch (bounded memory on any device).
  triton  fastlm/triton_kernels/cross_entropy.py: one pass over each row with an online softmax;
          loss and log-sum-exp in the forward and, when a gradient is needed, the gradient
          written in the same pass.
  cpp     csrc/cross_entropy_cpu.cpp: the same single-pass algorithm for CPU tensors
          (torch.ops.fastlm.cross_entropy_fwd).
  auto    triton on CUDA, cpp on CPU when the extension has the kernel, else torch.

z_loss (PaLM's auxiliary loss) adds z_loss * lse**2 to the loss of every non-ignored token
before the reduction: "mean" adds z_loss * mean(lse**2) over non-ignored tokens, "sum" adds
z_loss * sum(lse**2), "none" adds it per token (0 for ignored tokens).

Memory: with a fused backend and a gradient required, the gradient is written into the logits
buffer itself when the logits are an autograd intermediate (the usual `lm_head(x)` output), so
no second N x V buffer exists; their values are gone after the forward. Leaf tensors (ones the
caller created) are never overwritten: a separate gradient buffer is used. The version counter
of overwritten logits is bumped so that any other op that saved them fails loudly in backward.
The fused backwards scale their saved gradients in place (no second buffer), so each runs only
once (no retain_graph: a second run raises); linear_cross_entropy's does so only on CUDA, where
reading the incoming gradient would sync, and is repeatable on the CPU, as the torch backends'
are. Rows that share memory (an expanded tensor) are copied first. Neither op has a double
backward on these paths: the gradients come from the forward, so create_graph=True raises
(F.cross_entropy, the torch cross_entropy, has one).

linear_cross_entropy's memory: one chunk of logits (default_chunk_rows), the hidden gradient, and
the weight gradient's accumulator (fp32 for 16-bit weights: a bf16 sum over chunks would round
once per chunk). Each chunk's weight-gradient product goes into it through the matmul itself
where torch's CUDA addmm can accumulate 16-bit operands into fp32, else in slices of V; the
gradient handed back is the accumulator rounded over its own bytes. So no V x D buffer exists
beside the accumulator.

Loss scaling: a fused backend forms d loss / d logits in the forward and may store it in 16 bits
(the logits' dtype). Scaled only later by a GradScaler's factor, most of its entries would have
rounded to zero in fp16. `grad_scale=` (the factor the caller multiplies the loss by before
backward, e.g. the GradScaler's scale tensor) makes the forward store the gradient already
scaled; the backward divides it back out. The gradient is the same; only its rounding improves.

Targets: their range is checked where that costs no device sync (CPU tensors, eager mode). On
CUDA, and under torch.compile, it is left to the data path, which checks every token id once
when the data is loaded.

torch.compile: both ops trace without graph breaks (the kernels are custom ops with fake
implementations; backend choice and chunk size are constants of the trace).
"""
import functools
import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from fastlm.ops.backends import (extension_op_unusable_reason, launches_directly, register_op, resolve_backend,
                                 triton_unusable_reason)
from fastlm.ops.checks import FLOAT_DTYPES, check_same_device, check_tensor, dtype_name

OP = "cross_entropy"
LINEAR_OP = "linear_cross_entropy"
REDUCTIONS = ("mean", "sum", "none")
CPP_OP_NAME = "cross_entropy_fwd"
# float64 is accepted so that gradcheck can run on the torch and cpp paths.
LOGIT_DTYPES = FLOAT_DTYPES + (torch.float64,)
# Largest vocabulary the fused kernels are tested for (Llama 3 has 128256).
MAX_FUSED_VOCAB = 262144


# --------------------------------------------------------------------------------------------
# Backends and validation
# --------------------------------------------------------------------------------------------

def backend_reasons(device, dtype=None, head_dim=None):
    """{backend: None if usable on `device`, else why not}; cross_entropy and
    linear_cross_entropy have the same backends."""
    return {
        "torch": None,
        "triton": "the triton backend takes fp32/bf16/fp16, got float64" if dtype == torch.float64
        else triton_unusable_reason(device),
        "cpp": _cpp_unusable_reason(device),
        "cuda": "cross-entropy has no hand-written CUDA kernel; use backend='triton' on CUDA",
    }


def _cpp_unusable_reason(device):
    reason = extension_op_unusable_reason(CPP_OP_NAME, device)
    if reason is None:
        _register_cpp_fake()
    return reason


def auto_preference(device, dtype=None):
    # The Triton interpreter is usable on CPU but far too slow to be picked automatically.
    return ("triton",) if device.type == "cuda" else ("cpp",)


register_op(OP, backend_reasons, auto_preference)
register_op(LINEAR_OP, backend_reasons, auto_preference)


def _check_options(op, ignore_index, reduction, label_smoothing, z_loss):
    # Any integer type, as F.cross_entropy takes (a numpy int read from a config, say).
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"{op}: ignore_index must be an int, got {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{op}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not (math.isfinite(z_loss) and z_loss >= 0.0):
        raise ValueError(f"{op}: z_loss must be a finite float >= 0, got {z_loss!r}")


def _check_targets(op, targets, lead_shape, vocab, ignore_index):
    check_tensor(op, "targets", targets, dtypes=(torch.int64,))
    if tuple(targets.shape) != tuple(lead_shape):
        raise ValueError(f"{op}: targets must have shape {tuple(lead_shape)} (the leading dims of the "
                         f"input), got {tuple(targets.shape)}")
    if targets.device.type != "cpu" or torch.compiler.is_compiling():
        return  # the range check would cost a device sync (or a graph break): see the module doc
    bad = ((targets < 0) | (targets >= vocab)) & (targets != ignore_index)
    if targets.numel() and bool(bad.any()):
        value = int(targets[bad].flatten()[0])
        raise ValueError(f"{op}: targets must be in [0, {vocab}) or ignore_index={ignore_index}, "
                         f"got {value}")


def _check_grad_scale(op, grad_scale):
    if grad_scale is None:
        return
    if isinstance(grad_scale, torch.Tensor):
        if grad_scale.numel() != 1 or not grad_scale.is_floating_point():
            raise ValueError(f"{op}: grad_scale must be a float or a one-element float tensor, "
                             f"got a tensor of shape {tuple(grad_scale.shape)} and dtype {dtype_name(grad_scale.dtype)}")
    elif isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float)) or not grad_scale > 0:
        raise ValueError(f"{op}: grad_scale must be a positive float or a scalar tensor, got {grad_scale!r}")


def _check_cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss, grad_scale):
    check_tensor(OP, "logits", logits, ndims=(2, 3), dtypes=LOGIT_DTYPES)
    check_same_device(OP, logits=logits, targets=targets)
    _check_options(OP, ignore_index, reduction, label_smoothing, z_loss)
    _check_grad_scale(OP, grad_scale)
    if logits.shape[-1] == 0:
        raise ValueError(f"{OP}: logits must have a non-empty vocabulary dim, got shape {tuple(logits.shape)}")
    _check_targets(OP, targets, logits.shape[:-1], logits.shape[-1], ignore_index)


def _check_linear(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss,
                  chunk_size, grad_scale):
    check_tensor(LINEAR_OP, "hidden", hidden, ndims=(2, 3), dtypes=LOGIT_DTYPES)
    check_tensor(LINEAR_OP, "weight", weight, ndims=(2,), dtypes=LOGIT_DTYPES)
    if bias is not None:
        check_tensor(LINEAR_OP, "bias", bias, ndims=(1,), dtypes=LOGIT_DTYPES)
    check_same_device(LINEAR_OP, hidden=hidden, weight=weight, targets=targets, bias=bias)
    _check_options(LINEAR_OP, ignore_index, reduction, label_smoothing, z_loss)
    _check_grad_scale(LINEAR_OP, grad_scale)
    vocab, dim = weight.shape
    if vocab == 0 or hidden.shape[-1] != dim:
        raise ValueError(f"{LINEAR_OP}: weight must have shape (V, D) with V > 0 and D = hidden.shape[-1] "
                         f"= {hidden.shape[-1]}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (vocab,):
        raise ValueError(f"{LINEAR_OP}: bias must have shape ({vocab},), got {tuple(bias.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"{LINEAR_OP}: chunk_size must be None or a positive int, got {chunk_size!r}")
    _check_targets(LINEAR_OP, targets, hidden.shape[:-1], vocab, ignore_index)


def _check_same_dtype(hidden, weight, bias):
    dtypes = {"hidden": hidden.dtype, "weight": weight.dtype}
    if bias is not None:
        dtypes["bias"] = bias.dtype
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{k} {dtype_name(v)}" for k, v in dtypes.items())
        raise TypeError(f"{LINEAR_OP}: hidden, weight and bias must share a dtype (outside autocast), "
                        f"got {listing}")


def _reduce(loss_rows, count, reduction):
    """Reduce per-row losses (0 on ignored rows) the way F.cross_entropy does; count: the number
    of non-ignored rows (a tensor, from _count; needed for "mean" only)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    # 0/0 = nan when every row is ignored, as in F.cross_entropy.
    return loss_rows.sum() / count


def _count(targets, ignore_index, reduction):
    """The number of non-ignored rows (an int64 tensor) when the reduction needs it ("mean"), else
    None: every device op here is a kernel launch per call."""
    return (targets != ignore_index).sum() if reduction == "mean" else None


def _row_weight(count, reduction, dtype, grad_scale, device):
    """The factor of the unit gradient that the forward writes: 1/count for "mean", times the
    caller's grad_scale, as a scalar tensor on `device`."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if reduction == "mean":
        weight = count.clamp_min(1).to(acc).reciprocal()
        return weight if grad_scale is None else weight * _scalar(grad_scale, acc, device)
    return torch.ones((), dtype=acc, device=device) if grad_scale is None else _scalar(grad_scale, acc, device)


def _scalar(value, dtype, device):
    """A float or a one-element tensor as a 0-dim tensor of `dtype` on `device`. A float is filled
    in on the device: torch.as_tensor(float, device="cuda") is a host-to-device copy, which
    synchronizes with the device."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(())
    return torch.full((), value, device=device).to(dtype)  # the dtype torch.as_tensor(value) has


def _unscale(grad_out, grad_scale):
    """The incoming gradient with the grad_scale that the forward already applied divided out."""
    if grad_scale is None:
        return grad_out
    return grad_out / _scalar(grad_scale, grad_out.dtype, grad_out.device)


# --------------------------------------------------------------------------------------------
# References (pure PyTorch)
# --------------------------------------------------------------------------------------------

def cross_entropy_reference(logits, targets, *, ignore_index=-100, reduction="mean",
                            label_smoothing=0.0, z_loss=0.0):
    """F.cross_entropy on logits upcast to at least fp32, plus the z-loss term. Any shape
    accepted by cross_entropy; returns fp32 (float64 for float64 logits)."""
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute)
    if x.dim() == 3:
        x, targets = x.flatten(0, 1), targets.flatten()
    loss = F.cross_entropy(x, targets, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing) if reduction == "none" else \
        F.cross_entropy(x, targets, ignore_index=ignore_index, reduction=reduction,
                        label_smoothing=label_smoothing)
    if z_loss:
        valid = targets != ignore_index
        z_rows = torch.where(valid, z_loss * torch.logsumexp(x, dim=-1).square(), 0.0)
        loss = loss + _reduce(z_rows, valid.sum(), reduction)
    if reduction == "none":
        loss = loss.reshape(logits.shape[:-1])
    return loss


def linear_cross_entropy_reference(hidden, weight, targets, *, bias=None, **options):
    """The unfused computation: logits = hidden @ weight.T + bias, then cross_entropy_reference."""
    return cross_entropy_reference(F.linear(hidden, weight, bias), targets, **options)


def _ce_rows_torch(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
    """Per-chunk kernel contract in PyTorch, used by the chunked torch linear_cross_entropy.

    logits (n, V), targets (n,). Returns (loss_rows fp32 (n,), lse fp32 (n,)); when grad is given
    (it may be logits itself), writes d loss_rows / d logits * grad_scale into it (0 on ignored
    rows).
    """
    compute = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(compute)
    vocab = x.shape[-1]
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(x, dim=-1)
    target_logit = x.gather(1, safe_targets[:, None])[:, 0]
    loss = lse - (1.0 - label_smoothing) * target_logit
    if label_smoothing:
        loss = loss - label_smoothing * x.mean(dim=-1)
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if grad is not None:
        probs = torch.exp(x - lse[:, None])
        probs.mul_((1.0 + 2.0 * z_loss * lse)[:, None])
        if label_smoothing:
            probs.sub_(label_smoothing / vocab)
        probs.scatter_add_(1, safe_targets[:, None],
                           torch.full_like(lse[:, None], -(1.0 - label_smoothing)))
        probs.mul_((valid.to(compute) * grad_scale.to(compute))[:, None])
        grad.copy_(probs)
    return loss.to(torch.float32 if compute == torch.float32 else compute), lse


# --------------------------------------------------------------------------------------------
# Fused kernels behind one contract (same as _ce_rows_torch)
# --------------------------------------------------------------------------------------------

def _ce_rows_cpp(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
    return torch.ops.fastlm.cross_entropy_fwd(logits, targets, grad, ignore_index,
                                              float(label_smoothing), float(z_loss), grad_scale)


def _ce_rows_triton(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
    if launches_directly(logits, targets, grad, grad_scale):
        from fastlm.triton_kernels.cross_entropy import cross_entropy_rows

        return cross_entropy_rows(logits, targets, grad, ignore_index, float(label_smoothing), float(z_loss),
                                  grad_scale)
    return _triton_rows(logits, targets, grad, ignore_index, float(label_smoothing), float(z_loss), grad_scale)


# The Triton launches as custom ops, so that torch.compile sees one call with a known effect
# (it writes `grad`, `x`) instead of tracing into the launcher; plain eager calls skip them
# (launches_directly). The kernels are imported on first call.
@torch.library.custom_op("fastlm::cross_entropy_rows_triton", mutates_args=("grad",))
def _triton_rows(logits: torch.Tensor, targets: torch.Tensor, grad: Optional[torch.Tensor], ignore_index: int,
                 label_smoothing: float, z_loss: float, grad_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from fastlm.triton_kernels.cross_entropy import cross_entropy_rows

    return cross_entropy_rows(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale)


@_triton_rows.register_fake
def _(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32), logits.new_empty(logits.shape[:1],
                                                                                     dtype=torch.float32)


@torch.library.custom_op("fastlm::scale_rows_triton", mutates_args=("x",))
def _triton_scale_rows(x: torch.Tensor, scale: torch.Tensor) -> None:
    from fastlm.triton_kernels.cross_entropy import scale_rows_

    scale_rows_(x, scale)


@_triton_scale_rows.register_fake
def _(x, scale):
    return None


@functools.lru_cache(maxsize=None)
def _register_cpp_fake():
    # The C++ kernel's shapes for torch.compile, registered once the extension has defined the op.
    @torch.library.register_fake("fastlm::cross_entropy_fwd")
    def _(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
        acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
        return logits.new_empty(logits.shape[:1], dtype=acc), logits.new_empty(logits.shape[:1], dtype=acc)


_ROW_KERNELS = {"torch": _ce_rows_torch, "cpp": _ce_rows_cpp, "triton": _ce_rows_triton}


def _refuse_double_backward(op, backend):
    """The fused backwards hand back gradients formed in the forward, outside autograd: a graph
    of the backward (create_graph=True) would silently lack their second derivative."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(f"{op}: backend {backend!r} has no double backward (create_graph=True); "
                           "use F.cross_entropy on the logits (cross_entropy's backend 'torch') for it")


def _is_one(grad_out):
    """True when the scalar grad_out is exactly 1 and checking costs no device sync (or graph break)."""
    return grad_out.device.type == "cpu" and not torch.compiler.is_compiling() and grad_out.item() == 1.0


def _scales_in_place(grad_out):
    """Whether the fused linear_cross_entropy backward scales its saved gradients in place: where
    the host cannot read the incoming gradient without a device sync (CUDA), outside
    torch.compile. On the CPU it reads it and needs no pass at all when it is 1, the usual case."""
    return grad_out.device.type != "cpu" and not torch.compiler.is_compiling()


def _scale_in_place(t, grad_out, backend):
    """t *= grad_out (a scalar tensor), with no pass over t when grad_out is exactly 1: the host
    checks a CPU scalar; for the triton backend the kernel checks it on the device (reading it
    on the host would be a sync), so that a 1 (the usual case: a plain loss.backward(), or a loss
    scaled by the grad_scale the forward applied) costs one launch instead of a read and write
    of all N x V entries. Under torch.compile the multiply is left to the compiler."""
    if _is_one(grad_out):
        return t
    if backend == "triton" and not torch.compiler.is_compiling() and t.dim() == 2 and t.stride(-1) == 1:
        scale = grad_out.to(torch.float32)
        if launches_directly(t, scale):
            from fastlm.triton_kernels.cross_entropy import scale_rows_

            return scale_rows_(t, scale)
        _triton_scale_rows(t, scale)
        return t
    return t.mul_(grad_out.to(torch.float32 if t.dtype != torch.float64 else t.dtype))


# --------------------------------------------------------------------------------------------
# cross_entropy
# --------------------------------------------------------------------------------------------

class _FusedCrossEntropy(torch.autograd.Function):
    """Fused forward that leaves the (unit) gradient in a buffer; backward only scales it."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, label_smoothing, z_loss, backend,
                overwrite, needs_grad, grad_scale):
        count = _count(targets, ignore_index, reduction)
        grad = None
        if needs_grad:
            grad = logits if overwrite else torch.empty_like(logits)
        weight = _row_weight(count, reduction, logits.dtype, grad_scale, logits.device)
        kernel = _ROW_KERNELS[backend]
        loss_rows, _ = kernel(logits, targets, grad, ignore_index, label_smoothing, z_loss, weight)
        if grad is not None:
            if overwrite:
                torch.autograd.graph.increment_version(logits)
            ctx.save_for_backward(grad)
        ctx.reduction, ctx.grad_scale, ctx.backend = reduction, grad_scale, backend
        ctx.used = False
        return _reduce(loss_rows, count, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_double_backward(OP, ctx.backend)
        if ctx.used:
            raise RuntimeError(f"{OP}: the fused backward scales its saved gradient in place and "
                               "cannot run twice; use backend='torch' with retain_graph=True")
        ctx.used = True
        (grad,) = ctx.saved_tensors
        grad_loss = _unscale(grad_loss, ctx.grad_scale)
        if ctx.reduction == "none":
            grad.mul_(grad_loss[:, None].to(torch.float32 if grad.dtype != torch.float64 else grad.dtype))
        else:
            _scale_in_place(grad, grad_loss, ctx.backend)
        return grad, None, None, None, None, None, None, None, None, None


def _rows_are_a_view(logits):
    """True when logits.reshape(-1, V) is a view (no copy) of logits."""
    if logits.dim() == 2 or logits.shape[0] == 1 or logits.shape[1] == 1:
        return True
    return logits.stride(0) == logits.shape[1] * logits.stride(1)


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
                  z_loss=0.0, grad_scale=None, backend="auto"):
    """Cross-entropy of `logits` against class indices `targets`.

    logits: (N, V) or (B, T, V), fp32/bf16/fp16 (float64 for tests); any strides.
    targets: int64 of logits.shape[:-1]; each in [0, V) or equal to ignore_index.
    reduction: "mean" (over non-ignored tokens; nan if all are ignored, as in PyTorch), "sum",
    or "none" (shape logits.shape[:-1], 0 on ignored tokens).
    grad_scale: None, or the factor (float or scalar tensor) the loss will be multiplied by
    before backward, e.g. a GradScaler's scale: see "Loss scaling" in the module doc.
    Returns fp32 (float64 for float64 logits) whatever the input dtype; differentiable w.r.t.
    logits. With a fused backend the logits buffer may be overwritten (see the module doc).
    """
    _check_cross_entropy(logits, targets, ignore_index, reduction, label_smoothing, z_loss, grad_scale)
    ignore_index = int(ignore_index)
    name = resolve_backend(OP, logits.device, backend, dtype=logits.dtype)
    options = dict(ignore_index=ignore_index, reduction=reduction,
                   label_smoothing=float(label_smoothing), z_loss=float(z_loss))
    if name == "torch":
        return cross_entropy_reference(logits, targets, **options)
    lead_shape, vocab = logits.shape[:-1], logits.shape[-1]
    if vocab > MAX_FUSED_VOCAB:
        raise ValueError(f"{OP}: backend {name!r} supports V <= {MAX_FUSED_VOCAB}, got V={vocab}")
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    rows = logits.reshape(-1, vocab)
    # Rows that share memory (an expanded tensor, stride 0) cannot each hold their own gradient.
    overlapping = needs_grad and rows.shape[0] > 1 and rows.stride(0) < vocab
    copied = logits.stride(-1) != 1 or overlapping or not _rows_are_a_view(logits)
    if logits.stride(-1) != 1 or overlapping:
        rows = rows.contiguous()
    # Only an autograd intermediate (or our own copy) may hold its own gradient: callers own
    # leaves, and views of leaves. Under torch.compile the graph owns every buffer: no overwrite.
    overwrite = needs_grad and not torch.compiler.is_compiling() and (copied or _is_intermediate(logits))
    loss = _FusedCrossEntropy.apply(rows, targets.reshape(-1), ignore_index, reduction,
                                    options["label_smoothing"], options["z_loss"],
                                    name, overwrite, needs_grad, grad_scale)
    return loss.reshape(lead_shape) if reduction == "none" else loss


def _is_intermediate(t):
    base = t._base if t._is_view() else t
    return base.grad_fn is not None


# --------------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------------

CPU_CHUNK_BYTES = 256 * 2**20


@torch.compiler.assume_constant_result
def default_chunk_rows(n_rows, vocab, device, logits_dtype=torch.float32):
    """Rows per chunk so that one chunk of logits stays within a memory budget: 256 MiB on CPU;
    on CUDA 1/128 of the GPU's total memory, clamped to [64 MiB, 512 MiB] (a chunk of thousands
    of rows keeps the matmuls efficient; at Llama 3's vocabulary a larger one would hold more
    memory than the weight gradient's accumulator). A function of the shape and the device alone
    (not of free memory), so the chunking, and with it the summation order of the weight
    gradient, is the same in every run and after every resume."""
    return _chunk_rows(n_rows, vocab, torch.device(device), logits_dtype)


@functools.lru_cache(maxsize=None)
def _chunk_rows(n_rows, vocab, device, logits_dtype):
    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = min(max(total // 128, 64 * 2**20), 512 * 2**20)
    elem = torch.empty((), dtype=logits_dtype).element_size()
    return max(1, min(n_rows, budget // (vocab * elem)))


def _chunk_logits(out, hidden_chunk, weight, bias):
    if bias is None:
        return torch.matmul(hidden_chunk, weight.t(), out=out)
    return torch.addmm(bias, hidden_chunk, weight.t(), out=out)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Rows in chunks: logits = h_c @ W.T (+ b), fused CE writing d loss / d logits in place,
    then the chunk's grad of hidden, weight and bias, all in the forward (mean/sum). For
    reduction="none" the per-row incoming gradient is only known in backward, so the backward
    recomputes the chunks instead. Without a gradient to compute (no_grad, inference_mode, or
    no input requiring grad), the forward computes the loss only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, label_smoothing, z_loss,
                chunk_rows, backend, needs_grad, grad_scale):
        kernel = _ROW_KERNELS[backend]
        grads_now = needs_grad and reduction != "none"
        count = _count(targets, ignore_index, reduction)
        row_weight = _row_weight(count, reduction, hidden.dtype, grad_scale, hidden.device)
        loss_rows, grads = _chunked_pass(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss,
                                         chunk_rows, kernel, row_weight, with_grads=grads_now)
        ctx.reduction, ctx.grad_scale, ctx.backend = reduction, grad_scale, backend
        ctx.has_bias = bias is not None
        ctx.used = False
        ctx.param_dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if grads_now:
            grads = (grads[0], _round_accumulator(grads[1], weight.dtype), grads[2])
            ctx.save_for_backward(*[g for g in grads if g is not None])
        elif needs_grad:
            ctx.save_for_backward(hidden, weight, bias, targets, row_weight)
            ctx.options = (ignore_index, label_smoothing, z_loss, chunk_rows, kernel)
        return _reduce(loss_rows, count, reduction)

    @staticmethod
    def backward(ctx, grad_loss):
        _refuse_double_backward(LINEAR_OP, ctx.backend)
        grad_loss = _unscale(grad_loss, ctx.grad_scale)
        if ctx.reduction != "none":
            in_place = ctx.backend != "torch" and _scales_in_place(grad_loss)
            if in_place:
                # Checked before the saved tensors are read: after the first run they fail autograd's
                # version check, with a message that does not say why.
                if ctx.used:
                    raise RuntimeError(f"{LINEAR_OP}: on {grad_loss.device.type} the fused backward scales its "
                                       "saved gradients in place and cannot run twice; use backend='torch' "
                                       "with retain_graph=True")
                ctx.used = True
            saved = list(ctx.saved_tensors)
            grads = (saved[0], saved[1], saved[2] if ctx.has_bias else None)
            if in_place:
                # A copy would be a second V x D weight gradient beside the saved one (1 GB in bf16
                # at Llama 3's lm_head), and whether grad_loss is 1 is not known on the host without
                # a sync: the multiply is issued (for triton, a kernel that skips its pass when it
                # is 1). The saved gradients are then spent: the backward runs once, as
                # cross_entropy's does.
                grads = tuple(None if g is None else _scale_in_place(g, grad_loss, ctx.backend) for g in grads)
            elif not _is_one(grad_loss):
                # Out of place, so that the backward may run again (retain_graph, gradcheck).
                grads = tuple(None if g is None else g * grad_loss for g in grads)
            grad_hidden, grad_weight, grad_bias = grads
        else:
            hidden, weight, bias, targets, row_weight = ctx.saved_tensors
            ignore_index, label_smoothing, z_loss, chunk_rows, kernel = ctx.options
            _, (grad_hidden, grad_weight, grad_bias) = _chunked_pass(
                hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, chunk_rows, kernel,
                row_weight, with_grads=True, row_grad_out=grad_loss)
            grad_weight = _round_accumulator(grad_weight, weight.dtype)
        weight_dtype, bias_dtype = ctx.param_dtypes
        return (grad_hidden, grad_weight.to(weight_dtype),
                None if grad_bias is None else grad_bias.to(bias_dtype),
                None, None, None, None, None, None, None, None, None)


def _chunked_pass(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, chunk_rows, kernel,
                  row_weight, with_grads, row_grad_out=None):
    """One pass over the rows in chunks: (loss_rows, grads). With with_grads, grads are
    (grad_hidden, grad_weight fp32-or-wider, grad_bias or None) of sum_rows(loss_row * row_weight
    [* row_grad_out]); otherwise grads is None and no gradient buffer exists."""
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    loss_rows = torch.empty(n_rows, dtype=torch.float64 if hidden.dtype == torch.float64 else torch.float32,
                            device=hidden.device)
    buffer = torch.empty(min(chunk_rows, n_rows), vocab, dtype=hidden.dtype, device=hidden.device)
    grads = None
    if with_grads:
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grads = (torch.empty_like(hidden), torch.zeros(weight.shape, dtype=acc, device=weight.device),
                 None if bias is None else torch.zeros(bias.shape, dtype=acc, device=bias.device))
    for start in range(0, n_rows, chunk_rows):
        stop = min(start + chunk_rows, n_rows)
        logits = _chunk_logits(buffer[: stop - start], hidden[start:stop], weight, bias)
        loss_rows[start:stop], _ = kernel(logits, targets[start:stop], logits if with_grads else None,
                                          ignore_index, label_smoothing, z_loss, row_weight)
        if with_grads:
            if row_grad_out is not None:
                logits.mul_(row_grad_out[start:stop, None].to(logits.dtype))
            _accumulate(grads, logits, hidden, weight, start, stop)
    return loss_rows, grads


# Without a matmul that accumulates 16-bit products into fp32 (below), a half-precision chunk's
# weight-gradient product is formed in this many slices of the vocabulary before each is added to
# the fp32 accumulator: a V/8 x D temporary instead of V x D (1 GB in bf16 at Llama 3's
# 128256 x 4096). Each slice is still a large matmul.
WEIGHT_GRAD_SLICES = 8
# Whether torch's CUDA addmm accumulates 16-bit operands into an fp32 `out` that is also its input
# (out_dtype=torch.float32; some torch versions require the input in the operands' dtype and
# refuse, before doing anything): None until first tried, then True or False for the process.
_FP32_ACCUMULATING_ADDMM = {"usable": None}


def _accumulate(grads, dlogits, hidden, weight, start, stop):
    grad_hidden, grad_weight, grad_bias = grads
    torch.matmul(dlogits, weight, out=grad_hidden[start:stop])
    if grad_weight.dtype == dlogits.dtype:
        grad_weight.addmm_(dlogits.t(), hidden[start:stop])
    else:  # half-precision chunk: accumulate over chunks in fp32
        _add_half_product(grad_weight, dlogits.t(), hidden[start:stop])
    if grad_bias is not None:
        grad_bias.add_(dlogits.sum(0, dtype=grad_bias.dtype))


def _fp32_accumulating_addmm_possible(acc):
    return acc.is_cuda and _FP32_ACCUMULATING_ADDMM["usable"] is not False and not torch.compiler.is_compiling()


def weight_grad_accumulation():
    """How 16-bit weight-gradient products reach their fp32 accumulator in this process: "addmm"
    (the matmul accumulates), "slices" (formed in slices of V, then added), or "untried"."""
    return {None: "untried", True: "addmm", False: "slices"}[_FP32_ACCUMULATING_ADDMM["usable"]]


def _add_half_product(acc, a, b):
    """acc (fp32, V x D) += a @ b for 16-bit a (V x rows) and b (rows x D)."""
    if _fp32_accumulating_addmm_possible(acc):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        except (RuntimeError, TypeError):
            if _FP32_ACCUMULATING_ADDMM["usable"]:
                raise  # it worked before: a real error
            _FP32_ACCUMULATING_ADDMM["usable"] = False
        else:
            _FP32_ACCUMULATING_ADDMM["usable"] = True
            return
    vocab = acc.shape[0]
    step = -(-vocab // WEIGHT_GRAD_SLICES // 64) * 64  # a multiple of 64 rows: aligned matmul operands
    for v in range(0, vocab, step):
        acc[v:v + step].add_(a[v:v + step] @ b)


def _round_accumulator(acc, dtype):
    """The weight gradient's fp32 accumulator as `dtype` (the weight's). For a 16-bit weight it is
    rounded into the first half of the accumulator's own storage (round_in_place), so that the
    gradient handed back costs no second V x D buffer beside the accumulator; the storage stays
    the accumulator's size while the gradient lives. Under torch.compile a plain cast."""
    if acc.dtype == dtype:
        return acc
    if acc.dtype != torch.float32 or dtype not in (torch.bfloat16, torch.float16) or torch.compiler.is_compiling():
        return acc.to(dtype)
    return round_in_place(acc, dtype)


def round_in_place(acc, dtype):
    """acc (a contiguous fp32 tensor) rounded to the 16-bit `dtype`, written over the first half of
    acc's own bytes; returns that view, shaped like acc, with the values of acc.to(dtype). acc is
    consumed. Elements [a, 2a) go in one copy: they land on bytes [2a, 4a), which hold elements
    already converted, never ones still to be read ([4a, ...)). The first slice, which lands on
    its own bytes, goes through a small temporary."""
    flat = acc.view(-1)
    n = flat.numel()
    out = flat.view(dtype)[:n]
    first = min(n, max(1, n // 64))
    out[:first].copy_(flat[:first].to(dtype))
    done = first
    while done < n:
        end = min(n, 2 * done)
        out[done:end].copy_(flat[done:end])
        done = end
    return out.view(acc.shape)


def linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, z_loss=0.0, chunk_size=None, grad_scale=None, backend="auto"):
    """cross_entropy(hidden @ weight.T + bias, targets) without materialising all the logits.

    hidden: (N, D) or (B, T, D); weight: (V, D) as in lm_head.weight; bias: (V,) or None; all of
    one float dtype (fp32/bf16/fp16; float64 for tests), or any mix under autocast, which casts
    them to the autocast dtype as F.linear would. targets: int64 of hidden.shape[:-1].
    chunk_size: rows of logits that exist at once (None: default_chunk_rows). grad_scale, other
    options and the returned fp32 loss as in cross_entropy. Every backend (torch included) runs
    in chunks; linear_cross_entropy_reference is the unchunked computation. Under no_grad or
    inference_mode only the loss is computed (no gradient buffers, no gradient matmuls).
    """
    _check_linear(hidden, weight, targets, bias, ignore_index, reduction, label_smoothing, z_loss,
                  chunk_size, grad_scale)
    ignore_index = int(ignore_index)
    device = hidden.device
    if torch.is_autocast_enabled(device.type):
        cast = torch.get_autocast_dtype(device.type)
        hidden, weight = hidden.to(cast), weight.to(cast)
        bias = None if bias is None else bias.to(cast)
    _check_same_dtype(hidden, weight, bias)
    name = resolve_backend(LINEAR_OP, device, backend, dtype=hidden.dtype)
    if name != "torch" and weight.shape[0] > MAX_FUSED_VOCAB:
        raise ValueError(f"{LINEAR_OP}: backend {name!r} supports V <= {MAX_FUSED_VOCAB}, got V={weight.shape[0]}")
    lead_shape = hidden.shape[:-1]
    rows = hidden.reshape(math.prod(lead_shape), hidden.shape[-1])  # not -1: D may be 0
    chunk_rows = chunk_size or default_chunk_rows(rows.shape[0], weight.shape[0], device, hidden.dtype)
    # Grad mode decides, not requires_grad alone: under no_grad the forward must not pay for gradients.
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    with torch.autocast(device.type, enabled=False):
        loss = _ChunkedLinearCrossEntropy.apply(rows, weight, bias, targets.reshape(-1), ignore_index,
                                                reduction, float(label_smoothing), float(z_loss),
                                                chunk_rows, name, needs_grad, grad_scale)
    return loss.reshape(lead_shape) if reduction == "none" else loss
