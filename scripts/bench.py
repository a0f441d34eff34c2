"""Benchmarks of jaxrl: sampler, train step, whole RL step, checkpoint conversion, decode matmul floor.

    python scripts/bench.py sampler|train|rl-step|convert|floor [options]   # --help lists them

The benchmarks are the `benchmarks` package (benchmarks/cli.py holds the options and the JSON
record; docs/benchmarks.md says what each figure means). Test: `pytest tests/test_bench.py`.
"""
import sys

from benchmarks.cli import main

if __name__ == "__main__":
    sys.exit(main())
