"""Build the fastlm._C extension from csrc/.

C++ sources are always compiled. CUDA sources (*.cu) are compiled when the installed torch
has CUDA and a CUDA toolkit is found, or when FASTLM_BUILD_CUDA=1 forces it
(FASTLM_BUILD_CUDA=0 turns them off). Build with `pip install --no-build-isolation -e .`
so the extension links against the torch that is already installed.
"""
import glob
import hashlib
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def source_hash(paths):
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def want_cuda(torch, cuda_home):
    forced = os.environ.get("FASTLM_BUILD_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            sys.exit(f"FASTLM_BUILD_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    return torch.version.cuda is not None and cuda_home is not None


def write_build_info(digest, with_cuda, torch_version):
    with open(os.path.join(ROOT, "fastlm", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py when fastlm._C was built; do not edit.\n")
        f.write(f"SOURCE_HASH = {digest!r}\nWITH_CUDA = {with_cuda!r}\nTORCH_VERSION = {torch_version!r}\n")


def extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")))
    with_cuda = want_cuda(torch, CUDA_HOME) and bool(cu_sources)
    digest = source_hash(cpp_sources + cu_sources + headers)
    write_build_info(digest, with_cuda, torch.__version__)

    cxx_flags = ["-O3", "-std=c++17"]
    if sys.platform != "win32":
        cxx_flags += ["-fopenmp"] if sys.platform != "darwin" else []
    define_macros = [("FASTLM_WITH_CUDA", "1" if with_cuda else "0")]
    if with_cuda:
        archs = os.environ.get("FASTLM_CUDA_ARCHS", "80;90")
        nvcc_flags = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo"]
        for arch in archs.split(";"):
            nvcc_flags += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
        ext = CUDAExtension(
            "fastlm._C",
            cpp_sources + cu_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    else:
        ext = CppExtension(
            "fastlm._C",
            cpp_sources,
            define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"] if sys.platform.startswith("linux") else [],
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


try:
    ext_modules, cmdclass = extensions()
except ImportError:
    print("fastlm: torch is not installed, building without the fastlm._C extension "
          "(install torch first, then `pip install --no-build-isolation -e .`)", file=sys.stderr)
    ext_modules, cmdclass = [], {}

setup(ext_modules=ext_modules, cmdclass=cmdclass)
