"""`python benchmarks/bench_cross_entropy.py [--quick] [...]` is `python -m fastlm.bench --only cross_entropy [...]`."""
import sys

from fastlm.bench.__main__ import main

sys.exit(main(["--only", "cross_entropy", *sys.argv[1:]]))
