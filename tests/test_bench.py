"""The benchmark runner: smoke run, numerical parity, skipped benchmarks and command-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastlm.bench import __main__ as bench_cli
from fastlm.bench import parity

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "fastlm.bench", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_quick_run_measures_or_skips_every_benchmark(tmp_path):
    proc = _run_cli("--quick", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch " + torch.__version__ in proc.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["benchmarks"]) == set(bench_cli.BENCHMARKS)
    for name, result in summary["benchmarks"].items():
        if "skipped" in result:
            assert result["skipped"], name
            continue
        assert result["rows"], name
        for row in result["rows"]:
            measured = row.get("fused_ms") is not None and not row.get("skipped")
            assert measured or row.get("skipped"), (name, row)
    # The end-to-end benchmark needs nothing optional: it must always be measured on CPU.
    e2e = summary["benchmarks"]["e2e"]["rows"]
    assert all(r["fused_ms"] > 0 and r["ref_ms"] > 0 and r["fused_tokens_per_s"] > 0 for r in e2e)
    assert all(r["max_err"] < 1e-4 for r in e2e)
    markdown = (tmp_path / "summary.md").read_text()
    assert "| benchmark |" in markdown and "summary_speedup.png" in markdown
    assert (tmp_path / "summary_speedup.png").exists()
    for row in summary["rows"]:
        assert row["status"] in ("measured", "skipped")
        if row["status"] == "skipped":
            assert row["note"].startswith("skipped: ") and len(row["note"]) > len("skipped: ")


def test_parity_small_model_within_fp32_reordering(tmp_path):
    report = parity.run_parity(steps=20, case=parity.TINY_CASE, out_dir=str(tmp_path), plot=False)
    assert report["passed"], parity.describe(report)
    assert len(report["ref_losses"]) == len(report["fused_losses"]) == 20
    assert report["max_loss_rel_diff"] <= parity.LOSS_RTOL == 1e-5
    assert report["weights"]["max_tensor_rel_l2"] <= parity.WEIGHT_RTOL
    # Training actually happened: the loss went down from about ln(256).
    assert report["ref_losses"][-1] < report["ref_losses"][0] - 0.1
    assert json.loads((tmp_path / "parity.json").read_text())["passed"]


def test_parity_catches_a_slightly_wrong_gradient(tmp_path, monkeypatch):
    # The fused loss kernel returns the right loss but a gradient with 5% label smoothing mixed
    # in: a bug the tolerance must not hide. (A uniformly scaled gradient would not do: Adam's
    # update is invariant to it.)
    from fastlm.ops import loss

    fused = parity.run_parity(steps=1, case=parity.TINY_CASE, out_dir=str(tmp_path), plot=False)["fused_backends"]
    name = "cpp" if "cross_entropy cpp" in fused else "torch"
    kernel = loss._ROW_KERNELS[name]

    def wrong_gradient(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale):
        if grad is None:
            return kernel(logits, targets, grad, ignore_index, label_smoothing, z_loss, grad_scale)
        result = kernel(logits.clone(), targets, None, ignore_index, label_smoothing, z_loss, grad_scale)
        kernel(logits, targets, grad, ignore_index, label_smoothing + 0.05, z_loss, grad_scale)
        return result

    monkeypatch.setitem(loss._ROW_KERNELS, name, wrong_gradient)
    report = parity.run_parity(steps=20, case=parity.TINY_CASE, out_dir=str(tmp_path), plot=False)
    assert not report["passed"], parity.describe(report)


def test_parity_failure_gives_exit_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(parity, "LOSS_RTOL", -1.0)  # no pair of losses can meet this
    code = bench_cli.main(["--parity", "--quick", "--steps", "2", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert code == 1
    assert "parity FAILED" in capsys.readouterr().out


def test_missing_or_failing_benchmark_is_skipped_not_fatal(tmp_path, monkeypatch, capsys):
    # A module that does not exist, and one that exists but has no run(): both become skipped rows.
    monkeypatch.setattr(bench_cli, "BENCHMARKS", {"missing": "fastlm.bench.no_such_module",
                                                  "broken": "fastlm.bench.common"})
    code = bench_cli.main(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "not in this checkout" in summary["benchmarks"]["missing"]["skipped"]
    assert "AttributeError" in summary["benchmarks"]["broken"]["skipped"]
    assert [r["status"] for r in summary["rows"]] == ["skipped", "skipped"]
    assert "0 measured, 2 skipped" in capsys.readouterr().out


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


def test_unknown_only_name_from_the_command_line():
    proc = _run_cli("--only", "nope", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("python -m fastlm.bench: error: ")
    assert "Traceback" not in proc.stderr
