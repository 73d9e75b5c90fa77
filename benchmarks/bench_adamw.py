"""AdamW step time, torch for-loop / foreach / fused vs fastlm cpp / cuda: python benchmarks/bench_adamw.py [--quick]."""
from fastlm.bench.adamw import main

if __name__ == "__main__":
    main()
