"""kill -9 trials: does a run killed at a random moment and resumed end exactly like one never killed?

Each trial starts a short CPU training run as a subprocess, SIGKILLs it at a random moment of a
step, an eval or a checkpoint write (aimed by phase, attributed afterwards from the run's
FASTLM_FAULT_TRACE), checks that out_dir still holds whole checkpoints only, then resumes with
`--resume --out_dir X` alone (or restarts, if no checkpoint was written yet) until the run is
done, and compares the final weights, optimizer state and every logged loss with an
uninterrupted run, bit for bit.

    python benchmarks/kill_trials.py --trials 100            # writes benchmarks/results/<device>/kill_trials.json

tests/test_faults.py runs 10 trials through run_trials().
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

import torch

# The tiny configuration of tests/helpers.py, with frequent checkpoints and evals so that kills
# land in all three phases. A checkpoint write pauses (FASTLM_FAULT_PAUSE_S) to widen its window.
# A small CPU run (about 30 ms a step, 150 ms an eval, 90 ms a checkpoint write with the pause
# below, on one core) with frequent evals and checkpoints, so that kills land in all three phases.
RUN_ARGS = ["--block_size", "32", "--n_layer", "2", "--n_head", "2", "--d_model", "64", "--batch_size", "8",
            "--sample_tokens", "0", "--progress", "false", "--warmup_steps", "2", "--lr", "3e-3",
            "--max_steps", "24", "--log_interval", "1", "--eval_interval", "4", "--eval_iters", "16",
            "--ckpt_interval", "3", "--keep_checkpoints", "2"]
SAVE_PAUSE_S = 0.05  # FASTLM_FAULT_PAUSE_S: each checkpoint write sleeps this long before its rename
PHASES = ("step", "eval", "save")
# Where a kill is aimed: the phase's n-th start (uniform over the run's occurrences), then a
# uniform delay up to about half the phase's length.
OCCURRENCES = {"step": 24, "eval": 7, "save": 8}
MAX_DELAY_S = {"step": 0.015, "eval": 0.07, "save": SAVE_PAUSE_S}
TIMEOUT_S = 300


def run_env(trace):
    env = dict(os.environ, FASTLM_FAULT_TRACE=str(trace), FASTLM_FAULT_PAUSE_S=str(SAVE_PAUSE_S),
               OMP_NUM_THREADS="1", FASTLM_NO_EXT_WARNING="1")
    env.pop("TRITON_INTERPRET", None)
    return env


def train_command(out_dir, resume):
    if resume:
        return [sys.executable, "-m", "fastlm.train", "--resume", "--out_dir", str(out_dir)]
    return [sys.executable, "-m", "fastlm.train", *RUN_ARGS, "--out_dir", str(out_dir)]


def read_trace(path):
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return []
    return [tuple(line.split()) for line in lines if line.count(" ") == 1]


def run_to_end(out_dir, trace):
    """Run (resuming if out_dir holds a checkpoint) until done; returns stderr of the last run."""
    from fastlm.checkpoint import checkpoint_files

    result = subprocess.run(train_command(out_dir, resume=bool(checkpoint_files(out_dir))), env=run_env(trace),
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    if result.returncode != 0:
        raise AssertionError(f"run in {out_dir} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result.stderr


def outcome(out_dir):
    """What a finished run must reproduce: every logged value and the final checkpoint's tensors."""
    from fastlm.checkpoint import load_checkpoint
    from fastlm.metrics import read_metrics

    records = [r for r in read_metrics(os.path.join(out_dir, "metrics.jsonl")) if r["type"] in ("train", "eval")]
    logged = [(r["type"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("train_loss"), r.get("val_loss"))
              for r in records]
    ckpt = load_checkpoint(str(out_dir), warn=None)
    return logged, ckpt


def same_outcome(a, b):
    """None if two outcomes are bit-identical, else what differs."""
    (logged_a, ckpt_a), (logged_b, ckpt_b) = a, b
    if logged_a != logged_b:
        diff = next((x, y) for x, y in zip(logged_a + [None], logged_b + [None]) if x != y)
        return f"logged values differ: {diff}"
    if ckpt_a["step"] != ckpt_b["step"]:
        return f"final steps differ: {ckpt_a['step']} vs {ckpt_b['step']}"
    for name, tensor in ckpt_a["model"].items():
        if not torch.equal(tensor, ckpt_b["model"][name]):
            return f"weights differ: {name}"
    for index, state in ckpt_a["optimizer"]["state"].items():
        for key, value in state.items():
            if not torch.equal(value, ckpt_b["optimizer"]["state"][index][key]):
                return f"optimizer state differs: param {index} {key}"
    return None


def check_directory(out_dir, trace):
    """After a kill: every checkpoint file in out_dir loads, and the newest is at least as new as
    the last write that completed. Returns a problem or None."""
    from fastlm.checkpoint import checkpoint_files, load_checkpoint
    from fastlm.config import ConfigError

    saved = [int(step) for phase, step in read_trace(trace) if phase == "saved"]
    files = checkpoint_files(out_dir)
    if saved and not files:
        return f"checkpoint missing: step {saved[-1]} was saved, out_dir holds none"
    for path in files:
        try:
            load_checkpoint(path)
        except ConfigError as exc:
            return f"corrupt checkpoint: {exc}"
    if files:
        warnings = []
        newest = load_checkpoint(str(out_dir), warn=warnings.append)
        if warnings or (saved and newest["step"] < saved[-1]):
            return f"newest checkpoint is step {newest['step']}, last completed save {saved[-1:]}: {warnings}"
    return None


def wait_for(trace, phase, occurrence, proc, deadline):
    """Wait until `phase` has been entered `occurrence` times (or the run ended)."""
    while time.time() < deadline and proc.poll() is None:
        if sum(1 for p, _ in read_trace(trace) if p == phase) >= occurrence:
            return True
        time.sleep(0.002)
    return False


def kill_trial(workdir, index, rng, reference):
    """One trial: start, SIGKILL at a random moment, check, resume to the end, compare."""
    out_dir, trace = os.path.join(workdir, f"trial{index}"), os.path.join(workdir, f"trial{index}.trace")
    target = PHASES[index % len(PHASES)]
    occurrence = rng.randint(1, OCCURRENCES[target])
    delay = rng.uniform(0, MAX_DELAY_S[target])
    proc = subprocess.Popen(train_command(out_dir, resume=False), env=run_env(trace),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(trace, target, occurrence, proc, time.time() + TIMEOUT_S)
    time.sleep(delay)
    finished_first = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lines = read_trace(trace)
    landed = "finished" if finished_first else (lines[-1][0] if lines else "startup")
    landed = {"saved": "step"}.get(landed, landed)  # between a write and the next step
    at_step = int(lines[-1][1]) if lines else 0
    problem = check_directory(out_dir, trace)
    if problem is None:
        run_to_end(out_dir, trace)
        problem = same_outcome(outcome(out_dir), reference)
    return {"trial": index, "aimed_at": target, "landed_in": landed, "step": at_step,
            "recovered_bit_exact": problem is None, "problem": problem}


def run_trials(trials, seed=0, workdir=None, log=print):
    """Run `trials` kill -9 trials; returns the summary dict (see main)."""
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        started = time.perf_counter()
        reference_dir = os.path.join(tmp, "reference")
        run_to_end(reference_dir, os.path.join(tmp, "reference.trace"))
        reference = outcome(reference_dir)
        results = []
        for index in range(trials):
            result = kill_trial(tmp, index, rng, reference)
            results.append(result)
            log(f"trial {index + 1:>3}/{trials}: killed in {result['landed_in']:<8} at step {result['step']:>2}: "
                + ("recovered bit-exact" if result["recovered_bit_exact"] else f"FAILED: {result['problem']}"))
        landed = {}
        for result in results:
            landed[result["landed_in"]] = landed.get(result["landed_in"], 0) + 1
        return {"trials": trials, "recovered_bit_exact": sum(r["recovered_bit_exact"] for r in results),
                "landed_in": landed, "seed": seed, "run_args": RUN_ARGS, "save_pause_s": SAVE_PAUSE_S,
                "elapsed_s": time.perf_counter() - started, "results": results}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/<device slug>/")
    args = parser.parse_args()
    from fastlm.bench.common import env_info, results_dir

    summary = run_trials(args.trials, args.seed)
    summary["env"] = env_info(torch.device("cpu"))
    path = os.path.join(results_dir(torch.device("cpu"), args.out_dir), "kill_trials.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{summary['recovered_bit_exact']}/{summary['trials']} trials recovered bit-exact "
          f"(killed in: {summary['landed_in']}); {summary['elapsed_s']:.0f} s; wrote {path}")
    return 0 if summary["recovered_bit_exact"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
