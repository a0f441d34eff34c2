"""`python scripts/bench.py floor`: the matmul-only floor of one decode step.

A decode step cannot be faster than the model's weight matmuls at the step's row count. This
times a jitted `lax.fori_loop` of `--steps` steps that run nothing but those matmuls, in the
compute dtype, with the weights cast once outside the loop (as the sampler does): per layer
attn.c_q, c_k, c_v, c_proj, mlp.c_fc, mlp.c_proj, then lm_head, i.e. 6·n_layer + 1 dots per
step. Around them only what keeps the chain honest: the residual adds and RMS norms of the
model (so values stay finite and layer i+1 waits for layer i, as in the real step) and a sum
of k, v and the logits into a carried scalar (so XLA cannot drop those dots). No attention, no
embedding lookup, no sampling; the small gate matmuls of gen-2026 (ve_gate, smear_gate, at
most 32 input channels) are left out. One device; rows as the sampler's sweep (`--rows`).

Per configuration: `floor_step_s` (median over `--repeats` calls of one loop / steps) and
`floor_step_s_best` (the fastest call), FLOPs and weight bytes per step, and the achieved
FLOP/s and bytes/s against the device ceilings (`mfu`, `mbu`). A sampler's decode step time
divided by `floor_step_s` at the same rows says how far the step is from its matmuls alone.
Test: `pytest tests/test_bench.py -k floor`.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from benchmarks import device as bench_device
from jaxrl import model

BLOCK_DOTS = (("attn", "c_q"), ("attn", "c_k"), ("attn", "c_v"), ("attn", "c_proj"), ("mlp", "c_fc"),
              ("mlp", "c_proj"))


def floor_weights(config: model.GPTConfig, params) -> dict:
    """The weights of the dots in the compute dtype: {"h": [per layer {name: (out, in)}], "lm_head": (V, D)}."""
    cast = lambda w: jnp.asarray(w, config.dtype)  # noqa: E731
    layers = [{f"{a}.{b}": cast(params["transformer"]["h"][a][b]["weight"][i]) for a, b in BLOCK_DOTS}
              for i in range(config.n_layer)]
    return {"h": layers, "lm_head": cast(params["lm_head"]["weight"])}


def floor_step(weights: dict, x, acc):
    """One step's matmuls: x (R, D) in the compute dtype, acc a float32 scalar. Returns (x, acc)."""
    for w in weights["h"]:
        u = model.rms_norm(x)
        q = model.linear(u, w["attn.c_q"])
        k, v = model.linear(u, w["attn.c_k"]), model.linear(u, w["attn.c_v"])
        acc = acc + jnp.sum(k, dtype=jnp.float32) + jnp.sum(v, dtype=jnp.float32)
        x = x + model.linear(q, w["attn.c_proj"])  # attention left out: q stands in for its output
        h = jax.nn.relu(model.linear(model.rms_norm(x), w["mlp.c_fc"]))
        x = x + model.linear(h * h, w["mlp.c_proj"])
    logits = model.linear(model.rms_norm(x), weights["lm_head"])
    return model.rms_norm(x), acc + jnp.sum(logits, dtype=jnp.float32)


@jax.jit
def floor_loop(weights: dict, x, steps):
    """`steps` floor steps in one compiled loop; returns (x, acc) so nothing is dead code."""
    return jax.lax.fori_loop(0, steps, lambda _, c: floor_step(weights, *c), (x, jnp.float32(0)))


def floor_counts(weights: dict, rows: int) -> dict:
    """Dots, FLOPs and weight bytes of one step at `rows` rows."""
    mats = [w for layer in weights["h"] for w in layer.values()] + [weights["lm_head"]]
    n = sum(math.prod(w.shape) for w in mats)
    return {"dots_per_step": len(mats), "matmul_flops_per_step": 2 * rows * n,
            "weight_bytes_per_step": sum(w.nbytes for w in mats)}


def run_one(config, weights: dict, rows: int, steps: int, repeats: int, ceil: dict) -> dict:
    x = jax.random.normal(jax.random.key(rows), (rows, config.n_embd), config.dtype)
    n = jnp.int32(steps)
    jax.block_until_ready(floor_loop(weights, x, n))  # compile
    median_s, times = bench_device.median_time(lambda: floor_loop(weights, x, n), repeats)
    out = {"rows": rows, "steps": steps, "floor_step_s": median_s / steps, "floor_step_s_best": min(times) / steps,
           **floor_counts(weights, rows)}
    out["achieved_flops_per_s"] = out["matmul_flops_per_step"] / out["floor_step_s"]
    out["achieved_bytes_per_s"] = out["weight_bytes_per_step"] / out["floor_step_s"]
    out["mfu"] = out["achieved_flops_per_s"] / ceil["flops_per_s"]
    out["mbu"] = out["achieved_bytes_per_s"] / ceil["bytes_per_s"]
    return out


def run(ctx, args, ceil: dict) -> tuple[dict, list[str], list[list]]:
    """Every row count of `--rows`; the record's top-level figures are the last one's."""
    weights = floor_weights(ctx.config, jax.device_put(ctx.params, jax.devices()[0]))
    results = [run_one(ctx.config, weights, r, args.steps, args.repeats, ceil) for r in args.rows]
    figures = dict(results[-1], sweep=results if len(results) > 1 else [])
    headers = ["rows", "dots/step", "ms/step (median)", "ms/step (best)", "GFLOP/s", "GB/s", "MFU", "MBU"]
    table = [[r["rows"], r["dots_per_step"], f"{1e3 * r['floor_step_s']:.3f}", f"{1e3 * r['floor_step_s_best']:.3f}",
              f"{r['achieved_flops_per_s'] / 1e9:.1f}", f"{r['achieved_bytes_per_s'] / 1e9:.1f}",
              f"{100 * r['mfu']:.1f}%", f"{100 * r['mbu']:.1f}%"] for r in results]
    return figures, headers, table
