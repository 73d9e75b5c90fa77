"""The prepared GPU check (benchmarks/gpu_check.sh) on CPU: its dry run, phase selection and errors.

The check itself runs on a GPU machine; here we make sure the command a GPU session will run
is well-formed: every phase in order, --only selecting phases, one-line errors."""
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def run(*args):
    return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=60)


def phases_of(stdout):
    return [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith("=== phase: ")]


def test_dry_run_lists_every_phase_in_order_and_runs_nothing():
    result = run("--dry-run")
    assert result.returncode == 0, result.stderr
    assert phases_of(result.stdout) == ["versions", "build", "tests", "bench", "e2e"]
    commands = [line for line in result.stdout.splitlines() if line.startswith("+ [")]
    assert any("pytest -m gpu -x" in c for c in commands)
    assert any("FASTLM_BUILD_CUDA=1" in c and "--no-build-isolation" in c for c in commands)
    assert any("fastlm.bench --parity --device cuda" in c for c in commands)
    assert not any(line.startswith("= [") for line in result.stdout.splitlines())  # nothing ran


def test_only_selects_phases():
    result = run("--dry-run", "--only", "tests", "e2e")
    assert result.returncode == 0, result.stderr
    assert phases_of(result.stdout) == ["tests", "e2e"]


def test_unknown_phase_or_argument_is_a_one_line_error():
    for args in (["--only", "tests", "nope"], ["--fast"]):
        result = run(*args)
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and "gpu_check.sh: error:" in result.stderr
