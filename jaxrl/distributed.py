"""Multi-process (multi-host) plumbing on JAX's own multi-controller runtime.

Every process runs the same script. The step's questions are split into contiguous per-process
shares in a fixed global order (`process_share`), each process samples its share on its own
devices, and the learner assembles the training batch as one global array over the mesh of all
devices (`rl.global_batch`), so the update equals a one-process run on the same total device
count. This module holds only the runtime's initialisation and the per-process shares and gathers.

`initialize(cfg)` calls `jax.distributed.initialize` when the config or the environment asks for
more than one process: `coordinator_address`/`num_processes`/`process_id` from the config, else
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, else JAX's own auto-detection on
SLURM and Cloud TPU. On CPU it selects the gloo collectives (rl.py's ppermute tree runs over them).

Equality with one process: the update sums gradients in a fixed pairwise tree, so 2 processes x 2
devices give the same bits as 1 process x 4 devices, provided XLA's CPU intra-op thread pool has
the same size in both: XLA sizes it max(PJRT_NPROC or the core count, local devices), and Eigen
splits long matmul contractions by that count. tests/test_multihost.py sets PJRT_NPROC=4.

Test: `pytest tests/test_multihost.py` (two processes on 127.0.0.1).
"""
from __future__ import annotations

import os

import jax
import numpy as np


def _env_int(name):
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(cfg) -> None:
    """Join the multi-process runtime if asked to; a no-op for a single process."""
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num = cfg.num_processes or _env_int("JAX_NUM_PROCESSES")
    pid = cfg.process_id if cfg.process_id is not None else _env_int("JAX_PROCESS_ID")
    auto = "SLURM_JOB_ID" in os.environ and (_env_int("SLURM_NTASKS") or 1) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ
    if not address and not auto:
        if num not in (None, 1):
            raise ValueError(f"num_processes={num} needs coordinator_address (host:port of process 0)")
        return
    cpu = os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or jax.config.jax_platforms == "cpu"
    if cpu and hasattr(jax.config, "jax_cpu_collectives_implementation"):  # the default in recent jax
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    else:
        jax.distributed.initialize()


def process_share(items: np.ndarray) -> np.ndarray:
    """This process's contiguous share of `items` (length must divide by the process count)."""
    n, p = len(items), jax.process_count()
    if n % p:
        raise ValueError(f"{n} items cannot be split evenly over {p} processes; make it a multiple of {p}")
    k = n // p
    return items[jax.process_index() * k: (jax.process_index() + 1) * k]


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenate every process's rows in process order (identity for one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


def mean_scalar(x: float) -> float:
    """Mean over processes of a per-process scalar (nanochat's all-reduce AVG of per-rank values)."""
    return float(np.mean(gather_rows(np.array([x], np.float64))))


def sum_scalar(x: float) -> float:
    return float(np.sum(gather_rows(np.array([x], np.float64))))

