#!/usr/bin/env python3
"""Kept so that old commands keep working: the benchmark is `momentum-cuda bench`
(momentum_cuda/bench.py; `python -m momentum_cuda bench --help`). The JSON files written by the
earlier version of this script (benchmarks/results/cpu-2026*.json) have their own schema,
described in their "config" block."""
import sys

from momentum_cuda.bench import main

if __name__ == "__main__":
    sys.exit(main())
