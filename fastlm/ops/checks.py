"""Input checks shared by every op: each raises TypeError/ValueError naming the argument, its
shape, dtype or device, before any kernel runs."""
import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def check_tensor(op, name, t, *, ndims=None, dtypes=None):
    """Raise TypeError/ValueError naming `name` when t is not a tensor of an allowed rank and dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndims is not None and t.dim() not in ndims:
        raise ValueError(f"{op}: {name} must have {' or '.join(map(str, ndims))} dimensions, "
                         f"got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(dtype_name(d) for d in dtypes)
        raise TypeError(f"{op}: {name} must have dtype in ({names}), got {dtype_name(t.dtype)}")


def check_same_device(op, **tensors):
    """Raise ValueError when the given tensors are not all on one device."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
