"""nanochat's parameters as a pytree: the table of state-dict names, shapes and saved dtypes per
model config, nested-dict <-> flat-key conversion (flax.traverse_util), and a nanochat-like random init.

Params are a nested dict made by splitting nanochat's state-dict keys on "." with PyTorch's
(out_features, in_features) layout kept (see jaxrl/model.py), except that the transformer blocks
are stacked: `transformer.h.<i>.<rest>` of every layer i is one array `transformer.h.<rest>` with a
leading layer axis (ve_gate over the value-embedding layers only), and `value_embeds.<i>.weight`
is `value_embeds.weight` (n_ve, Vp, K·Dh), so the model scans its layers. `flatten_params` /
`unflatten_params` convert between this tree and nanochat's flat names, the external contract.
Re-exported by jaxrl.model.

Test: `pytest tests/test_model.py tests/test_convert.py`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

if TYPE_CHECKING:
    from jaxrl.model import GPTConfig

Params = dict[str, Any]
SMEAR_CHANNELS = 24  # smear gate input channels (gen-2026-07)


def param_table(config: GPTConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(state-dict key, torch shape, dtype nanochat saves on GPU) in nanochat's state-dict order."""
    C, hd, Vp, L = config.n_embd, config.head_dim, config.padded_vocab, config.n_layer
    H, K = config.n_head, config.n_kv_head
    rows: list[tuple[str, tuple[int, ...], str]] = []
    if config.has_lambdas:
        rows += [("resid_lambdas", (L,), "float32"), ("x0_lambdas", (L,), "float32")]
    if config.has_smear:
        rows += [("smear_lambda", (1,), "float32"), ("backout_lambda", (1,), "float32")]
    rows.append(("transformer.wte.weight", (Vp, C), "bfloat16"))
    for i in range(L):
        p = f"transformer.h.{i}."
        rows += [
            (p + "attn.c_q.weight", (H * hd, C), "float32"),
            (p + "attn.c_k.weight", (K * hd, C), "float32"),
            (p + "attn.c_v.weight", (K * hd, C), "float32"),
            (p + "attn.c_proj.weight", (C, C), "float32"),
        ]
        if config.has_ve(i):
            rows.append((p + "attn.ve_gate.weight", (K, config.ve_gate[1]), "float32"))
        rows += [(p + "mlp.c_fc.weight", (4 * C, C), "float32"), (p + "mlp.c_proj.weight", (C, 4 * C), "float32")]
    rows.append(("lm_head.weight", (Vp, C), "float32"))
    if config.has_smear:
        rows.append(("smear_gate.weight", (1, SMEAR_CHANNELS), "float32"))
    for i in range(L):
        if config.has_ve(i):
            rows.append((f"value_embeds.{i}.weight", (Vp, K * hd), "bfloat16"))
    return rows


# Logical axis names of every dimension of the params tree (stacked layout), by the suffix of the
# name; jaxrl/sharding.py's RULES map them to mesh axes. Torch (out, in) layout: c_q is (heads, embed).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "transformer.wte.weight": ("vocab", "embed"),
    "lm_head.weight": ("vocab", "embed"),
    "value_embeds.weight": ("layers", "vocab", "kv"),
    "transformer.h.attn.c_q.weight": ("layers", "heads", "embed"),
    "transformer.h.attn.c_k.weight": ("layers", "kv", "embed"),
    "transformer.h.attn.c_v.weight": ("layers", "kv", "embed"),
    "transformer.h.attn.c_proj.weight": ("layers", "embed", "heads"),
    "transformer.h.attn.ve_gate.weight": ("layers", None, None),
    "transformer.h.mlp.c_fc.weight": ("layers", "mlp", "embed"),
    "transformer.h.mlp.c_proj.weight": ("layers", "embed", "mlp"),
    "resid_lambdas": ("layers",),
    "x0_lambdas": ("layers",),
    "smear_lambda": (None,),
    "backout_lambda": (None,),
    "smear_gate.weight": (None, None),
}


def param_axes(name: str) -> tuple[str | None, ...] | None:
    """Logical axes of the stacked param `name` (dotted), or None for a name that is not a param."""
    return PARAM_AXES.get(name)


LAYERS = "transformer.h."  # nanochat's per-layer keys: transformer.h.<i>.<rest>
VALUE_EMBEDS = "value_embeds."  # value_embeds.<i>.weight on the value-embedding layers


def ve_layers(n_layer: int) -> list[int]:
    """The layers that carry a value embedding in gen-2026-* (i % 2 == (n_layer - 1) % 2)."""
    return [i for i in range(n_layer) if i % 2 == (n_layer - 1) % 2]


def _stack(values: list) -> Any:
    """Stack same-shape leaves along a new leading axis, keeping their kind (numpy, jax, abstract)."""
    first = values[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(values), *first.shape), first.dtype)
    if isinstance(first, jax.Array):
        return jnp.stack(values)
    if hasattr(first, "shape"):
        return np.stack([np.asarray(v) for v in values])
    if all(v == first for v in values):  # labels and other per-layer tags: one value for the stack
        return first
    raise ValueError(f"cannot stack the per-layer values {values!r}: they differ and are not arrays")


def _unstack(value: Any, n: int) -> list:
    """Inverse of `_stack`: n leaves (a non-array value is repeated n times)."""
    if isinstance(value, jax.ShapeDtypeStruct):
        return [jax.ShapeDtypeStruct(value.shape[1:], value.dtype)] * n
    if hasattr(value, "shape"):
        if value.shape[:1] != (n,):
            raise ValueError(f"stacked parameter of shape {tuple(value.shape)}: expected a leading axis of {n}")
        return [value[i] for i in range(n)]
    return [value] * n


def unflatten_params(flat: dict[str, Any], *, consume: bool = False) -> Params:
    """nanochat's flat state-dict names -> the stacked params tree.

    "a.b.c": x becomes tree["a"]["b"]["c"]; the per-layer keys transformer.h.<i>.<rest> are
    stacked over i into transformer.h.<rest> of shape (n_layer, ...) (ve_gate over the layers
    that have it), and value_embeds.<i>.weight into value_embeds.weight (n_ve, Vp, K·Dh).
    Non-array leaves (labels) that agree across layers stay one value. `consume`: delete each
    per-layer entry from `flat` once stacked, so a large host checkpoint is never held twice.
    """
    plain, groups = {}, {}
    for key, value in flat.items():
        for prefix in (LAYERS, VALUE_EMBEDS):
            if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit():
                i, rest = key[len(prefix):].split(".", 1)
                groups.setdefault(prefix + rest, []).append((int(i), key))
                break
        else:
            plain[key] = value
    for name, members in groups.items():
        plain[name] = _stack([flat[key] for _, key in sorted(members)])
        if consume:
            for _, key in members:
                del flat[key]
    return traverse_util.unflatten_dict(plain, sep=".")


def flatten_params(tree: Params, n_layer: int | None = None) -> dict[str, Any]:
    """Inverse of `unflatten_params`: the stacked tree -> nanochat's flat state-dict names.

    A tree in the per-layer layout of older jaxrl checkpoints (transformer.h.<i>... nested under
    digit keys) flattens to the same names. The layer count comes from the stacked arrays, or
    from `n_layer` when the leaves are not arrays (a tree of optimizer-group labels).
    """
    flat = traverse_util.flatten_dict(tree, sep=".")
    def stacked_under(prefix):
        return {k: v for k, v in flat.items() if k.startswith(prefix) and not k[len(prefix):].split(".")[0].isdigit()}

    stacked, ves = stacked_under(LAYERS), stacked_under(VALUE_EMBEDS)
    if not stacked and not ves:
        return flat
    if n_layer is None:
        shapes = [np.shape(v) for k, v in stacked.items() if "ve_gate" not in k and hasattr(v, "shape")]
        if not shapes:
            raise ValueError("flatten_params: the stacked layers hold no arrays to count them; pass n_layer")
        n_layer = shapes[0][0]
    out = {k: v for k, v in flat.items() if k not in stacked and k not in ves}
    ve_idx = ve_layers(n_layer)
    for key, value in stacked.items():
        rest = key[len(LAYERS):]
        idx = ve_idx if rest.startswith("attn.ve_gate.") else range(n_layer)
        out.update({f"{LAYERS}{i}.{rest}": v for i, v in zip(idx, _unstack(value, len(idx)))})
    for key, value in ves.items():
        rest = key[len(VALUE_EMBEDS):]
        out.update({f"{VALUE_EMBEDS}{i}.{rest}": v for i, v in zip(ve_idx, _unstack(value, len(ve_idx)))})
    return out


def init_params(config: GPTConfig, key: jax.Array) -> Params:
    """nanochat-like random init (float32 master weights), for benchmarks and the demo."""
    C = config.n_embd
    flat = {}
    keys = jax.random.split(key, len(param_table(config)))
    bound = math.sqrt(3.0) * C**-0.5
    for k, (name, shape, _) in zip(keys, param_table(config)):
        if name == "resid_lambdas":
            value = jnp.ones(shape)
        elif name == "x0_lambdas":
            value = jnp.full(shape, 0.1)
        elif name in ("smear_lambda", "smear_gate.weight") or name.endswith("ve_gate.weight"):
            value = jnp.zeros(shape)
        elif name == "backout_lambda":
            value = jnp.full(shape, 0.2)
        elif name == "transformer.wte.weight":
            value = jax.random.normal(k, shape)
        elif name == "lm_head.weight":
            value = 0.001 * jax.random.normal(k, shape)
        elif name.endswith("c_proj.weight"):
            value = jnp.zeros(shape)
        else:  # c_q, c_k, c_v, c_fc, value_embeds
            value = jax.random.uniform(k, shape, minval=-bound, maxval=bound)
        flat[name] = value.astype(jnp.float32)
    return unflatten_params(flat)
