"""Parallelism past one device's memory: FSDP2 sharding and activation checkpointing.

Both are PyTorch's own machinery, applied to a built GPT in place:

  apply_activation_checkpointing(model, mode)   recompute blocks (or their attention) in backward
                                                 instead of keeping their activations
  apply_fsdp(model, device, ...)                 torch.distributed.fsdp.fully_shard (FSDP2) on every
                                                 block, then on the root (embedding, tied lm_head,
                                                 final norm); parameters become DTensors sharded
                                                 on dim 0 over a 1-D mesh of all ranks

Order: activation checkpointing, then FSDP, then the optimizer (it must see the DTensors).
fastlm.optim.AdamW updates the local shards with its fused kernels and clips by the global norm;
fastlm.checkpoint_sharded saves and loads the sharded state with torch.distributed.checkpoint.

What runs where under FSDP: the root's pre-forward all-gathers the embedding (tied to lm_head),
so linear_cross_entropy receives the plain, unsharded weight that FSDP gathered (no full logits,
no further copy); each block all-gathers its own parameters around its forward and backward
(freed again after forward with reshard_after_forward), and gradients are reduce-scattered,
averaged over ranks, in fp32 when parameters compute in bf16.
"""
import functools
import os

import torch
import torch.distributed as dist

from fastlm.config import ConfigError

PARALLEL_CHOICES = ("ddp", "fsdp")
CHECKPOINTING_CHOICES = ("none", "full", "selective")


# --------------------------------------------------------------------------------------------
# Activation checkpointing
# --------------------------------------------------------------------------------------------

class _Checkpointed:
    """Mixin put in front of a module's class: forward runs under torch.utils.checkpoint when
    gradients are recorded, so only its inputs are kept and the rest is recomputed in backward.

    The module keeps its parameter names and attributes (no wrapper module, so state dicts and
    `block.attn.backend` are untouched). Dropout masks repeat in the recompute (the RNG state
    is stashed and restored by checkpoint). Composes with FSDP2: its hooks sit around this
    forward, and the recompute runs inside the pre-backward unshard.
    """

    def forward(self, *args, **kwargs):
        if not (torch.is_grad_enabled() and self.training):
            return super().forward(*args, **kwargs)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


@functools.lru_cache(maxsize=None)
def _checkpointed_class(cls):
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})


def checkpoint_module(module):
    """Make `module` recompute its forward in backward (in place; idempotent)."""
    if not isinstance(module, _Checkpointed):
        module.__class__ = _checkpointed_class(type(module))
    return module


def apply_activation_checkpointing(model, mode):
    """Checkpoint a GPT's activations per block.

    mode: "none"; "full" (every block keeps only its input and recomputes all of itself);
    "selective" (the attention sub-layer of every block is recomputed, the MLP's activations are
    kept: a middle point between memory and recompute, cheaper than full by the MLP's forward).
    Returns the list of checkpointed modules.
    """
    if mode not in CHECKPOINTING_CHOICES:
        raise ConfigError(f"activation_checkpointing must be one of {', '.join(CHECKPOINTING_CHOICES)}; got {mode!r}")
    if mode == "none":
        return []
    targets = list(model.blocks) if mode == "full" else [block.attn for block in model.blocks]
    return [checkpoint_module(m) for m in targets]


# --------------------------------------------------------------------------------------------
# FSDP2
# --------------------------------------------------------------------------------------------

def ensure_process_group(device):
    """A process group for FSDP: torchrun's, or a world of one (so `--parallel fsdp` also runs in
    a single plain process: a 1-GPU smoke test, or resuming a sharded run on one rank)."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def device_mesh(device):
    """A 1-D device mesh over all ranks, on the device type of `device`."""
    from torch.distributed.device_mesh import init_device_mesh

    ensure_process_group(device)
    return init_device_mesh(torch.device(device).type, (dist.get_world_size(),))


def mixed_precision_policy(param_dtype):
    """FSDP2's policy: parameters all-gathered in `param_dtype` for compute (bf16), gradients
    reduce-scattered in fp32; None or float32 keeps everything in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if param_dtype is None or param_dtype == torch.float32:
        return MixedPrecisionPolicy()
    if param_dtype == torch.float16:
        raise ConfigError("--parallel fsdp supports float32 and bfloat16 (float16 needs a sharded GradScaler)")
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)


def apply_fsdp(model, device, param_dtype=None, reshard_after_forward=True, mesh=None):
    """Shard a GPT with FSDP2 in place: fully_shard every block, then the root. Returns the model.

    device: where the model lives (its type picks the mesh: cuda with nccl, cpu with gloo).
    param_dtype: compute dtype of the gathered parameters (torch.bfloat16 for --dtype bfloat16;
        the sharded fp32 parameters stay the optimizer's master copy).
    reshard_after_forward: free each block's gathered parameters after its forward and gather
        them again in backward (ZeRO-3, least memory), or keep them until backward (ZeRO-2-like,
        one all-gather less per block and step).
    """
    from torch.distributed.fsdp import fully_shard

    mesh = mesh if mesh is not None else device_mesh(device)
    policy = mixed_precision_policy(param_dtype)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # The root holds the embedding tied to lm_head; FSDP keeps it gathered from forward into
    # backward (the loss needs it at once), whatever reshard_after_forward says.
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    return model


def reshard(model):
    """Free the gathered parameters of every FSDP module of `model`, as a backward does. A forward
    without backward (an eval) leaves them gathered where reshard_after_forward is False, and the
    modules then hold plain tensors instead of their sharded DTensor parameters."""
    for module in model.modules():
        if is_fsdp(module):
            module.reshard()


def is_fsdp(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_state_bytes(model, optimizer=None):
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards of
    DTensors; plain tensors whole; tied parameters once): {"params", "grads", "optimizer"}."""
    from fastlm.optim.adamw import local_tensor

    def nbytes(tensors):
        seen, total = set(), 0
        for t in tensors:
            t = local_tensor(t)
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    params = list(model.parameters())
    result = {"params": nbytes(params), "grads": nbytes(p.grad for p in params if p.grad is not None)}
    if optimizer is not None:
        result["optimizer"] = nbytes(v for state in optimizer.state.values() for v in state.values()
                                     if isinstance(v, torch.Tensor))
    return result
