"""Launch helpers shared by the Triton kernels of fastlm/triton_kernels/."""
import contextlib
import functools

import torch

# Compile options of every launch. FMA contraction is stated, not left to Triton's default (on up
# to 3.9, off from 3.10): the kernels' numerics and their sm_90 compile checks assume it.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}


def device_guard(t):
    """Make t's CUDA device current while a kernel is launched: Triton launches on the current
    device, which need not be the one holding the tensors (logits on cuda:1, current device 0)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


# Host-side integer helpers. triton.cdiv and triton.next_power_of_2 are constexpr functions in
# recent Triton, several microseconds per call on the host (they unwrap constexpr arguments).

def cdiv(a, b):
    """ceil(a / b) for ints."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of 2 >= n (0 for 0), as triton.next_power_of_2."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


@functools.lru_cache(maxsize=None)
def sm_count(device):
    """Streaming multiprocessors of a CUDA device (a torch.device), read once per device."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def attention_output_like(q):
    """An empty (B, H, T, D) tensor for attention's output, in q's memory order: when q is a
    (B, T, H, D) tensor seen as (B, H, T, D) (the GPT's heads of its qkv projection), so is the
    output, and the caller's transpose back to (B, T, H * D) is a view rather than a copy, as with
    SDPA's flash kernel; contiguous otherwise. Shared by the launcher and the custom op's fake
    implementation, so that torch.compile sees the strides the kernel writes."""
    B, H, T, D = q.shape
    if H > 1 and T > 1 and q.stride(2) > q.stride(1):
        return torch.empty((B, T, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    return torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
