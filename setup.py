"""Build fastlm, and its extension fastlm._C ahead of time when torch can be imported here.

- `pip install -e .` or `pip install .` (build isolation, pip's default): the build environment
  holds only what [build-system] requires lists, which is not torch (pip would fetch the newest
  torch there and the extension would not match the one installed). So the package is built
  without fastlm._C, and fastlm/_ext.py compiles it for the running torch on first use.
- `pip install --no-build-isolation -e .`: the installed torch is importable, so fastlm._C is
  compiled now against it, and fastlm/_build_info.py records the torch version and source hash
  that fastlm/_ext.py checks before loading it.
Both builds take their sources and flags from fastlm/_build.py. C++ sources are always
compiled; CUDA sources (*.cu) when torch has CUDA and a CUDA toolkit is found, or when
FASTLM_BUILD_CUDA=1 forces it (FASTLM_BUILD_CUDA=0 turns them off). A wheel also ships csrc/ as
fastlm/csrc/, the sources of builds on first use.
"""
import importlib.util
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")


def load_build_module():
    """fastlm/_build.py, loaded by path: importing the package here would need torch."""
    spec = importlib.util.spec_from_file_location("fastlm_build", os.path.join(ROOT, "fastlm", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fastlm_build = load_build_module()


class BuildPyWithSources(build_py):
    """build_py that also copies csrc/ into the wheel as fastlm/csrc/."""

    def run(self):
        super().run()
        if self.editable_mode:  # an editable install reads csrc/ where it is
            return
        target = os.path.join(self.build_lib, "fastlm", "csrc")
        shutil.rmtree(target, ignore_errors=True)  # no file deleted from csrc/ lingers in build/
        self.mkpath(target)
        for path in fastlm_build.source_files(CSRC):
            self.copy_file(path, target)


def write_build_info(digest, with_cuda, torch_version):
    with open(os.path.join(ROOT, "fastlm", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py when fastlm._C was built; do not edit.\n")
        f.write(f"SOURCE_HASH = {digest!r}\nWITH_CUDA = {with_cuda!r}\nTORCH_VERSION = {torch_version!r}\n")


def extensions():
    """([fastlm._C], {"build_ext": ...}) when torch can be imported here, else ([], {})."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastlm: no torch in this build environment; fastlm._C will be compiled for the "
              "installed torch on first use", file=sys.stderr)
        return [], {}

    sources = [os.path.relpath(p, ROOT) for p in fastlm_build.source_files(CSRC)]
    cpp_sources = [p for p in sources if p.endswith(".cpp")]
    cu_sources = [p for p in sources if p.endswith(".cu")]
    try:
        with_cuda = bool(cu_sources) and fastlm_build.want_cuda(torch.version.cuda is not None, CUDA_HOME)
    except ValueError as exc:
        sys.exit(str(exc))
    flags = fastlm_build.compile_flags(os.path.dirname(torch.__file__), with_cuda)
    write_build_info(fastlm_build.source_hash(CSRC), with_cuda, torch.__version__)
    if with_cuda:
        ext = CUDAExtension("fastlm._C", cpp_sources + cu_sources,
                            extra_compile_args={"cxx": flags["cxx"], "nvcc": flags["nvcc"]},
                            extra_link_args=flags["ld"])
    else:
        ext = CppExtension("fastlm._C", cpp_sources, extra_compile_args={"cxx": flags["cxx"]},
                           extra_link_args=flags["ld"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass={"build_py": BuildPyWithSources, **cmdclass})
