"""`python benchmarks/bench_e2e.py [--quick] [...]` is `python -m fastlm.bench --only e2e [...]`."""
import sys

from fastlm.bench.__main__ import script_main

sys.exit(script_main("e2e"))
