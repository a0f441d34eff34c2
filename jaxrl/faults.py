"""Fault injection for tests: the one hook through which a test makes a training run fail on purpose.

The hook: NaN advantages at chosen steps, which drive the trainer's non-finite path (the update is
skipped and logged; max_nonfinite_skips consecutive ones stop the run). A test opts in with the
environment variable named by NAN_STEPS_ENV, whose name says it is for tests; a production run
never sets it, and no config key or command-line option reaches it. When it fires, the run says so
loudly: a warning on stderr and a {"event": "test_fault"} row in metrics.jsonl, for that step.
docs/errors.md ("Faults during a run") documents it. Imports no jax.

    batch = faults.inject_nan_advantages(batch, step, writer)   # scripts/train_rl.py, once per step

Test: `python -m pytest -q tests/test_faults.py` (slow: trainer subprocesses) and tests/test_run_safety.py.
"""
import os
import sys

import numpy as np

NAN_STEPS_ENV = "JAXRL_TEST_FAULT_NAN_STEPS"  # "k" or "k1,k2,...": those steps' advantages become NaN


def nan_steps(environ=os.environ) -> frozenset[int]:
    """The steps listed in NAN_STEPS_ENV; empty when it is unset (the hook is off)."""
    text = environ.get(NAN_STEPS_ENV, "")
    try:
        return frozenset(int(k) for k in text.split(",") if k.strip())
    except ValueError:
        raise ValueError(f"{NAN_STEPS_ENV}={text!r} must list step numbers, e.g. \"1,3,4\"; it is a test hook: "
                         "unset it outside tests") from None


def inject_nan_advantages(batch, step: int, writer, environ=os.environ):
    """`batch` with NaN advantages when `step` is one of nan_steps(), announced on stderr and in the
    metrics (`writer.log`); otherwise `batch` itself. `batch` is a NamedTuple with `advantages`."""
    if step not in nan_steps(environ):
        return batch
    print(f"WARNING: test fault injected: step {step}'s advantages set to NaN by {NAN_STEPS_ENV} "
          "(a test hook; unset it outside tests)", file=sys.stderr, flush=True)
    writer.log({"step": step, "event": "test_fault", "phase": "rl", "fault": "nan_advantages", "env": NAN_STEPS_ENV})
    return batch._replace(advantages=batch.advantages * np.float32("nan"))
