"""Loading fastlm._C: the ahead-of-time build only when it matches the running torch and csrc/,
else the build on first use; neither a missing nor a mismatched build ever crashes (ops fall back
to PyTorch with one warning)."""
import os
import shutil
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch

from fastlm import _build, _ext
from fastlm.ops import cross_entropy
from fastlm.ops import BackendUnavailable


@pytest.fixture
def broken_extension(monkeypatch):
    monkeypatch.delenv("FASTLM_NO_EXT_WARNING", raising=False)
    monkeypatch.setattr(_ext, "_warned", False)
    cached_load = _ext._load

    def set_reason(reason):
        monkeypatch.setattr(_ext, "_load", lambda: (None, reason))

    yield set_reason
    cached_load.cache_clear()


@pytest.mark.parametrize("reason", ["fastlm._C was built for torch 2.12.0, this is torch 2.13.0+cpu, and the "
                                    "C++ sources to build it are not installed",
                                    "fastlm's C++ kernels are not available: ninja is not installed"])
def test_auto_falls_back_to_torch_with_one_warning(broken_extension, reason):
    broken_extension(reason)
    logits = torch.randn(5, 11, requires_grad=True)
    targets = torch.randint(0, 11, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [cross_entropy(logits, targets) for _ in range(3)]
    ours = [w for w in caught if "falling back to the PyTorch kernels" in str(w.message)]
    assert len(ours) == 1 and reason in str(ours[0].message)
    expected = torch.nn.functional.cross_entropy(logits, targets)
    assert all(torch.allclose(loss, expected) for loss in losses)


def test_explicit_cpp_backend_names_the_reason(broken_extension):
    broken_extension("fastlm._C is stale: csrc/ changed since it was built")
    with pytest.raises(BackendUnavailable, match="stale"), pytest.warns(RuntimeWarning, match="falling back"):
        cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="cpp")


def info(torch_version="2.13.0+cpu", source_hash="0123456789abcdef"):
    return types.SimpleNamespace(TORCH_VERSION=torch_version, SOURCE_HASH=source_hash, WITH_CUDA=False)


@pytest.mark.parametrize("built, running, built_hash, current_hash, expected", [
    ("2.13.0+cpu", "2.13.0+cpu", "a" * 16, "a" * 16, None),
    ("2.13.0+cpu", "2.13.0+cpu", "a" * 16, None, None),  # sources not installed: the version decides
    ("2.12.0+cpu", "2.13.0+cpu", "a" * 16, "a" * 16, "built for torch 2.12.0+cpu, this is torch 2.13.0+cpu"),
    ("2.13.0+cpu", "2.13.0+cu130", "a" * 16, "a" * 16, "built for torch 2.13.0+cpu, this is torch 2.13.0+cu130"),
    ("2.13.0+cpu", "2.13.0+cpu", "a" * 16, "b" * 16, "stale: csrc/ changed"),
])
def test_prebuilt_mismatch(built, running, built_hash, current_hash, expected):
    reason = _ext._prebuilt_mismatch(info(built, built_hash), running, current_hash)
    if expected is None:
        assert reason is None
    else:
        assert expected in reason and "\n" not in reason


# Runs _ext._load() in a fresh process with the ahead-of-time build described by `prebuilt`
# (None: there is none) and a stand-in for the build on first use; prints what happened.
LOAD_WITH_FAKES = textwrap.dedent("""
    import sys, types
    from fastlm import _build, _ext
    prebuilt, build_fails = {prebuilt!r}, {build_fails!r}
    _ext._prebuilt_info = lambda: None if prebuilt is None else types.SimpleNamespace(**prebuilt)

    def stand_in(csrc, why):
        if build_fails:
            raise _build.BuildFailed("compiling the kernels for torch X failed (see /x/build.log)")
        print("first-use build because:", why)
        return types.SimpleNamespace(with_cuda=lambda: False)

    _ext._build_for_running_torch = stand_in
    print("status:", _ext.extension_status())
    print("fastlm._C imported:", "fastlm._C" in sys.modules)
""")


def load_with_fakes(prebuilt, build_fails=False):
    script = LOAD_WITH_FAKES.format(prebuilt=prebuilt, build_fails=build_fails)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_build_for_another_torch_is_never_imported_but_rebuilt():
    out = load_with_fakes({"TORCH_VERSION": "2.12.0+cpu", "SOURCE_HASH": _ext._current_source_hash()})
    assert f"first-use build because: fastlm._C was built for torch 2.12.0+cpu, this is torch {torch.__version__}" in out
    assert "status: (True, None)" in out
    assert "fastlm._C imported: False" in out


def test_no_prebuilt_extension_builds_on_first_use_without_blame():
    out = load_with_fakes(None)
    assert "first-use build because: None" in out and "fastlm._C imported: False" in out


def test_a_failed_build_is_one_line_and_not_fatal():
    out = load_with_fakes(None, build_fails=True)
    assert ("status: (False, \"fastlm's C++ kernels are not available: compiling the kernels for torch X "
            "failed (see /x/build.log)\")") in out


def test_the_loaded_extension_matches_torch_and_csrc():
    available, reason = _ext.extension_status()
    if not available:
        pytest.skip(reason)
    module = _ext.extension(warn=False)
    current = _ext._current_source_hash()
    if module.__name__ == "fastlm._C":
        from fastlm import _build_info

        assert (_build_info.TORCH_VERSION, _build_info.SOURCE_HASH) == (torch.__version__, current)
    else:  # built on first use, in a directory of its own for this torch
        assert os.path.basename(os.path.dirname(module.__file__)).startswith(
            f"fastlm-torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}-")


# The real build on first use, in a fresh process (a process cannot hold two builds of the
# same operators), then a check that its operators are the ones the ops call.
FIRST_USE = textwrap.dedent("""
    import torch
    from fastlm import _build, _ext, ops, optim
    _ext._prebuilt_info = lambda: None  # as after a plain `pip install -e .`
    assert _ext.extension_status() == (True, None), _ext.extension_status()
    module = _ext.extension(warn=False)
    # CUDA kernels exactly when this torch has CUDA and nvcc is found (CPU torch in CI: none)
    assert module.with_cuda() == _build.want_cuda(torch.version.cuda is not None, _build.cpp_extension().CUDA_HOME)
    print("loaded:", module.__file__)
    backends = ops.available_backends("cpu")
    assert backends["cross_entropy"]["cpp"] is None and backends["adamw"]["cpp"] is None, backends
    logits, targets = torch.randn(7, 13, dtype=torch.float64), torch.randint(0, 13, (7,))
    torch.testing.assert_close(ops.cross_entropy(logits, targets, backend="cpp"),
                               torch.nn.functional.cross_entropy(logits, targets))
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, r in zip(params, reference):
        p.grad = torch.randn_like(p)
        r.grad = p.grad.clone()
    optim.AdamW(params, lr=0.1, backend="cpp").step()
    torch.optim.AdamW(reference, lr=0.1).step()
    for p, r in zip(params, reference):
        torch.testing.assert_close(p, r)
""")


@pytest.mark.slow
def test_first_use_build_compiles_once_for_concurrent_processes(tmp_path):
    env = {**os.environ, "FASTLM_EXT_DIR": str(tmp_path / "cache")}
    env.pop("FASTLM_NO_EXT_WARNING", None)
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [proc.communicate(timeout=900) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-4000:]
    stderr = "".join(err for _, err in outputs)
    building = [line for line in stderr.splitlines() if line.startswith("fastlm: building")]
    assert len(building) == 1, stderr[-4000:]
    assert f"for torch {torch.__version__} (first use" in building[0]
    loaded = {out.split("loaded:", 1)[1].strip() for out, _ in outputs}
    assert len(loaded) == 1 and loaded.pop().startswith(str(tmp_path / "cache"))
    # a later process loads the cached build: no compiler, no message
    again = subprocess.run([sys.executable, "-c", FIRST_USE], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "fastlm: building" not in again.stderr, again.stderr[-4000:]


def test_ninja_from_the_package_when_the_venv_is_not_activated(monkeypatch):
    pytest.importorskip("ninja")
    monkeypatch.setenv("PATH", "")
    _ext._put_ninja_on_path()
    assert shutil.which("ninja") is not None
