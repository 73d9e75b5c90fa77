"""`python benchmarks/bench_attention.py [--quick] [...]` is `python -m fastlm.bench --only attention [...]`."""
import sys

from fastlm.bench.__main__ import main

sys.exit(main(["--only", "attention", *sys.argv[1:]]))
