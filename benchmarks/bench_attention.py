"""`python benchmarks/bench_attention.py [--quick] [...]` is `python -m fastlm.bench --only attention [...]`."""
import sys

from fastlm.bench.__main__ import script_main

sys.exit(script_main("attention"))
