"""Checkpoints: the format, atomic saves that keep the last K, safe loading with fallback, and
what a resumed run takes from one.

A run's out_dir holds numbered checkpoints, `ckpt-<step>.pt`, the newest `--keep_checkpoints`
of them, and `ckpt.pt`, a hard link to the newest (a copy where the filesystem has no hard
links): `python -m fastlm.sample --ckpt out/ckpt.pt` and older tools keep working. Each file is
written to a temporary name, fsync'ed and renamed, so at every moment, kill -9 and a full disk
included, the directory holds whole checkpoints only. Loading a directory takes the newest
checkpoint that passes its CRC checks and loads; a corrupt one (truncated, bytes flipped) is
skipped with one line saying so. A checkpoint is loaded with weights_only=True and holds the
three configs, the model, optimizer and grad-scaler states, the step, every rank's RNG and
data-sampler state, the tokenizer, the data's fingerprint, and the loop's running totals
(the train-loss window of the next eval, the skipped steps).
"""
import contextlib
import dataclasses
import os
import re
import shutil
import sys
import time
import zipfile

import torch

from fastlm.config import SECTIONS, ConfigError, GPTConfig, KernelConfig, configs_from_dict
from fastlm.files import TMP_MARK, atomic_write, fsync_dir

CKPT_NAME = "ckpt.pt"
CKPT_FORMAT = "fastlm-checkpoint-1"
_NUMBERED = re.compile(r"^ckpt-(\d+)\.pt$")
# How this invocation runs, never part of what a resumed run continues: always taken from the
# command line, never from the checkpoint, and not reported as changes.
INVOCATION_FLAGS = frozenset({"out_dir", "resume", "overwrite", "override_resume_config"})
# Not reported as changes either (display only), but restored from the checkpoint unless given.
QUIET_FLAGS = INVOCATION_FLAGS | {"progress"}
# Training settings a resumed run may change without changing what it computes: where it stops,
# how often it measures, logs and saves, how it guards against faults, and where it runs. Every
# other training setting (data, batch, schedule, precision, seed, ...) must match the checkpoint
# unless --override_resume_config.
RESUME_OVERRIDABLE = QUIET_FLAGS | {"max_steps", "eval_interval", "eval_iters", "eval_train_split", "log_interval",
                                    "ckpt_interval", "keep_checkpoints", "skip_nonfinite_steps", "check_every_step",
                                    "sample_tokens", "compile", "device", "tokenizer_file", "init_from", "tensorboard",
                                    "wandb_project", "hellaswag", "hellaswag_limit", "parallel",
                                    "reshard_after_forward", "activation_checkpointing"}


# --------------------------------------------------------------------------- fault injection
# tests/test_faults.py and benchmarks/kill_trials.py kill runs at random moments. Two environment
# variables (one dictionary look-up each when unset) let them attribute each kill and widen the
# window of a checkpoint write. Not for use in real runs.
#   FASTLM_FAULT_TRACE=FILE   append "<phase> <step>" to FILE as the loop enters each phase
#   FASTLM_FAULT_PAUSE_S=T    sleep T seconds inside each checkpoint write, before its rename


def fault_trace(phase, step):
    path = os.environ.get("FASTLM_FAULT_TRACE")
    if path:
        with open(path, "a") as f:
            f.write(f"{phase} {step}\n")


def _fault_pause():
    seconds = os.environ.get("FASTLM_FAULT_PAUSE_S")
    if seconds:
        time.sleep(float(seconds))


# --------------------------------------------------------------------------- files of a run

def numbered_name(step):
    return f"ckpt-{step:06d}.pt"


def checkpoint_files(out_dir):
    """The checkpoint files in out_dir, newest first: the numbered ones by step, then ckpt.pt
    unless it is one of them (a hard link). Empty if out_dir holds none or does not exist."""
    paths = [path for _, path in sorted(_numbered_steps(out_dir), reverse=True)]
    latest = os.path.join(out_dir, CKPT_NAME)
    if os.path.isfile(latest):
        identities = {_identity(p) for p in paths}
        if _identity(latest) not in identities:
            paths.append(latest)
    return paths


def _identity(path):
    with contextlib.suppress(OSError):
        st = os.stat(path)
        return (st.st_dev, st.st_ino)
    return path


def _numbered_steps(out_dir):
    """[(step, path)] of out_dir's ckpt-<step>.pt files, in no particular order."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    return [(int(m.group(1)), os.path.join(out_dir, name)) for name in names if (m := _NUMBERED.match(name))]


def remove_checkpoints(out_dir):
    """Delete every checkpoint in out_dir (--overwrite starts a run afresh)."""
    for path in checkpoint_files(out_dir) + [os.path.join(out_dir, CKPT_NAME)]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def save_checkpoint(state, out_dir, keep=2):
    """Write `state` (with its "step") as out_dir/ckpt-<step>.pt, point ckpt.pt at it and keep
    the newest `keep` numbered checkpoints; returns the path written.

    Every file appears by an atomic rename, so a crash at any moment leaves whole checkpoints
    only; on an error (e.g. OSError for a full disk) the earlier checkpoints are untouched.
    Numbered checkpoints of later steps are removed too: they are what a run fell back from
    (corrupt) or an abandoned future, and must not be resumed instead of this one.
    """
    step = int(state["step"])
    path = os.path.join(out_dir, numbered_name(step))
    with atomic_write(path) as f:
        try:
            torch.save(state, f)
        except RuntimeError as exc:
            # torch's zip writer can answer a failed write (a full disk) with its own RuntimeError
            # on the way out; the OSError behind it is what the caller handles.
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise
        _fault_pause()
    _point_latest_at(path, os.path.join(out_dir, CKPT_NAME))
    kept = sorted((s for s in _numbered_steps(out_dir) if s[0] <= step), reverse=True)[:max(keep, 1)]
    for s, old in _numbered_steps(out_dir):
        if (s, old) not in kept:
            with contextlib.suppress(FileNotFoundError):
                os.remove(old)
    return path


def _point_latest_at(path, latest):
    """Make `latest` the same file as `path`: a hard link renamed into place, else a copy."""
    tmp = f"{latest}{TMP_MARK}{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
    try:
        os.link(path, tmp)
    except OSError:  # no hard links on this filesystem
        with atomic_write(latest) as dst, open(path, "rb") as src:
            shutil.copyfileobj(src, dst)
        return
    try:
        os.replace(tmp, latest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
    fsync_dir(os.path.dirname(latest) or ".")


# --------------------------------------------------------------------------- loading

def checkpoint_path(path):
    """The checkpoint file that `path` names: itself, or the newest checkpoint of a directory."""
    if os.path.isdir(path):
        files = checkpoint_files(path)
        return files[0] if files else os.path.join(path, CKPT_NAME)
    return path


def _warn(message):
    print(f"fastlm: warning: {message}", file=sys.stderr)


def load_checkpoint(path, warn=_warn):
    """Load a fastlm checkpoint with weights_only: a file, or an out_dir (its newest checkpoint
    that loads). Any problem is a ConfigError.

    From a directory, corrupt checkpoints are skipped in favour of the next newest, and `warn`
    (None: silent) gets one line naming what was skipped; if none loads, that is the error.
    """
    if not os.path.isdir(path):
        if not os.path.isfile(path):
            raise ConfigError(f"no checkpoint at {path}")
        return _load_file(path)
    candidates = checkpoint_files(path)
    if not candidates:
        raise ConfigError(f"no checkpoint in {path}")
    failures = []
    for candidate in candidates:
        try:
            ckpt = _load_file(candidate)
        except ConfigError as exc:
            failures.append((candidate, str(exc)))
            continue
        if failures and warn is not None:
            skipped = ", ".join(os.path.basename(p) for p, _ in failures)
            warn(f"{failures[0][1]}; skipped {skipped}, loading {os.path.basename(candidate)} "
                 f"(step {ckpt['step']})")
        return ckpt
    if len(failures) == 1:
        raise ConfigError(failures[0][1])
    raise ConfigError(f"no usable checkpoint in {path}: " + "; ".join(message for _, message in failures))


def _load_file(path):
    try:
        # torch.load does not check the CRC32 that torch.save records for every entry of its zip
        # archive, so flipped bytes in a tensor would load silently: check them first.
        with zipfile.ZipFile(path) as archive:
            bad_entry = archive.testzip()
        if bad_entry is not None:
            raise ValueError(f"CRC mismatch in {bad_entry}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        first_line = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise ConfigError(f"checkpoint {path} is corrupt or not a fastlm checkpoint "
                          f"({type(exc).__name__}: {first_line})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ConfigError(f"checkpoint {path} is corrupt or not a fastlm checkpoint (no fastlm format tag)")
    return ckpt


# --------------------------------------------------------------------------- resuming

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
    values.update({name: asked[name] for name in INVOCATION_FLAGS})
    for name in sorted(run.explicit):
        if name not in asked or name in INVOCATION_FLAGS:
            continue
        if name not in saved or asked[name] == saved[name]:
            values[name] = asked[name]
            continue
        change = f"{name} {saved[name]!r} -> {asked[name]!r}"
        if name == "init_from":
            raise ConfigError(f"--init_from {asked[name]!r} starts a new run from those weights; a resumed run goes on "
                              f"from its checkpoint in {where}: drop --init_from, or drop --resume and use another --out_dir")
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
        if name not in QUIET_FLAGS:
            changes.append(change)
    resumed = configs_from_dict(values, explicit=run.explicit).validate()
    return resumed, changes


def check_same_data(ckpt, data, override):
    """None if `data` is what the checkpoint trained on; else raise ConfigError, or with
    `override` return the line that reports the change. Checkpoints without a fingerprint pass."""
    saved = ckpt.get("data") or {}
    if not saved.get("fingerprint") or saved["fingerprint"] == data.fingerprint:
        return None
    if override and saved.get("source") != data.source:
        return None  # an explicit --data change, already reported by resume_config
    what = (f"data {data.source} is not what the checkpoint trained on ({saved.get('source')}, "
            f"fingerprint {saved['fingerprint'][:12]}; now {data.fingerprint[:12]})")
    if not override:
        raise ConfigError(f"{what}; restore that data to continue the run, or pass --override_resume_config "
                          "to train on this data from here")
    return what + " (overridden)"
