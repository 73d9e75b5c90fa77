"""End-to-end training step, fused vs reference path (see fastlm/bench/e2e.py).

`python -m fastlm.bench` runs this together with every kernel benchmark and writes the summary.
"""
from fastlm.bench.e2e import main

if __name__ == "__main__":
    main()
