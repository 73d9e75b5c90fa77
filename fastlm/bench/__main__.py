"""`python -m fastlm.bench`: every kernel benchmark plus the end-to-end one, and one summary.

Each benchmark module (fastlm/bench/<name>.py) exposes
run(quick, device, dtype, out_dir) -> rows; this runner calls each in a fresh Python process,
so a crash, a missing module or a missing backend becomes a "skipped: <reason>" line rather
than the end of the run, and one benchmark's memory never inflates the next one's peak. It then
prints one table and writes summary.json, summary.md and PNG plots to
benchmarks/results/<device slug>/ (or --out-dir).

`--parity` instead trains the same model with the reference and the fused path and checks that
the losses and final weights agree (fastlm/bench/parity.py); exit status 1 when they do not.
"""
import argparse
import datetime
import glob
import importlib
import json
import os
import signal
import subprocess
import sys
import time

PROG = "python -m fastlm.bench"
# name -> module; cross_entropy covers both cross_entropy and linear_cross_entropy.
BENCHMARKS = {
    "cross_entropy": "fastlm.bench.cross_entropy",
    "adamw": "fastlm.bench.adamw",
    "attention": "fastlm.bench.attention",
    "e2e": "fastlm.bench.e2e",
}
DTYPES = ("float32", "bfloat16", "float16")
ROW_KEYS = ("name", "shape", "backend", "ref_ms", "fused_ms", "speedup", "ref_peak_mb", "fused_peak_mb", "max_err")
TABLE = [("benchmark", "benchmark", ""), ("case", "case", ""), ("backend", "backend", ""),
         ("ref_ms", "ref ms", ".2f"), ("fused_ms", "fused ms", ".2f"), ("speedup", "speed-up", ".2f"),
         ("ref_peak_mb", "ref peak MB", ".1f"), ("fused_peak_mb", "fused peak MB", ".1f"),
         ("max_err", "max err", ".1e"), ("tokens_per_s", "tok/s ref -> fused", ""), ("mfu", "MFU", ""),
         ("note", "note", "")]
NOTE_WIDTH = 70
CASE_OPTIONS = ("clip",)


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit 2."""


# --------------------------------------------------------------------------------------------
# Running one benchmark (in a child process)
# --------------------------------------------------------------------------------------------

def run_benchmark(spec):
    """Child-process body: import the module, call run(), write {"rows"} or {"skipped"} as JSON."""
    name, module_name = spec["name"], spec["module"]
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                raise LookupError(f"{module_name} is not in this checkout") from None
            raise
        rows = module.run(quick=spec["quick"], device=spec["device"], dtype=spec["dtype"], out_dir=spec["out_dir"])
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError(f"{module_name}.run returned {type(rows).__name__}, not a list of dicts")
        result = {"rows": rows}
    except LookupError as exc:
        result = {"skipped": str(exc)}
    except Exception as exc:  # any failure inside one benchmark is reported, never fatal
        import traceback

        traceback.print_exc()
        message = (str(exc).splitlines() or [""])[0][:200]
        result = {"skipped": f"{name} failed: {type(exc).__name__}: {message}"}
    with open(spec["result_path"], "w") as f:
        json.dump(result, f, default=str)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def run_in_subprocess(name, args, quick, out_dir, timeout):
    """Run one benchmark in a fresh interpreter; returns {"rows": [...]} or {"skipped": reason}."""
    result_path = os.path.join(out_dir, f".{name}-result.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    spec = {"name": name, "module": BENCHMARKS[name], "quick": quick, "device": args.device,
            "dtype": args.dtype, "out_dir": out_dir, "result_path": result_path}
    code = "import json, sys; from fastlm.bench.__main__ import run_benchmark; run_benchmark(json.loads(sys.argv[1]))"
    sys.stdout.flush()
    # Its own session, so that a timeout or Ctrl-C also ends the processes it spawned itself.
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], start_new_session=True)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return {"skipped": f"timed out after {timeout:.0f} s"}
    except BaseException:
        _kill_group(proc)
        raise
    try:
        with open(result_path) as f:
            result = json.load(f)
        os.remove(result_path)
    except (OSError, ValueError):
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return {"skipped": f"the benchmark process died ({how}) before reporting"}
    return result


# --------------------------------------------------------------------------------------------
# Summary: rows of every benchmark in one table, JSON, markdown and plots
# --------------------------------------------------------------------------------------------

def _fmt(value, spec):
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def _is_measured(row):
    return not row.get("skipped") and row.get("fused_ms") is not None


def case_label(row):
    """The row's name, plus its shape when the name alone does not tell the size (no digit in it)."""
    name, shape = str(row.get("name")), row.get("shape")
    if shape is not None and not any(ch.isdigit() for ch in name):
        name = f"{name} {shape if isinstance(shape, str) else 'x'.join(map(str, shape))}"
    # Options that tell apart rows of one name and shape (adamw times each size with and without clipping).
    options = [f"{key} {row[key]}" for key in CASE_OPTIONS if row.get(key) is not None]
    return ", ".join([name, *options])


def _panel(bench, row):
    # cross_entropy's module reports two ops (cross_entropy, linear_cross_entropy): one panel each
    name = str(row.get("name"))
    return bench if any(ch.isdigit() for ch in name) else name


def summary_rows(results):
    """Flatten {benchmark: result} into display rows (one per measured or skipped case)."""
    out = []
    for bench, result in results.items():
        if "skipped" in result:
            out.append({"benchmark": bench, "status": "skipped", "note": f"skipped: {result['skipped']}"})
            continue
        for row in result["rows"]:
            display = {"benchmark": bench, **{k: row.get(k) for k in ROW_KEYS}, "case": case_label(row)}
            if row.get("skipped"):
                display.update(status="skipped", note=f"skipped: {row['skipped']}")
            elif row.get("fused_ms") is None and row.get("ref_ms") is None:
                display.update(status="skipped", note="skipped: no time measured")
            else:
                display["status"] = "measured"
            if row.get("fused_tokens_per_s") is not None:
                display["tokens_per_s"] = f"{row['ref_tokens_per_s']:,.0f} -> {row['fused_tokens_per_s']:,.0f}"
            if row.get("fused_mfu") is not None:
                display["mfu"] = f"{row['ref_mfu']:.1%} -> {row['fused_mfu']:.1%}"
            out.append(display)
    return out


def text_table(rows):
    cells = [[header for _, header, _ in TABLE]]
    for row in rows:
        line = [_fmt(row.get(key), spec) for key, _, spec in TABLE]
        if len(line[-1]) > NOTE_WIDTH:
            line[-1] = line[-1][:NOTE_WIDTH - 3] + "..."
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 2, len(TABLE) - 1) else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows):
    header = "| " + " | ".join(h for _, h, _ in TABLE) + " |"
    align = "|" + "|".join(":--" if i in (0, 1, 2, len(TABLE) - 1) else "--:" for i in range(len(TABLE))) + "|"
    body = ["| " + " | ".join(_fmt(r.get(k), s).replace("|", "/") for k, _, s in TABLE) + " |" for r in rows]
    return "\n".join([header, align, *body])


def write_markdown(out_dir):
    """summary.md from summary.json (and parity.json when present) in out_dir."""
    summary_path, parity_path = os.path.join(out_dir, "summary.json"), os.path.join(out_dir, "parity.json")
    lines = ["# fastlm benchmarks", ""]
    summary = parity = None
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    if os.path.exists(parity_path):
        with open(parity_path) as f:
            parity = json.load(f)
    env = (summary or parity)["env"]
    lines += [f"Measured on **{env['device']}** with torch {env['torch']}, triton {env['triton']}, "
              f"Python {env['python']}, {env['threads']} threads."]
    if summary:
        lines += [f"Command: `{summary['command']}` ({summary['date']}, {summary['seconds']:.0f} s"
                  f"{'; quick mode: ' + ', '.join(summary['quick']) if summary['quick'] else ''}).", "",
                  "Reference = each benchmark's PyTorch baseline (cross_entropy: F.cross_entropy, or lm_head + "
                  "F.cross_entropy; adamw: torch.optim.AdamW(fused=True); attention: sdpa; e2e: backend torch "
                  "everywhere); fused = the backend named in the row. Times are medians after warm-up; "
                  "peak memory is what one call adds (CPU: RSS high-water mark in a fresh process; CUDA: "
                  "max_memory_allocated); max err is against a float64 or reference result. End-to-end rows "
                  "(e2e) time one training step of the whole model; their max err is the relative difference "
                  "of the first step's loss.", "", markdown_table(summary["rows"]), ""]
    if parity:
        w = parity["weights"]
        lines += ["## Numerical parity", "",
                  f"{'Passed' if parity['passed'] else 'FAILED'}: {parity['steps']} training steps of "
                  f"{parity['case']['name']} (fp32, dropout 0, seed {parity['seed']}), reference vs fused "
                  f"({parity['fused_backends']}). Max relative loss difference {parity['max_loss_rel_diff']:.2e} "
                  f"(limit {parity['loss_rtol']:.0e} at every step); final weights: max per-tensor relative L2 "
                  f"difference {w['max_tensor_rel_l2']:.2e} (limit {parity['weight_rtol']:.0e}), max abs "
                  f"{w['max_abs']:.2e}.", ""]
    pngs = sorted(os.path.basename(p) for p in glob.glob(os.path.join(out_dir, "*.png")))
    shown = [p for p in pngs if p.startswith(("summary", "parity"))]
    # Each module names its plots after itself, with a _quick suffix in quick mode.
    per_bench = [p for p in pngs if summary and any(
        p.startswith(b) and p.endswith("_quick.png") == (b in summary["quick"]) for b in summary["benchmarks"])]
    if shown or per_bench:
        lines += ["## Plots", "", *[f"![{p[:-4]}]({p})\n" for p in shown]]
        if per_bench:
            lines += ["Per benchmark: " + ", ".join(f"[{p}]({p})" for p in per_bench), ""]
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines))


def _is_own_baseline(row):
    # e.g. attention's sdpa row, which is the baseline the other backends are compared with
    return row.get("speedup") == 1.0 and row.get("ref_ms") == row.get("fused_ms")


def plot_summary(results, out_dir, device_type):
    """summary_speedup.png (every measured case) and summary_times.png (time per case per benchmark)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastlm.bench.common import save_figure

    measured = [(bench, row) for bench, result in results.items() for row in result.get("rows", [])
                if _is_measured(row) and row.get("speedup") and not _is_own_baseline(row)]
    if not measured:
        return
    fig, ax = plt.subplots(figsize=(9, 0.3 * len(measured) + 1.4))
    labels = [f"{bench}: {case_label(row)} [{row.get('backend')}]" for bench, row in measured]
    speedups = [row["speedup"] for _, row in measured]
    ax.barh(range(len(measured)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(measured)), labels, fontsize=7)
    ax.invert_yaxis()
    if max(speedups) / min(speedups) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("speed-up of fused over reference (>1 is faster)")
    ax.set_title(f"fastlm: fused vs reference, {device_type}")
    ax.grid(True, axis="x", alpha=0.3)
    save_figure(fig, "summary_speedup", device=device_type, out_dir=out_dir)

    panels = {}
    for bench, result in results.items():
        for row in result.get("rows", []):
            if _is_measured(row):
                panels.setdefault(_panel(bench, row), []).append(row)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 4.2), squeeze=False)
    for ax, (panel, rows) in zip(axes[0], panels.items()):
        # Cases in the module's order, which grows in size; one x position per case.
        cases = list(dict.fromkeys(case_label(r) for r in rows))
        ref = {}
        for r in rows:
            if r.get("ref_ms") is not None:
                ref.setdefault(cases.index(case_label(r)), r["ref_ms"])
        ax.plot(list(ref), list(ref.values()), "k--", marker="x", label="reference")
        for backend in dict.fromkeys(str(r.get("backend")) for r in rows):
            mine = [r for r in rows if str(r.get("backend")) == backend]
            if not all(_is_own_baseline(r) for r in mine):
                ax.plot([cases.index(case_label(r)) for r in mine], [r["fused_ms"] for r in mine], marker="o",
                        label=backend[:34])
        ax.set_xticks(range(len(cases)), cases, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("ms (median)")
        ax.set_title(panel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"time per case, fused vs reference, {device_type}")
    save_figure(fig, "summary_times", device=device_type, out_dir=out_dir)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--quick", nargs="*", metavar="NAME", default=None,
                        help="small sizes, a smoke run of well under a minute each: for every benchmark, or only "
                             "for the NAMEs given")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help=f"run only these benchmarks (of {', '.join(BENCHMARKS)}; commas also separate)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="passed to every benchmark; default: each benchmark's own (fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--parity", action="store_true",
                        help="check numerical parity of the reference and fused training paths instead")
    parser.add_argument("--steps", type=int, default=None, help="--parity: training steps (default 50, quick 20)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per benchmark before it is reported as skipped (default 1200, quick 300)")
    parser.add_argument("--out-dir", default=None, help="default: benchmarks/results/<device slug>/")

    def error(message):
        parser.exit(2, f"{PROG}: error: {message}\n")

    parser.error = error
    args = parser.parse_args(argv)
    if args.only is not None:
        names = [n for item in args.only for n in item.split(",") if n]
        unknown = [n for n in names if n not in BENCHMARKS]
        if unknown:
            raise UsageError(f"unknown benchmark {unknown[0]!r} for --only; choose from {', '.join(BENCHMARKS)}")
        args.only = list(dict.fromkeys(names))
    if args.quick:
        unknown = [n for n in args.quick if n not in BENCHMARKS]
        if unknown:
            raise UsageError(f"unknown benchmark {unknown[0]!r} for --quick; choose from {', '.join(BENCHMARKS)}")
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    return args


def run_suite(args, out_dir):
    from fastlm.bench.common import env_info

    names = args.only or list(BENCHMARKS)
    # --quick alone: every benchmark quick; --quick NAME...: those only.
    quick = [n for n in names if args.quick is not None and (not args.quick or n in args.quick)]
    timeout = args.timeout or (300 if len(quick) == len(names) else 1200)
    env = env_info(args.device)
    mode = "quick" if len(quick) == len(names) else f"full ({'quick: ' + ', '.join(quick) if quick else 'all'})"
    print(f"fastlm benchmarks on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
          f"Python {env['python']}, {env['threads']} threads; {mode} run of {', '.join(names)} -> {out_dir}")
    started = time.perf_counter()
    results = {}
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        t0 = time.perf_counter()
        results[name] = run_in_subprocess(name, args, name in quick, out_dir, timeout)
        results[name]["quick"] = name in quick
        results[name]["seconds"] = time.perf_counter() - t0
        status = results[name].get("skipped")
        print(f"=== {name}: {'skipped: ' + status if status else 'done'} ({results[name]['seconds']:.0f} s)")
    rows = summary_rows(results)
    seconds = time.perf_counter() - started
    summary = {"env": env, "device": args.device, "quick": quick, "dtype": args.dtype,
               "command": " ".join([PROG, *sys.argv[1:]]) if sys.argv[0].endswith("__main__.py") else PROG,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "seconds": seconds, "rows": rows, "benchmarks": results}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    try:
        plot_summary(results, out_dir, args.device)
    except Exception as exc:  # a plot must never cost the numbers
        print(f"{PROG}: warning: summary plots failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    write_markdown(out_dir)
    print(f"\nSummary ({env['device']}, torch {env['torch']}, triton {env['triton']}, {seconds:.0f} s):")
    print(text_table(rows))
    skipped = [r for r in rows if r["status"] == "skipped"]
    print(f"\n{len(rows) - len(skipped)} measured, {len(skipped)} skipped; wrote summary.json, summary.md and "
          f"PNGs in {out_dir}")
    return 0


def run_parity_check(args, out_dir):
    from fastlm.bench import parity

    quick = args.quick is not None
    steps = args.steps or (20 if quick else 50)
    case = parity.TINY_CASE if quick else parity.DEFAULT_CASE
    report = parity.run_parity(steps, args.device, case, out_dir=out_dir)
    print(parity.describe(report))
    write_markdown(out_dir)
    print(f"wrote parity.json, parity.png and summary.md in {out_dir}")
    return 0 if report["passed"] else 1


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_in_subprocess, which ends the running benchmark


def main(argv=None):
    if __name__ == "__main__":
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        args = parse_args(argv)
        import torch

        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda, but CUDA is not available on this machine (use --device cpu)")
        from fastlm.bench.common import results_dir

        out_dir = os.path.abspath(results_dir(args.device, args.out_dir))
        return run_parity_check(args, out_dir) if args.parity else run_suite(args, out_dir)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
