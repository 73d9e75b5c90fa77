"""Timing, peak-memory, error and report helpers shared by every benchmark.

Timing: warm-up, then the median of repeats; CUDA with events, CPU with perf_counter.
Peak memory: torch.cuda.max_memory_allocated on CUDA; on CPU the RSS high-water mark of a
fresh subprocess per case, so one case's allocations never hide another's.
"""
import json
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import time

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "benchmarks", "results")


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, *, device="cpu", warmup=3, repeats=10):
    """Median wall time of fn() in milliseconds after `warmup` untimed calls."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    if device.type == "cuda":
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _status_mb(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_high_water_mark():
    """Start VmHWM afresh from the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _high_water_mb():
    # VmHWM belongs to this process's own address space. ru_maxrss does not: on Linux it also
    # carries the high-water mark of the parent the process was forked from, which would hide
    # a child's smaller peak behind its parent's.
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


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
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    kwargs = dict(kwargs, _threads=torch.get_num_threads())
    proc = ctx.Process(target=_peak_child_fresh, args=(setup, kwargs, queue))
    proc.start()
    status, value, _ = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"peak-memory subprocess failed: {value}")
    return value


def _peak_child_fresh(setup, kwargs, queue):
    """Child body: high-water mark of one step over the footprint of its inputs."""
    try:
        torch.set_num_threads(int(kwargs.pop("_threads")))
        step = setup(**kwargs)
        before = _status_mb("VmRSS") if _reset_high_water_mark() else _high_water_mb()
        step()
        queue.put(("ok", max(_high_water_mb() - before, 0.0), before))
    except BaseException as exc:  # report any failure to the parent instead of hanging it
        queue.put(("error", f"{type(exc).__name__}: {exc}", 0.0))


def max_abs_error(out, ref):
    return (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0


def max_rel_error(out, ref):
    """max |out - ref| / max(|ref|), a scale-free error for tables."""
    if out.numel() == 0:
        return 0.0
    ref = ref.double()
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


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
        raw = device_name(device).split(" (")[0]
        raw = f"cpu-{os.cpu_count()}core-" + raw
    raw = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor", "", raw.lower())
    return re.sub(r"[^a-z0-9]+", "-", raw).strip("-")[:60]


def env_info(device):
    info = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["threads"] = torch.get_num_threads()
    return info


def format_table(rows, columns):
    """Plain-text table; `columns` is a list of (key, header, format spec)."""
    cells = [[header for _, header, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else (format(value, spec) if spec else str(value)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def results_dir(device, out_dir=None):
    path = out_dir or os.path.join(RESULTS_DIR, device_slug(device))
    os.makedirs(path, exist_ok=True)
    return path


def save_report(name, rows, columns, *, device, out_dir=None, extra=None):
    """Print the table and write <results>/<name>.json; returns the results folder."""
    path = results_dir(device, out_dir)
    info = env_info(device)
    print(f"\n{name} on {info['device']} (torch {info['torch']}, triton {info['triton']})")
    print(format_table(rows, columns))
    with open(os.path.join(path, f"{name}.json"), "w") as f:
        json.dump({"benchmark": name, "env": info, "rows": rows, **(extra or {})}, f, indent=2)
    return path


def save_figure(fig, name, *, device, out_dir=None):
    """Write fig as <results>/<name>.png and close it."""
    import matplotlib.pyplot as plt

    path = os.path.join(results_dir(device, out_dir), f"{name}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
