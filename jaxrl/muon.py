"""Muon for the three nanochat generations, as an optax GradientTransformation over torch-layout matrices.

Owns the per-matrix math of docs/nanochat.md#optimizers (Muon): Nesterov momentum without bias correction, the
orthogonalisation (gen-2025-10 Newton–Schulz; gen-2026-01 Polar Express; gen-2026-07 MuonEq +
Polar Express + Muon+), NorMuon-style variance reduction and cautious weight decay. `jaxrl/optim.py`
builds the per-group instances; this module knows nothing about parameter names.

A leaf is a matrix in torch (out, in) layout: (rows, cols) = its last two axes (leading axes, if
any, are independent matrices). `dtype="bfloat16"` runs the orthogonalisation as nanochat does on
a GPU: matmul operands and results are bf16 (fp32 accumulation), the elementwise math between them
is fp32 and rounded once where torch.compile stores a buffer, and gen-2026-01 also rounds its lr and
β2 to bf16 (the kernel's `lr_t.to(g.dtype)`). `dtype="float32"` is nanochat with COMPUTE_DTYPE fp32.

Under an fsdp mesh each same-shape stack is split over the devices by matrix (logical axis
"matrices", jaxrl/sharding.py), so a device orthogonalises its own share without communicating.

Updates are the fp32 increment nanochat adds to the parameter, so `optax.apply_updates` reproduces
nanochat's own `p.sub_(...)` rounding. Test: `python -m pytest -q tests/test_optim.py`.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl import sharding

f32, bf16 = jnp.float32, jnp.bfloat16
MOMENTUM = 0.95
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # gen-2025-10 quintic, nanochat muon.py @ 3a5e0bc
# Polar Express, 5 steps (https://arxiv.org/abs/2505.16932), nanochat muon.py @ 85b3e95 / optim.py @ 92d63d4
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
BETA2 = {"gen-2025-10": None, "gen-2026-01": 0.95, "gen-2026-07": 0.9}


class MuonState(NamedTuple):
    """Per group: `count` updates done (int32 scalar); per leaf: the fp32 momentum (param shape)
    and the fp32 factored second moment (…, rows, 1) or (…, 1, cols); None in gen-2025-10."""

    count: jax.Array
    momentum: Any
    variance: Any


def shape_scale(shape) -> float:
    """sqrt(max(1, rows/cols)) for a torch (out, in) matrix: c_fc (4C, C) gets 2."""
    return max(1.0, shape[-2] / shape[-1]) ** 0.5


def torch_lerp(a, b, w: float):
    """torch.lerp(a, b, w) with a Python weight, in a's dtype (the two-branch formula torch uses)."""
    w = np.float32(w)
    if abs(w) < 0.5:
        return a + w * (b - a)
    return b - (b - a) * (np.float32(1) - w)


def _as(x: float, dtype) -> np.float32:
    """A Python constant as nanochat's kernel sees it after `.to(dtype)`, back in fp32."""
    return np.asarray(x, np.dtype(dtype)).astype(np.float32)


def _round(x, dtype):
    """Store x in `dtype` (a bf16 buffer in nanochat's compiled kernel), keep computing in fp32."""
    return x.astype(dtype).astype(f32)


def _mm(a, b, dtype):
    """Matmul with nanochat's precision: bf16 in/out with fp32 accumulation, or true fp32."""
    if dtype == bf16:
        return jnp.matmul(a.astype(bf16), b.astype(bf16), preferred_element_type=f32).astype(bf16).astype(f32)
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _frob(x):
    """Frobenius norm over the last two axes, fp32, keepdims."""
    x = x.astype(f32)
    return jnp.sqrt(jnp.sum(x * x, axis=(-2, -1), keepdims=True))


def _normalize(x, dtype, safety: float, eps: float):
    """x / (‖x‖·safety + eps) with the norm of the stored (dtype) x, as `X.norm()` returns it."""
    return _round(x / (_round(_frob(x), dtype) * np.float32(safety) + np.float32(eps)), dtype)


def newton_schulz(g, dtype):
    """gen-2025-10: 5 quintic steps on X/(‖X‖+1e-7); tall matrices are transposed (wide form)."""
    tall = g.shape[-2] > g.shape[-1]
    x = _round(g, dtype)
    x = x.mT if tall else x
    x = _normalize(x, dtype, 1.0, 1e-7)
    a, b, c = (np.float32(k) for k in NS_COEFFS)
    for _ in range(5):
        A = _mm(x, x.mT, dtype)
        B = _round(b * A + _mm(_round(c * A, dtype), A, dtype), dtype)  # nanochat: `c * A @ A`
        x = _round(a * x + _mm(B, x, dtype), dtype)
    return x.mT if tall else x


def polar_express(x, dtype, *, transpose_tall: bool):
    """5 Polar Express steps on a normalised x. Tall x: transposed to wide (gen-2026-01) or the
    XᵀX form (gen-2026-07); the two are mathematically identical."""
    tall = x.shape[-2] > x.shape[-1]
    if tall and transpose_tall:
        return polar_express(x.mT, dtype, transpose_tall=True).mT
    for coeffs in POLAR_EXPRESS_COEFFS:
        a, b, c = (np.float32(k) for k in coeffs)
        if tall:
            A = _mm(x.mT, x, dtype)
            B = _round(b * A + c * _mm(A, A, dtype), dtype)
            x = _round(a * x + _mm(x, B, dtype), dtype)
        else:
            A = _mm(x, x.mT, dtype)
            B = _round(b * A + c * _mm(A, A, dtype), dtype)
            x = _round(a * x + _mm(B, x, dtype), dtype)
    return x


def muon_eq(x, dtype):
    """gen-2026-07 MuonEq: rescale every row to ‖x‖_F/sqrt(rows) (row norms clamped at 1e-6)."""
    target = _frob(x) / np.float32(math.sqrt(x.shape[-2]))
    row_norm = jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True)), np.float32(1e-6))
    return _round(x * _round(target / row_norm, dtype), dtype)


def orthogonalize(g, generation: str, dtype):
    """The orthogonalised update of a (…, rows, cols) fp32 g, returned in fp32."""
    if generation == "gen-2025-10":
        return newton_schulz(g, dtype)
    if generation == "gen-2026-01":
        return polar_express(_normalize(_round(g, dtype), dtype, 1.02, 1e-6), dtype, transpose_tall=True)
    x = muon_eq(_round(g, dtype), dtype)
    u = polar_express(_normalize(x, dtype, 1.01, 1e-6), dtype, transpose_tall=False)
    # Muon+: snap ‖u‖_F to sqrt(min(rows, cols)), the norm of a semi-orthogonal matrix
    target = np.float32(math.sqrt(min(g.shape[-2:])))
    return u * (target / jnp.maximum(_frob(u), np.float32(1e-6)))


def variance_reduction(u, s, beta2: float, dtype):
    """NorMuon-style: per-row (rows >= cols) or per-column second moment s (no bias correction),
    then rescale u back to its Frobenius norm. `dtype` is u's dtype in nanochat (bf16 only in
    gen-2026-01 bf16 mode, where `beta2_t.to(g.dtype)` also rounds β2: 0.95 -> 0.9492).
    Returns (u, s)."""
    axis = -1 if u.shape[-2] >= u.shape[-1] else -2
    n = np.float32(u.shape[axis])
    v_mean = jnp.mean(u * u, axis=axis, keepdims=True)
    v_norm = jnp.sqrt(jnp.sum(v_mean, axis=(-2, -1), keepdims=True) * n)
    s = torch_lerp(s, v_mean, np.float32(1) - _as(beta2, dtype))
    step = jax.lax.rsqrt(jnp.maximum(s, np.float32(1e-10)))
    v_norm_new = jnp.sqrt(jnp.sum(v_mean * n * step * step, axis=(-2, -1), keepdims=True))
    scale = step * (v_norm / jnp.maximum(v_norm_new, np.float32(1e-10)))
    return _round(u * _round(scale, dtype), dtype), s


def _lr_table(lrs: np.ndarray, shape, generation: str, dtype) -> jax.Array:
    """Per-step lr of one matrix: group lr × shape scale in float64, then fp32 as torch fills it."""
    table = np.asarray(np.asarray(lrs, np.float64) * shape_scale(shape), np.float32)
    if generation == "gen-2026-01":  # `lr_t.to(g.dtype)` in the fused kernel: bf16 in bf16 mode
        table = _as(table, dtype)
    return jnp.asarray(table)


def _stack_update(g, p, buf, s, idx, *, lrs, generation, dtype, weight_decay):
    """Same-shape matrices g, p, buf (K, rows, cols), s (K, rows, 1) | (K, 1, cols) | None.
    Returns (update to add to p, new momentum, new second moment or None)."""
    g = g.astype(f32)
    # gen-2025-10 passes 1 - 0.95 as a Python float; later gens compute it from an fp32 tensor
    w = 1.0 - MOMENTUM if generation == "gen-2025-10" else np.float32(1) - np.float32(MOMENTUM)
    buf = torch_lerp(buf.astype(f32), g, w)
    g = torch_lerp(g, buf, MOMENTUM)  # Nesterov: (1-μ)·g + μ·buf
    u = orthogonalize(g, generation, dtype)
    udtype = dtype if generation == "gen-2026-01" else f32  # nanochat's dtype of U after orthogonalising
    if BETA2[generation] is not None:
        u, s = variance_reduction(u, s, BETA2[generation], udtype)
    lr = _lr_table(lrs, g.shape, generation, udtype)[idx]
    step = lr * u
    if weight_decay:  # cautious: decay only where the update and the weight agree in sign
        pf = p.astype(f32)
        step = step + lr * _as(weight_decay, udtype) * pf * (u * pf >= 0)
    return -step, buf, s


def muon(lrs, *, generation: str, dtype: str = "bfloat16",
         weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Muon of one nanochat generation. `lrs[k]` (float64, length num_steps) is the group lr used
    by the k-th update (0-based) before the shape scale; later updates reuse the last entry.
    `weight_decay` is cautious (gen-2026-*); gen-2025-10 has none and rejects a nonzero value."""
    if generation not in BETA2:
        raise ValueError(f"unknown generation {generation!r}; expected one of {sorted(BETA2)}")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"muon dtype must be 'bfloat16' or 'float32', got {dtype!r}")
    if generation == "gen-2025-10" and weight_decay:
        raise ValueError(f"gen-2025-10 Muon has no weight decay; got weight_decay={weight_decay}, pass 0.0")
    lrs = np.asarray(lrs, np.float64)
    cdtype = bf16 if dtype == "bfloat16" else f32
    has_vr = BETA2[generation] is not None

    def second_moment(p):
        r, c = p.shape[-2:]
        return jnp.zeros(p.shape[:-2] + ((r, 1) if r >= c else (1, c)), f32)

    def init(params):
        for p in jax.tree.leaves(params):
            if p.ndim < 2:
                raise ValueError(f"Muon needs matrices; got a parameter of shape {p.shape}")
        momentum = jax.tree.map(lambda p: jnp.zeros(p.shape, f32), params)
        variance = jax.tree.map(second_moment, params) if has_vr else None
        return MuonState(jnp.zeros([], jnp.int32), momentum, variance)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("Muon needs params (cautious weight decay); call update(grads, state, params)")
        g_leaves, treedef = jax.tree.flatten(grads)
        n = len(g_leaves)
        cols = [g_leaves, treedef.flatten_up_to(params), treedef.flatten_up_to(state.momentum),
                treedef.flatten_up_to(state.variance) if has_vr else [None] * n]
        idx = jnp.minimum(state.count, len(lrs) - 1)
        out: list = [None] * n
        # Stack the matrices of one shape and update them together, as nanochat does (same math).
        # A leaf stacked over layers joins the stack matrix by matrix: one (K, rows, cols) batch,
        # as XLA's CPU matmuls with two batch axes run far slower than with one.
        for shape in sorted({tuple(g.shape[-2:]) for g in g_leaves}):
            members = [i for i in range(n) if tuple(g_leaves[i].shape[-2:]) == shape]
            ends = np.cumsum([math.prod(g_leaves[i].shape[:-2]) for i in members])
            stacked = [None if c[0] is None else sharding.constrain(  # fsdp: each device its share of the stack
                       jnp.concatenate([c[i].reshape(-1, *c[i].shape[-2:]) for i in members]), ("matrices",))
                       for c in cols]
            res = _stack_update(*stacked, idx, lrs=lrs, generation=generation, dtype=cdtype,
                                weight_decay=weight_decay)
            for j, i in enumerate(members):
                lead, lo = g_leaves[i].shape[:-2], ends[j - 1] if j else 0
                out[i] = tuple(None if r is None else r[lo:ends[j]].reshape(*lead, *r.shape[-2:]) for r in res)
        updates, momentum, variance = (treedef.unflatten([o[k] for o in out]) for k in range(3))
        return updates, MuonState(state.count + 1, momentum, variance if has_vr else None)

    return optax.GradientTransformation(init, update)
