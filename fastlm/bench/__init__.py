"""Benchmarks of fastlm's fused kernels and training step against their PyTorch references.

One module per benchmark (cross_entropy, adamw, attention, e2e) exposes `run(quick, device,
dtype) -> list[Row]` (common.Row: one schema for every benchmark); parity.py checks that the
reference and fused training paths agree. `python -m fastlm.bench` (__main__.py) is the one
runner: it alone writes results, and report.py formats them.
"""
