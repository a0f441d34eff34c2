"""RLConfig's range and consistency checks (`RLConfig.validate` calls `problems`): every problem at
once, each saying which numbers to change.

Test: `pytest tests/test_config.py tests/test_bad_inputs.py`.
"""
from __future__ import annotations

import math

from jaxrl.config import BUILTIN_TASKS, FIELDS, RLConfig


_RANGES = (  # (fields, predicate on a non-None value, the requirement in words)
    (("device_batch_size", "examples_per_step", "num_samples", "max_new_tokens", "num_epochs",
      "save_every", "eval_every", "eval_examples", "log_every", "num_steps", "stop_after_steps", "eval_num_samples",
      "num_processes"), lambda v: v >= 1,
     "a positive integer"),
    (("arith_difficulty",), lambda v: 1 <= v <= 3, "1, 2 or 3"),
    (("top_k", "max_nonfinite_skips", "zero_reward_warn_steps", "model_step", "process_id", "train_chunk_rows"), lambda v: v >= 0, ">= 0"),
    (("seed", "eval_seed"), lambda v: 0 <= v < 2**32, "in [0, 2**32) (sampling keys are 32-bit)"),
    (("temperature", "unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay"),
     lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    (("init_lr_frac",), lambda v: 0 < v <= 1, "in (0, 1]"),
)


def problems(c: RLConfig, world_size: int) -> list[str]:
    """Every range or consistency problem, each saying which numbers to change."""
    p = []
    for names, ok, what in _RANGES:
        p += [f"{n} must be {what}, found {getattr(c, n)}" for n in names
              if getattr(c, n) is not None and not ok(getattr(c, n))]
    for name, f in FIELDS.items():
        v, choices = getattr(c, name), f.metadata["choices"]
        if choices and v is not None and v not in choices:
            p.append(f"{name} must be one of {', '.join(map(repr, choices))}, found {v!r}")
    if c.device_batch_size >= 1 and c.num_samples >= 1 and c.num_samples % c.device_batch_size:
        d, n = c.device_batch_size, c.num_samples
        divisors = ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
        p.append(f"num_samples ({n}) must be a multiple of device_batch_size ({d}): set num_samples "
                 f"to {_near_multiples(n, d)}, or device_batch_size to a divisor of {n} ({divisors})")
    if world_size < 1:
        p.append(f"world_size must be >= 1, found {world_size}")
    elif c.examples_per_step >= 1 and c.examples_per_step % world_size:
        e = c.examples_per_step
        p.append(f"examples_per_step ({e}) must be divisible by the data-parallel size ({world_size}): "
                 f"set examples_per_step to {_near_multiples(e, world_size)}, or run on a number of "
                 f"devices that divides {e}")
    if not c.task.strip():
        p.append('task must be "gsm8k", "arith" or a directory, found an empty string')
    elif c.task not in BUILTIN_TASKS and c.data_dir is not None:
        p.append(f"task is a directory ({c.task!r}) and data_dir is also set ({c.data_dir!r}): "
                 f"set only one (data_dir is for the named tasks {', '.join(BUILTIN_TASKS)})")
    if c.run.strip() in ("", ".", "..") or "/" in c.run:
        p.append(f"run must be a folder name (the run directory is <out_dir>/<run>), found {c.run!r}: "
                 'set run = "my-run"')
    if c.coordinator_address is not None and ":" not in c.coordinator_address:
        p.append(f"coordinator_address must be host:port, found {c.coordinator_address!r}")
    if c.num_processes is not None and c.process_id is not None and c.process_id >= c.num_processes:
        p.append(f"process_id ({c.process_id}) must be < num_processes ({c.num_processes})")
    return p


def _near_multiples(n: int, d: int) -> str:
    """The multiples of d just below and above n, e.g. (10, 4) -> '8 or 12'."""
    return " or ".join(str(x) for x in ((n // d) * d, (n // d + 1) * d) if x > 0)
