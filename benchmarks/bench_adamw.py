"""`python benchmarks/bench_adamw.py [--quick] [...]` is `python -m fastlm.bench --only adamw [...]`."""
import sys

from fastlm.bench.__main__ import main

sys.exit(main(["--only", "adamw", *sys.argv[1:]]))
