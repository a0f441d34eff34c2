"""Mesh construction and every PartitionSpec the project uses; nothing else spells a mesh axis.

jaxrl is data parallel: one mesh axis, "data", over every device of every process. Rollout rows
and training rows are split over it, params and optimizer state are replicated.

Test: `pytest tests/test_sampler.py tests/test_rl.py` (they run on 8 simulated CPU devices).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D ("data",) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    return Mesh(np.array(devices), (DATA,))


def data_spec() -> P:
    """Leading (row) axis split over the data axis."""
    return P(DATA)


def replicated_spec() -> P:
    return P()


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, data_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, replicated_spec())


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """jax.shard_map over the data axis (replication of outputs is not checked: rows are independent)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
