"""`python benchmarks/bench_adamw.py [--quick] [...]` is `python -m fastlm.bench --only adamw [...]`."""
import sys

from fastlm.bench.__main__ import script_main

sys.exit(script_main("adamw"))
