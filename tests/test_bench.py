"""The benchmark runner: what a run measures and where it writes, numerical parity, skipped
benchmarks and command-line errors."""
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from fastlm.bench import __main__ as bench_cli
from fastlm.bench import parity, report
from fastlm.bench.common import Row, device_slug

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = {f.name for f in dataclasses.fields(Row)} | {"speedup"}


def _run(*args, timeout=240, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)


def _committed_results():
    """Every file under benchmarks/results/ with its size and modification time."""
    found = {}
    for root, _, files in os.walk(bench_cli.RESULTS_DIR):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            found[os.path.join(root, name)] = (stat.st_size, stat.st_mtime_ns)
    return found


def test_quick_run_measures_or_skips_every_benchmark(tmp_path):
    proc = _run("-m", "fastlm.bench", "--quick", "--out-dir", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch " + torch.__version__ in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["benchmarks"]) == list(bench_cli.BENCHMARKS)
    for name, entry in summary["benchmarks"].items():
        assert entry["quick"] is True, name
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"] == entry.get("rows"), name
        if "skipped" in entry:
            assert entry["skipped"], name
            continue
        assert entry["rows"], name
        for row in entry["rows"]:
            assert set(row) == ROW_KEYS, (name, row)
            assert report.is_measured(row) or row["skipped"], (name, row)
    # The end-to-end benchmark and the torch baselines need nothing optional: always measured on CPU.
    e2e = summary["benchmarks"]["e2e"]["rows"]
    assert all(r["fused_ms"] > 0 and r["ref_ms"] > 0 and r["extra"]["fused_tokens_per_s"] > 0 for r in e2e)
    assert all(r["max_err"] < 1e-4 for r in e2e)
    sdpa = [r for r in summary["benchmarks"]["attention"]["rows"] if r["backend"] == "sdpa"]
    assert sdpa and all(r["ref_ms"] > 0 and r["fused_ms"] is None and r["extra"]["fwd_tflops"] > 0 for r in sdpa)
    torch_fused = [r for r in summary["benchmarks"]["adamw"]["rows"] if r["backend"] == "torch-fused"]
    assert len(torch_fused) == 2 and all(r["ref_ms"] > 0 and r["fused_ms"] is None for r in torch_fused)
    # On CPU a step's host time is its time: host_ms is a CUDA figure only.
    assert not any("host_ms" in r["extra"] for r in summary["benchmarks"]["adamw"]["rows"])
    markdown = (tmp_path / "summary.md").read_text()
    assert "| name | case |" in markdown and "summary_speedup.png" in markdown and "attention.png" in markdown
    for png in (*report.SUMMARY_PLOTS, "attention"):
        assert (tmp_path / f"{png}.png").exists(), png


def test_quick_with_names_runs_only_those_into_a_scratch_directory(tmp_path):
    before = _committed_results()
    proc = _run("-m", "fastlm.bench", "--quick", "e2e", env=dict(os.environ, TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    out_dir = re.search(r"^results -> (\S+) \(scratch", proc.stdout, re.M).group(1)
    assert out_dir.startswith(str(tmp_path))
    summary = json.loads(open(os.path.join(out_dir, "summary.json")).read())
    assert list(summary["benchmarks"]) == ["e2e"] and summary["benchmarks"]["e2e"]["quick"] is True
    assert "=== adamw" not in proc.stdout and "=== e2e" in proc.stdout
    assert _committed_results() == before


@pytest.mark.parametrize("argv, names, quick", [
    ([], list(bench_cli.BENCHMARKS), False),
    (["--quick"], list(bench_cli.BENCHMARKS), True),
    (["--quick", "adamw"], ["adamw"], True),
    (["--quick", "e2e"], ["e2e"], True),
    (["--only", "e2e", "--quick"], ["e2e"], True),
    (["--quick", "--only", "e2e,attention"], ["e2e", "attention"], True),
    (["--only", "attention", "e2e", "--quick", "e2e", "attention"], ["attention", "e2e"], True),
    (["--only", "adamw"], ["adamw"], False),
])
def test_a_run_is_the_named_benchmarks_all_quick_or_all_full(argv, names, quick):
    args = bench_cli.parse_args(argv)
    assert (args.names, args.quick) == (names, quick)


def test_quick_runs_default_to_scratch_and_full_runs_to_the_results_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    monkeypatch.setattr(bench_cli, "RESULTS_DIR", str(tmp_path / "results"))
    os.makedirs(tmp_path / "scratch")

    def out_dir(*argv):
        args = bench_cli.parse_args(argv)
        args.device = "cpu"
        return bench_cli.output_dir(args)

    quick = out_dir("--quick", "adamw")
    assert quick.startswith(str(tmp_path / "scratch")) and out_dir("--quick") != quick  # a fresh one each time
    assert out_dir("--only", "adamw") == str(tmp_path / "results" / device_slug("cpu"))
    assert out_dir("--quick", "--out-dir", str(tmp_path / "mine")) == str(tmp_path / "mine")


def test_parity_small_model_within_fp32_reordering():
    result = parity.run_parity(steps=20, case=parity.TINY_CASE)
    assert result["passed"], parity.describe(result)
    assert len(result["ref_losses"]) == len(result["fused_losses"]) == 20
    assert result["max_loss_rel_diff"] <= parity.LOSS_RTOL == 1e-5
    assert result["weights"]["max_tensor_rel_l2"] <= parity.WEIGHT_RTOL == 1e-3
    # Training actually happened: the loss went down from about ln(256).
    assert result["ref_losses"][-1] < result["ref_losses"][0] - 0.1


def test_parity_catches_a_slightly_wrong_gradient(monkeypatch):
    # The fused loss kernel returns the right loss but a gradient with 5% label smoothing mixed
    # in: a bug the tolerance must not hide. (A uniformly scaled gradient would not do: Adam's
    # update is invariant to it.)
    from fastlm.ops import loss

    fused = parity.run_parity(steps=1, case=parity.TINY_CASE)["fused_backends"]
    name = "cpp" if "cross_entropy cpp" in fused else "torch"
    kernel = loss._ROW_KERNELS[name]

    def wrong_gradient(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
        if grad is None:
            return kernel(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale)
        result = kernel(logits.clone(), targets, None, ignore_index, label_smoothing, z_loss, grad_scale)
        kernel(logits, targets, grad, ignore_index, label_smoothing + 0.05, z_loss, grad_scale)
        return result

    monkeypatch.setitem(loss._ROW_KERNELS, name, wrong_gradient)
    result = parity.run_parity(steps=20, case=parity.TINY_CASE)
    assert not result["passed"], parity.describe(result)


def test_parity_failure_gives_exit_1_and_writes_its_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(parity, "LOSS_RTOL", -1.0)  # no pair of losses can meet this
    code = bench_cli.main(["--parity", "--quick", "--steps", "2", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert code == 1
    assert "parity FAILED" in capsys.readouterr().out
    assert json.loads((tmp_path / "parity.json").read_text())["passed"] is False
    assert "## Numerical parity" in (tmp_path / "summary.md").read_text()


def test_missing_or_failing_benchmark_is_skipped_and_a_partial_run_keeps_the_others(tmp_path, monkeypatch, capsys):
    # A module that does not exist, and one that exists but is no benchmark: both become skipped rows.
    monkeypatch.setattr(bench_cli, "BENCHMARKS", {"missing": "fastlm.bench.no_such_module",
                                                  "broken": "fastlm.bench.common"})
    assert bench_cli.main(["--only", "broken", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert bench_cli.main(["--only", "missing", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["benchmarks"]) == ["missing", "broken"]  # the runner's order, the earlier run kept
    assert "ModuleNotFoundError" in summary["benchmarks"]["missing"]["skipped"]
    assert "AttributeError" in summary["benchmarks"]["broken"]["skipped"]
    assert summary["benchmarks"]["missing"]["quick"] is False
    out = capsys.readouterr().out
    assert "0 measured, 1 skipped" in out and "keeps 1 benchmark(s) of earlier runs" in out
    assert (tmp_path / "summary.md").read_text().count("| skipped: ") == 2


def test_table_has_one_line_per_row_and_reference_rows_show_no_fused_time():
    rows = [Row("attention", "B1 H4 T512 D64", "sdpa", ref_ms=5.0, max_err=1e-7, extra={"fwd_tflops": 0.01}),
            Row("attention", "B1 H4 T512 D64", "torch", ref_ms=5.0, fused_ms=10.0, extra={"fwd_tflops": 0.005}),
            Row("attention", "B1 H4 T512 D64", "triton", skipped="no GPU")]
    text = report.text_table([r.to_dict() for r in rows]).splitlines()
    assert len(text) == 2 + len(rows)
    assert re.search(r"sdpa\s+5\.00\s+-\s+-", text[2]) and "fwd_tflops 0.01" in text[2]
    assert re.search(r"torch\s+5\.00\s+10\.00\s+0\.50", text[3]) and text[4].endswith("skipped: no GPU")
    assert len(report.markdown_table([r.to_dict() for r in rows]).splitlines()) == 2 + len(rows)


def test_cuda_requested_without_cuda_is_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench_cli.main(["--quick", "--device", "cuda", "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA is not available" in err
    assert not (tmp_path / "summary.json").exists()


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--only", "e2e,nope"], ["--only", "attention", "cross-entropy"],
                                  ["--quick", "e2e", "nope"]])
def test_unknown_benchmark_name_exits_2_with_one_line(argv, capsys):
    assert bench_cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown benchmark" in err and argv[0] in err


@pytest.mark.parametrize("argv", [["--only", "e2e", "--quick", "adamw"], ["--parity", "--only", "e2e"],
                                  ["--parity", "--dtype", "bfloat16"], ["--quick", "adamw", "--steps", "5"]])
def test_contradictory_selection_exits_2_with_one_line(argv, capsys):
    assert bench_cli.main(argv) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("argv", [["--only", "e2e"], ["--only=e2e"], ["--parity"], ["--quick", "--parity"]])
def test_a_benchmark_script_refuses_a_selection_of_other_benchmarks(argv, capsys):
    assert bench_cli.script_main("adamw", argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python benchmarks/bench_adamw.py: error: ")
    assert "runs the adamw benchmark" in err and "python -m fastlm.bench --" in err


@pytest.mark.parametrize("name", list(bench_cli.BENCHMARKS))
def test_a_benchmark_script_s_help_is_its_own(name):
    proc = _run(f"benchmarks/bench_{name}.py", "--help", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python benchmarks/bench_{name}.py "), proc.stdout
    assert f"run the {name} benchmark" in proc.stdout
    usage, options = proc.stdout.split("\n\n")[0], proc.stdout.split("options:")[1]  # not the description
    offered = set(re.findall(r"--[a-z-]+", usage)) | set(re.findall(r"^  (--[a-z-]+)", options, re.M))
    assert offered == {"--quick", "--device", "--dtype", "--timeout", "--out-dir"}  # the script is the selection
    assert "NAME" not in usage + options


def test_the_module_s_help_offers_every_selection():
    proc = _run("-m", "fastlm.bench", "--help", timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m fastlm.bench "), proc.stdout
    for flag in ("--only NAME", "--quick [NAME ...]", "--parity", "--steps"):
        assert flag in proc.stdout, flag


def test_a_benchmark_script_runs_its_benchmark_and_records_its_own_command(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(bench_cli, "run_suite", lambda args, out_dir: seen.update(vars(args)) or 0)
    assert bench_cli.script_main("e2e", ["--quick", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    assert seen["names"] == ["e2e"] and seen["quick"] is True and not seen["parity"]
    assert seen["command"] == f"python benchmarks/bench_e2e.py --quick --device cpu --out-dir {tmp_path}"


def test_an_out_dir_that_is_a_file_is_a_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("kept")
    assert bench_cli.main(["--quick", "adamw", "--out-dir", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file" in err and blocker.read_text() == "kept"


def test_unknown_name_from_the_command_line_and_from_a_benchmark_script():
    for args, prog, needle in ((["-m", "fastlm.bench", "--only", "nope"], "python -m fastlm.bench",
                                "unknown benchmark 'nope' for --only"),
                               (["benchmarks/bench_adamw.py", "--quick", "nope"], "python benchmarks/bench_adamw.py",
                                "unrecognized arguments: nope")):  # a script's --quick names no benchmarks
        proc = _run(*args, timeout=60)
        assert proc.returncode == 2, args
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{prog}: error: "), proc.stderr
        assert needle in proc.stderr, proc.stderr


def test_profile_step_prints_where_a_step_spends_its_time(tmp_path, capsys):
    from fastlm.bench import profile_step

    assert profile_step.main(["--device", "cpu", "--steps", "1", "--path", "fastlm", "--out-dir", str(tmp_path)]) == 0
    table = (tmp_path / "profile_fastlm_eager.txt").read_text()
    assert table.strip() in capsys.readouterr().out
    lines = table.splitlines()
    assert lines[0].startswith("fastlm eager on cpu:") and "adamw" in lines[0]
    assert "share" in lines[2] and len(lines) > 5
    shares = [float(line.split("%")[0]) for line in lines[3:]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 100.01


def test_profile_step_counts_each_kernel_once_on_cuda():
    # Kineto reports a CUDA kernel twice: as its own event and as the own device time of the
    # operator that launched it. The step's device time is the kernels' alone.
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from fastlm.bench.common import own_times_us

    def own_time_total_us(events, device_type):
        return sum(us for _, us in own_times_us(events, device_type))

    def event(device_type, self_device, self_cpu, annotation=False):
        return SimpleNamespace(device_type=device_type, self_device_time_total=self_device,
                               self_cpu_time_total=self_cpu, is_user_annotation=annotation)

    events = [event(DeviceType.CPU, 300.0, 40.0),   # aten::mm: its gemm's 300 us as own device time
              event(DeviceType.CUDA, 300.0, 0.0),   # the gemm kernel
              event(DeviceType.CUDA, 100.0, 0.0),   # a kernel launched by Triton, no operator
              event(DeviceType.CUDA, 400.0, 0.0, annotation=True)]  # a user range on the device
    assert own_time_total_us(events, "cuda") == 400.0
    assert own_time_total_us(events, "cpu") == 40.0


def test_the_kernel_table_lists_the_largest_own_times_per_step_with_their_share():
    from types import SimpleNamespace

    from fastlm.bench.common import PROFILE_HEADER, kernel_table

    def event(name, count):
        return SimpleNamespace(key=name, count=count)

    own = [(event("small", 2), 100.0), (event("gemm " + "x" * 200, 4), 3000.0), (event("copy", 6), 900.0)]
    lines = kernel_table(own, steps=2, top=2)
    assert lines[0] == PROFILE_HEADER and len(lines) == 3  # the top 2 of 3
    assert [line.split()[:3] for line in lines[1:]] == [["75.0%", "1.500", "2.0"], ["22.5%", "0.450", "3.0"]]
    assert lines[1].endswith("  gemm " + "x" * 105) and lines[2].endswith("  copy")  # names cut at 110 characters
    assert kernel_table([], steps=1) == [PROFILE_HEADER]


def test_profile_ops_writes_each_op_s_steps_and_kernels(tmp_path, capsys):
    from fastlm.bench import profile_ops
    from fastlm.bench.common import PROFILE_HEADER

    assert profile_ops.main(["--device", "cpu", "--steps", "1", "--out-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    variants = {"cross_entropy": ["F.cross_entropy", "cpp"] * 2, "adamw": ["torch fused", "fastlm cpp",
                "torch fused + clip_grad_norm_", "fastlm cpp, max_grad_norm"], "attention": ["sdpa", "torch"],
                "norm": ["PyTorch + cast", "torch"],
                "launch": ["torch op (add_, 1 value)", "triton empty kernel", "autograd.grad, torch op",
                           "autograd.grad, Python Function", "tiny triton cross_entropy", "tiny triton layer_norm",
                           "tiny triton causal_attention"]}
    for op in profile_ops.OPS:
        text = (tmp_path / f"profile_ops_{op}.txt").read_text()
        assert text.strip() in out
        lines = text.splitlines()
        assert lines[0].startswith(f"{op} on cpu") and lines[1] == profile_ops.SUMMARY_HEADER
        assert lines[1].split() == ["case", "variant", "host", "ms", "wall", "ms", "event", "ms", "device", "ms",
                                    "busy", "launches", "syncs"]
        rows = lines[2:lines.index("")]
        assert [row[41:72].strip() for row in rows] == variants[op]
        # Triton is timed on CUDA only: on CPU its variants are listed with the reason.
        assert all("triton" in row[41:72] for row in rows if "not run: " in row)
        rows = [row for row in rows if "not run: " not in row]
        for row in rows:  # host, wall and device ms measured; CUDA's event ms, launches and syncs not on CPU
            host, wall, event, device, busy, launches, syncs = row[72:].split()
            assert float(host) > 0 and float(wall) >= float(host) and float(device) > 0 and busy.endswith("%")
            assert event == launches == syncs == "-"
        # Then each step's kernels (operators on CPU), largest first.
        assert text.count(PROFILE_HEADER) == len(rows)
        first = lines.index(PROFILE_HEADER)
        assert lines[first - 1] == f"--- {rows[0][:40].strip()}, {variants[op][0]}: kernels by own CPU time"
        assert float(lines[first + 1].split("%")[0]) > 0
        # And each step's host functions (cProfile), largest own time first, with no machine paths.
        assert text.count(profile_ops.HOST_HEADER) == len(rows)
        host = lines.index(profile_ops.HOST_HEADER)
        title = f"--- {rows[0][:40].strip()}, {variants[op][0]}: host functions by own time (cProfile)"
        assert lines[host - 1] == title
        functions = lines[host + 1:lines.index("", host)]
        own = [float(line.split()[0]) for line in functions]
        assert 0 < len(functions) <= profile_ops.TOP_HOST_FUNCTIONS and own == sorted(own, reverse=True) and own[0] > 0
        assert profile_ops._ROOT not in text and "site-packages" not in text


def test_profile_ops_stopped_at_its_time_limit_keeps_the_steps_it_measured(tmp_path, monkeypatch, capsys):
    from fastlm.bench import profile_ops

    measure, calls = profile_ops.measure, []

    def measure_once(*args):  # SIGINT (gpu_check's time limit) during the second step measured
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return measure(*args)

    monkeypatch.setattr(profile_ops, "measure", measure_once)
    assert profile_ops.main(["--device", "cpu", "--steps", "1", "--only", "adamw", "--out-dir", str(tmp_path)]) == 130
    assert "interrupted during adamw" in capsys.readouterr().err
    rows = (tmp_path / "profile_ops_adamw.txt").read_text().split("\n\n")[0].splitlines()[2:]
    assert len(rows) == 1 and "torch fused" in rows[0]


@pytest.mark.parametrize("name", ["profile_step", "profile_ops"])
def test_profilers_bad_arguments_are_one_line_errors(name, capsys):
    import importlib

    main = importlib.import_module(f"fastlm.bench.{name}").main
    assert main(["--device", "cpu", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip() == f"{name}: error: --steps must be >= 1, got 0"
    assert main(["--device", "tpu"]) == 2
    assert capsys.readouterr().err.strip() == f"{name}: error: device must be auto, cpu, cuda or cuda:N, got 'tpu'"
    assert main(["--device", "cpu", "--out-dir", __file__]) == 2
    assert "is a file" in capsys.readouterr().err


def test_adamw_host_times_are_interleaved_medians_of_one_call_each():
    from fastlm.bench import adamw as bench_adamw

    calls = []

    def slow():
        calls.append("slow")
        time.sleep(0.002)

    host = bench_adamw.host_times({"slow": slow, "fast": lambda: calls.append("fast")}, torch.device("cpu"),
                                  warmup=1, repeats=3)
    assert calls == ["slow", "fast"] * 4
    assert host["slow"] >= 2.0 > host["fast"] >= 0.0


@pytest.mark.gpu
def test_adamw_rows_on_cuda_carry_host_ms():
    from fastlm.bench import adamw as bench_adamw

    rows = bench_adamw.run(quick=True, device="cuda", dtype="float32")
    assert all(("host_ms" in r.extra) == (r.skipped is None) for r in rows)
    assert all(r.extra["host_ms"] > 0 for r in rows if r.skipped is None)


def test_copy_bandwidth_is_measured_once_per_device():
    from fastlm.bench import common

    first = common.copy_bandwidth_gbs("cpu")
    assert first > 0 and common.copy_bandwidth_gbs("cpu") == first


def test_a_summary_that_cannot_be_merged_is_named_before_it_is_replaced(tmp_path, capsys):
    (tmp_path / "summary.json").write_text(json.dumps({"cross_entropy": {}, "adamw": {}}))  # an older layout
    summary = bench_cli.merged_summary(str(tmp_path), {}, "cpu", {"e2e": {"rows": []}})
    assert list(summary["benchmarks"]) == ["e2e"]
    out = capsys.readouterr().out
    assert "is replaced" in out and "(cross_entropy, adamw)" in out
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    merged = bench_cli.merged_summary(str(tmp_path), {}, "cpu", {"adamw": {"rows": []}})
    assert list(merged["benchmarks"]) == ["adamw", "e2e"] and capsys.readouterr().out == ""


SLOW_BENCHMARK = '''
"""Two rows, recorded as they finish, then what SLOW_MODE says: hang or die."""
import os
import time

from fastlm.bench.common import Row, report_rows

DTYPE = {"cpu": "float32"}


def run(quick, device, dtype):
    rows = []
    for i in range(2):
        rows.append(Row("slow", f"case {i}", "torch", ref_ms=1.0 + i))
        report_rows(rows)
    if os.environ["SLOW_MODE"] == "die":
        os._exit(3)
    time.sleep(120)
'''


@pytest.fixture
def slow_benchmark(tmp_path, monkeypatch):
    (tmp_path / "slowbench.py").write_text(SLOW_BENCHMARK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), REPO, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(bench_cli, "BENCHMARKS", {"slow": "slowbench", "later": "slowbench"})
    out = tmp_path / "results"
    return out


@pytest.mark.parametrize("mode,why", [("hang", "timed out after 5 s"), ("die", "died (exit status 3)")])
def test_a_benchmark_that_times_out_or_dies_keeps_the_rows_it_finished(slow_benchmark, monkeypatch, mode, why):
    monkeypatch.setenv("SLOW_MODE", mode)
    argv = ["--only", "slow", "--device", "cpu", "--timeout", "5", "--out-dir", str(slow_benchmark)]
    assert bench_cli.main(argv) == 0
    entry = json.loads((slow_benchmark / "summary.json").read_text())["benchmarks"]["slow"]
    assert [r["case"] for r in entry["rows"]] == ["case 0", "case 1"] and "skipped" not in entry
    assert why in entry["partial"] and "the 2 row(s) finished before are kept" in entry["partial"]
    assert f"**partial**: {entry['partial']}" in (slow_benchmark / "summary.md").read_text()
    assert not [p for p in os.listdir(slow_benchmark) if p.startswith(".")]  # no leftover result files


def test_parity_beside_an_earlier_runner_s_summary_writes_its_report(tmp_path, monkeypatch, capsys):
    """The committed results hold a summary.json of the previous runner (no schema, entries without
    command/date/dtype): --parity into that folder wrote parity.json, then failed with a KeyError
    while writing summary.md. The old summary.json and the summary.md made from it stay as they are."""
    old = {"env": {}, "device": "cpu", "benchmarks": {"adamw": {"rows": [], "quick": False, "seconds": 1.0}}}
    (tmp_path / "summary.json").write_text(json.dumps(old))
    (tmp_path / "summary.md").write_text("the earlier runner's tables")
    code = bench_cli.main(["--parity", "--quick", "--steps", "2", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "another runner version" in out and "wrote parity.json, parity.png in" in out
    assert json.loads((tmp_path / "parity.json").read_text())["passed"]
    assert json.loads((tmp_path / "summary.json").read_text()) == old
    assert (tmp_path / "summary.md").read_text() == "the earlier runner's tables"


def test_an_interrupted_run_writes_what_finished_and_names_what_did_not_run(slow_benchmark, monkeypatch, capsys):
    """Ctrl-C (or the SIGTERM of a time limit) ends the running benchmark, keeps its finished rows
    in the results, names the benchmarks not run, and leaves their earlier results alone."""
    import _thread
    import threading

    monkeypatch.setenv("SLOW_MODE", "hang")
    slow_benchmark.mkdir()
    earlier = {"rows": [dict(Row("slow", "old", "torch", ref_ms=9.0).to_dict())], "quick": False, "dtype": "float32",
               "command": "earlier", "date": "then", "seconds": 1.0}
    (slow_benchmark / "summary.json").write_text(json.dumps(
        {"schema": bench_cli.SCHEMA, "device": "cpu", "env": {}, "benchmarks": {"later": earlier}}))
    partial = slow_benchmark / ".slow-partial.json"

    def interrupt_once_rows_are_recorded():
        for _ in range(600):
            if partial.exists() and len(json.loads(partial.read_text() or "[]")) == 2:
                break
            threading.Event().wait(0.1)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_once_rows_are_recorded, daemon=True).start()
    assert bench_cli.main(["--only", "slow", "later", "--device", "cpu", "--out-dir", str(slow_benchmark)]) == 130
    benchmarks = json.loads((slow_benchmark / "summary.json").read_text())["benchmarks"]
    assert [r["case"] for r in benchmarks["slow"]["rows"]] == ["case 0", "case 1"]
    assert benchmarks["slow"]["partial"].startswith("interrupted after")
    assert benchmarks["later"] == earlier
    assert "=== stopped: not run: later" in capsys.readouterr().out


def test_a_benchmark_script_saves_what_finished_on_sigterm(monkeypatch):
    """benchmarks/bench_<name>.py is the program, so SIGTERM must end it as it ends the module
    (SystemExit, which keeps the finished rows), not kill it with the rows lost."""
    import signal

    seen = []
    monkeypatch.setattr(bench_cli, "run_suite", lambda args, out_dir: seen.append(signal.getsignal(signal.SIGTERM)) or 0)
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_adamw.py", "--quick"])
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert bench_cli.script_main("adamw") == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [bench_cli._exit_on_sigterm]


def _cuda_summary():
    """A summary.json of a CUDA run holding a row for every target, some met and some missed."""
    rows = {
        "cross_entropy": [
            Row("cross_entropy", "N=16384 V=50257", "triton", ref_ms=3.0, fused_ms=1.0,
                extra={"compiled_ref_ms": 1.2, "copy_fraction": 0.9}),
            Row("cross_entropy", "N=16384 V=128256", "triton", ref_ms=3.0, fused_ms=2.0,  # 1.5x: missed
                extra={"compiled_ref_ms": 1.9, "copy_fraction": 0.8}),
            Row("linear_cross_entropy", "N=16384 D=768 V=50257", "triton", ref_ms=10.0, fused_ms=9.0,
                ref_peak_mb=4000.0, fused_peak_mb=500.0),
            Row("linear_cross_entropy", "N=8192 D=4096 V=128256", "triton", skipped="out of memory")],
        "adamw": [Row("adamw", "124M (124.4M, 148 tensors)", "cuda", ref_ms=2.0, fused_ms=1.6,
                      extra={"copy_fraction": 0.85}),
                  Row("adamw", "124M (124.4M, 148 tensors), clip", "cuda", ref_ms=3.0, fused_ms=2.0)],
        "attention": [Row("attention", "B8 H16 T1024 D128", "triton", ref_ms=1.0, fused_ms=2.0),  # T < 2048: no bar
                      Row("attention", "B4 H16 T2048 D128", "triton", ref_ms=1.0, fused_ms=0.9),
                      Row("attention", "B1 H16 T8192 D128", "triton", ref_ms=1.0, fused_ms=1.1,
                          extra={"fwdbwd_tflops": 300.0, "fwd_tflops": 400.0})],
    }
    benchmarks = {name: {"rows": [r.to_dict() for r in entry]} for name, entry in rows.items()}
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12", "threads": 16}
    for entry in benchmarks.values():
        entry.update(quick=False, dtype="bfloat16", command="python -m fastlm.bench", date="2026-11-26", seconds=1.0)
    return {"schema": bench_cli.SCHEMA, "device": "cuda", "env": env, "benchmarks": benchmarks}


def test_targets_are_judged_from_the_rows_and_missing_rows_are_not_measured(tmp_path):
    from fastlm.bench import targets

    verdicts = {(v.target, v.size): v for v in targets.judge(_cuda_summary())}
    met = lambda target, size: verdicts[(target, size)].met  # noqa: E731
    assert met("cross_entropy triton vs F.cross_entropy eager", "N=16384, V=50257, bf16") is True
    assert met("cross_entropy triton vs F.cross_entropy eager", "N=16384, V=128256, bf16") is False
    assert met("cross_entropy triton bandwidth, of copy bandwidth", "N=16384, V=128256, bf16") is False
    assert met("linear_cross_entropy peak memory, of lm_head + CE", "N=16384, D=768, V=50257, bf16") is True
    assert met("linear_cross_entropy time, of lm_head + CE", "N=8192, D=4096, V=128256, bf16") is None  # skipped
    assert met("AdamW cuda vs torch fused", "124M fp32") is True
    assert met("AdamW cuda + max_grad_norm vs clip_grad_norm_ + torch fused", "124M fp32") is True
    slowest = verdicts[("causal_attention triton vs SDPA, every case at T >= 2048", "2 cases, bf16")]
    assert slowest.met is False and "0.91x at B1 H16 T8192 D128" in slowest.measured
    assert met("causal_attention triton fwd+bwd TFLOP/s (H100 target)", "D=128, T=8192, bf16") is False
    assert met("causal_attention triton forward TFLOP/s (H100 target)", "D=128, T=8192, bf16") is True
    assert all(v.met is None for v in verdicts.values() if v.target.startswith("end-to-end"))  # no e2e rows
    (tmp_path / "summary.json").write_text(json.dumps(_cuda_summary()))
    assert targets.main([str(tmp_path)]) == 0
    table = (tmp_path / "targets.md").read_text()
    assert table.startswith("Targets of the GPU issue on NVIDIA H100 80GB HBM3: 9 met, 5 missed, 6 not measured.")
    report.write_markdown(str(tmp_path))  # a CUDA summary.md carries the same table
    summary_md = (tmp_path / "summary.md").read_text()
    assert "## Targets" in summary_md and table.strip() in summary_md


def test_a_value_rounded_onto_its_bar_shows_two_more_digits():
    from fastlm.bench.targets import _judge

    near = _judge("e2e", "GPT-2", 89.96 / 69.41, 1.3)  # the H200 run's eager step: 1.296x
    assert near.met is False and near.measured == "1.2961x (>= 1.30x)"
    assert _judge("attn", "T=8192", 329.8, 330, fmt="{:.0f}").measured == "329.80 (>= 330)"
    assert _judge("mem", "D=4096", 0.2549, 0.25, higher=False, fmt="{:.2f}").measured == "0.2549 (<= 0.25)"
    assert _judge("ce", "V=50257", 1.53, 2.0).measured == "1.53x (>= 2.00x)"  # clear of the bar: as it was


def test_targets_of_a_folder_without_a_summary_is_a_one_line_error(tmp_path, capsys):
    from fastlm.bench import targets

    assert targets.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err and "summary.json" in err


def test_e2e_resolves_backends_for_the_autocast_dtype():
    # As the trainer does: under bf16 autocast the ops see bf16, so auto is resolved for bf16.
    # (Resolved for the fp32 weights, CUDA's auto attention was sdpa, not what training runs: the
    # first H200 run measured that.)
    from fastlm.bench import e2e

    _, model, _ = e2e.make_step(e2e.CASES["quick"][0], "fastlm", "cpu", "bfloat16", "eager")
    assert model.compute_dtype == torch.bfloat16


def test_kernel_variants_time_each_setting_and_restore_the_module():
    """variants_ms: one timing per KERNEL_VARIANTS entry, each run with that entry's settings of the
    cross-entropy kernel module (the defaults elsewhere), under its label; the defaults come back."""
    pytest.importorskip("triton")
    from fastlm.bench import cross_entropy as bench
    from fastlm.triton_kernels import cross_entropy as kernel

    names = ("PROGRAMS_PER_SM", "BACKWARD_GRAD_WALK", "MAX_BLOCK_V", "EDGE_TILE")

    def settings():
        return {name: getattr(kernel, name) for name in names}

    class Step:
        def __init__(self):
            self.seen = []

        def prepare(self):
            pass

        def __call__(self):
            self.seen.append(settings())

    before, step = settings(), Step()
    assert {name for _, changes in bench.KERNEL_VARIANTS for name in changes} <= set(names)
    times = bench.time_kernel_variants(step, torch.device("cpu"), dict(warmup=0, repeats=1))
    assert settings() == before
    assert step.seen == [{**before, **changes} for _, changes in bench.KERNEL_VARIANTS]
    assert list(times) == [label for label, _ in bench.KERNEL_VARIANTS]
    assert all(ms >= 0 for ms in times.values())
