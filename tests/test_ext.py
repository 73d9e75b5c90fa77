"""A missing or stale fastlm._C never crashes: ops fall back to PyTorch with one warning."""
import warnings

import pytest
import torch

from fastlm import _ext
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


@pytest.mark.parametrize("reason", ["the compiled extension fastlm._C is not available (no module)",
                                    "fastlm._C is stale: csrc/ changed since it was built"])
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


def test_source_hash_tracks_csrc():
    current = _ext._current_source_hash()
    assert current is None or len(current) == 16
    available, reason = _ext.extension_status()
    if available:
        from fastlm import _build_info

        assert _build_info.SOURCE_HASH == current
    else:
        assert reason
