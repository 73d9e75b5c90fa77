"""What every benchmark shares: the row it reports, timing, peak memory, errors, the device,
and the profiles behind them.

Timing: warm-up, then the median of repeats; CUDA with events, CPU with perf_counter.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the RSS high-water mark of a
fresh subprocess per case, so one case's allocations never hide another's.
Profiles (profile_step, profile_ops): torch.profiler over steps, each kernel's own device time
(CPU time on CPU), as one table.
"""
import dataclasses
import multiprocessing
import os
import platform
import re
import statistics
import time

import torch

from fastlm.ops import available_backends


@dataclasses.dataclass
class Row:
    """One case of a benchmark: its reference against one backend, or why it was not measured.

    name     the op or step measured (cross_entropy's benchmark also reports linear_cross_entropy)
    case     the size and options, e.g. "N=4096 V=32000" or "10M (10.3M, 52 tensors) clip"
    backend  the backend timed as fused_ms; a row with only ref_ms is the reference itself
    ref_ms, fused_ms            medians after warm-up; speedup = ref_ms / fused_ms
    ref_peak_mb, fused_peak_mb  peak memory one call adds over its inputs
    max_err  error against the benchmark's oracle (its module docstring says which)
    extra    benchmark-specific numbers: TFLOP/s, tokens/s, MFU, ...
    """
    name: str
    case: str
    backend: str
    ref_ms: float | None = None
    fused_ms: float | None = None
    ref_peak_mb: float | None = None
    fused_peak_mb: float | None = None
    max_err: float | None = None
    skipped: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    def to_dict(self):
        speedup = self.ref_ms / self.fused_ms if self.ref_ms and self.fused_ms else None
        return {**dataclasses.asdict(self), "speedup": speedup}


# Where a benchmark process keeps the rows it has finished (set by the runner, bench/__main__.py),
# so that a benchmark stopped by its time limit or Ctrl-C still reports them.
PARTIAL_ROWS_ENV = "FASTLM_BENCH_PARTIAL"


def report_rows(rows):
    """Record the rows measured so far (call after each finished case). The runner keeps them if
    this process is stopped before run() returns; outside the runner this does nothing."""
    path = os.environ.get(PARTIAL_ROWS_ENV)
    if not path:
        return
    import json

    with open(path + ".part", "w") as f:
        json.dump([row.to_dict() for row in rows], f, default=str)
    os.replace(path + ".part", path)


def timed_backends(op, device, backends):
    """{backend: None if it is timed here, else why not}, from fastlm.ops.available_backends.

    The Triton interpreter (TRITON_INTERPRET=1 on CPU) is usable but is a correctness tool, not
    a performance path, so it is never timed.
    """
    reasons = available_backends(device)[op]
    interpreted = torch.device(device).type != "cuda"
    return {name: "the Triton interpreter on CPU is for tests, not timing"
            if name == "triton" and interpreted and reasons[name] is None else reasons[name]
            for name in backends}


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, *, device="cpu", warmup=3, repeats=10, setup=None):
    """Median time of fn() in milliseconds after `warmup` untimed calls; setup(), when given,
    runs untimed before every call (e.g. to make inputs that fn consumes)."""
    device = torch.device(device)
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


_COPY_GBS = {}


def copy_bandwidth_gbs(device):
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), the ceiling the
    bandwidth-bound kernels are measured against: median of 20 copies of 1 GiB on CUDA, of
    256 MiB on CPU. Measured once per process and device."""
    device = torch.device(device)
    key = str(device)
    if key not in _COPY_GBS:
        nbytes = 2**30 if device.type == "cuda" else 2**28
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device=device, warmup=3, repeats=20)
        _COPY_GBS[key] = 2 * nbytes / (ms * 1e-3) / 1e9
        del src, dst
    return _COPY_GBS[key]


def max_rel_error(out, ref):
    """max |out - ref| / max(|ref|), a scale-free error for tables."""
    if out.numel() == 0:
        return 0.0
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# --------------------------------------------------------------------------------------------
# Peak memory
# --------------------------------------------------------------------------------------------

def peak_memory_mb(setup, *, device="cpu", **kwargs):
    """Peak memory in MiB that one call of the step built by `setup(**kwargs)` adds.

    `setup` must be a module-level function (it is pickled into a subprocess on CPU) that
    allocates the inputs and returns a zero-argument callable running the measured step.
    CPU: the rise of the RSS high-water mark of a fresh process over its footprint once the
    inputs exist. CUDA: torch.cuda.max_memory_allocated over what the inputs hold.
    """
    device = torch.device(device)
    if device.type == "cuda":
        step = setup(**kwargs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not os.path.exists("/proc/self/status"):
        return None  # the CPU measurement reads Linux's /proc
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # a child's failure is raised here
        return pool.apply(_peak_child, (setup, kwargs, torch.get_num_threads()))


def _peak_child(setup, kwargs, threads):
    """Child body: the rise of VmHWM over the footprint of the inputs. VmHWM belongs to this
    process's own address space; ru_maxrss would also carry the high-water mark of the parent
    the process was forked from, which would hide a child's smaller peak behind its parent's."""
    torch.set_num_threads(threads)
    step = setup(**kwargs)
    before = _status_mb("VmRSS") if _reset_high_water_mark() else _status_mb("VmHWM")
    step()
    return max(_status_mb("VmHWM") - before, 0.0)


def _status_mb(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(field + ":"))


def _reset_high_water_mark():
    """Start VmHWM afresh from the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Profiles: where a step's device time goes
# --------------------------------------------------------------------------------------------

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


def profile_calls(calls, device):
    """The profiler's events (key_averages) of `calls`, zero-argument callables run in order under
    torch.profiler; on CUDA the device is synchronized before and after, so every kernel is in."""
    device = torch.device(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(device)
    with torch.profiler.profile(activities=activities) as prof:
        for call in calls:
            call()
        synchronize(device)
    return prof.key_averages()


def profile_device(device, steps, out_dir):
    """The torch.device of a profiler's command line, its --steps and --out-dir checked too;
    ConfigError, one line for stderr, when one of them is bad."""
    from fastlm.config import ConfigError
    from fastlm.distributed import resolve_device

    device = resolve_device(device)  # an unknown device, or cuda without one: ConfigError
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    if out_dir and os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"--out-dir {out_dir} is a file; give a directory")
    return device


PROFILE_HEADER = f"{'share':>6} {'ms/step':>9} {'calls/step':>10}  name"


def kernel_table(own, steps, top=25):
    """The table of the `top` largest of `own` ([(event, own us)] over `steps` steps): the header,
    then per event its share of the summed own time, ms and calls per step, and its name."""
    total_us = sum(us for _, us in own) or 1.0
    lines = [PROFILE_HEADER]
    for event, us in sorted(own, key=lambda pair: -pair[1])[:top]:
        lines.append(f"{100 * us / total_us:5.1f}% {us / steps / 1e3:9.3f} {event.count / steps:10.1f}  "
                     f"{event.key[:110]}")
    return lines


# --------------------------------------------------------------------------------------------
# The device and the software a measurement was taken with
# --------------------------------------------------------------------------------------------

def device_name(device):
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def device_slug(device):
    """A short folder name for results: 'cpu-2core-intel-xeon-...' or 'cuda-nvidia-h100-...'."""
    device = torch.device(device)
    if device.type == "cuda":
        raw = "cuda-" + torch.cuda.get_device_name(device)
    else:
        raw = f"cpu-{os.cpu_count()}core-" + device_name(device).split(" (")[0]
    raw = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor", "", raw.lower())
    return re.sub(r"[^a-z0-9]+", "-", raw).strip("-")[:60]


def env_info(device):
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "threads": torch.get_num_threads()}
