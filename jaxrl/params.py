"""nanochat's parameters as a pytree: the table of state-dict names, shapes and saved dtypes per
model config, nested-dict <-> flat-key conversion (flax.traverse_util), and a nanochat-like random init.

Params are a nested dict made by splitting nanochat's state-dict keys on "." with PyTorch's
(out_features, in_features) layout kept (see jaxrl/model.py). Re-exported by jaxrl.model.

Test: `pytest tests/test_model.py tests/test_convert.py`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
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


def unflatten_params(flat: dict[str, Any]) -> Params:
    """{"a.b.c": x} -> {"a": {"b": {"c": x}}}."""
    return traverse_util.unflatten_dict(flat, sep=".")


def flatten_params(tree: Params) -> dict[str, Any]:
    """Inverse of `unflatten_params`: nested dict -> {"a.b.c": x}, in the tree's insertion order."""
    return traverse_util.flatten_dict(tree, sep=".")


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
