"""`python benchmarks/bench_cross_entropy.py [--quick] [...]` is `python -m fastlm.bench --only cross_entropy [...]`."""
import sys

from fastlm.bench.__main__ import script_main

sys.exit(script_main("cross_entropy"))
