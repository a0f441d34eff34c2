"""Running nanochat's stacked transformer blocks: `lax.scan` over groups of layers, or unrolled.

The blocks of one model differ in two ways only: from gen-2026-01 on, every other layer has a
value embedding (layers i with i % 2 == (n_layer - 1) % 2), and per-layer scalars (attention
window, resid/x0 lambdas) differ. So the layers run in groups of `period` layers (2 when value
embeddings alternate, else 1) that `lax.scan` repeats with the scalars as scanned arrays: one
compiled body per kind of layer, whatever the depth. With an odd n_layer and value embeddings,
the first layer (a value-embedding one) runs before the scan.

Unrolled (`scan=False`), the same layer function runs once per layer with static indices: the
small models' decode on a CPU is faster that way (see `scan_layers`).

Test: `pytest tests/test_model.py -k scan`.
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


def _take(tree: Any, i) -> Any:
    return jax.tree.map(lambda a: a[i], tree)


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
        ys = []
        for i in range(n_layer):
            carry, y = fn(carry, _take(per_layer, i), _take(per_ve, ve.index(i)) if i in ve else None)
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
