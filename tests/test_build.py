"""fastlm/_build.py: the C++ standard picked from torch's headers, the shared flags, the source
hash, and the lock under which concurrent processes build once."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from fastlm import _build

BUILD_PY = _build.__file__


def fake_torch_include(root, aten=None, all_h=None):
    """A torch include tree whose ATen.h / torch/all.h state the given C++ requirement."""
    for relpath, standard in ((_build.STANDARD_HEADERS[0], aten), (_build.STANDARD_HEADERS[1], all_h)):
        if standard is None:
            continue
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        macro = {17: "201703L", 20: "202002L"}[standard]
        path.write_text(f"#pragma once\n\n#if !defined(_MSC_VER) && __cplusplus < {macro}\n"
                        f"#error C++{standard} or later compatible compiler is required to use ATen.\n#endif\n")
    return str(root)


@pytest.mark.parametrize("aten, all_h, expected", [
    (17, 17, "c++17"),   # torch 2.4 .. 2.13
    (20, 20, "c++20"),   # torch 2.14
    (17, 20, "c++20"),   # the strictest requirement wins
    (20, None, "c++20"),
    (17, None, "c++17"),
    (None, None, "c++20"),  # headers that state nothing we know: the newer standard
])
def test_cxx_standard_follows_the_headers(tmp_path, aten, all_h, expected):
    assert _build.cxx_standard(fake_torch_include(tmp_path, aten, all_h)) == expected


def test_cxx_standard_of_the_installed_torch():
    # torch's release notes: C++20 is required from 2.14 on; C++17 is enough before.
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    expected = "c++20" if (major, minor) >= (2, 14) else "c++17"
    assert _build.cxx_standard(os.path.join(os.path.dirname(torch.__file__), "include")) == expected


@pytest.mark.parametrize("standard", [17, 20])
def test_flags_carry_the_standard_to_gcc_and_nvcc_without_fast_math(tmp_path, monkeypatch, standard):
    monkeypatch.delenv("FASTLM_CUDA_ARCHS", raising=False)
    fake_torch_include(tmp_path / "include", standard, standard)
    flags = _build.compile_flags(str(tmp_path), with_cuda=True)
    assert f"-std=c++{standard}" in flags["cxx"] and f"-std=c++{standard}" in flags["nvcc"]
    assert "-DFASTLM_WITH_CUDA=1" in flags["cxx"] and "-DFASTLM_WITH_CUDA=1" in flags["nvcc"]
    assert {"-O3", "-lineinfo"} <= set(flags["nvcc"])
    assert [f for f in flags["nvcc"] if f.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    every_flag = " ".join(flags["cxx"] + flags["nvcc"] + flags["ld"])
    assert "fast_math" not in every_flag and "fast-math" not in every_flag and "ftz" not in every_flag


def test_cpu_only_flags(tmp_path):
    flags = _build.compile_flags(str(tmp_path), with_cuda=False)
    assert flags["nvcc"] == [] and "-DFASTLM_WITH_CUDA=0" in flags["cxx"]


@pytest.mark.parametrize("forced, torch_has_cuda, cuda_home, expected", [
    (None, True, "/usr/local/cuda", True), (None, True, None, False), (None, False, "/usr/local/cuda", False),
    ("1", False, None, True), ("0", True, "/usr/local/cuda", False)])
def test_want_cuda(monkeypatch, forced, torch_has_cuda, cuda_home, expected):
    if forced is None:
        monkeypatch.delenv("FASTLM_BUILD_CUDA", raising=False)
    else:
        monkeypatch.setenv("FASTLM_BUILD_CUDA", forced)
    assert _build.want_cuda(torch_has_cuda, cuda_home) is expected


def test_want_cuda_rejects_other_values(monkeypatch):
    monkeypatch.setenv("FASTLM_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="FASTLM_BUILD_CUDA must be 0 or 1, got 'yes'"):
        _build.want_cuda(True, "/usr/local/cuda")


def test_source_dir_prefers_the_shipped_copy_and_hash_tracks_contents(tmp_path):
    package = tmp_path / "fastlm"
    (tmp_path / "csrc").mkdir(parents=True)
    package.mkdir()
    (tmp_path / "csrc" / "a.cpp").write_text("int a;")
    assert _build.source_dir(str(package)) == str(tmp_path / "csrc")  # a checkout
    (package / "csrc").mkdir()
    (package / "csrc" / "a.cpp").write_text("int a;")
    assert _build.source_dir(str(package)) == str(package / "csrc")  # a wheel
    before = _build.source_hash(str(package / "csrc"))
    assert before == _build.source_hash(str(tmp_path / "csrc"))  # same sources, same key
    (package / "csrc" / "a.h").write_text("")
    assert _build.source_hash(str(package / "csrc")) != before
    assert _build.source_dir(str(tmp_path / "elsewhere" / "fastlm")) is None


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch"))
    monkeypatch.setenv("FASTLM_EXT_DIR", str(tmp_path / "fastlm"))
    assert _build.cache_root() == str(tmp_path / "fastlm")
    monkeypatch.delenv("FASTLM_EXT_DIR")
    assert _build.cache_root() == str(tmp_path / "torch")
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert _build.cache_root() == str(tmp_path / "cache" / "fastlm")


# A stand-in for the compiler: it logs who built, then takes `seconds` to finish.
BUILDER = textwrap.dedent("""
    import importlib.util, os, sys, time
    spec = importlib.util.spec_from_file_location("fastlm_build", {build_py!r})
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    build_dir, seconds = sys.argv[1], float(sys.argv[2])

    def compile_stand_in():
        with open(os.path.join(build_dir, "builders.log"), "a") as log:
            log.write(f"{{os.getpid()}}\\n")
        time.sleep(seconds)

    print("built" if build.build_once(build_dir, compile_stand_in) else "waited")
""")


def start_builder(tmp_path, build_dir, seconds):
    script = tmp_path / "builder.py"
    script.write_text(BUILDER.format(build_py=BUILD_PY))
    return subprocess.Popen([sys.executable, str(script), str(build_dir), str(seconds)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_concurrent_processes_build_once(tmp_path):
    build_dir = tmp_path / "ext"
    procs = [start_builder(tmp_path, build_dir, 2.0) for _ in range(3)]
    outcomes = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outcomes.append(out.strip())
    assert sorted(outcomes) == ["built", "waited", "waited"]
    assert len((build_dir / "builders.log").read_text().split()) == 1
    assert start_builder(tmp_path, build_dir, 0).communicate(timeout=60)[0].strip() == "waited"


def test_a_killed_build_does_not_block_the_next(tmp_path):
    build_dir = tmp_path / "ext"
    stuck = start_builder(tmp_path, build_dir, 600)
    deadline = time.time() + 60
    while not (build_dir / "builders.log").exists():
        assert time.time() < deadline and stuck.poll() is None
        time.sleep(0.05)
    stuck.send_signal(signal.SIGKILL)
    stuck.communicate()
    out, err = start_builder(tmp_path, build_dir, 0).communicate(timeout=60)
    assert out.strip() == "built", err
    assert len((build_dir / "builders.log").read_text().split()) == 2


def test_a_failed_build_is_reported_without_building_again(tmp_path):
    calls = []

    def failing_build():
        calls.append(1)
        raise RuntimeError("Error building extension 'fastlm_C':\n[1/3] c++ ... a long compiler log")

    for _ in range(2):
        with pytest.raises(_build.BuildFailed, match=r"^Error building extension 'fastlm_C':$"):
            _build.build_once(str(tmp_path / "ext"), failing_build)
    assert len(calls) == 1


def test_the_isolated_build_environment_gets_no_torch():
    # Under build isolation pip installs what this lists into a private environment: a torch
    # here would be the newest one (a multi-GB CUDA download) and not the torch in use.
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"), "rb") as f:
        pyproject = tomllib.load(f)
    assert not [r for r in pyproject["build-system"]["requires"] if r.lower().startswith("torch")]
    assert "ninja" in pyproject["project"]["dependencies"]  # the first-use build needs it
    assert isinstance(pyproject["project"]["license"], str)  # SPDX, not the deprecated table
