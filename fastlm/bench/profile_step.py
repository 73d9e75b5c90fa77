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
from fastlm.config import ConfigError
from fastlm.distributed import resolve_device


def own_times_us(events, device_type):
    """[(event, own microseconds)] of the profiled `events` that make up a step's own time: device
    time on CUDA, CPU time on CPU. On CUDA an operator's own device time is that of the kernels it
    launched, which are events of their own too: as torch's own table does, only the device's
    events (kernels, copies) count, or every kernel would count twice."""
    if device_type != "cuda":
        return [(e, e.self_cpu_time_total) for e in events]
    from torch.autograd import DeviceType

    return [(e, e.self_device_time_total) for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]


def profile(path, mode, device, steps, batch_size=None):
    """The table of `steps` profiled steps of one path and mode."""
    case = dict(e2e.CASES[device.type][0] if device.type == "cuda" else e2e.CASES["quick"][0])
    if batch_size:
        case["batch_size"] = batch_size
    step, _, backends = e2e.make_step(case, path, device, e2e.DTYPE[device.type], mode)
    for _ in range(2):
        step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    # The rows listed are those summed (on CUDA the kernels, not also the operators that launched them).
    own = own_times_us(prof.key_averages(), device.type)
    total_us = sum(us for _, us in own) or 1.0
    lines = [f"{path} {mode} on {device.type}: {case['name']}, batch {case['batch_size']} x {case['block_size']} "
             f"tokens; {backends}", f"{steps} steps, {total_us / steps / 1e3:.2f} ms of own "
             f"{'device' if device.type == 'cuda' else 'CPU'} time per step",
             f"{'share':>6} {'ms/step':>9} {'calls/step':>10}  name"]
    for event, us in sorted(own, key=lambda pair: -pair[1])[:25]:
        lines.append(f"{100 * us / total_us:5.1f}% {us / steps / 1e3:9.3f} {event.count / steps:10.1f}  {event.key[:110]}")
    return "\n".join(lines)


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
        device = resolve_device(args.device)
    except ConfigError as exc:  # an unknown device, or cuda without one
        print(f"profile_step: error: {exc}", file=sys.stderr)
        return 2
    if args.steps < 1:
        print(f"profile_step: error: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    if args.out_dir and os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        print(f"profile_step: error: --out-dir {args.out_dir} is a file; give a directory", file=sys.stderr)
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
