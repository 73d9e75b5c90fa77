"""The CUDA sources compile for sm_80 and sm_90 (when nvcc is on PATH; no GPU needed).

One nvcc call, object files only (no link), against the installed torch's headers: this is
what keeps csrc/*.cu buildable on machines where the kernels cannot run.
"""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CU_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "*.cu")))
ARCHS = ("80", "90")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.skipif(not CU_SOURCES, reason="no CUDA sources in csrc/")
def test_cuda_sources_compile_for_sm80_and_sm90(tmp_path):
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = ["nvcc", "-c", *CU_SOURCES, "-odir", str(tmp_path), "-std=c++17", "-O3", "--use_fast_math",
           "-Xcompiler", "-fPIC", "-DFASTLM_WITH_CUDA=1",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-I", torch_include, "-I", os.path.join(torch_include, "torch", "csrc", "api", "include"),
           "-I", sysconfig.get_paths()["include"]]
    for arch in ARCHS:
        cmd.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"nvcc failed:\n{result.stderr[-4000:]}"
    objects = sorted(os.listdir(tmp_path))
    assert len(objects) == len(CU_SOURCES), objects
