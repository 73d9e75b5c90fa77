"""Sharded checkpoints with torch.distributed.checkpoint (DCP), for runs under FSDP.

A sharded checkpoint is a directory, out_dir/ckpt.dcp:

  ckpt.dcp/__N_0.distcp ...   each rank's shards of the model and optimizer (written by that rank)
  ckpt.dcp/.metadata          DCP's index of the shards (written by rank 0 once all ranks are done)
  ckpt.dcp/meta.pt            everything else a single-file checkpoint holds (configs, step, every
                              rank's RNG and sampler state, tokenizer), torch.save'd by rank 0

Atomic at the directory level: all ranks write into ckpt.dcp.tmp; when every rank has finished,
rank 0 renames the previous ckpt.dcp to ckpt.dcp.old, renames ckpt.dcp.tmp to ckpt.dcp and removes
the old one. A kill at any point leaves a whole checkpoint: ckpt.dcp, or, between the two
renames, ckpt.dcp.old, which find_sharded() then returns. ckpt.dcp.tmp is never read.

Loading goes through `get_state_dict`/`set_state_dict`, so the same files load into an FSDP model
on any number of ranks (DCP reshards: 2 -> 1, 1 -> 2) or into a plain model in one process;
consolidate() turns one into the single-file format of fastlm.checkpoint (what fastlm.sample and
the exporters read).
"""
import contextlib
import os
import shutil
import warnings

import torch
import torch.distributed as dist

from fastlm.checkpoint import CKPT_FORMAT, CKPT_NAME, checkpoint_files, load_checkpoint, save_checkpoint
from fastlm.config import ConfigError
from fastlm.files import atomic_write

SHARDED_NAME = "ckpt.dcp"
META_NAME = "meta.pt"


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_sharded(out_dir):
    """The whole sharded checkpoint in out_dir (ckpt.dcp, or ckpt.dcp.old if a save was killed
    between its renames), or None."""
    for name in (SHARDED_NAME, SHARDED_NAME + ".old"):
        path = os.path.join(out_dir, name)
        if os.path.isfile(os.path.join(path, META_NAME)) and os.path.isfile(os.path.join(path, ".metadata")):
            return path
    return None


def sharded_to_resume(out_dir):
    """The sharded checkpoint a resumed run in out_dir continues from, or None: the one in out_dir
    unless out_dir/ckpt.pt holds a later step (the run went on under DDP); a ckpt.pt of the same
    step (fastlm.consolidate's output) leaves the sharded one in charge."""
    sharded = find_sharded(out_dir)
    single = os.path.join(out_dir, CKPT_NAME)
    if sharded is None or not os.path.isfile(single):
        return sharded
    try:  # mmap: reads the step, not the weights
        single_step = int(torch.load(single, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:  # a corrupt ckpt.pt is not a reason to ignore a whole sharded one
        return sharded
    return sharded if int(load_meta(sharded)["step"]) >= single_step else None


def load_single_file(path):
    """fastlm.checkpoint.load_checkpoint(path) for the readers of single files (sample, eval, export,
    --init_from): an out_dir whose sharded checkpoint is newer than its single files, or holds only
    that, is a ConfigError that says to consolidate it, not a quiet read of older weights."""
    sharded = find_sharded(path) if os.path.isdir(path) else None
    advice = f"run python -m fastlm.consolidate {path} first"
    if sharded is not None and not checkpoint_files(path):
        raise ConfigError(f"{path} holds a sharded checkpoint ({os.path.basename(sharded)}) only; {advice}")
    ckpt = load_checkpoint(path)
    sharded_step = int(load_meta(sharded)["step"]) if sharded is not None else -1
    if sharded_step > int(ckpt["step"]):
        raise ConfigError(f"{path}: its sharded checkpoint ({os.path.basename(sharded)}, step {sharded_step}) is "
                          f"newer than its single-file one (step {ckpt['step']}); {advice}")
    return ckpt


@contextlib.contextmanager
def _single_process_is_intended():
    """In one process, without a process group, DCP warns at every call that "torch.distributed is
    disabled, ... assuming the intent is to save/load in a single process": that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def save_sharded(path, model, optimizer, meta):
    """Save model + optimizer (DTensor shards or plain tensors) and `meta` to the directory `path`.

    Collective: every rank of the process group calls it with its own model and optimizer; `meta`
    (a dict of tensors and plain values, loadable with weights_only) is taken from rank 0.
    """
    import torch.distributed.checkpoint as dcp

    tmp, old = path + ".tmp", path + ".old"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        os.makedirs(tmp)
    _barrier()
    with _single_process_is_intended():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=tmp)  # ends with a collective: all shards written
    if _rank() == 0:
        with open(os.path.join(tmp, META_NAME), "wb") as f:
            torch.save({**meta, "format": CKPT_FORMAT, "sharded": True}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.isdir(path):
            shutil.rmtree(old, ignore_errors=True)  # path is whole, so old is stale
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
        shutil.rmtree(old, ignore_errors=True)
    _barrier()  # no rank goes on (or exits) before the checkpoint is in place


def load_meta(path):
    """The meta dict of the sharded checkpoint in directory `path` (ConfigError if unreadable)."""
    file = os.path.join(path, META_NAME)
    try:
        meta = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ConfigError(f"sharded checkpoint {path} is corrupt or incomplete ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{path} is not a fastlm sharded checkpoint")
    return {**meta, "path": path}


def load_sharded(path, model, optimizer=None):
    """Load the model (and optimizer) state of the sharded checkpoint `path` in place.

    Collective when the model is sharded. The model may be FSDP on any number of ranks or a plain
    module in one process: DCP reads the pieces each rank's tensors need.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = _state_dicts(model, optimizer)
    with _single_process_is_intended():
        dcp.load(state, checkpoint_id=path)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def load_full(model, optimizer, ckpt):
    """Load a single-file checkpoint (fastlm.checkpoint: full tensors, optimizer state keyed by
    parameter index) into a model and optimizer that may be sharded: every rank reads the whole
    file and keeps its shards. Collective under FSDP. This is how a DDP or one-process run goes
    on under --parallel fsdp."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # torch.optim numbers parameters in param-group order; DCP names them by module path.
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    saved = ckpt["optimizer"]
    optim_sd = {"state": {order[i]: state for i, state in saved["state"].items()},
                "param_groups": [{**group, "params": [order[i] for i in group["params"]]}
                                 for group in saved["param_groups"]]}
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def consolidate(path, out_path):
    """Write the sharded checkpoint `path` (a ckpt.dcp directory, or the out_dir holding one) as
    one single-file checkpoint at `out_path` (fastlm.checkpoint's format: fastlm.sample, export
    and a plain resume read it). Runs in one process, no process group needed. Returns out_path."""
    from fastlm.checkpoint import model_config_from_checkpoint
    from fastlm.model import GPT, decay_groups
    from fastlm.optim import AdamW

    if find_sharded(path) is not None:
        path = find_sharded(path)
    if not os.path.isfile(os.path.join(path, META_NAME)):
        raise ConfigError(f"no sharded checkpoint at {path} (expected {SHARDED_NAME}/{META_NAME})")
    meta = load_meta(path)
    model = GPT(model_config_from_checkpoint(meta))
    train = meta["train_config"]
    optimizer = AdamW(decay_groups(model, train["weight_decay"]), lr=train["lr"],
                      betas=(train["beta1"], train["beta2"]), backend="torch")
    load_sharded(path, model, optimizer)
    state = {key: value for key, value in meta.items() if key not in ("sharded", "path")}
    state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    if os.path.isdir(out_path):
        out_path = os.path.join(out_path, CKPT_NAME)
    if os.path.basename(out_path) == CKPT_NAME:  # a run's out_dir: its numbered checkpoints, ckpt.pt the newest
        save_checkpoint(state, os.path.dirname(out_path) or ".")
    else:
        with atomic_write(out_path) as f:
            torch.save(state, f)
    return out_path
