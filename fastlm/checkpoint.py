"""Checkpoints: the format, atomic writes, safe loading, and what a resumed run takes from one.

A checkpoint is one file, out_dir/ckpt.pt, written atomically (a crash or a full disk leaves the
previous one whole) and loaded with weights_only=True. It holds the three configs, the model,
optimizer and grad-scaler states, the step, every rank's RNG and data-sampler state, and the
tokenizer.
"""
import dataclasses
import os

import torch

from fastlm.config import SECTIONS, ConfigError, GPTConfig, KernelConfig, configs_from_dict
from fastlm.files import atomic_write

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = "fastlm-checkpoint-1"
# Training settings a resumed run may change without changing what it computes: where it stops,
# how often it measures, logs and saves, and where it runs. Every other training setting (data,
# batch, schedule, precision, seed, ...) must match the checkpoint unless --override_resume_config.
# How this invocation runs, never part of what a resumed run continues (not reported as changes).
RUN_FLAGS = frozenset({"out_dir", "resume", "overwrite", "override_resume_config", "progress"})
RESUME_OVERRIDABLE = RUN_FLAGS | {"max_steps", "eval_interval", "eval_iters", "eval_train_split", "log_interval",
                                  "ckpt_interval", "sample_tokens", "compile", "device",
                                  "parallel", "reshard_after_forward", "activation_checkpointing"}


def save_checkpoint(state, path):
    """torch.save `state` to `path` atomically."""
    with atomic_write(path) as f:
        torch.save(state, f)


def checkpoint_path(path):
    """The checkpoint file that `path` names: itself, or ckpt.pt inside a directory."""
    return os.path.join(path, CKPT_NAME) if os.path.isdir(path) else path


def load_checkpoint(path):
    """Load a fastlm checkpoint (a file, or the out_dir that holds ckpt.pt) with weights_only;
    any problem is a ConfigError."""
    path = checkpoint_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        first_line = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise ConfigError(f"checkpoint {path} is corrupt or not a fastlm checkpoint "
                          f"({type(exc).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{path} is not a fastlm checkpoint")
    return ckpt


def saved_settings(ckpt):
    """The checkpoint's settings as one flat {field: value} dict of the fields this version knows.

    Checkpoints written before the configs were split keep dropout and the backends under
    model_config; flattening reads both layouts.
    """
    known = {f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)}
    flat = {}
    for key in ("model_config", "kernel_config", "train_config"):
        flat.update({k: v for k, v in (ckpt.get(key) or {}).items() if k in known})
    flat.setdefault("pad_vocab_to", 1)  # written before the vocabulary was padded
    return flat


def model_config_from_checkpoint(ckpt):
    arch = {f.name for f in dataclasses.fields(GPTConfig)}
    return GPTConfig(**{k: v for k, v in saved_settings(ckpt).items() if k in arch})


def resume_config(run, ckpt, where):
    """The RunConfig of a resumed run, and one line per deliberate change from the checkpoint.

    Every setting comes back from the checkpoint. A setting the user gave explicitly wins where
    that is safe: the kernels, and RESUME_OVERRIDABLE. An explicit architecture change is an
    error (the weights would not fit); any other change of what the run computes is an error
    unless --override_resume_config, and then it is reported.
    """
    saved = saved_settings(ckpt)
    asked = {**dataclasses.asdict(run.model), **dataclasses.asdict(run.kernels), **dataclasses.asdict(run.train)}
    arch = {f.name for f in dataclasses.fields(GPTConfig)}
    free = {f.name for f in dataclasses.fields(KernelConfig)} | RESUME_OVERRIDABLE
    values, changes = dict(saved), []
    for name in sorted(run.explicit):
        if name not in asked:
            continue
        if name not in saved or asked[name] == saved[name]:
            values[name] = asked[name]
            continue
        change = f"{name} {saved[name]!r} -> {asked[name]!r}"
        if name in arch:
            raise ConfigError(f"checkpoint in {where} is incompatible: it has {name}={saved[name]!r}, "
                              f"this run asks for {asked[name]!r}")
        if name not in free:
            if not run.train.override_resume_config:
                raise ConfigError(f"--{name} {asked[name]!r} differs from the checkpoint's {saved[name]!r} and changes "
                                  "what the run computes; drop it to continue the run as it was, or pass "
                                  "--override_resume_config to change it anyway")
            change += " (overridden)"
        values[name] = asked[name]
        if name == "max_steps":
            change += " (the cosine schedule now ends there)"
        if name not in RUN_FLAGS:
            changes.append(change)
    resumed = configs_from_dict(values, explicit=run.explicit).validate()
    return resumed, changes

