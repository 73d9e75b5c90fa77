"""The seam between the training loop and the kernels.

Every op here has one public function with a `backend=` argument ("auto", "torch", and the
fused backends that op has), validates its inputs before any kernel runs, and keeps its
pure-PyTorch reference beside the dispatch.
"""
import importlib

import torch

from fastlm.ops._common import BACKENDS, BackendUnavailable
from fastlm.ops.attention import causal_attention
from fastlm.ops.cross_entropy import cross_entropy, linear_cross_entropy


def available_backends(device=None):
    """{op name: {backend: None if usable on `device`, else the reason}}.

    device defaults to CUDA when present, else CPU.
    """
    # The modules, not the functions of the same name that this package re-exports.
    ce = importlib.import_module("fastlm.ops.cross_entropy")
    attention = importlib.import_module("fastlm.ops.attention")
    adamw = importlib.import_module("fastlm.optim.adamw")

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return {
        "cross_entropy": ce.backend_reasons(device),
        "linear_cross_entropy": ce.backend_reasons(device, linear=True),
        "causal_attention": attention.backend_reasons(device),
        "adamw": adamw.backend_reasons(device),
    }


__all__ = ["BACKENDS", "BackendUnavailable", "available_backends", "causal_attention",
           "cross_entropy", "linear_cross_entropy"]
