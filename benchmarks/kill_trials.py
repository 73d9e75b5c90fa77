"""kill -9 trials: does a run killed at a random moment and resumed end exactly like one never killed?

Each trial starts a short CPU training run in a process of its own, SIGKILLs it at a random
moment of a step, an eval or a checkpoint write (aimed by phase, attributed afterwards from the
run's FASTLM_FAULT_TRACE), checks that out_dir still holds whole checkpoints only, then resumes
with `--resume --out_dir X` alone (or restarts, if no checkpoint was written yet) until the run
is done, and compares the final weights, optimizer state and every logged loss with an
uninterrupted run, bit for bit.

The runs are `fastlm.train.main(argv)`, what `python -m fastlm.train argv` runs, in processes
forked from a server that has imported torch and fastlm once (multiprocessing's forkserver):
a trial then costs its training, not two interpreter start-ups.

    python benchmarks/kill_trials.py --trials 100      # writes benchmarks/results/<device>/kill_trials.json

tests/test_faults.py runs 10 trials through run_trials().
"""
import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time

import torch

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
TIMEOUT_S = 600


def _run(argv, trace, log):
    """Body of a run's process: `python -m fastlm.train argv`, its output to `log`."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(FASTLM_FAULT_TRACE=trace, FASTLM_FAULT_PAUSE_S=str(SAVE_PAUSE_S), FASTLM_NO_EXT_WARNING="1")
    torch.set_num_threads(1)  # the same arithmetic in every run, and no oversubscribed cores
    import threading

    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())  # not its default multiprocessing lock, which a SIGKILL would leak
    from fastlm import train

    sys.exit(train.main(argv))


def start_run(out_dir, trace, resume):
    """Start a run (a fresh one, or `--resume --out_dir` alone) in a process of its own."""
    argv = ["--resume", "--out_dir", str(out_dir)] if resume else [*RUN_ARGS, "--out_dir", str(out_dir)]
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fastlm.train", "torch._dynamo"])  # the imports every run pays
    proc = context.Process(target=_run, args=(argv, str(trace), f"{trace}.log"), daemon=True)
    proc.start()
    return proc


def read_trace(path):
    try:
        with open(path) as f:
            lines = f.read().split("\n")
    except FileNotFoundError:
        return []
    return [tuple(line.split()) for line in lines if line.count(" ") == 1]


def run_to_end(out_dir, trace):
    """Run until done, resuming if out_dir holds a checkpoint (else starting afresh)."""
    from fastlm.checkpoint import checkpoint_files

    proc = start_run(out_dir, trace, resume=bool(checkpoint_files(str(out_dir))))
    proc.join(TIMEOUT_S)
    if proc.exitcode != 0:
        with open(f"{trace}.log") as f:
            raise AssertionError(f"run in {out_dir} failed ({proc.exitcode}): {f.read()[-2000:]}")


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
    while time.time() < deadline and proc.is_alive():
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
    proc = start_run(out_dir, trace, resume=False)
    wait_for(trace, target, occurrence, proc, time.time() + TIMEOUT_S)
    time.sleep(delay)
    finished_first = not proc.is_alive()
    proc.kill()  # SIGKILL
    proc.join()
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
    from fastlm.bench.__main__ import RESULTS_DIR
    from fastlm.bench.common import device_slug, env_info

    summary = run_trials(args.trials, args.seed)
    summary["env"] = env_info(torch.device("cpu"))
    out_dir = args.out_dir or os.path.join(RESULTS_DIR, device_slug(torch.device("cpu")))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "kill_trials.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"\n{summary['recovered_bit_exact']}/{summary['trials']} trials recovered bit-exact "
          f"(killed in: {summary['landed_in']}); {summary['elapsed_s']:.0f} s; wrote {path}")
    return 0 if summary["recovered_bit_exact"] == summary["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
