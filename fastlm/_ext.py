"""Loading of the compiled extension fastlm._C.

A missing or stale extension is never fatal: callers get None and every op falls back to its
PyTorch backend. The reason is reported once, as a warning, the first time it matters.
"""
import functools
import glob
import hashlib
import os
import warnings

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


def _current_source_hash():
    """Hash of csrc/ as it is now, or None when the sources are not beside the package."""
    paths = []
    for pattern in ("*.cpp", "*.cu", "*.h"):
        paths += glob.glob(os.path.join(_CSRC, pattern))
    if not paths:
        return None
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _load():
    """Return (module or None, reason it is unusable or None)."""
    import torch  # noqa: F401  (fastlm._C links against libtorch, which must load first)

    try:
        from fastlm import _C  # noqa: F401  (importing registers torch.ops.fastlm.*)
    except ImportError as exc:
        return None, (f"the compiled extension fastlm._C is not available ({exc}); "
                      "build it with `pip install --no-build-isolation -e .`")
    try:
        from fastlm import _build_info
    except ImportError:
        _build_info = None
    current = _current_source_hash()
    if _build_info is not None and current is not None and current != _build_info.SOURCE_HASH:
        return None, ("fastlm._C is stale: csrc/ changed since it was built; rebuild with "
                      "`pip install --no-build-isolation -e .`")
    return _C, None


_warned = False


def extension(warn=True):
    """The loaded fastlm._C module, or None (after one warning per process) if unusable."""
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
