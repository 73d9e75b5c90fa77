"""Loading of the compiled extension (fastlm._C, or its build for the running torch).

Two builds exist, of the same csrc/ sources with the same flags (fastlm/_build.py):
- ahead of time, by `pip install --no-build-isolation -e .`: the module fastlm._C, with
  fastlm/_build_info.py recording the torch version and source hash it was built from;
- on first use, when there is no such build or it does not match the running torch or csrc/
  (a plain, isolated `pip install -e .`, an upgraded torch, a copied venv, edited sources):
  torch.utils.cpp_extension compiles the sources for the running torch into a cache directory
  keyed by everything the binary depends on, once, under a lock that other processes and DDP
  ranks wait on, with one line on stderr.
The ahead-of-time build is checked against the running torch before it is imported, since a
binary built for another torch can crash at import. Nothing here is fatal: when no build can be
had, callers get None and every op falls back to its PyTorch backend; the reason is reported
once, as a warning, the first time it matters.
"""
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import warnings

from fastlm import _build

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_FIRST_USE_NAME = "fastlm_C"  # the module name of the build on first use (a valid identifier)


def _current_source_hash():
    """Hash of the sources as they are now, or None when they are not installed."""
    csrc = _build.source_dir(_PACKAGE_DIR)
    return None if csrc is None else _build.source_hash(csrc)


def _prebuilt_info():
    """fastlm/_build_info.py (written by an ahead-of-time build), or None."""
    try:
        from fastlm import _build_info
    except ImportError:
        return None
    return _build_info


def _prebuilt_mismatch(info, torch_version, source_hash):
    """Why the ahead-of-time fastlm._C described by `info` must not be loaded, or None if it may.

    info: the _build_info module; source_hash: the sources' hash now, None if not installed.
    """
    built_for = getattr(info, "TORCH_VERSION", None)
    if built_for != torch_version:
        return f"fastlm._C was built for torch {built_for}, this is torch {torch_version}"
    if source_hash is not None and getattr(info, "SOURCE_HASH", None) != source_hash:
        return "fastlm._C is stale: csrc/ changed since it was built"
    return None


def _first_use_build_dir(torch_version, source_hash, flags, with_cuda):
    """The cache directory of the build for this torch, Python, sources and flags."""
    key = json.dumps([torch_version, sys.version_info[:2], source_hash, flags, sys.platform])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    name = f"fastlm-torch{torch_version}-{python}-{'cuda' if with_cuda else 'cpu'}-{digest}"
    return os.path.join(_build.cache_root(), name)


def _import_built(build_dir):
    path = os.path.join(build_dir, _FIRST_USE_NAME + (".pyd" if sys.platform == "win32" else ".so"))
    spec = importlib.util.spec_from_file_location(_FIRST_USE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # registers torch.ops.fastlm.*
    return module


def _put_ninja_on_path():
    """torch runs `ninja` from PATH; the ninja package's binary is not on it in a venv that was
    not activated (`.venv/bin/python -m fastlm.train`)."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _build_for_running_torch(csrc, why=None):
    """Compile csrc/ for the running torch into the cache (once) and import it.

    why: the reason the ahead-of-time build was not used, for the one-line message.
    Raises _build.BuildFailed (one line) when the build cannot be done.
    """
    import torch

    cpp_extension = _build.cpp_extension()
    _put_ninja_on_path()
    if not cpp_extension.is_ninja_available():
        raise _build.BuildFailed("ninja is not installed (pip install ninja)")
    sources = _build.source_files(csrc)
    cu_sources = [p for p in sources if p.endswith(".cu")]
    with_cuda = bool(cu_sources) and _build.want_cuda(torch.version.cuda is not None, cpp_extension.CUDA_HOME)
    flags = _build.compile_flags(os.path.dirname(torch.__file__), with_cuda)
    build_dir = _first_use_build_dir(torch.__version__, _build.source_hash(csrc), flags, with_cuda)

    def build():
        lead, when = (f"{why}; building", "") if why else ("building", "first use, ")
        print(f"fastlm: {lead} the C++{'/CUDA' if with_cuda else ''} kernels for torch {torch.__version__} "
              f"({when}about 1-2 min) in {build_dir}", file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                _FIRST_USE_NAME,
                [p for p in sources if p.endswith(".cpp")] + (cu_sources if with_cuda else []),
                extra_cflags=flags["cxx"], extra_cuda_cflags=flags["nvcc"], extra_ldflags=flags["ld"],
                build_directory=build_dir, with_cuda=with_cuda, verbose=False)
        except Exception as exc:
            log = os.path.join(build_dir, "build.log")
            with open(log, "w") as f:
                f.write(f"{type(exc).__name__}: {exc}\n")
            raise _build.BuildFailed(f"compiling the kernels for torch {torch.__version__} failed "
                                     f"(see {log}; remove {build_dir} to retry)") from exc

    _build.build_once(build_dir, build)
    return _import_built(build_dir)


@functools.lru_cache(maxsize=None)
def _load():
    """Return (module or None, reason it is unusable or None)."""
    import torch

    why = None  # why the ahead-of-time build is not used; None when there is none
    info = _prebuilt_info()
    if info is not None:
        why = _prebuilt_mismatch(info, torch.__version__, _current_source_hash())
        if why is None:
            try:
                from fastlm import _C  # importing registers torch.ops.fastlm.*
                return _C, None
            except ImportError as exc:
                why = f"fastlm._C does not import ({exc})"
    csrc = _build.source_dir(_PACKAGE_DIR)
    if csrc is None:
        return None, f"{why or 'fastlm._C was not built'}, and the C++ sources to build it are not installed"
    try:
        return _build_for_running_torch(csrc, why), None
    except Exception as exc:  # never fatal: the ops fall back to PyTorch
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return None, f"fastlm's C++ kernels are not available: {first_line}"


_warned = False


def extension(warn=True):
    """The loaded extension module, or None (after one warning per process) if unusable."""
    global _warned
    module, reason = _load()
    if module is None and warn and not _warned and not os.environ.get("FASTLM_NO_EXT_WARNING"):
        _warned = True
        warnings.warn(reason + "; falling back to the PyTorch kernels", RuntimeWarning, stacklevel=3)
    return module


def extension_status():
    """(available: bool, reason: str or None) without warning."""
    module, reason = _load()
    return module is not None, reason


def has_op(name):
    """True when torch.ops.fastlm.<name> is registered by a usable extension."""
    import torch

    if extension(warn=False) is None:
        return False
    return hasattr(torch.ops.fastlm, name)
