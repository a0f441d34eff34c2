"""The nanochat GPT, all three generations, as pure JAX functions over a params pytree.

Owns: `GPTConfig` (nanochat's GPTConfig fields plus the generation and the compute dtype) and
the full-sequence forward used for training (packed rows too). jaxrl/params.py holds the
parameter table (names, shapes and saved dtypes of nanochat's state dict) and init, re-exported
here; jaxrl/decode.py runs the same trunk with a KV cache for the sampler.

Params are a nested dict made by splitting nanochat's state-dict keys on ".", the blocks stacked
over a leading layer axis (`transformer.h.<i>.attn.c_q.weight` is `params["transformer"]["h"]["attn"]
["c_q"]["weight"][i]`; see jaxrl/params.py), PyTorch's `(out_features, in_features)` layout kept:
no transposes, and Muon sees the same (rows, cols) as nanochat.

Axis letters: B batch, T query len, S key len (cache length), D model (n_embd), H heads,
K kv heads, Dh head dim, V vocab, L layers.
Attention of full sequences (training, prefill): `GPTConfig.attention` (RLConfig's `attention`, or the
JAXRL_ATTENTION override: `attention_impl`) = einsum | xla | cudnn (see `full_attention`).

Test: `pytest tests/test_model.py` (causality, cache = full forward, bf16), tests/test_stack.py (scan
= unrolled) and tests/test_convert.py (golden logits of every generation; needs torch).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl import params as _params, sharding, stack
from jaxrl.config import ATTENTIONS, GENERATIONS

# The parameter table, init and (un)flattening live in jaxrl/params.py; callers reach them here too.
Params = _params.Params
SMEAR_CHANNELS = _params.SMEAR_CHANNELS
param_table, init_params = _params.param_table, _params.init_params
flatten_params, unflatten_params = _params.flatten_params, _params.unflatten_params

RMS_EPS = float(np.finfo(np.float32).eps)  # F.rms_norm's default eps for fp32 and bf16 inputs
SOFTCAP = 15.0


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """nanochat's GPTConfig fields plus which generation's forward to run and in which dtype."""

    sequence_len: int = 256
    vocab_size: int = 2048
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4
    n_embd: int = 256
    window_pattern: str = "L"  # over {S, L}; gen-2025-10 has no windows and ignores it
    generation: str = "gen-2026-07"
    compute_dtype: str = "float32"  # "bfloat16" rounds where nanochat's CUDA path rounds
    attention: str = "einsum"  # kernel of full-sequence attention, one of ATTENTIONS (static: jit keys on it)

    def __post_init__(self):
        if self.generation not in GENERATIONS:
            raise ValueError(f"unknown generation {self.generation!r}; expected one of {', '.join(GENERATIONS)}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be 'float32' or 'bfloat16', found {self.compute_dtype!r}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTIONS)}, found {self.attention!r}")
        for name in ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"model_config.{name} must be a positive int, found {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not divisible by n_kv_head {self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - {"S", "L"}:
            raise ValueError(f"window_pattern must be a non-empty string over S/L, found {self.window_pattern!r}")

    # -- derived quantities (docs/nanochat.md#derived-quantities) --
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        if self.generation == "gen-2025-10":
            return self.vocab_size
        return -(-self.vocab_size // 64) * 64

    @property
    def has_lambdas(self) -> bool:
        return self.generation != "gen-2025-10"

    @property
    def has_smear(self) -> bool:
        return self.generation == "gen-2026-07"

    @property
    def rotary_base(self) -> float:
        return 100_000.0 if self.generation == "gen-2026-07" else 10_000.0

    @property
    def qk_scale(self) -> float:
        return 1.2 if self.generation == "gen-2026-07" else 1.0

    @property
    def ve_gate(self) -> tuple[float, int]:
        """(scale, channels) of the value-embedding gate."""
        return (3.0, 12) if self.generation == "gen-2026-07" else (2.0, 32)

    @property
    def dtype(self):
        return jnp.bfloat16 if self.compute_dtype == "bfloat16" else jnp.float32

    def has_ve(self, i: int) -> bool:
        return self.has_lambdas and i % 2 == (self.n_layer - 1) % 2

    def window_sizes(self) -> tuple[int | None, ...]:
        """Left window per layer (query at p sees p-W..p); None = no window (gen-2025-10)."""
        if self.generation == "gen-2025-10":
            return (None,) * self.n_layer
        s = self.sequence_len
        short = s // 2 if self.generation == "gen-2026-01" else 128 * math.ceil(math.ceil(s / 4) / 128)
        pattern = self.window_pattern.upper()
        sizes = [s if pattern[i % len(pattern)] == "L" else short for i in range(self.n_layer)]
        sizes[-1] = s
        return tuple(sizes)

    def model_config(self) -> dict:
        """The `model_config` dict nanochat writes in meta JSON for this generation."""
        keys = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd"]
        keys += [] if self.generation == "gen-2025-10" else ["window_pattern"]
        return {k: getattr(self, k) for k in keys}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; expected a subset of {sorted(names)}")
        return cls(**d)

    def replace(self, **kw) -> "GPTConfig":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------
# Building blocks


def rms_norm(x):
    """F.rms_norm without weight: fp32 math, result in the input dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + RMS_EPS)).astype(x.dtype)


def linear(x, w):
    """y = x · wᵀ with w in torch layout (out, in), computed in x's dtype."""
    return _x_wt(x, w.astype(x.dtype))


@jax.custom_vjp
def _x_wt(x, w):
    return jnp.einsum("...i,oi->...o", x, w)


def _x_wt_fwd(x, w):
    return _x_wt(x, w), (x, w)


def _x_wt_bwd(res, g):
    """dx = g·w; dw = (xᵀ·g)ᵀ. Autodiff's own dw = gᵀ·x makes XLA's CPU dots read g (tokens ×
    out, e.g. the (tokens × vocab) logit gradient) transposed, which it materialises in a slow
    strided fusion; xᵀ·g reads g as it is and transposes only the (in × out) result."""
    x, w = res
    dx = jnp.einsum("...o,oi->...i", g, w)
    dw = jnp.einsum("ti,to->io", x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])).T
    return dx, dw


_x_wt.defvjp(_x_wt_fwd, _x_wt_bwd)


def rotary(config: GPTConfig, positions):
    """cos, sin of shape (B, T, 1, Dh/2) for integer positions (B, T), rounded as nanochat rounds."""
    hd = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rotary_base) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)[None, None, :]
    table_dtype = config.dtype if config.generation == "gen-2026-07" else jnp.bfloat16
    cos = jnp.cos(angle).astype(table_dtype)[:, :, None, :]
    sin = jnp.sin(angle).astype(table_dtype)[:, :, None, :]
    return cos, sin


def apply_rotary(x, cos, sin):
    """Half-split rotation by -θ (nanochat's sign): (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    return jnp.concatenate([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], axis=-1)


class Packing(NamedTuple):
    """Several sequences laid end to end in each row (training). A sequence may continue a shared
    prefix: the samples of one prompt attend to one copy of the prompt."""

    segments: jax.Array  # (B,T) int32 id of each token's piece (prefix or continuation)
    parents: jax.Array  # (B,T) int32 id of the prefix a continuation extends (its own id otherwise)
    prev_index: jax.Array  # (B,T) int32 index of the previous token of the same sequence (smear)


def attention_mask(q_pos, k_pos, window: int | None, packing: Packing | None = None):
    """(B,T,S) bool: causal over absolute positions, keys at negative positions (left padding)
    hidden, an optional left window, and with `packing` only the query's own piece and the prefix
    that piece continues."""
    delta = q_pos[:, :, None] - k_pos[:, None, :]  # (B,T,S)
    mask = (delta >= 0) & (k_pos[:, None, :] >= 0)
    if window is not None:
        mask = mask & (delta <= window)
    if packing is not None:
        seg_k = packing.segments[:, None, :]
        mask = mask & ((seg_k == packing.segments[:, :, None]) | (seg_k == packing.parents[:, :, None]))
    return mask


def attend(q, k, v, q_pos, k_pos, window: int | None, packing: Packing | None = None):
    """Grouped-query attention with a causal (and optional left-window) mask over absolute positions.

    q (B,T,H,Dh), k/v (B,S,K,Dh), q_pos (B,T), k_pos (B,S) -> (B,T,H,Dh). Keys at negative
    positions (left padding of shorter prompts) are never attended to. With `packing` (S == T):
    a query sees only keys of its own piece and of the prefix its piece continues.
    """
    B, T, H, hd = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, hd)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    mask = attention_mask(q_pos, k_pos, window, packing)
    # finite: a padding query with no visible key gets a harmless uniform row instead of NaN
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.astype(q.dtype).reshape(B, T, H, hd)


def attend_fused(q, k, v, q_pos, k_pos, window: int | None, packing: Packing | None = None, *,
                 implementation: str = "xla"):
    """`attend` through jax.nn.dot_product_attention ("cudnn": cuDNN's fused attention, bf16/fp16
    on NVIDIA GPUs only; "xla": JAX's reference path). Same mask, declared causal as well (keys
    never follow their query in a row, packed or not). Each query also sees its own slot, so a
    padding query with no visible key stays finite; no real query's output changes."""
    mask = attention_mask(q_pos, k_pos, window, packing)
    T, S = mask.shape[1:]
    if T == S:
        mask = mask | jnp.eye(T, dtype=bool)[None]
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=T == S, implementation=implementation)
    return out.astype(q.dtype)


def attention_impl(configured: str = "einsum") -> str:
    """The attention a script runs: JAXRL_ATTENTION when set (it overrides the `attention` config key),
    else `configured`. ValueError for an unknown value or cudnn off an NVIDIA GPU; scripts call it at start."""
    name = "JAXRL_ATTENTION" if "JAXRL_ATTENTION" in os.environ else "attention"
    impl = os.environ.get("JAXRL_ATTENTION", configured)
    if impl not in ATTENTIONS:
        raise ValueError(f"{name} must be einsum, xla or cudnn, found {impl!r}: unset it (einsum) or fix it")
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError(f"{name}=cudnn needs an NVIDIA GPU, found {jax.default_backend()!r}: unset it or set xla")
    return impl


def full_attention(config: GPTConfig):
    """The attention of training and prefill: `config.attention`, a static setting fixed at trace time."""
    return attend if config.attention == "einsum" else functools.partial(attend_fused, implementation=config.attention)


def _block_attn(config, lx, vx, u, idx, positions, cache, cstate, rope, packing):
    """Attention of one layer (`lx`: its weights and scalars; `vx`: its value embedding or None).
    Returns (out (B,T,D), (k, v) of this chunk, the cache state after this layer's write)."""
    B, T, _ = u.shape
    H, K, hd = config.n_head, config.n_kv_head, config.head_dim
    a = lx["attn"]
    q = linear(u, a["c_q"]["weight"]).reshape(B, T, H, hd)
    k = linear(u, a["c_k"]["weight"]).reshape(B, T, K, hd)
    v = linear(u, a["c_v"]["weight"]).reshape(B, T, K, hd)
    if vx is not None:
        scale, ch = config.ve_gate
        ve = vx["table"][idx].astype(u.dtype).reshape(B, T, K, hd)
        gate = scale * jax.nn.sigmoid(linear(u[..., :ch], vx["gate"]))
        v = v + gate[..., None] * ve
    cos, sin = rope
    q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))
    if config.qk_scale != 1.0:
        q, k = q * jnp.asarray(config.qk_scale, q.dtype), k * jnp.asarray(config.qk_scale, k.dtype)
    window = lx.get("window")
    if cache is None:
        y = full_attention(config)(q, k, v, positions, positions, window, packing)
    else:
        y, cstate = cache.attend(cstate, lx["index"], q, k, v, positions, window)
    return linear(y.reshape(B, T, H * hd), a["c_proj"]["weight"]), (k, v), cstate


def _embed(config, params, idx, prev_emb, positions, prev_index=None):
    """Normalised token embedding with smear (gen-2026-07). Returns (x, pre-smear e).

    Smear reads the previous token's pre-smear embedding (`prev_emb` for the chunk's first
    token); a token at position 0 (or in left padding) has no previous token and is not smeared.
    """
    e = rms_norm(sharding.gather(params["transformer"]["wte"]["weight"])[idx].astype(config.dtype))
    if not config.has_smear:
        return e, e
    lam = params["smear_lambda"].astype(e.dtype)[0]
    gate_w = params["smear_gate"]["weight"]
    gate = jax.nn.sigmoid(linear(e[..., :SMEAR_CHANNELS], gate_w))  # (B,T,1)
    if prev_index is None:
        prev = jnp.concatenate([prev_emb[:, None, :].astype(e.dtype), e[:, :-1]], axis=1)
    else:  # packed rows: the previous token of the same sequence (a shared prefix's last token)
        prev = jnp.take_along_axis(e, prev_index[..., None], axis=1)
    prev = jnp.where((positions > 0)[..., None], prev, jnp.zeros_like(prev))
    return e + lam * gate * prev, e


def trunk(config: GPTConfig, params: Params, idx, positions, cache=None, prev_emb=None,
          packing: Packing | None = None, *, scan: bool | None = None, remat: bool = False):
    """Embedding, blocks (jaxrl/stack.py: scanned or unrolled), backout and final norm.

    idx, positions (B,T). Without a cache: causal attention within the chunk (training/prefill);
    positions are 0..T-1, or shifted left by a row's padding (negative = padding, never attended).
    With a cache view (T=1 decode, `decode.SlotView`/`SharedView`/`RefillView`), `view.attend(state, layer, q, k,
    v, positions, window) -> (y, state)` writes this token's k/v into the stacked `view.state`.
    `prev_emb` (B,D) is the previous token's pre-smear embedding (None: no smear for token 0).
    `packing` (no cache): several sequences packed in each row, each with its own positions from
    0; attention and smear stay within a sequence (see Packing).
    `scan`: lax.scan the layers (default stack.scan_layers); `remat`: recompute blocks in backward.
    Inside the fsdp train step, weights come as `sharding.Sharded` shards: each layer gathers its
    own when it runs (and again in the backward pass, instead of keeping them).
    Returns x (B,T,D) after the final norm; without a cache the per-layer (k, v), each
    (L,B,T,K,Dh), with a view its final state; and the last pre-smear embedding (B,D).
    """
    B, T = idx.shape
    if prev_emb is None:  # smear for position 0 has nothing to read
        prev_emb = jnp.zeros((B, config.n_embd), config.dtype)
    x, e = _embed(config, params, idx, prev_emb, positions, None if packing is None else packing.prev_index)
    x0, rope, backout_at = x, rotary(config, positions), config.n_layer // 2

    def layer(carry, lx, vx):
        x, xb, cstate = carry
        lx, vx = sharding.gather(lx), sharding.gather(vx)  # fsdp: this layer's whole weights (else identity)
        if "lambdas" in lx:
            x = lx["lambdas"][0].astype(x.dtype) * x + lx["lambdas"][1].astype(x.dtype) * x0
        out, kv, cstate = _block_attn(config, lx, vx, rms_norm(x), idx, positions, cache, cstate, rope, packing)
        x = x + out
        h = jax.nn.relu(linear(rms_norm(x), lx["mlp"]["c_fc"]["weight"]))
        x = x + linear(h * h, lx["mlp"]["c_proj"]["weight"])
        if config.has_smear:  # backout reads the residual after block n_layer // 2
            xb = jnp.where(lx["index"] == backout_at, x, xb)
        return (x, xb, cstate), (kv if cache is None else None)

    per_layer, per_ve = stack.layer_inputs(config, params)
    carry = (x, jnp.zeros_like(x) if config.has_smear else None, None if cache is None else cache.state)
    scan = stack.scan_layers(config.n_layer) if scan is None else scan
    if remat:
        layer = jax.checkpoint(layer)
    elif sharding.has_sharded(per_layer):  # keep everything for the backward pass but the gathered weights
        layer = jax.checkpoint(layer, policy=jax.checkpoint_policies.save_anything_except_these_names(
            sharding.GATHERED))
    (x, xb, cstate), kvs = stack.run_layers(layer, carry, per_layer, per_ve, config.n_layer, scan=scan)
    if config.has_smear:
        x = x - params["backout_lambda"].astype(x.dtype)[0] * xb
    return rms_norm(x), (kvs if cache is None else cstate), e[:, -1]


def logits_from_hidden(config: GPTConfig, params: Params, x):
    """(…, D) -> float32 (…, V): lm_head, crop the padded vocab, softcap 15 (bf16 in gen-2025-10 bf16 mode)."""
    logits = linear(x, sharding.gather(params["lm_head"]["weight"]))[..., : config.vocab_size]
    if config.generation == "gen-2025-10":  # softcap in the compute dtype: docs/nanochat.md#forward-of-gen-2025-10
        return (SOFTCAP * jnp.tanh(logits / SOFTCAP)).astype(jnp.float32)
    return SOFTCAP * jnp.tanh(logits.astype(jnp.float32) / SOFTCAP)


def forward(config: GPTConfig, params: Params, idx, positions=None, packing: Packing | None = None, *,
            scan: bool | None = None, remat: bool = False) -> jax.Array:
    """Full-sequence logits, float32 (B, T, V) after softcap and vocab crop.

    Default: one sequence per row at positions 0..T-1. Packed rows pass `positions` (from 0 in
    each sequence) and `packing`: then every token sees exactly what it would see alone in its
    own row.
    """
    idx = jnp.asarray(idx, jnp.int32)
    B, T = idx.shape
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    x, _, _ = trunk(config, params, idx, positions, packing=packing, scan=scan, remat=remat)
    return logits_from_hidden(config, params, x)


def token_nll(config: GPTConfig, params: Params, idx, targets) -> jax.Array:
    """Per-token negative log-likelihood (B, T), float32, exactly 0 where targets == -1."""
    return nll_from_logits(forward(config, params, idx), targets)


def nll_from_logits(logits, targets):
    targets = jnp.asarray(targets, jnp.int32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(targets >= 0, -picked, 0.0)
