"""Benchmarks of fused kernels against their PyTorch references (`python -m fastlm.bench`).

One module per op (cross_entropy, adamw, attention, e2e) exposes
`run(quick=False, device="cpu", dtype=None, out_dir=None) -> list[dict]`;
`benchmarks/bench_<op>.py` are thin scripts around them. common.py holds timing, memory,
error and report helpers shared by all of them.
"""
