"""Where one training step's time goes: torch.profiler over steps of the end-to-end benchmark.

    python -m fastlm.bench.profile_step [--device cuda] [--path fastlm pytorch] [--mode eager compiled]
                                        [--steps 3] [--batch-size B] [--out-dir DIR]

For each path and mode (default eager) it builds the step of fastlm/bench/e2e.py (GPT-2 small
on CUDA, the quick model on CPU), runs two warm-up steps (compiling, tuning), profiles `--steps`
steps, and prints the operators and kernels by their own device time (CPU time on CPU), the 25
largest, with each one's share of the step. The same tables go to profile_<path>_<mode>.txt in
--out-dir. These are the numbers behind a missed target: which kernel, how long, how often.
"""
import argparse
import os
import sys

import torch

from fastlm.bench import e2e
from fastlm.bench.common import kernel_table, own_times_us, profile_calls, profile_device
from fastlm.config import ConfigError


def profile(path, mode, device, steps, batch_size=None):
    """The table of `steps` profiled steps of one path and mode."""
    case = dict(e2e.CASES[device.type][0] if device.type == "cuda" else e2e.CASES["quick"][0])
    if batch_size:
        case["batch_size"] = batch_size
    step, _, backends = e2e.make_step(case, path, device, e2e.DTYPE[device.type], mode)
    for _ in range(2):
        step()
    # The rows listed are those summed (on CUDA the kernels, not also the operators that launched them).
    own = own_times_us(profile_calls([step] * steps, device), device.type)
    total_us = sum(us for _, us in own) or 1.0
    lines = [f"{path} {mode} on {device.type}: {case['name']}, batch {case['batch_size']} x {case['block_size']} "
             f"tokens; {backends}", f"{steps} steps, {total_us / steps / 1e3:.2f} ms of own "
             f"{'device' if device.type == 'cuda' else 'CPU'} time per step"]
    return "\n".join(lines + kernel_table(own, steps))


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastlm.bench.profile_step", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--path", nargs="+", choices=tuple(e2e.STEP_PATHS), default=list(e2e.STEP_PATHS))
    parser.add_argument("--mode", nargs="+", choices=("eager", "compiled"), default=None,
                        help="default: eager (a compiled model's kernels are inductor's, named by fusion)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    try:
        device = profile_device(args.device, args.steps, args.out_dir)
    except ConfigError as exc:
        print(f"profile_step: error: {exc}", file=sys.stderr)
        return 2
    modes = args.mode or ["eager"]
    for mode in modes:
        for path in args.path:
            text = profile(path, mode, device, args.steps, args.batch_size)
            print(text + "\n", flush=True)
            if args.out_dir:
                os.makedirs(args.out_dir, exist_ok=True)
                with open(os.path.join(args.out_dir, f"profile_{path}_{mode}.txt"), "w") as f:
                    f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
