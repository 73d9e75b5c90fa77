"""Faults injected into training runs, one test per guarantee of the README's "Fault tolerance":
kill -9 at random moments, corrupt checkpoints, a full disk, SIGTERM/SIGINT (once and twice),
NaN/inf in the loss or the gradients, and two runs on one out_dir."""
import errno
import importlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastlm import checkpoint as checkpoint_mod
from fastlm import train as train_mod
from fastlm.checkpoint import checkpoint_files, load_checkpoint
from fastlm.files import DirectoryLock
from fastlm.metrics import read_metrics
from tests.helpers import run_cli, stop_at, tiny_args

REPO = Path(__file__).resolve().parents[1]


def kill_trials(monkeypatch):
    """benchmarks/kill_trials.py as a module (importable by name: its runs' processes import it)."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    return importlib.import_module("kill_trials")


def losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if r["type"] == "train"}


def newest(out_dir):
    return load_checkpoint(str(out_dir), warn=None)


def same_weights(a, b):
    return all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def snapshot(out_dir):
    """{name: bytes} of every checkpoint file in out_dir."""
    return {p.name: p.read_bytes() for p in Path(out_dir).iterdir() if p.name.startswith("ckpt")}


def one_line_error(stderr, *needles):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    for needle in needles:
        assert needle in lines[0], lines[0]



def poison(monkeypatch, steps, what="loss"):
    """Make this process's training steps `steps` (1-based) non-finite: the loss NaN, or (what=
    "grad") the loss finite and its gradients inf."""
    original = train_mod.GPT.forward
    calls = [0]

    def poisoned(self, idx, targets=None, return_logits=False, **kwargs):
        logits, loss = original(self, idx, targets, return_logits, **kwargs)
        if self.training and loss is not None:
            calls[0] += 1
            if calls[0] in steps:
                if what == "loss":
                    loss = loss * float("nan")
                else:
                    loss.register_hook(lambda grad: grad * float("inf"))
        return logits, loss

    monkeypatch.setattr(train_mod.GPT, "forward", poisoned)


def start_run(out_dir, *extra, steps=100000, env=None):
    return subprocess.Popen([sys.executable, "-m", "fastlm.train", *tiny_args(out_dir, *extra, steps=steps)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_until(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def trained_steps(out_dir):
    path = Path(out_dir) / "metrics.jsonl"
    return len([r for r in read_metrics(path) if r["type"] == "train"]) if path.exists() else 0


# --------------------------------------------------------------------------- kill -9

@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_exact(tmp_path, monkeypatch):
    """10 trials of benchmarks/kill_trials.py (it runs 100): killed in a step, an eval or a
    checkpoint write, out_dir holds whole checkpoints only, and `--resume --out_dir` alone ends
    with the weights, optimizer state and logged losses of the uninterrupted run, bit for bit."""
    summary = kill_trials(monkeypatch).run_trials(10, seed=2024, workdir=tmp_path, log=lambda line: None)
    failed = [r for r in summary["results"] if not r["recovered_bit_exact"]]
    assert not failed, failed
    assert {"step", "eval", "save"} <= set(summary["landed_in"]), summary["landed_in"]


def test_metrics_line_cut_by_a_kill_is_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1, "loss": 5.0}\n{"type": "train", "st')
    assert read_metrics(path) == [{"type": "train", "step": 1, "loss": 5.0}]


def test_stale_temporary_files_are_removed_on_start(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, steps=2)) == 0
    (out / "ckpt-000004.pt.tmp-999999").write_bytes(b"half a checkpoint")
    assert train_mod.main(tiny_args(out, "--resume", steps=3)) == 0
    assert not list(out.glob("*.tmp-*"))


# --------------------------------------------------------------------------- corrupt checkpoints

def damage(path, how):
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:len(data) // 2]
    else:  # 64 flipped bytes in the middle: inside a tensor's data (or a header) whatever the layout
        middle = len(data) // 2
        data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    with open(path, "r+b") as f:  # in place: ckpt.pt, a hard link to it, is damaged too
        f.write(data)
        f.truncate()


@pytest.mark.parametrize("how", ["truncated", "flipped"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, monkeypatch, capsys, how):
    full, out = tmp_path / "full", tmp_path / "run"
    assert train_mod.main(tiny_args(full, "--ckpt_interval", "2", steps=8)) == 0
    monkeypatch.setattr(train_mod.Trainer, "_should_stop", stop_at(6))
    assert train_mod.main(tiny_args(out, "--ckpt_interval", "2", steps=8)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt-000004.pt", "ckpt-000006.pt", "ckpt.pt"]
    damage(out / "ckpt-000006.pt", how)
    capsys.readouterr()
    assert train_mod.main(["--resume", "--out_dir", str(out)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "ckpt-000006.pt is corrupt" in warnings[0] and "(step 4)" in warnings[0], warnings
    # The run redid steps 5-6 from the previous checkpoint and ended as if nothing had happened.
    assert losses(out) == losses(full)
    assert same_weights(newest(out), newest(full))
    assert sorted(p.name for p in out.glob("ckpt*")) == ["ckpt-000006.pt", "ckpt-000008.pt", "ckpt.pt"]


def test_corrupt_only_checkpoint_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--keep_checkpoints", "1", steps=2)) == 0
    assert [p.name for p in out.glob("ckpt-*")] == ["ckpt-000002.pt"]
    damage(out / "ckpt.pt", "flipped")
    before = snapshot(out)
    result = run_cli("fastlm.train", "--resume", "--out_dir", out)
    assert result.returncode == 2
    one_line_error(result.stderr, "ckpt-000002.pt is corrupt")
    assert snapshot(out) == before


def test_keep_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--ckpt_interval", "1", "--keep_checkpoints", "3", steps=5)) == 0
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000003.pt", "ckpt-000004.pt", "ckpt-000005.pt"]
    assert os.path.samefile(out / "ckpt.pt", out / "ckpt-000005.pt")
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 5


# --------------------------------------------------------------------------- out of memory

def _limit_address_space(max_bytes):
    def limit():  # every allocation past it fails, whatever the machine's overcommit policy
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))

    return limit


def test_out_of_memory_is_one_line_and_keeps_the_checkpoints(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--ckpt_interval", "1", steps=2)) == 0
    before = snapshot(out)
    limit = _limit_address_space(6 << 30)
    # A model that does not fit (a 100 GB embedding), then a batch that does not (GBs of activations).
    big_model = subprocess.run([sys.executable, "-m", "fastlm.train",
                                *tiny_args(tmp_path / "new", "--d_model", "100000000", "--n_head", "1")],
                               capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert big_model.returncode == 1, big_model.stderr
    one_line_error(big_model.stderr, "out of memory building the model", "choose a smaller model")
    big_batch = subprocess.run([sys.executable, "-m", "fastlm.train", "--resume", "--out_dir", str(out), "--max_steps",
                                "4", "--batch_size", "2000000", "--override_resume_config"],
                               capture_output=True, text=True, timeout=600, preexec_fn=limit)
    assert big_batch.returncode == 1, big_batch.stderr
    one_line_error(big_batch.stderr, "out of memory at step 2 on cpu", "the checkpoint of step 2 is kept",
                   "lower --batch_size")
    assert snapshot(out) == before


# --------------------------------------------------------------------------- full disk, unwritable

def _limit_file_size(max_bytes):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def test_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, steps=2)) == 0
    before = snapshot(out)
    # Files may not grow past 64 KiB (a checkpoint is ~150 KiB, metrics lines fit): as if the disk
    # filled up while the checkpoint of step 4 was being written.
    result = subprocess.run([sys.executable, "-m", "fastlm.train", "--resume", "--out_dir", str(out),
                             "--max_steps", "4"], capture_output=True, text=True, timeout=600,
                            preexec_fn=_limit_file_size(64 * 1024))
    assert result.returncode == 1, result.stderr
    one_line_error(result.stderr, "cannot write a checkpoint", "File too large", "step 2, is kept")
    assert snapshot(out) == before
    assert not list(out.glob("*.tmp-*"))
    assert newest(out)["step"] == 2


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES])
def test_failed_write_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys, code):
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--ckpt_interval", "2", steps=2)) == 0
    before = snapshot(out)

    def failing_save(state, f):
        f.write(b"x" * 1000)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(checkpoint_mod.torch, "save", failing_save)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(tiny_args(out, "--resume", "--ckpt_interval", "2", steps=6))
    assert exc.value.code == 1
    one_line_error(capsys.readouterr().err, os.strerror(code), "step 2, is kept")
    assert snapshot(out) == before and not list(out.glob("*.tmp-*"))


# --------------------------------------------------------------------------- signals

def test_sigterm_finishes_the_step_writes_one_checkpoint_and_says_interrupted(tmp_path):
    out, trace = tmp_path / "run", tmp_path / "trace"
    proc = start_run(out, env=dict(os.environ, FASTLM_FAULT_TRACE=str(trace)))
    wait_until(lambda: trained_steps(out) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by signal 15" in err and "checkpoint saved" in err
    phases = trace.read_text().split()[::2]
    assert phases[-2:] == ["save", "saved"] and "save" not in phases[:-2]  # one write, after the last step
    step = newest(out)["step"]
    assert step == trained_steps(out) == max(losses(out))  # the step in flight finished and was saved


def test_second_signal_exits_at_once_without_touching_the_last_checkpoint(tmp_path):
    out, trace = tmp_path / "run", tmp_path / "trace"
    assert train_mod.main(tiny_args(out, steps=3)) == 0
    before = snapshot(out)
    # Every write pauses 60 s before its rename, and the only write is the one the signal asks for.
    env = dict(os.environ, FASTLM_FAULT_TRACE=str(trace), FASTLM_FAULT_PAUSE_S="60")
    proc = start_run(out, "--resume", "--ckpt_interval", "0", env=env)
    wait_until(lambda: trained_steps(out) >= 5, proc)
    proc.send_signal(signal.SIGINT)
    wait_until(lambda: "save" in trace.read_text(), proc)
    time.sleep(0.5)  # inside the write
    sent = time.time()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert time.time() - sent < 10
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "exiting at once" in err.splitlines()[-1] and "(step 3)" in err.splitlines()[-1]
    assert snapshot(out) == before and not list(out.glob("*.tmp-*"))


# --------------------------------------------------------------------------- NaN / inf

def test_nonfinite_grad_norm_stops_naming_the_step_and_the_tensor(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison(monkeypatch, {3}, what="grad")
    with pytest.raises(SystemExit) as exc:
        train_mod.main(tiny_args(out, "--ckpt_interval", "2", steps=6))
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "grad norm became" in err[0] and "at step 3" in err[0], err
    assert newest(out)["step"] == 2 and sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-000002.pt"]


def test_nonfinite_between_log_steps_is_caught_before_the_next_save(tmp_path, monkeypatch, capsys):
    """The loss is read only every log_interval steps, yet the error names the exact step and no
    checkpoint holding its weights is written."""
    out = tmp_path / "run"
    poison(monkeypatch, {6})
    with pytest.raises(SystemExit):
        train_mod.main(tiny_args(out, "--log_interval", "4", "--ckpt_interval", "4", steps=12))
    assert "loss became nan at step 6" in capsys.readouterr().err
    assert newest(out)["step"] == 4


def test_skip_nonfinite_steps_skips_up_to_n_updates(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison(monkeypatch, {3, 5})
    assert train_mod.main(tiny_args(out, "--skip_nonfinite_steps", "2", steps=6)) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "update skipped" in line]
    assert len(warnings) == 2 and "at step 3" in warnings[0] and "(2 of at most 2)" in warnings[1]
    ckpt = newest(out)
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())
    # The optimizer skipped two whole updates: its step counts are 4 after 6 steps.
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {4.0}
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["type"] == "train"]
    assert [r["loss"] is None for r in records] == [False, False, True, False, True, False]
    assert records[-1]["skipped_steps"] == 2 and ckpt["loop"]["skipped_steps"] == 2


def test_skip_nonfinite_steps_stops_after_n(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    poison(monkeypatch, {3, 5})
    with pytest.raises(SystemExit) as exc:
        train_mod.main(tiny_args(out, "--skip_nonfinite_steps", "1", "--ckpt_interval", "4", steps=8))
    assert exc.value.code == 1
    assert "loss became nan at step 5, more than --skip_nonfinite_steps 1" in capsys.readouterr().err
    assert newest(out)["step"] == 4


def test_skip_nonfinite_steps_changes_nothing_when_all_steps_are_finite(tmp_path):
    plain, guarded = tmp_path / "plain", tmp_path / "guarded"
    assert train_mod.main(tiny_args(plain, steps=5)) == 0
    assert train_mod.main(tiny_args(guarded, "--skip_nonfinite_steps", "3", steps=5)) == 0
    assert losses(plain) == losses(guarded) and same_weights(newest(plain), newest(guarded))


# --------------------------------------------------------------------------- host syncs

@pytest.mark.parametrize("every_step", [False, True])
def test_loop_reads_the_device_only_at_log_eval_and_checkpoint_steps(tmp_path, monkeypatch, every_step):
    reads = []
    original = train_mod.Trainer._read_pending

    def counting(self):
        reads.append(self.step)
        return original(self)

    monkeypatch.setattr(train_mod.Trainer, "_read_pending", counting)
    extra = ["--check_every_step", "true"] if every_step else []
    out = tmp_path / "run"
    assert train_mod.main(tiny_args(out, "--log_interval", "5", "--eval_interval", "4", "--ckpt_interval", "6",
                                    *extra, steps=12)) == 0
    assert reads == (list(range(1, 13)) if every_step else [4, 5, 6, 8, 10, 12])
    assert sorted(losses(out)) == [5, 10, 12]


# --------------------------------------------------------------------------- one run per out_dir

def test_second_run_on_the_same_out_dir_refuses_and_a_killed_run_frees_it(tmp_path):
    out = tmp_path / "run"
    first = start_run(out, "--ckpt_interval", "2")
    wait_until(lambda: checkpoint_files(str(out)), first)
    second = run_cli("fastlm.train", "--resume", "--out_dir", out)
    assert second.returncode == 2
    one_line_error(second.stderr, "is in use by another run", f"pid {first.pid}")
    first.kill()  # kill -9: the kernel drops its lock
    first.communicate()
    third = run_cli("fastlm.train", "--resume", "--out_dir", out, "--max_steps", str(newest(out)["step"] + 1))
    assert third.returncode == 0, third.stderr


def test_directory_lock_is_exclusive_and_released(tmp_path):
    first, second = DirectoryLock(str(tmp_path)), DirectoryLock(str(tmp_path))
    assert first.acquire()
    assert not second.acquire()
    assert first.owner().startswith(f"pid {os.getpid()} on ")
    first.release()
    assert second.acquire()
    second.release()
