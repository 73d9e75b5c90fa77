"""`python -m fastlm.bench`: run the benchmarks, print one table, write the results.

Each benchmark (fastlm/bench/<name>.py) exposes `run(quick, device, dtype) -> list[Row]` and its
default dtype per device type, `DTYPE`; one that draws something the summary plots do not also
has `plot(rows, label)`. This runner calls each in a fresh Python process, so a crash, a missing
module or a missing backend becomes a "skipped: <reason>" line rather than the end of the run,
and one benchmark's memory never inflates the next one's peak. It alone writes results:
<name>.json per benchmark, summary.json, summary.md and PNGs, into benchmarks/results/<device
slug>/ for a full run and into a fresh scratch directory for a quick one (--out-dir chooses).
A run of some benchmarks replaces their entries in the folder's summary.json and keeps the rest.
A benchmark that runs out of time (--timeout), dies, or is interrupted (Ctrl-C, SIGTERM) keeps
the rows it finished (each benchmark records them as it goes), marked partial; an interrupted
run writes its results, names the benchmarks it did not run, and exits 130.

`--parity` instead trains the same model with the reference and the fused path and checks that
the losses and final weights agree (fastlm/bench/parity.py); exit status 1 when they do not.
"""
import argparse
import datetime
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from fastlm.bench.report import SCHEMA

PROG = "python -m fastlm.bench"
BENCHMARKS = {
    "cross_entropy": "fastlm.bench.cross_entropy",  # and linear_cross_entropy
    "adamw": "fastlm.bench.adamw",
    "attention": "fastlm.bench.attention",
    "norm": "fastlm.bench.norm",  # layer_norm and rms_norm
    "e2e": "fastlm.bench.e2e",
}
DTYPES = ("float32", "bfloat16", "float16")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                           "benchmarks", "results")


class UsageError(ValueError):
    """A bad command line: one line on stderr, exit 2."""


# --------------------------------------------------------------------------------------------
# One benchmark, in a child process
# --------------------------------------------------------------------------------------------

def run_benchmark(spec):
    """Child-process body: import the module, call run(), write {"rows", ...} or {"skipped"} as JSON."""
    import torch

    from fastlm.bench.common import Row

    try:
        module = importlib.import_module(spec["module"])
        dtype = spec["dtype"] or module.DTYPE[torch.device(spec["device"]).type]
        rows = module.run(quick=spec["quick"], device=spec["device"], dtype=dtype)
        if not isinstance(rows, list) or not all(isinstance(r, Row) for r in rows):
            raise TypeError(f"{spec['module']}.run returned {type(rows).__name__}, not a list of Rows")
        result = {"dtype": dtype, "about": module.__doc__, "rows": [r.to_dict() for r in rows]}
    except Exception as exc:  # any failure inside one benchmark is reported, never fatal
        import traceback

        traceback.print_exc()
        message = (str(exc).splitlines() or [""])[0][:200]
        result = {"skipped": f"{spec['name']} failed: {type(exc).__name__}: {message}"}
    with open(spec["result_path"], "w") as f:
        json.dump(result, f, default=str)


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _partial_result(partial_path, why):
    """What a benchmark that did not finish leaves: the rows it recorded (common.report_rows),
    marked partial, or else a skipped entry saying why."""
    try:
        with open(partial_path) as f:
            rows = json.load(f)
        os.remove(partial_path)
    except (OSError, ValueError):
        rows = []
    if not rows:
        return {"skipped": why}
    return {"rows": rows, "partial": f"{why}; the {len(rows)} row(s) finished before are kept"}


def run_in_subprocess(name, args, out_dir, timeout):
    """Run one benchmark in a fresh interpreter; returns {"rows": [...], ...} or {"skipped": reason}.

    A benchmark that times out or dies keeps the rows it finished, with a "partial" note. When
    this process is interrupted (Ctrl-C, SIGTERM), the benchmark is ended and the exception
    carries its partial result as `bench_result`."""
    from fastlm.bench.common import PARTIAL_ROWS_ENV

    result_path = os.path.join(out_dir, f".{name}-result.json")
    partial_path = os.path.join(out_dir, f".{name}-partial.json")
    for path in (result_path, partial_path):
        if os.path.exists(path):
            os.remove(path)
    spec = {"name": name, "module": BENCHMARKS[name], "quick": args.quick, "device": args.device,
            "dtype": args.dtype, "result_path": result_path}
    code = "import json, sys; from fastlm.bench.__main__ import run_benchmark; run_benchmark(json.loads(sys.argv[1]))"
    sys.stdout.flush()
    # Its own session, so that a timeout or Ctrl-C also ends the processes it spawned itself.
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], start_new_session=True,
                            env={**os.environ, PARTIAL_ROWS_ENV: partial_path})
    started = time.perf_counter()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return _partial_result(partial_path, f"timed out after {timeout:.0f} s")
    except BaseException as exc:
        _kill_group(proc)
        exc.bench_result = _partial_result(partial_path, f"interrupted after {time.perf_counter() - started:.0f} s")
        raise
    try:
        with open(result_path) as f:
            result = json.load(f)
        os.remove(result_path)
    except (OSError, ValueError):
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        return _partial_result(partial_path, f"the benchmark process died ({how}) before reporting")
    if os.path.exists(partial_path):
        os.remove(partial_path)
    return result


# --------------------------------------------------------------------------------------------
# The suite: every selected benchmark, then the results
# --------------------------------------------------------------------------------------------

def _write_json(out_dir, name, data):
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(data, f, indent=2, default=str)


def merged_summary(out_dir, env, device, entries):
    """summary.json's content: this run's entries over those of an earlier run on the same device."""
    earlier = {}
    path = os.path.join(out_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous.get("schema") == SCHEMA and previous.get("device") == device:
            earlier = previous["benchmarks"]
        else:  # say so: a partial run would otherwise drop the other benchmarks' results unseen
            names = ", ".join(previous.get("benchmarks", previous)) or "none"
            print(f"note: {path} is from another runner version or device (schema "
                  f"{previous.get('schema')}, device {previous.get('device')}); it is replaced, and its "
                  f"entries ({names}) are not carried over: rerun those benchmarks too", flush=True)
    merged = {**earlier, **entries}
    order = [*BENCHMARKS, *merged]
    benchmarks = {name: merged[name] for name in sorted(merged, key=order.index)}
    return {"schema": SCHEMA, "env": env, "device": device, "benchmarks": benchmarks}


def draw_plots(out_dir, summary, entries):
    """{name: figure}: the summary plots, and each benchmark's own plot where it has one."""
    from fastlm.bench.report import SUMMARY_PLOTS, summary_figures, table_rows

    for name in SUMMARY_PLOTS:  # none may outlive a run that no longer draws it
        if os.path.exists(os.path.join(out_dir, f"{name}.png")):
            os.remove(os.path.join(out_dir, f"{name}.png"))
    figures = summary_figures(table_rows(summary["benchmarks"]), summary["device"])
    for name, entry in entries.items():
        plot = getattr(importlib.import_module(BENCHMARKS[name]), "plot", None) if entry.get("rows") else None
        figure = plot and plot(entry["rows"], f"{entry['dtype']}, {summary['device']}")
        if figure:
            figures[name] = figure
    return figures


def run_suite(args, out_dir):
    from fastlm.bench.common import env_info
    from fastlm.bench.report import is_measured, save_plots, table_rows, text_table, write_markdown

    env = env_info(args.device)
    timeout = args.timeout or (300 if args.quick else 1200)
    print(f"fastlm benchmarks on {env['device']}: torch {env['torch']}, triton {env['triton']}, Python "
          f"{env['python']}, {env['threads']} threads; {'quick' if args.quick else 'full'} run of "
          f"{', '.join(args.names)}\nresults -> {out_dir}{args.out_dir_note}")
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries, stopped = {}, None
    for name in args.names:
        print(f"\n=== {name} ===", flush=True)
        started = time.perf_counter()
        try:
            result = run_in_subprocess(name, args, out_dir, timeout)
        except (KeyboardInterrupt, SystemExit) as exc:  # keep what finished, write it, then stop
            stopped, result = exc, getattr(exc, "bench_result", {"skipped": "interrupted"})
        about = result.pop("about", None)
        entries[name] = {"quick": args.quick, "dtype": result.pop("dtype", args.dtype), "command": args.command,
                         "date": date, "seconds": time.perf_counter() - started, **result}
        _write_json(out_dir, name, {"benchmark": name, "about": about, "env": env, "device": args.device,
                                    **entries[name]})
        state = next((f"{key}: {result[key]}" for key in ("skipped", "partial") if key in result), "done")
        print(f"=== {name}: {state} ({entries[name]['seconds']:.0f} s)", flush=True)
        if stopped is not None:
            not_run = args.names[args.names.index(name) + 1:]
            print(f"=== stopped{': not run: ' + ', '.join(not_run) if not_run else ''}", flush=True)
            break
    summary = merged_summary(out_dir, env, args.device, entries)
    _write_json(out_dir, "summary", summary)
    plots = save_plots(out_dir, lambda: draw_plots(out_dir, summary, entries))
    write_markdown(out_dir)
    rows = table_rows(entries)
    measured = sum(map(is_measured, rows))
    print(f"\nSummary ({env['device']}, torch {env['torch']}, triton {env['triton']}):\n{text_table(rows)}")
    kept = len(summary["benchmarks"]) - len(entries)
    print(f"\n{measured} measured, {len(rows) - measured} skipped; wrote {', '.join(f'{n}.json' for n in entries)}, "
          f"summary.json, summary.md{' and ' + ', '.join(plots) if plots else ''} in {out_dir}"
          f"{f' (the summary keeps {kept} benchmark(s) of earlier runs)' if kept else ''}")
    if isinstance(stopped, SystemExit):
        return stopped.code if isinstance(stopped.code, int) else 1
    return 130 if stopped is not None else 0


def run_parity_check(args, out_dir):
    from fastlm.bench import parity
    from fastlm.bench.report import save_plots, write_markdown

    steps = args.steps or (20 if args.quick else 50)
    report = parity.run_parity(steps, args.device, parity.TINY_CASE if args.quick else parity.DEFAULT_CASE)
    print(parity.describe(report))
    _write_json(out_dir, "parity", report)
    save_plots(out_dir, lambda: {"parity": parity.plot(report)})
    markdown = write_markdown(out_dir)
    print(f"wrote parity.json, parity.png{' and summary.md' if markdown else ''} in {out_dir}{args.out_dir_note}")
    return 0 if report["passed"] else 1


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _names(values, flag):
    names = list(dict.fromkeys(n for item in values or () for n in item.split(",") if n))
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise UsageError(f"unknown benchmark {unknown[0]!r} for {flag}; choose from {', '.join(BENCHMARKS)}")
    return names


def script_prog(name):
    """The program name of benchmarks/bench_<name>.py, as its usage and errors print it."""
    return f"python benchmarks/bench_{name}.py"


def build_parser(script=None):
    """The command line of `python -m fastlm.bench`, or with script=NAME that of
    benchmarks/bench_NAME.py: its own program name, and no selection (--only, --quick NAME...,
    --parity and its --steps), since the script is the selection."""
    if script is None:
        prog, description = PROG, __doc__.splitlines()[0].replace("`", "")
    else:
        prog = script_prog(script)
        description = (f"{prog}: run the {script} benchmark (python -m fastlm.bench --only {script}), "
                       "print its table, write its results")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    if script is None:
        parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                            help=f"run only these benchmarks (of {', '.join(BENCHMARKS)}; commas also separate)")
        parser.add_argument("--quick", nargs="*", metavar="NAME", default=None,
                            help="small sizes, a smoke run, into a scratch directory unless --out-dir is given; "
                                 "NAMEs select benchmarks as --only does")
    else:
        parser.add_argument("--quick", action="store_const", const=[], default=None,
                            help="small sizes, a smoke run, into a scratch directory unless --out-dir is given")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help=("passed to every benchmark; default: each benchmark's own" if script is None
                              else "default: the benchmark's own") + " (fp32 on CPU, bf16 on CUDA)")
    if script is None:
        parser.add_argument("--parity", action="store_true",
                            help="check numerical parity of the reference and fused training paths instead")
        parser.add_argument("--steps", type=int, default=None, help="--parity: training steps (default 50, quick 20)")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds {'per' if script is None else 'for the'} benchmark before it is reported as "
                             "skipped (default 1200, quick 300)")
    parser.add_argument("--out-dir", default=None,
                        help="default: benchmarks/results/<device slug>/, or a fresh scratch directory with --quick")
    if script is not None:
        parser.set_defaults(only=[script], parity=False, steps=None)

    def error(message):
        parser.exit(2, f"{prog}: error: {message}\n")

    parser.error = error
    return parser


def parse_args(argv, script=None):
    """The run `argv` asks for; script=NAME: the command line of benchmarks/bench_NAME.py, where
    a selection of its own (--only, --parity) would override the script's, so it is an error that
    says where selections go."""
    if script is not None:
        selection = next((arg.split("=")[0] for arg in argv if arg.split("=")[0] in ("--only", "--parity")), None)
        if selection is not None:
            raise UsageError(f"this script runs the {script} benchmark; for {selection}, use python -m fastlm.bench "
                             f"{selection}{' NAME...' if selection == '--only' else ''}")
    args = build_parser(script).parse_args(argv)
    only, quick = _names(args.only, "--only"), _names(args.quick, "--quick")
    if only and quick and set(only) != set(quick):
        raise UsageError("--quick NAME... selects benchmarks as --only does; name them once (a run is quick or full)")
    if args.parity and (only or quick):
        raise UsageError("--parity runs no benchmark; drop the benchmark names")
    if args.parity and args.dtype is not None:
        raise UsageError("--parity trains in float32 (its tolerances are fp32's); drop --dtype")
    if args.steps is not None and not args.parity:
        raise UsageError("--steps sets the --parity check's training steps; the benchmarks take no --steps")
    args.names, args.quick = only or quick or list(BENCHMARKS), args.quick is not None
    if args.steps is not None and args.steps <= 0:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    if args.timeout is not None and args.timeout <= 0:
        raise UsageError(f"--timeout must be positive, got {args.timeout}")
    return args


def output_dir(args):
    """--out-dir; else a fresh scratch directory for a quick run, benchmarks/results/<device slug>/ for a full one."""
    from fastlm.bench.common import device_slug

    args.out_dir_note = ""
    if args.out_dir:
        path = args.out_dir
    elif args.quick:
        path = tempfile.mkdtemp(prefix=f"fastlm-bench-{device_slug(args.device)}-quick-")
        args.out_dir_note = " (scratch: quick runs never write benchmarks/results/ unless --out-dir says so)"
    else:
        path = os.path.join(RESULTS_DIR, device_slug(args.device))
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--out-dir {path} is a file; give a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create --out-dir {path}: {exc.strerror}") from None
    return os.path.abspath(path)


def script_main(name, argv=None):
    """benchmarks/bench_<name>.py: `python -m fastlm.bench --only <name> [...]` under the script's
    own name (see parse_args)."""
    return main(argv, script=name)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through run_in_subprocess, which ends the running benchmark


def main(argv=None, script=None):
    """`python -m fastlm.bench`; script=NAME: benchmarks/bench_NAME.py (see script_main)."""
    if argv is None:  # run as the program: SIGTERM keeps the finished rows as Ctrl-C does
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = PROG if script is None else script_prog(script)
    try:
        args = parse_args(argv, script)
        args.command = " ".join([prog, *argv])
        import torch

        if args.device is None:
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda, but CUDA is not available on this machine (use --device cpu)")
        out_dir = output_dir(args)
        return run_parity_check(args, out_dir) if args.parity else run_suite(args, out_dir)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
