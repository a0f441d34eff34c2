"""The mesh, the logical-axis rules and every PartitionSpec the project uses; nothing else spells a mesh axis.

The mesh has two axes: "data" and "fsdp" (`make_mesh`; config keys mesh_data x mesh_fsdp = the
device count, -1 infers one). Every array dimension the project shards has a logical axis name:
the params' in jaxrl/params.py (`param_axes`: layers, vocab, embed, heads, kv, mlp), the rows of
rollouts and training batches "batch", and the stack of same-shape matrices Muon orthogonalises
together "matrices". `RULES` maps logical axes to mesh axes, once:

    batch    -> (data, fsdp)  every device trains and samples its own rows
    vocab, heads, kv, mlp -> fsdp   one dimension of each weight matrix is split over fsdp
    matrices -> fsdp          each device orthogonalises its share of a Muon stack
    layers, embed -> (replicated)

A dimension whose size does not divide by its mesh axes stays replicated (`spec`), so any model
runs on any mesh. A "tensor" axis would be one more mesh axis and a few more rules here.

Training layout (fsdp > 1): the fp32 master params, Muon momenta and second moments and AdamW
moments are sharded as the rules say (optimizer-state leaves take the spec of their param). The
train step runs under shard_map: each layer's weights are all-gathered over fsdp inside the layer
scan (`Sharded`, `gather`; the gathered copy is not kept for the backward pass but gathered
again, `GATHERED`), whose transpose reduce-scatters the gradients, so no device ever holds the
whole model's gradient. Rollouts use another layout: a replicated copy of the params, gathered
once per step (`replicated`), because decoding reads every weight at every token and a gather
per token would cost more than the copy's memory.

Test: `pytest tests/test_sharding.py tests/test_sampler.py tests/test_rl.py` (8 simulated CPU devices).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import jax
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
MESH_AXES = (DATA, FSDP)

# Logical axis -> mesh axes (None: replicated). The one place a mesh axis is chosen.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": (DATA, FSDP),
    "vocab": (FSDP,),
    "heads": (FSDP,),
    "kv": (FSDP,),
    "mlp": (FSDP,),
    "matrices": (FSDP,),
    "layers": None,
    "embed": None,
}

GATHERED = "fsdp_gathered"  # checkpoint_name of a layer's gathered weights: recomputed in backward, never saved


def mesh_shape(n_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """(data, fsdp) for `n_devices`: their product must be n_devices; one of them may be -1 (inferred)."""
    for name, v in (("mesh_data", data), ("mesh_fsdp", fsdp)):
        if v == 0 or v < -1:
            raise ValueError(f"{name} must be a positive int or -1 (inferred), found {v}")
    if data == -1 and fsdp == -1:
        raise ValueError("mesh_data and mesh_fsdp cannot both be -1: set one of them")
    if data == -1 or fsdp == -1:
        known = fsdp if data == -1 else data
        if n_devices % known:
            raise ValueError(f"{'mesh_fsdp' if data == -1 else 'mesh_data'} = {known} does not divide the "
                             f"{n_devices} devices")
        return (n_devices // known, known) if data == -1 else (known, n_devices // known)
    if data * fsdp != n_devices:
        raise ValueError(f"mesh_data x mesh_fsdp = {data} x {fsdp} = {data * fsdp}, but there are {n_devices} "
                         f"devices: their product must be the device count (or set one to -1)")
    return data, fsdp


def make_mesh(devices=None, *, data: int = -1, fsdp: int = 1) -> Mesh:
    """A (data, fsdp) mesh over `devices` (default: all devices of all processes, in process
    order, so an fsdp group that divides a process's devices stays inside that process)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(len(devices), data, fsdp)
    return Mesh(np.array(devices).reshape(shape), MESH_AXES)


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def fsdp_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape.get(FSDP, 1)


def row_shards(mesh: Mesh | None) -> int:
    """Devices the rows of a batch are split over (every device of the mesh)."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in RULES["batch"])


def spec(axes: tuple, shape: tuple | None = None, mesh: Mesh | None = None) -> P:
    """PartitionSpec of logical `axes` under RULES; with `shape` and `mesh`, a dimension whose size
    does not divide by its mesh axes' size (or whose mesh axes have size 1) is left replicated.
    A mesh axis splits at most one dimension: the first one that asks for it and divides."""
    out, used = [], set()
    for i, name in enumerate(axes):
        mesh_axes = RULES.get(name) if name is not None else None
        if mesh_axes and used & set(mesh_axes):  # a mesh axis splits one dimension at most: the first
            mesh_axes = None
        if mesh_axes and mesh is not None:
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if size == 1 or (shape is not None and shape[i] % size):
                mesh_axes = None
        used |= set(mesh_axes or ())
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def rows_spec() -> P:
    """Leading (row) axis split over every device."""
    return spec(("batch",))


def replicated_spec() -> P:
    return P()


def rows_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, rows_spec())


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, replicated_spec())


# ------------------------------------------------------------------------------------------
# Params and optimizer state


def _param_name(path) -> str | None:
    """The params-tree name ("transformer.h.attn.c_q.weight") a leaf's key path ends with, if any."""
    from jaxrl.params import param_axes

    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    for i in range(len(keys)):
        name = ".".join(keys[i:])
        if param_axes(name) is not None:
            return name
    return None


def leaf_spec(path, shape, mesh: Mesh) -> P:
    """Spec of a params or optimizer-state leaf: its param's logical axes (an optimizer-state leaf
    lies under its param's path), replicated for anything else (step counts, scalars)."""
    from jaxrl.params import param_axes

    name = _param_name(path)
    axes = param_axes(name) if name is not None else None
    if axes is None or len(axes) != len(shape):
        return P()
    return spec(axes, tuple(shape), mesh)


def tree_specs(tree: Any, mesh: Mesh) -> Any:
    """PartitionSpecs of a params or train-state tree (arrays or ShapeDtypeStructs) on `mesh`."""
    return jax.tree_util.tree_map_with_path(lambda p, x: leaf_spec(p, np.shape(x), mesh), tree)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), tree_specs(tree, mesh),
                        is_leaf=lambda x: isinstance(x, P))


def place(tree: Any, mesh: Mesh) -> Any:
    """`tree` (params or train state) on `mesh` in the training layout."""
    return jax.device_put(tree, tree_shardings(tree, mesh))


def shard_map(f, mesh: Mesh, in_specs, out_specs):
    """jax.shard_map over the mesh (replication of outputs is not checked: rows are independent,
    and the callers sum what must be summed)."""
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


# ------------------------------------------------------------------------------------------
# Inside the train step: gathering a layer's weights, constraints


@jax.tree_util.register_pytree_node_class
class Sharded:
    """This device's shard of a weight split over fsdp along dimension `axis` (counted from the
    end, so slicing leading layer axes keeps it right). `gather` makes the whole weight."""

    def __init__(self, local, axis: int):
        self.local, self.axis = local, axis

    def tree_flatten(self):
        return (self.local,), self.axis

    @classmethod
    def tree_unflatten(cls, axis, children):
        return cls(children[0], axis)


def _fsdp_dim(s: P, ndim: int) -> int | None:
    """The dimension a spec splits over fsdp, counted from the end, or None."""
    parts = tuple(s) + (None,) * (ndim - len(s))
    for i, part in enumerate(parts):
        if part == FSDP or (isinstance(part, tuple) and FSDP in part):
            return i - ndim
    return None


def sum_replicated_over_fsdp(grads: Any, specs: Any) -> Any:
    """Inside shard_map: psum over fsdp of the gradients of leaves not split over it (the split
    ones were reduce-scattered by their gather's transpose)."""
    return jax.tree.map(lambda g, s: g if _fsdp_dim(s, g.ndim) is not None else jax.lax.psum(g, FSDP),
                        grads, specs, is_leaf=lambda x: isinstance(x, P))


def wrap(local_tree: Any, specs: Any) -> Any:
    """Inside shard_map: this device's shards of a params tree, each fsdp-split leaf as `Sharded`."""
    def one(x, s):
        axis = _fsdp_dim(s, x.ndim)
        return x if axis is None else Sharded(x, axis)

    return jax.tree.map(one, local_tree, specs, is_leaf=lambda x: isinstance(x, P))


def gather(tree: Any) -> Any:
    """`tree` with every `Sharded` leaf all-gathered over fsdp (identity on anything else). Its
    transpose reduce-scatters the gradient. Named `GATHERED` so a remat policy can drop it."""
    def one(x):
        if not isinstance(x, Sharded):
            return x
        full = jax.lax.all_gather(x.local, FSDP, axis=x.local.ndim + x.axis, tiled=True)
        return checkpoint_name(full, GATHERED)

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, Sharded))


def has_sharded(tree: Any) -> bool:
    return any(isinstance(x, Sharded) for x in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Sharded)))


_ACTIVE: list[Mesh] = []


@contextlib.contextmanager
def active(mesh: Mesh | None):
    """While tracing a jitted function on `mesh`: lets `constrain` place intermediates by logical axes."""
    _ACTIVE.append(mesh)
    try:
        yield
    finally:
        _ACTIVE.pop()


def constrain(x, axes: tuple):
    """x with its sharding pinned to logical `axes` on the active mesh; identity without one, or
    when the mesh has no fsdp axis to use (the programs of a data-parallel mesh stay as they were)."""
    mesh = _ACTIVE[-1] if _ACTIVE else None
    if mesh is None or fsdp_size(mesh) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(axes, x.shape, mesh)))


def constrain_tree(tree: Any, mesh: Mesh | None) -> Any:
    """A params or train-state tree pinned to its training layout on `mesh` (identity without a mesh)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, tree_shardings(tree, mesh))


def use_cpu_cores(count: int | None = None) -> None:
    """Make each core of this CPU host its own jax device (call before jax starts a backend).

    XLA:CPU runs a small decode step (16 rows) on about one core; with a CPU device per core the
    sampler splits the rows, or one prompt's samples (`sampler.sample_split`), over the cores and
    each device runs its share on its own thread. `count` None: the cores this process may run on,
    unless the device count is already chosen (XLA_FLAGS' --xla_force_host_platform_device_count or
    JAX_NUM_CPU_DEVICES), which is left as it is. Only the CPU backend is affected (an accelerator
    host keeps its devices)."""
    if count is None:
        if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "") or \
                "JAX_NUM_CPU_DEVICES" in os.environ:
            return
        count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if count < 1:
        raise ValueError(f"CPU devices must be >= 1, found {count}")
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError as e:  # a backend is already up: too late to change its device count
        raise RuntimeError(f"cannot make {count} CPU devices: {e}") from None
