"""What every op shares: backend names, backend resolution and input checks.

Each op module (cross_entropy.py, attention.py, ...) validates its inputs with these helpers
before any kernel runs, then resolves `backend=` with `resolve_backend`.
"""
import os

import torch

from fastlm import _ext

BACKENDS = ("auto", "torch", "triton", "cuda", "cpp")


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here (the message says why)."""


def triton_unusable_reason(device):
    """None when Triton kernels can run on tensors of `device`, else why not."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"triton needs a CUDA tensor (or TRITON_INTERPRET=1 for CPU tensors), got device {device.type!r}"


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


def resolve_backend(op, backend, device, reasons, preference):
    """Pick the backend to run.

    reasons: {backend: None if usable else why not} for every backend the op has.
    preference: backends to try, in order, for backend="auto".
    An explicit backend that cannot run raises BackendUnavailable naming the reason.
    """
    if backend == "auto":
        for name in preference:
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


def check_tensor(op, name, t, *, ndims=None, dtypes=None):
    """Raise TypeError/ValueError naming `name` when t is not a tensor of an allowed rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndims is not None and t.dim() not in ndims:
        raise ValueError(f"{op}: {name} must have {' or '.join(map(str, ndims))} dimensions, "
                         f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(op, **tensors):
    """Raise ValueError when the given tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
