"""Where a kernel benchmark's time goes: host time, wall time and device time of each step, and its kernels.

    python -m fastlm.bench.profile_ops [--device cuda] [--only cross_entropy adamw attention norm]
                                       [--steps 5] [--out-dir DIR]

The end-to-end profile (profile_step) shows a kernel inside the training step; this one takes the
steps the kernel benchmarks time, built by their own modules, at the issue's target sizes on CUDA:
  cross_entropy  fwd+bwd on logits that are an autograd intermediate (cross_entropy.LossStep):
                 F.cross_entropy, torch.compile(F.cross_entropy) and the fused triton kernel, at
                 N=16384, V=50257 and 128256, bf16;
  adamw          one step at GPT-2 small's 124M shapes (adamw.make_step): torch.optim.AdamW
                 (fused=True) and fastlm's cuda backend, without and with clipping at 1.0;
  attention      causal fwd+bwd (attention.setup_fwd_bwd): sdpa (flash) and triton at B1 H32 T2048
                 D64 (the slowest case against sdpa) and B4 H16 T8192 D128, bf16;
  norm           LayerNorm fwd+bwd as the GPT runs it under autocast (norm.setup_fwd_bwd): PyTorch's
                 norm + the cast to bf16, and triton, at N=32768 D=768 (x fp32, y bf16);
  launch         what one call costs the host, on inputs so small that the device has nothing to
                 do: a torch op; an empty Triton kernel; torch.autograd.grad through a torch op
                 and through a Python autograd.Function that launches nothing; and each fused
                 op's fwd+bwd ("tiny triton <op>": cross_entropy, layer_norm, causal_attention)
                 at a few rows.
                 It splits the fused ops' host time (0.85 ms a fwd+bwd on the H200 run) into
                 launches, autograd and the rest.
On CPU (for tests): quick sizes, fp32, the CPU backends (cpp for cross_entropy and adamw, the
explicit torch path for attention), and no torch.compile.

For each step, after warm-up calls (compiling, tuning), the median over 20 steps (3 on CPU) of:
  host ms     perf_counter from the call to its return, the device synchronized before and not
              inside: how long the host takes to issue the step;
  wall ms     the same call to the end of a synchronize after it: the step as a caller waits for it;
  event ms    CUDA events around the call, as the benchmarks time it (common.time_ms);
and over --steps profiled steps (torch.profiler), per step:
  device ms   the sum of the kernels' own device time (own CPU time on CPU), as in profile_step;
  busy        device ms / wall ms;
  launches    kernel launches (cudaLaunchKernel and the driver's cuLaunchKernel, Triton's);
  syncs       the host's waits for the device (cudaStreamSynchronize, cudaEventSynchronize), e.g.
              from a .item() or a host copy;
then the kernels by own device time: share, ms and calls per step, name; and the host's side of
the step, from cProfile over 20 steps (3 on CPU): the Python and C functions by own time, in
microseconds per step, with their cumulative time and calls per step (cProfile's own overhead
inflates every number, evenly: it is for where the host time goes, not how much there is).

Reading a gap. device ms ~ wall ms (busy near 100%): kernel-bound; the table says which kernel,
and a faster step needs faster or fewer kernels. wall ms >> device ms: the device idles inside
the step; with host ms ~ wall ms the host is the bound (Python, many small launches: see
launches) or it waits on the device mid-step (syncs > 0), and a step of the same kernels issued
faster, fused or captured (CUDA graphs) would be faster; with host ms << wall ms the host was
done early, so the idle time is on the device's side (launch latency between many tiny kernels,
or work the profiler does not see). event ms is wall ms less the synchronize's own latency; the
benchmarks' numbers are event ms. On CPU nothing is asynchronous: host ms = wall ms, and device ms
is the operators' own CPU time.

Each op's tables go to profile_ops_<op>.txt in --out-dir, rewritten after every step measured, so
a run stopped by its time limit keeps what finished.
"""
import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from fastlm.bench import adamw, attention, cross_entropy, norm
from fastlm.bench.common import (device_name, kernel_table, own_times_us, profile_calls, profile_device, synchronize,
                                 timed_backends)
from fastlm.config import ConfigError

PROG = "python -m fastlm.bench.profile_ops"
OPS = ("cross_entropy", "adamw", "attention", "norm", "launch")
# (warm-up calls, timed calls) per device type; warm-up compiles and tunes on CUDA.
TIMING = {"cuda": (3, 20), "cpu": (1, 3)}
TOP_KERNELS = 15
TOP_HOST_FUNCTIONS = 20
HOST_HEADER = f"{'own us':>9} {'cum us':>9} {'calls':>7}  function"
# Host-side events of the profile (CUDA runtime and driver calls) counted per step.
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaEventSynchronize")  # not cudaDeviceSynchronize: the profile's own


# --------------------------------------------------------------------------------------------
# The steps: each case is (label, {variant: make_call}); make_call() returns a zero-argument
# callable ready to run one step (prepared outside the timed and profiled region). A variant
# whose backend does not run here has, instead of make_call, the reason (a str).
# --------------------------------------------------------------------------------------------

def cross_entropy_cases(device):
    cuda = device.type == "cuda"
    dtype = cross_entropy.DTYPE[device.type]
    fused = "triton" if cuda else "cpp"
    shapes = cross_entropy.COMPILED_REFERENCE_SHAPES if cuda else cross_entropy.CE_SHAPES_QUICK
    for n, vocab in shapes:
        inputs = cross_entropy.make_inputs("cross_entropy", (n, vocab), dtype, device)
        variants = {"F.cross_entropy": _loss_step(inputs, "reference")}
        if cuda:  # as the benchmark times it at these sizes (on CPU, compiling costs more than the run)
            variants["torch.compile(F.cross_entropy)"] = _loss_step(inputs, "reference", torch.compile(F.cross_entropy))
        variants[fused] = _unless(timed_backends("cross_entropy", device, (fused,))[fused],
                                  lambda: _loss_step(inputs, fused))
        yield f"N={n} V={vocab} {dtype}", variants


def _loss_step(inputs, backend, loss_fn=None):
    """make_call of a cross_entropy fwd+bwd on inputs = (leaves, targets) of cross_entropy.make_inputs."""
    def make_call():
        step = cross_entropy.LossStep("cross_entropy", *inputs, backend, loss_fn)
        step.prepare()  # the logits, a clone of the leaf: an input, as in the benchmark
        return step
    return make_call


def adamw_cases(device):
    fused = "cuda" if device.type == "cuda" else "cpp"
    reason = timed_backends("adamw", device, (fused,))[fused]
    config = "124M" if device.type == "cuda" else "2M"
    shapes = adamw.gpt_shapes(**adamw.CONFIGS[config])
    label = f"{config} ({sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M, {len(shapes)} tensors) fp32"
    # As in the benchmark: every variant steps the same parameters, each with its own state.
    params = adamw.make_params(shapes, device, getattr(torch, adamw.DTYPE[device.type]))
    for clip in (False, True):
        variants = {
            "torch fused" + (" + clip_grad_norm_" if clip else ""):
                _same_call(adamw.make_step(adamw.REFERENCE, params, clip)),
            f"fastlm {fused}" + (", max_grad_norm" if clip else ""):
                _unless(reason, lambda: _same_call(adamw.make_step(fused, params, clip))),
        }
        yield label + (", clip" if clip else ""), variants


def attention_cases(device):
    dtype = attention.DTYPE[device.type]
    # On CPU Triton is its interpreter, no performance path: the explicit torch path stands in.
    fused = "triton" if device.type == "cuda" else "torch"
    reason = timed_backends("causal_attention", device, (fused,))[fused]
    shapes = [(1, 32, 2048, 64), (4, 16, 8192, 128)] if device.type == "cuda" else [(1, 4, 256, 64)]
    for shape in shapes:
        def step_of(backend, shape=shape):
            return _same_call(attention.setup_fwd_bwd(backend, shape, dtype, str(device)))

        yield ("B{} H{} T{} D{} ".format(*shape) + dtype,
               {"sdpa": step_of("sdpa"), fused: _unless(reason, lambda: step_of(fused))})


def norm_cases(device):
    # The benchmark's first case: GPT-2 small's LayerNorm under autocast (x fp32, y bf16). On CPU
    # Triton is its interpreter, no performance path: the op's torch backend stands in.
    fused = "triton" if device.type == "cuda" else "torch"
    reason = timed_backends("layer_norm", device, (fused,))[fused]
    op, n, dim, x_dtype = norm.CASES[device.type][0] if device.type == "cuda" else norm.QUICK_CASES[0]

    def step_of(backend):
        return _same_call(norm.setup_fwd_bwd(op, backend, n, dim, x_dtype, norm.DTYPE[device.type], str(device)))

    yield (f"{op} N={n} D={dim} x {x_dtype}",
           {"PyTorch + cast": step_of("reference"), fused: _unless(reason, lambda: step_of(fused))})


def launch_cases(device):
    x = torch.zeros(1, device=device)
    leaf = torch.zeros(1, device=device, requires_grad=True)
    grad = torch.ones(1, device=device)
    variants = {
        "torch op (add_, 1 value)": _same_call(lambda: x.add_(1.0)),
        # Whether Triton is timed here: as for any Triton op (layer_norm stands in).
        "triton empty kernel": _unless(timed_backends("layer_norm", device, ("triton",))["triton"],
                                       lambda: _same_call(_empty_triton_launch(x))),
        "autograd.grad, torch op": _same_call(lambda: torch.autograd.grad(leaf * 2.0, leaf, grad)),
        "autograd.grad, Python Function": _same_call(lambda: torch.autograd.grad(_NoKernels.apply(leaf), leaf, grad)),
    }
    tiny = {"cross_entropy": lambda: _loss_step(cross_entropy.make_inputs("cross_entropy", (4, 256), "bfloat16",
                                                                         device), "triton"),
            "layer_norm": lambda: _same_call(norm.setup_fwd_bwd("layer_norm", "triton", 4, 768, "bfloat16",
                                                                 "bfloat16", str(device))),
            "causal_attention": lambda: _same_call(attention.setup_fwd_bwd("triton", (1, 1, 16, 64), "bfloat16",
                                                                           str(device)))}
    for op, build in tiny.items():
        variants[f"tiny triton {op}"] = _unless(timed_backends(op, device, ("triton",))["triton"], build)
    yield "one call, nothing to compute", variants


class _NoKernels(torch.autograd.Function):
    """An autograd.Function that launches nothing: the cost of the Python Function machinery (on
    CUDA its backward runs on autograd's device thread)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def _empty_triton_launch(x):
    """A call that launches a Triton kernel which stores one value: Triton's own launch cost."""
    import triton
    import triton.language as tl

    @triton.jit
    def _one_store(X):
        tl.store(X, 1.0)

    def call():
        _one_store[(1,)](x)
    return call


CASES = {"cross_entropy": cross_entropy_cases, "adamw": adamw_cases, "attention": attention_cases,
         "norm": norm_cases, "launch": launch_cases}


def _same_call(step):
    """make_call for a step that needs no fresh inputs: the same callable every time."""
    return lambda: step


def _unless(reason, build):
    """A variant: the reason its backend does not run here, else build(), its make_call."""
    return reason if reason else build()


def host_table(make_call, device, top=TOP_HOST_FUNCTIONS):
    """The host's functions by own time over TIMING's repeats of the step, per step: HOST_HEADER,
    then one line per function (own us, cumulative us, calls), largest own time first."""
    _, repeats = TIMING[device.type]
    calls = [make_call() for _ in range(repeats)]
    profiler = cProfile.Profile()
    for call in calls:
        synchronize(device)
        profiler.enable()
        call()
        profiler.disable()
    synchronize(device)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (primitive calls, calls, own s, cum s, callers)}
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    lines = [HOST_HEADER]
    for (path, line, name), (_, count, own, cumulative, _) in rows:
        where = name if path == "~" else f"{short_path(path)}:{line}({name})"
        lines.append(f"{own / repeats * 1e6:9.1f} {cumulative / repeats * 1e6:9.1f} {count / repeats:7.1f}  {where}")
    return lines


# The repository root, so that its files are named relative to it.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def short_path(path):
    """A source path without the machine's part: from the package on for installed packages and
    this repository, else the file name (the standard library)."""
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in path:
            return path.split(marker, 1)[1]
    if path.startswith(_ROOT + os.sep):
        return os.path.relpath(path, _ROOT)
    return os.path.basename(path)


# --------------------------------------------------------------------------------------------
# Measuring one step
# --------------------------------------------------------------------------------------------

def measure(make_call, device, steps):
    """{host_ms, wall_ms, event_ms, device_ms, launches, syncs} per step, and the kernels table."""
    warmup, repeats = TIMING[device.type]
    cuda = device.type == "cuda"
    for _ in range(warmup):
        make_call()()
    host, wall, event = [], [], []
    for _ in range(repeats):
        call = make_call()
        synchronize(device)
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        call()
        t1 = time.perf_counter()
        if cuda:
            end.record()
        synchronize(device)
        t2 = time.perf_counter()
        del call
        host.append((t1 - t0) * 1e3)
        wall.append((t2 - t0) * 1e3)
        if cuda:
            event.append(start.elapsed_time(end))
    # Every profiled call is made (its inputs prepared) before the profile starts.
    events = profile_calls([make_call() for _ in range(steps)], device)
    own = own_times_us(events, device.type)

    def per_step(names):
        return sum(e.count for e in events if e.key in names) / steps if cuda else None

    result = dict(host_ms=statistics.median(host), wall_ms=statistics.median(wall),
                  event_ms=statistics.median(event) if cuda else None,
                  device_ms=sum(us for _, us in own) / steps / 1e3,
                  launches=per_step(LAUNCH_EVENTS), syncs=per_step(SYNC_EVENTS))
    return result, kernel_table(own, steps, top=TOP_KERNELS)


SUMMARY_HEADER = (f"{'case':<40} {'variant':<31} {'host ms':>8} {'wall ms':>8} {'event ms':>8} {'device ms':>9} "
                  f"{'busy':>5} {'launches':>8} {'syncs':>5}")


def summary_line(case, variant, m):
    def number(value, width, digits=3):
        return f"{value:{width}.{digits}f}" if value is not None else f"{'-':>{width}}"

    busy = f"{100 * m['device_ms'] / m['wall_ms']:4.0f}%" if m["wall_ms"] else f"{'-':>5}"
    return (f"{case:<40} {variant:<31} {number(m['host_ms'], 8)} {number(m['wall_ms'], 8)} "
            f"{number(m['event_ms'], 8)} {number(m['device_ms'], 9)} {busy} {number(m['launches'], 8, 1)} "
            f"{number(m['syncs'], 5, 1)}")


def profile_op(op, device, steps, write):
    """Measure every step of `op`; write(text) gets the op's whole text after each one."""
    warmup, repeats = TIMING[device.type]
    title = (f"{op} on {device.type} ({device_name(device)}), torch {torch.__version__}: medians of {repeats} "
             f"steps after {warmup} warm-up; device ms and kernels over {steps} profiled steps")
    summary, details = [title, SUMMARY_HEADER], []
    for case, variants in CASES[op](device):
        for variant, make_call in variants.items():
            if isinstance(make_call, str):
                summary.append(f"{case:<40} {variant:<31} not run: {make_call}")
            else:
                measured, table = measure(make_call, device, steps)
                summary.append(summary_line(case, variant, measured))
                details += ["", f"--- {case}, {variant}: kernels by own "
                            f"{'device' if device.type == 'cuda' else 'CPU'} time"] + table
                details += ["", f"--- {case}, {variant}: host functions by own time (cProfile)"]
                details += host_table(make_call, device)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            write("\n".join(summary + details))
    return "\n".join(summary + details)


def main(argv=None):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per variant (default 5)")
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)
    try:
        device = profile_device(args.device, args.steps, args.out_dir)
    except ConfigError as exc:
        print(f"profile_ops: error: {exc}", file=sys.stderr)
        return 2
    for op in args.only:
        def write(text, op=op):
            if args.out_dir:
                os.makedirs(args.out_dir, exist_ok=True)
                path = os.path.join(args.out_dir, f"profile_ops_{op}.txt")
                with open(path + ".part", "w") as f:
                    f.write(text + "\n")
                os.replace(path + ".part", path)

        try:
            text = profile_op(op, device, args.steps, write)
        except KeyboardInterrupt:  # the time limit of gpu_check.sh: what finished is written
            print(f"profile_ops: interrupted during {op}; the steps measured are in profile_ops_{op}.txt",
                  file=sys.stderr)
            return 130
        print(text + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
