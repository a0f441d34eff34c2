"""Benchmarks of jaxrl, run by `python scripts/bench.py <subcommand>`: callers of jaxrl's public API only.

- cli.py: the subcommands, their options and platform defaults, the final JSON record;
- context.py: what a benchmark runs on (a checkpoint, or random params of a nanochat shape);
- device.py: device ceilings, nanochat shapes, FLOP and byte counts, the timing helper;
- sampling.py (`sampler`), training.py (`train`), rl_step.py (`rl-step`), conversion.py
  (`convert`), floor.py (`floor`): one subcommand each; profiling.py: `--profile DIR`.

Nothing in jaxrl/ imports this package. Test: `pytest tests/test_bench.py`.
"""
