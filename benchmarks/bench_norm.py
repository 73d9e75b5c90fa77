"""`python benchmarks/bench_norm.py [--quick] [...]` is `python -m fastlm.bench --only norm [...]`."""
import sys

from fastlm.bench.__main__ import script_main

sys.exit(script_main("norm"))
