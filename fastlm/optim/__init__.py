"""Optimizers: AdamW with clipping, GradScaler support and mixed precision fused in."""
from fastlm.optim.adamw import AdamW

__all__ = ["AdamW"]
