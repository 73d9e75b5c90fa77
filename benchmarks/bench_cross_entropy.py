"""Fused cross-entropy and linear + cross-entropy vs PyTorch: `python benchmarks/bench_cross_entropy.py [--quick]`."""
from fastlm.bench.cross_entropy import main

if __name__ == "__main__":
    main()
