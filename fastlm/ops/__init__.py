"""The seam between the training loop and the kernels.

Every op has one public function with a `backend=` argument ("auto", "torch", and the fused
backends it has), validates its inputs before any kernel runs, and keeps its pure-PyTorch
reference beside the dispatch:

  loss.py       cross_entropy, linear_cross_entropy (+ their references)
  attention.py  causal_attention (+ attention_reference)
  norm.py       layer_norm, rms_norm (+ norm_reference)
  backends.py   resolve_backend / available_backends: the one place a backend is chosen
  checks.py     the input checks every op shares

AdamW's backends live with the optimizer in fastlm.optim and are resolved here too ("adamw").
"""
from fastlm.ops.attention import causal_attention
from fastlm.ops.backends import BackendUnavailable, available_backends, resolve_backend
from fastlm.ops.loss import cross_entropy, linear_cross_entropy
from fastlm.ops.norm import layer_norm, rms_norm

__all__ = ["BackendUnavailable", "available_backends", "causal_attention", "cross_entropy",
           "layer_norm", "linear_cross_entropy", "resolve_backend", "rms_norm"]
