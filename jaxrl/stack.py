"""Running nanochat's stacked transformer blocks: `lax.scan` over groups of layers, or unrolled.

The blocks of one model differ in two ways only: from gen-2026-01 on, every other layer has a
value embedding (layers i with i % 2 == (n_layer - 1) % 2), and per-layer scalars (attention
window, resid/x0 lambdas) differ. So the layers run in groups of `period` layers (2 when value
embeddings alternate, else 1) that `lax.scan` repeats with the scalars as scanned arrays: one
compiled body per kind of layer, whatever the depth. With an odd n_layer and value embeddings,
the first layer (a value-embedding one) runs before the scan.

Unrolled (`scan=False`), the same layer function runs once per layer on that layer's own arrays:
the stacked leaves are split once (`unstack`: one split forward, one concatenate for the
gradient, instead of a slice per layer whose gradient is padded to the whole stack and added).
A loop over decode steps should not split anything in its body (XLA does not hoist slices out
of a while loop, so every step would copy every layer's weights and cache): `for_loop` splits
the params before the loop into `Layers` (one array per layer, indexed statically), and the
sampler's cache is `Layers` too when unrolled, so a step reads and writes each layer in place.

Test: `pytest tests/test_stack.py` (scan = unrolled, the unrolled decode in `Layers`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.params import ve_layers

# Models with at most this many layers run their blocks unrolled by default (see scan_layers).
UNROLL_MAX_LAYERS = 4


def scan_layers(n_layer: int) -> bool:
    """Whether the blocks run under lax.scan by default: deeper than UNROLL_MAX_LAYERS. Unrolling a
    few layers compiles fast anyway and lets XLA read each layer's weights and cache in place."""
    return n_layer > UNROLL_MAX_LAYERS


def layout(n_layer: int, alternating_ve: bool) -> tuple[int, int]:
    """(lead, period): layers run before the scan, and layers per scanned group."""
    period = 2 if alternating_ve else 1
    return n_layer % period, period


def layer_inputs(config, params) -> tuple[dict, dict | None]:
    """The stacked params as scan inputs of a `GPTConfig`: (per-layer, leaves (L, ...): block
    weights, layer index, window, resid/x0 lambdas; per value-embedding layer, leaves (n_ve, ...):
    ve_gate and table, or None)."""
    h = params["transformer"]["h"]
    per_layer = {"attn": {n: h["attn"][n] for n in ("c_q", "c_k", "c_v", "c_proj")}, "mlp": h["mlp"],
                 "index": np.arange(config.n_layer)}
    windows = config.window_sizes()
    if windows[0] is not None:
        per_layer["window"] = np.asarray(windows, np.int32)
    if config.has_lambdas:
        per_layer["lambdas"] = (params["resid_lambdas"], params["x0_lambdas"])
        return per_layer, {"gate": h["attn"]["ve_gate"]["weight"], "table": params["value_embeds"]["weight"]}
    return per_layer, None


@jax.tree_util.register_pytree_node_class
class Layers:
    """A stacked array kept as one array per layer (unrolled decode); `x[i]` takes layer i (static)."""

    def __init__(self, arrays):
        self.arrays = tuple(arrays)

    def __getitem__(self, i):
        return self.arrays[i]

    def tree_flatten(self):
        return self.arrays, None

    @classmethod
    def tree_unflatten(cls, _, arrays):
        return cls(arrays)


def _is_layers(x) -> bool:
    return isinstance(x, Layers)


def write_layer(a, i, update, start: tuple):
    """`a` with layer i's slice at `start` (its per-layer indices) replaced by `update`, in place:
    one dynamic_update_slice of the stack, or of layer i's own array in `Layers`."""
    if _is_layers(a):
        new = jax.lax.dynamic_update_slice(a[i], update.astype(a[i].dtype), start)
        return Layers(a.arrays[:i] + (new,) + a.arrays[i + 1:])
    return jax.lax.dynamic_update_slice(a, update[None].astype(a.dtype), (i, *start))


def scatter_layer(a, i, index: tuple, update):
    """`a` with `a[i][index] = update` (numpy indexing; out-of-range indices are dropped), in place:
    a scatter into the stack, or into layer i's own array in `Layers`."""
    if _is_layers(a):
        new = a[i].at[index].set(update.astype(a[i].dtype), mode="drop")
        return Layers(a.arrays[:i] + (new,) + a.arrays[i + 1:])
    return a.at[(i, *index)].set(update.astype(a.dtype), mode="drop")


def map_layers(fn: Callable, a):
    """fn applied to each layer's array: `Layers` of the results, or their stack for an array."""
    if _is_layers(a):
        return Layers(fn(x) for x in a.arrays)
    return jax.vmap(fn)(a)


def unstack(tree: Any, n: int) -> list:
    """Per-layer trees of a tree of stacked leaves (n, ...): one split per leaf; numpy leaves
    (static per-layer values) and `Layers` are indexed as they are."""
    def split(a):
        if _is_layers(a) or isinstance(a, np.ndarray):
            return [a[i] for i in range(n)]
        return [x[0] for x in jnp.split(a, n)]

    leaves, treedef = jax.tree.flatten(tree, is_leaf=_is_layers)
    parts = [split(a) for a in leaves]
    return [treedef.unflatten([p[i] for p in parts]) for i in range(n)]


def for_loop(config, params) -> Any:
    """The params for a loop of unrolled decode steps: every stacked leaf split once into `Layers`
    (unchanged when the layers run under lax.scan, which slices inside its own body)."""
    if scan_layers(config.n_layer):
        return params

    def split(a):
        return Layers(x[0] for x in jnp.split(a, a.shape[0]))

    out = dict(params, transformer=dict(params["transformer"], h=jax.tree.map(split, params["transformer"]["h"])))
    for name in ("value_embeds", "resid_lambdas", "x0_lambdas"):
        if name in params:
            out[name] = jax.tree.map(split, params[name])
    return out


def _take(tree: Any, i) -> Any:
    return jax.tree.map(lambda a: a[i], tree, is_leaf=_is_layers)


def _stack(ys: list) -> Any:
    return jax.tree.map(lambda *a: jnp.stack(a), *ys)


def run_layers(fn: Callable, carry: Any, per_layer: Any, per_ve: Any, n_layer: int, *, scan: bool):
    """Run `fn(carry, lx, vx) -> (carry, y)` over the layers in order.

    `per_layer`: leaves (n_layer, ...), `lx` is layer i's slice. `per_ve`: leaves (n_ve, ...) over
    the value-embedding layers, or None when the model has none; `vx` is the slice of layer i
    on a value-embedding layer, else None. Returns (carry, ys stacked over layers (n_layer, ...)).
    """
    ve = ve_layers(n_layer) if per_ve is not None else []
    if not scan:
        layers, ves = unstack(per_layer, n_layer), (unstack(per_ve, len(ve)) if ve else [])
        ys = []
        for i in range(n_layer):
            carry, y = fn(carry, layers[i], ves[ve.index(i)] if i in ve else None)
            ys.append(y)
        return carry, _stack(ys)
    lead, period = layout(n_layer, per_ve is not None)
    ys = []
    for i in range(lead):  # odd n_layer with value embeddings: layer 0 carries the first one
        carry, y = fn(carry, _take(per_layer, i), _take(per_ve, 0))
        ys.append(y)
    groups = (n_layer - lead) // period
    if groups == 0:
        return carry, _stack(ys)

    def group(carry, xs):
        lx, vx = xs
        out = []
        for j in range(period):  # the last layer of a pair has the value embedding
            carry, y = fn(carry, _take(lx, j), vx if period == 2 and j == 1 else None)
            out.append(y)
        return carry, _stack(out)

    lx = jax.tree.map(lambda a: a[lead:].reshape(groups, period, *a.shape[1:]), per_layer)
    vx = None if per_ve is None else jax.tree.map(lambda a: a[lead:], per_ve)
    carry, gys = jax.lax.scan(group, carry, (lx, vx))
    gys = jax.tree.map(lambda a: a.reshape(groups * period, *a.shape[2:]), gys)
    if ys:
        gys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), _stack(ys), gys)
    return carry, gys
