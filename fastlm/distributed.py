"""Where a run executes: its device, and its place among torchrun's processes.

Under `torchrun` every process is one rank of a torch.distributed process group (nccl on CUDA,
gloo on CPU); outside it the run is a world of one.
"""
import gc
import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from fastlm.config import ConfigError


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def distributed(self):
        return self.size > 1

    @property
    def is_main(self):
        return self.rank == 0


def resolve_device(name, local_rank=0):
    """torch.device for "auto", "cpu", "cuda" (this rank's GPU) or "cuda:N"."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", name):  # what torch.device takes of these
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def init_world(device_name):
    """This process's World; under torchrun the process group is initialised here."""
    world = World(int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                  int(os.environ.get("LOCAL_RANK", "0")))
    if world.distributed and not dist.is_initialized():
        use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return world


def end_world():
    """Destroy the process group, if any, once nothing else holds it.

    Call it once the DistributedDataParallel wrapper is dropped (Trainer.close does it): its C++
    Reducer holds the group too, and a Reducer that outlives the group's registration destroys a
    gloo group itself while holding the GIL, as a gloo worker thread waits for the GIL to free the
    last collective's tensors: the process hangs at exit (about one 2-rank CPU run in 12). Garbage
    collected first, the wrapper leaves the group to destroy_process_group, which releases the GIL.
    """
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def any_rank(flag, world, device):
    """True on every rank when `flag` is true on any (one all-reduce; free in a world of one)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.item() > 0


def gather(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on every rank (a list of one outside torchrun)."""
    if not world.distributed:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered
