"""`python benchmarks/bench_e2e.py [--quick] [...]` is `python -m fastlm.bench --only e2e [...]`."""
import sys

from fastlm.bench.__main__ import main

sys.exit(main(["--only", "e2e", *sys.argv[1:]]))
