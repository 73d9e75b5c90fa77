"""Shared test utilities: a tiny training configuration, CLI runners, and backend checks."""
import contextlib
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastlm.ops.backends import backend_reasons

TINY = ["--block_size", "16", "--n_layer", "2", "--n_head", "2", "--d_model", "32", "--batch_size", "4",
        "--eval_iters", "2", "--sample_tokens", "0", "--progress", "false", "--warmup_steps", "2"]
# Backends that must be usable here (CI sets FASTLM_REQUIRE_BACKENDS=cpp,triton): their tests fail
# instead of skipping, so a broken build cannot turn the fused-kernel tests into silent skips.
REQUIRED_BACKENDS = frozenset(filter(None, os.environ.get("FASTLM_REQUIRE_BACKENDS", "").split(",")))


def tiny_args(out_dir, *extra, steps=10):
    return [*TINY, "--max_steps", str(steps), "--eval_interval", str(max(steps, 1)), "--log_interval", "1",
            "--out_dir", str(out_dir), *map(str, extra)]


def run_cli(module, *args, timeout=600, env=None):
    """Run `python -m module args` in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def skip_unless_usable(op, backend, device="cpu"):
    """Skip the test when `backend` cannot run `op` on `device` here (fail if it is required)."""
    reason = backend_reasons(op, device)[backend]
    if reason is None:
        return
    if backend in REQUIRED_BACKENDS and device == "cpu":
        pytest.fail(f"{op} backend {backend!r} must be usable here (FASTLM_REQUIRE_BACKENDS) but is not: {reason}")
    pytest.skip(f"{op} backend {backend} unavailable: {reason}")


@contextlib.contextmanager
def count_calls(owner, name):
    """Count the calls of owner[name] (a dict entry) or owner.name (an attribute) inside the block.

    Yields a list that gets one entry per call, so a test can assert which kernel really ran.
    """
    is_dict = isinstance(owner, dict)
    original = owner[name] if is_dict else getattr(owner, name)
    calls = []

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    if is_dict:
        owner[name] = spy
    else:
        setattr(owner, name, spy)
    try:
        yield calls
    finally:
        if is_dict:
            owner[name] = original
        else:
            setattr(owner, name, original)


def stop_at(step):
    """A Trainer._should_stop that simulates a SIGTERM arriving during step `step`."""

    def should_stop(trainer):
        if trainer.step == step:
            trainer._stop_signal = signal.SIGTERM
        return trainer._stop_signal is not None

    return should_stop


class LogOps(TorchDispatchMode):
    """A dispatch mode that records the ops it sees, by name. Under any dispatch mode (as fake
    tensors and export use) the Triton paths go through their custom ops; in plain eager they don't."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def rel_err(out, ref):
    """max |out - ref| / max |ref|, the denominator floored at 0.1 (unit-normal inputs, some
    gradients exactly zero), in float64."""
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(0.1)).item()


def compiled_and_eager_grads(loss_fn, *inputs):
    """(compiled, eager) pairs of the gradients of loss_fn(*inputs) w.r.t. inputs, compiled with
    torch.compile(fullgraph=True, backend="aot_eager"): a graph break raises, and the custom ops'
    fake implementations and autograd formulas are what the compiled graph runs."""
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    return zip(torch.autograd.grad(compiled(*inputs), inputs), torch.autograd.grad(loss_fn(*inputs), inputs))
