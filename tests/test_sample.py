import pytest

from fastlm import train as train_mod
from tests.helpers import run_cli, tiny_args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "run"
    assert train_mod.main(tiny_args(out, steps=3)) == 0
    return out


def test_sampling_is_deterministic_with_a_seed(checkpoint):
    args = ["--ckpt", checkpoint, "--prompt", "To be", "--max-new-tokens", "30", "--temperature", "0.8",
            "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    first, second = run_cli("fastlm.sample", *args), run_cli("fastlm.sample", *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("To be")
    other = run_cli("fastlm.sample", *args[:-1], "4")
    assert other.stdout != first.stdout


def test_sample_accepts_the_checkpoint_file(checkpoint):
    result = run_cli("fastlm.sample", "--ckpt", checkpoint / "ckpt.pt", "--max-new-tokens", "5", "--seed", "0",
                     "--num-samples", "2")
    assert result.returncode == 0, result.stderr
    assert "-" * 40 in result.stdout


@pytest.mark.parametrize("args,needle", [
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "1.5"], "--top-p"),
    (["--top-k", "0"], "--top-k"),
])
def test_bad_sampling_arguments(checkpoint, args, needle):
    result = run_cli("fastlm.sample", "--ckpt", checkpoint, *args)
    assert result.returncode == 2 and needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_missing_checkpoint(tmp_path):
    result = run_cli("fastlm.sample", "--ckpt", tmp_path)
    assert result.returncode == 2 and "no checkpoint" in result.stderr
