"""Causal attention: Triton vs sdpa vs the torch reference (see fastlm/bench/attention.py)."""
from fastlm.bench.attention import main

if __name__ == "__main__":
    main()
