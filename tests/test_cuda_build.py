"""The CUDA sources compile for sm_80 and sm_90 (when nvcc is on PATH; no GPU needed).

One nvcc call, object files only (no link), against the installed torch's headers, with the
nvcc flags of the real builds (fastlm/_build.py): this is what keeps csrc/*.cu buildable on
machines where the kernels cannot run.
"""
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

from fastlm import _build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = [p for p in _build.source_files(os.path.join(ROOT, "csrc")) if p.endswith(".cu")]


def nvcc_flags(monkeypatch):
    monkeypatch.delenv("FASTLM_CUDA_ARCHS", raising=False)  # the default: sm_80 and sm_90
    return _build.compile_flags(os.path.dirname(torch.__file__), with_cuda=True)["nvcc"]


def test_nvcc_flags_keep_ieee_rounding(monkeypatch):
    # --use_fast_math (or its parts) would flush denormals and approximate AdamW's divisions,
    # so the CUDA update would no longer match torch.optim.AdamW(fused=True).
    flags = nvcc_flags(monkeypatch)
    assert {"-O3", "-lineinfo"} <= set(flags)
    for flag in flags:
        assert not any(part in flag for part in ("fast_math", "fast-math", "ftz", "prec-div", "prec-sqrt")), flag


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not CU_SOURCES, reason="no CUDA sources in csrc/")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path, monkeypatch):
    flags = nvcc_flags(monkeypatch)
    assert [f for f in flags if f.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = ["nvcc", "-c", *CU_SOURCES, "-odir", str(tmp_path), *flags, "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-I", torch_include, "-I", os.path.join(torch_include, "torch", "csrc", "api", "include"),
           "-I", sysconfig.get_paths()["include"]]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-4000:]}"
    objects = sorted(os.listdir(tmp_path))
    assert len(objects) == len(CU_SOURCES), objects
