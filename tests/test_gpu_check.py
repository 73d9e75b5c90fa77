"""The prepared GPU check (benchmarks/gpu_check.sh) on CPU: its dry run, phase selection, the time
budget, the results archive and errors; and its parallel Triton compile report
(benchmarks/compile_report_parallel.py).

The check itself runs on a GPU machine; here we make sure the command a GPU session will run
is well-formed: every phase in order, --only selecting phases, one-line errors, and (with a
stand-in for python that plays a GPU machine) the budget and the archive at work."""
import os
import stat
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def run(*args, env=None):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60, env=env)


def phases_of(stdout):
    return [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("=== phase: ")]


def test_dry_run_lists_every_phase_in_order_and_runs_nothing():
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr
    assert phases_of(result.stdout) == ["versions", "build", "tests", "bench", "e2e", "profile"]
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ [")]
    pytest = next(c for c in commands if "pytest -m gpu" in c)
    assert "--maxfail=20" in pytest and "-n 8" in pytest and "--timeout 240" in pytest and "--junitxml=" in pytest
    assert any("FASTLM_BUILD_CUDA=1" in c and "--no-build-isolation" in c for c in commands)
    assert any("fastlm.bench --parity --device cuda" in c for c in commands)
    bench = next(c for c in commands if c.startswith("+ [bench"))
    assert "--only attention cross_entropy adamw norm --timeout 130" in bench  # no benchmark starves the others
    profile = [c for c in commands if c.startswith("+ [profile")]
    assert len(profile) == 3
    assert profile[0].startswith("+ [profile, limit 180s]") and "fastlm.bench.profile_step --device cuda" in profile[0]
    assert profile[1].startswith("+ [profile, limit 150s]") and "fastlm.bench.profile_ops --device cuda" in profile[1]
    assert "--out-dir benchmarks/results/cuda-<gpu>" in profile[1]
    assert profile[2].startswith("+ [profile, limit 120s]")  # the compile report, in parallel to fit its limit
    assert "benchmarks/compile_report_parallel.py --arch <sm> --out benchmarks/results/cuda-<gpu>/compile_report.txt" \
        in profile[2]
    assert not any(line.startswith("= [") for line in result.stdout.splitlines())  # nothing ran


def test_only_selects_phases():
    result = run("--dry-run", "--only", "tests", "e2e")
    assert result.returncode == 0, result.stderr
    assert phases_of(result.stdout) == ["tests", "e2e"]


def test_the_profile_commands_have_their_own_limits():
    env = dict(os.environ, FASTLM_PROFILE_OPS_TIMEOUT="77", FASTLM_COMPILE_REPORT_TIMEOUT="66")
    result = run("--dry-run", "--only", "profile", env=env)
    assert result.returncode == 0, result.stderr
    limits = {next(word for word in line.split() if word.startswith(("fastlm.", "benchmarks/"))):
              line.split("limit ")[1].split("s]")[0] for line in result.stdout.splitlines() if line.startswith("+ [")}
    assert limits == {"fastlm.bench.profile_step": "180", "fastlm.bench.profile_ops": "77",
                      "benchmarks/compile_report_parallel.py": "66"}


def test_budget_caps_every_command_limit_in_the_dry_run():
    result = run("--dry-run", "--budget", "100")
    limits = [int(line.split("limit ")[1].split("s]")[0]) for line in result.stdout.splitlines()
              if line.startswith("+ [")]
    assert limits and max(limits) <= 75  # each ends, SIGKILL grace (20 s) included, inside the budget


def _fake_gpu_python(tmp_path):
    """A stand-in for python on a GPU machine: names the GPU, gives sm_90, succeeds at the rest."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in\n  *get_device_name*re.sub*) echo cuda-fake-gpu ;;\n'
                    '  *get_device_capability*major*) echo 90 ;;\n  *) echo "ran: $*" ;;\nesac\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    return str(fake)


def test_budget_skips_what_cannot_finish_and_the_archive_holds_the_results(tmp_path):
    results, archive = tmp_path / "res", tmp_path / "out" / "gpu.tar.gz"
    env = dict(os.environ, PYTHON=_fake_gpu_python(tmp_path), FASTLM_RESULTS=str(results))
    result = run("--only", "build", "tests", "--budget", "20", "--archive", str(archive), env=env)
    assert result.returncode == 1
    assert result.stdout.count("skipped: ") == 4  # every command of both phases: 20 s leaves < 30
    assert "(skipped, budget)" in result.stdout
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "res/gpu_check.log" in names
    assert "=== phase: tests" in (results / "gpu_check.log").read_text()


def test_commands_run_inside_the_budget_and_are_logged(tmp_path):
    env = dict(os.environ, PYTHON=_fake_gpu_python(tmp_path), FASTLM_RESULTS=str(tmp_path / "res"))
    result = run("--only", "e2e", "--budget", "200", env=env)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "ran: -m fastlm.bench --device cuda --only e2e" in result.stdout
    assert "= [e2e] exit 0" in result.stdout
    assert "=== targets" not in result.stdout  # no summary.json: no benchmark wrote results


def test_the_profile_phase_runs_the_profilers_and_the_parallel_compile_report_for_the_gpu_s_arch(tmp_path):
    results = tmp_path / "res"
    env = dict(os.environ, PYTHON=_fake_gpu_python(tmp_path), FASTLM_RESULTS=str(results))
    result = run("--only", "profile", "--budget", "400", env=env)
    assert result.returncode == 0, result.stdout[-2000:]
    assert f"ran: -m fastlm.bench.profile_ops --device cuda --out-dir {results}" in result.stdout
    assert f"ran: benchmarks/compile_report_parallel.py --arch 90 --out {results}/compile_report.txt" in result.stdout
    assert result.stdout.count("= [profile] exit 0") == 3


def test_the_parallel_compile_report_is_the_one_process_report(tmp_path):
    """benchmarks/compile_report_parallel.py: the rows of its parts (here the cross-entropy and norm
    kernels per dtype) in the order and form of one report with the same arguments, also written to --out."""
    from fastlm.triton_kernels.compile_report import unavailable_reason

    if unavailable_reason(90):
        pytest.skip(unavailable_reason(90))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = ["--arch", "90", "--dtypes", "bf16,fp16", "--vocabs", "4000,50257", "--norm-dims", "768"]
    parallel = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "compile_report_parallel.py"), *args,
                               "--head-dims", "", "--out", str(tmp_path / "report.txt")], capture_output=True,
                              text=True, timeout=300, env=env, cwd=REPO)
    assert parallel.returncode == 0, parallel.stderr[-2000:]
    one = subprocess.run([sys.executable, "-m", "fastlm.triton_kernels.compile_report", *args, "--head-dims", ","],
                         capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert one.returncode == 0, one.stderr[-2000:]
    lines = parallel.stdout.splitlines()
    # Per dtype: the cross-entropy kernel at each V, its backward's scale kernel, the norm kernels.
    assert parallel.stdout == one.stdout and len(lines) == 11 and lines[0].split()[0] == "kernel"
    assert [line.split()[3] for line in lines[1:]] == ["bf16"] * 5 + ["fp16"] * 5
    assert [line.split()[0] for line in lines[1:]] == ["cross_entropy", "cross_entropy", "cross_entropy_scale",
                                                       "norm_fwd", "norm_bwd"] * 2
    assert (tmp_path / "report.txt").read_text() == one.stdout


def test_the_run_ends_with_the_targets_judged_from_its_results(tmp_path):
    results = tmp_path / "res"
    results.mkdir()
    (results / "summary.json").write_text("{}")  # what a benchmark would have written
    env = dict(os.environ, PYTHON=_fake_gpu_python(tmp_path), FASTLM_RESULTS=str(results))
    result = run("--only", "build", "--budget", "200", env=env)
    assert result.returncode == 0, result.stdout[-2000:]
    tail = result.stdout.split("=== targets\n", 1)[1]
    assert tail.startswith(f"ran: -m fastlm.bench.targets {results}") and "gpu_check: done" in tail


def test_a_command_at_its_time_limit_is_interrupted_so_it_can_report(tmp_path):
    """At its limit a command gets SIGINT (pytest then writes its summary and JUnit report, the
    benchmark runner the rows that finished), and the log says it was stopped."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\ncase "$*" in\n  *get_device_name*re.sub*) echo cuda-fake-gpu ;;\n'
                    '  *get_device_capability*major*) echo 90 ;;\n'
                    '  *fastlm.bench*) trap \'echo "interrupted: results written"; kill $!; exit 130\' INT; sleep 100 >/dev/null 2>&1 & wait ;;\n'
                    '  *) echo "ran: $*" ;;\nesac\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PYTHON=str(fake), FASTLM_RESULTS=str(tmp_path / "res"), FASTLM_BENCH_TIMEOUT="30")
    result = run("--only", "bench", env=env)
    assert result.returncode == 1
    assert "interrupted: results written" in result.stdout
    assert "= [bench] exit 124 after 30 s (time limit: stopped)" in result.stdout


def test_unknown_phase_or_argument_is_a_one_line_error():
    for args in (["--only", "tests", "nope"], ["--fast"], ["--budget", "soon"], ["--archive"]):
        result = run(*args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "gpu_check.sh: error:" in result.stderr
