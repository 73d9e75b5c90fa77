"""Benchmarks of fused kernels against their PyTorch references (`python -m fastlm.bench`).

One module per op (cross_entropy, adamw, attention, ...) exposes `run(args) -> list[dict]`;
`benchmarks/bench_<op>.py` are thin scripts around them. common.py holds timing, memory,
error and report helpers shared by all of them.
"""
