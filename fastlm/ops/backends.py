"""Backends: which implementations of an op exist, which can run here, and which `auto` picks.

Every op registers two functions here: `reasons(device, dtype, head_dim)` -> {backend: None if
usable, else why not} and `preference(device, dtype)` -> the backends `auto` tries, in order.
`resolve_backend` is the one place a backend is chosen; the ops call it for every call (cheap:
an explicit name is only checked), and the model calls it once when it is built or moved.

`launches_directly` is the one place that decides whether a Triton launch goes through its custom
op (torch.library) or is called directly.
"""
import functools
import os
import re

import torch

from fastlm import _ext

_OPS = {}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


def register_op(name, reasons, preference):
    _OPS[name] = (reasons, preference)


def _registered(op):
    if op not in _OPS and op == "adamw":
        import fastlm.optim.adamw  # noqa: F401  (registers itself; lives outside fastlm.ops)
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; ops with backends: {', '.join(sorted(_OPS))}")
    return _OPS[op]


def backend_reasons(op, device, dtype=None, head_dim=None):
    """{backend: None if usable for `op` on `device` (and dtype/head size, when given), else why not}."""
    reasons, _ = _registered(op)
    return reasons(torch.device(device), dtype=dtype, head_dim=head_dim)


# Under torch.compile the choice is made once, while tracing, and is a constant of the graph.
@torch.compiler.assume_constant_result
def resolve_backend(op, device, backend="auto", *, dtype=None, head_dim=None):
    """The backend that runs `op` on `device`: `backend` itself when it is usable, or for "auto"
    the first usable backend of the op's preference, else "torch".

    An explicit backend that cannot run raises BackendUnavailable naming the reason; an unknown
    name raises ValueError. A missing or stale extension is reported once, as a warning.
    """
    reasons_fn, preference_fn = _registered(op)
    device = torch.device(device)
    reasons = reasons_fn(device, dtype=dtype, head_dim=head_dim)
    if backend == "auto":
        for name in preference_fn(device, dtype):
            if reasons.get(name, "unknown") is None:
                return name
            if name in ("cpp", "cuda"):
                _ext.extension(warn=True)  # one warning per process if the extension is missing or stale
        return "torch"
    if backend not in reasons:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {['auto', *reasons]}")
    if reasons[backend] is not None:
        if backend in ("cpp", "cuda"):
            _ext.extension(warn=True)
        raise BackendUnavailable(f"{op}: backend {backend!r} cannot run on {device.type}: {reasons[backend]}")
    return backend


def available_backends(device=None):
    """{op: {backend: None if usable on `device`, else the reason}}; device defaults to CUDA
    when present, else CPU."""
    _registered("adamw")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return {op: backend_reasons(op, device) for op in _OPS}


def launches_directly(*tensors):
    """True in plain eager mode on plain tensors: there the ops call their Triton launchers
    directly instead of through the torch.library custom ops that wrap them. An eager custom-op
    call passes Python layers of the dispatcher (autograd, ADInplaceOrView, backend) that cost
    tens of microseconds of host time, more than the launch itself. torch.compile (and export),
    dispatch modes (fake tensors, FlopCounterMode, ...), functorch transforms and tensor
    subclasses still see the custom ops: their fake implementations are what makes them traceable.
    An nn.Parameter (a norm's weight) is a plain tensor here.
    """
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active()) and all(
        type(t) in _PLAIN_TENSOR_TYPES for t in tensors if t is not None)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def triton_unusable_reason(device):
    """None when Triton kernels can run on tensors of `device`, else why not."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        if _version_tuple(triton.__version__) < INTERPRETER_MIN_TRITON:
            # Its interpreter fails on a loop bound computed from the program id ("only
            # 0-dimensional arrays can be converted to Python scalars"); 3.7 runs every kernel.
            return (f"the interpreter of triton {triton.__version__} cannot run fastlm's kernels on CPU tensors; "
                    f"triton >= {'.'.join(map(str, INTERPRETER_MIN_TRITON))} can (CUDA tensors are unaffected)")
        return None
    return f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got device {device.type!r}"


INTERPRETER_MIN_TRITON = (3, 7)


@functools.lru_cache(maxsize=None)
def _version_tuple(version):
    """(major, minor) of a version string such as '3.6.0' or '3.7.0+git1234'."""
    parts = re.findall(r"\d+", version)[:2]
    return tuple(int(p) for p in parts) + (0,) * (2 - len(parts))


def extension_op_unusable_reason(op_name, device, device_types=("cpu",)):
    """None when torch.ops.fastlm.<op_name> exists and handles `device`, else why not."""
    if device.type not in device_types:
        return f"the compiled {op_name} kernel handles {'/'.join(device_types)} tensors, got {device.type!r}"
    available, reason = _ext.extension_status()
    if not available:
        return reason
    if not _ext.has_op(op_name):
        return f"fastlm._C was built without the {op_name} kernel"
    if device.type == "cuda" and not _ext.extension(warn=False).with_cuda():
        return "fastlm._C was built without CUDA kernels"
    return None
