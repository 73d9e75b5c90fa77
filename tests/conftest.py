import os

import pytest
import torch

# Triton kernels run on CPU tensors through the interpreter when no GPU is present. The variable
# must be set before triton is first imported, so it is set here, before any test module loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTLM_NO_EXT_WARNING", "1")
# CUDA attention launches use one fixed config per kernel (no tuning): the GPU suite compiles each
# kernel once per specialisation instead of every config per shape. Tests that cover the tuned
# path and every config set their own (tests/test_attention.py).
os.environ.setdefault("FASTLM_AUTOTUNE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _release_cuda_cache():
    # The gpu tests run in several processes on one GPU, and each process's caching allocator
    # keeps what its largest test freed (13 GB for the 2**31-element cross-entropy): returned
    # after every test, so a big test in one process cannot run out of memory held idle by another.
    yield
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()
