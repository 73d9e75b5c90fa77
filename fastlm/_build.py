"""How fastlm._C is built: its sources and their hash, the compiler flags, the build-once lock.

Standard library only. Two builds use it, so both compile the same sources with the same flags:
setup.py loads this file by its path (torch and fastlm cannot be imported there) for the
ahead-of-time build under `pip install --no-build-isolation`, and fastlm/_ext.py for the build
on first use, which compiles the extension for the running torch into a cache directory.
"""
import glob
import hashlib
import logging
import os
import platform
import re
import shutil
import sys

try:
    import fcntl
except ImportError:  # Windows: torch's own lock file in the build directory still serializes builds
    fcntl = None

SOURCE_PATTERNS = ("*.cpp", "*.cu", "*.h")

# The headers where torch states the C++ standard it needs (ATen.h and torch/all.h, from torch
# 1.x to 2.14 at least), e.g. `#error C++20 or later compatible compiler is required to use ATen.`
STANDARD_HEADERS = (os.path.join("ATen", "ATen.h"),
                    os.path.join("torch", "csrc", "api", "include", "torch", "all.h"))
_STANDARD_REQUIRED = re.compile(r"#\s*error\s+C\+\+(\d+) or later compatible compiler is required")


def source_dir(package_dir):
    """The csrc/ directory to build from, or None when there is none.

    A wheel ships the sources inside the package (fastlm/csrc/, see setup.py); a source checkout
    or an editable install has them beside the package (csrc/).
    """
    for candidate in (os.path.join(package_dir, "csrc"),
                      os.path.join(os.path.dirname(package_dir), "csrc")):
        if source_files(candidate):
            return candidate
    return None


def source_files(csrc):
    """Every C++/CUDA source and header in csrc, sorted."""
    paths = []
    for pattern in SOURCE_PATTERNS:
        paths += glob.glob(os.path.join(csrc, pattern))
    return sorted(paths)


def source_hash(csrc):
    """16 hex digits over the names and contents of csrc's sources: what the build records."""
    digest = hashlib.sha256()
    for path in source_files(csrc):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def cxx_standard(torch_include):
    """The -std= value for torch's headers under torch_include: "c++17" or "c++20".

    C++17 only where torch's headers say that it is enough (torch <= 2.13); C++20 where they
    require it (torch 2.14) or say nothing we recognise.
    """
    required = []
    for header in STANDARD_HEADERS:
        try:
            with open(os.path.join(torch_include, header), encoding="utf-8", errors="replace") as f:
                required += [int(v) for v in _STANDARD_REQUIRED.findall(f.read())]
        except OSError:
            continue
    return "c++17" if required and max(required) <= 17 else "c++20"


def want_cuda(torch_has_cuda, cuda_home):
    """Compile the .cu sources? FASTLM_BUILD_CUDA=0/1 decides; else when torch has CUDA and nvcc is found."""
    forced = os.environ.get("FASTLM_BUILD_CUDA")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"FASTLM_BUILD_CUDA must be 0 or 1, got {forced!r}")
        return forced == "1"
    return bool(torch_has_cuda) and cuda_home is not None


def compile_flags(torch_dir, with_cuda):
    """{"cxx": [...], "nvcc": [...], "ld": [...]}: the flags of both builds, for the torch
    installed in torch_dir (the directory of torch/__init__.py).

    No --use_fast_math: it flushes denormals to zero and approximates the reciprocal and the
    division in AdamW's update, so results would differ from torch.optim.AdamW(fused=True).
    FASTLM_CUDA_ARCHS="80;90" (the default) picks the GPUs the CUDA kernels are compiled for.
    """
    std = f"-std={cxx_standard(os.path.join(torch_dir, 'include'))}"
    define = f"-DFASTLM_WITH_CUDA={int(with_cuda)}"
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    flags = {"cxx": ["-O3", std, define, *openmp], "nvcc": [], "ld": list(openmp)}
    if with_cuda:
        archs = os.environ.get("FASTLM_CUDA_ARCHS", "80;90")
        flags["nvcc"] = ["-O3", "-lineinfo", std, define]
        flags["nvcc"] += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs.split(";") if a]
        flags["ld"] += [f"-L{d}" for d in cuda_library_dirs(cpp_extension().CUDA_HOME)]
    return flags


def cpp_extension():
    """torch.utils.cpp_extension, imported without the warning a CUDA build of torch logs at that
    import on a machine without a GPU ("No CUDA runtime is found"): compiling the CUDA kernels
    needs no GPU, and the line would come before every one-line message of a CLI run."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension as module
    finally:
        logger.setLevel(level)
    return module


def cuda_library_dirs(cuda_home):
    """The directories of a CUDA toolkit that hold libcudart. torch's build links with
    CUDA_HOME/lib64 only; toolkits laid out as lib/ or targets/<arch>-linux/lib/ (and nvcc found
    through a symlink in /usr/local/bin, which makes CUDA_HOME /usr/local) need them named."""
    if not cuda_home:
        return []
    nvcc = shutil.which("nvcc")
    homes = [cuda_home] + ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else [])
    homes += [os.path.join(cuda_home, "cuda")]
    dirs = []
    for home in homes:
        for sub in ("lib64", "lib", os.path.join("targets", f"{platform.machine()}-linux", "lib")):
            d = os.path.join(home, sub)
            if os.path.exists(os.path.join(d, "libcudart.so")) and d not in dirs:
                dirs.append(d)
    return dirs


def cache_root():
    """Where builds on first use go: $FASTLM_EXT_DIR, else $TORCH_EXTENSIONS_DIR, else ~/.cache/fastlm."""
    for name in ("FASTLM_EXT_DIR", "TORCH_EXTENSIONS_DIR"):
        if os.environ.get(name):
            return os.environ[name]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastlm")


class BuildFailed(RuntimeError):
    """The build failed, now or in an earlier process (the message says how, in one line)."""


def build_once(build_dir, build):
    """Run build() unless build_dir already holds a finished build. True if this call built.

    Concurrent callers (processes, DDP ranks) serialize on a lock file: the first builds, the
    others wait and then find the build finished. The lock is released by the kernel when its
    holder dies, so a killed build never blocks later ones. A failure is recorded so that later
    processes report it at once instead of compiling again; remove build_dir to retry.
    """
    done = os.path.join(build_dir, "BUILT")
    failed = os.path.join(build_dir, "FAILED")
    if os.path.exists(done):
        return False
    os.makedirs(build_dir, exist_ok=True)
    with open(os.path.join(build_dir, "build.lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(done):
            return False
        if os.path.exists(failed):
            with open(failed) as f:
                raise BuildFailed(f.read().strip())
        try:
            build()
        except Exception as exc:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            with open(failed, "w") as f:
                f.write(message)
            raise BuildFailed(message) from exc
        with open(done, "w"):
            pass
    return True
