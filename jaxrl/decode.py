"""KV-cache inference for the sampler: prefill left-padded prompts, then one token per row per step.

Two cache layouts, both read by the model's own trunk through an attention "view":
- `KVCache` + `decode_step`: one (L,B,S,K,Dh) cache, slot s of row b = position s − pad[b]
  (left padding puts every row's next token in the same slot: one in-place update per step);
- `SharedCache` + `decode_shared` (what the sampler runs): N samples per prompt read the prompt's
  keys once per prompt, and their own generated keys from a per-row buffer.

Test: `pytest tests/test_model.py` (cache = full forward) and `pytest tests/test_sampler.py`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrl import model as gpt
from jaxrl.model import GPTConfig, Params


class KVCache(NamedTuple):
    """Decode state. Slot s of a row holds the key/value of that row's absolute position s."""

    k: jax.Array  # (L, B, S, K, Dh)
    v: jax.Array  # (L, B, S, K, Dh)
    prev_emb: jax.Array  # (B, D) pre-smear embedding of the last token (gen-2026-07; zeros otherwise)


class SlotView:
    """Decode against one (L,B,S,K,Dh) cache: every row writes slot `slot`; slot s of row b holds
    position s - pad[b]."""

    def __init__(self, k, v, slot, pad):
        self.k, self.v, self.slot, self.pad = k, v, slot, pad

    def attend(self, i, q, k, v, positions, window):
        self.k = jax.lax.dynamic_update_slice(self.k, k[None].astype(self.k.dtype), (i, 0, self.slot, 0, 0))
        self.v = jax.lax.dynamic_update_slice(self.v, v[None].astype(self.v.dtype), (i, 0, self.slot, 0, 0))
        k_pos = jnp.arange(self.k.shape[2], dtype=jnp.int32)[None, :] - self.pad[:, None]
        return gpt.attend(q, self.k[i].astype(q.dtype), self.v[i].astype(q.dtype), positions, k_pos, window), None


class SharedView:
    """Decode for N samples per prompt: the prompt's keys are read once per prompt, each row's
    generated keys from its own buffer, of which only the first `gen_len` slots are read."""

    def __init__(self, cache: "SharedCache", col, pad, gen_len: int):
        self.c, self.col, self.pad, self.gen_len = cache, col, pad, gen_len

    def attend(self, i, q, k, v, positions, window):
        c = self.c
        kg = jax.lax.dynamic_update_slice(c.kg, k[None].astype(c.kg.dtype), (i, 0, self.col, 0, 0))
        vg = jax.lax.dynamic_update_slice(c.vg, v[None].astype(c.vg.dtype), (i, 0, self.col, 0, 0))
        self.c = c._replace(kg=kg, vg=vg)
        P, Tp = c.kp.shape[1], c.kp.shape[2]
        R, _, H, hd = q.shape
        K = c.kp.shape[3]
        N, G = R // P, self.gen_len
        qp = q.reshape(P, N, K, H // K, hd)
        sp = jnp.einsum("pnkgd,pskd->pnkgs", qp, c.kp[i].astype(q.dtype), preferred_element_type=jnp.float32)
        sg = jnp.einsum("rkgd,rskd->rkgs", q.reshape(R, K, H // K, hd), kg[i, :, :G].astype(q.dtype),
                        preferred_element_type=jnp.float32)
        q_pos = positions[:, 0]  # (R,)
        kp_pos = jnp.arange(Tp, dtype=jnp.int32)[None, :] - self.pad[:, None]  # (P, Tp)
        kg_pos = (Tp - self.pad)[:, None] + jnp.arange(G, dtype=jnp.int32)[None, :]  # (P, G)
        kp_pos = jnp.repeat(kp_pos, N, axis=0, total_repeat_length=R)
        kg_pos = jnp.repeat(kg_pos, N, axis=0, total_repeat_length=R)
        ok_p = (kp_pos >= 0) & (q_pos[:, None] >= kp_pos)
        ok_g = q_pos[:, None] >= kg_pos
        if window is not None:
            ok_p &= q_pos[:, None] - kp_pos <= window
            ok_g &= q_pos[:, None] - kg_pos <= window
        low = jnp.finfo(jnp.float32).min
        scores = jnp.concatenate([jnp.where(ok_p[:, None, None], sp.reshape(R, K, H // K, Tp), low),
                                  jnp.where(ok_g[:, None, None], sg, low)], axis=-1) / math.sqrt(hd)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        pp, pg = probs[..., :Tp].reshape(P, N, K, H // K, Tp), probs[..., Tp:]
        y = jnp.einsum("pnkgs,pskd->pnkgd", pp, c.vp[i].astype(q.dtype), preferred_element_type=jnp.float32)
        y = y.reshape(R, K, H // K, hd) + jnp.einsum("rkgs,rskd->rkgd", pg, vg[i, :, :G].astype(q.dtype),
                                                      preferred_element_type=jnp.float32)
        return y.astype(q.dtype).reshape(R, 1, H, hd), None


def prefill(config: GPTConfig, params: Params, idx, pad, cache_len: int):
    """Run left-padded prompts idx (B,T) once (row b starts after pad[b] padding tokens).

    Returns (logits at the last slot, float32 (B,V), KVCache with S = cache_len slots). Slot s of
    row b holds position s - pad[b]; padding slots have negative positions and are masked.
    Left padding puts every row's next token in the same slot, so decode writes the cache with
    one in-place dynamic_update_slice instead of a per-row scatter.
    """
    B, T = idx.shape
    assert cache_len >= T, f"cache_len {cache_len} < prompt bucket {T}"
    positions = jnp.arange(T, dtype=jnp.int32)[None, :] - pad[:, None]
    x, kvs, e_last = gpt.trunk(config, params, idx, positions)
    widths = ((0, 0), (0, cache_len - T), (0, 0), (0, 0))
    k = jnp.stack([jnp.pad(kv[0], widths) for kv in kvs])
    v = jnp.stack([jnp.pad(kv[1], widths) for kv in kvs])
    return gpt.logits_from_hidden(config, params, x[:, -1]), KVCache(k, v, e_last)


def decode_step(config: GPTConfig, params: Params, tokens, slot, pad, cache: KVCache):
    """One token per row at cache slot `slot` (scalar): tokens (B,), pad (B,).

    Returns (logits (B,V) f32, updated cache).
    """
    idx = tokens[:, None].astype(jnp.int32)
    positions = (slot - pad)[:, None].astype(jnp.int32)
    view = SlotView(cache.k, cache.v, slot, pad)
    x, _, e = gpt.trunk(config, params, idx, positions, cache=view, prev_emb=cache.prev_emb)
    return gpt.logits_from_hidden(config, params, x[:, 0]), KVCache(view.k, view.v, e.astype(cache.prev_emb.dtype))


class SharedCache(NamedTuple):
    """Decode state of N samples per prompt (rows prompt-major: row = prompt * N + sample)."""

    kp: jax.Array  # (L, P, Tp, K, Dh) prompt keys, shared by the prompt's samples
    vp: jax.Array  # (L, P, Tp, K, Dh)
    kg: jax.Array  # (L, R, M, K, Dh) keys of generated tokens, column j at slot j
    vg: jax.Array  # (L, R, M, K, Dh)
    prev_emb: jax.Array  # (R, D) pre-smear embedding of the last token (gen-2026-07)


def shared_cache(config: GPTConfig, cache: KVCache, num_samples: int, max_new_tokens: int) -> SharedCache:
    """From a prefill cache of P prompts (S = Tp) to the decode state of P * num_samples rows."""
    L, P, Tp, K, hd = cache.k.shape
    R = P * num_samples
    zeros = jnp.zeros((L, R, max_new_tokens, K, hd), cache.k.dtype)
    prev = jnp.repeat(cache.prev_emb, num_samples, axis=0, total_repeat_length=R)
    return SharedCache(cache.k, cache.v, zeros, zeros, prev)


def decode_shared(config: GPTConfig, params: Params, tokens, col, pad, cache: SharedCache, gen_len: int):
    """One token per row at generated column `col`: tokens (R,), pad (P,) of the prompts.

    Attends to the prompt (read once per prompt) and to generated slots [0, gen_len) (a static
    bound >= col + 1, so early columns read less). Returns (logits (R,V) f32, cache).
    """
    P, Tp = cache.kp.shape[1], cache.kp.shape[2]
    R = tokens.shape[0]
    row_pad = jnp.repeat(pad, R // P, axis=0, total_repeat_length=R)
    positions = ((Tp - row_pad) + col)[:, None].astype(jnp.int32)
    view = SharedView(cache, col, pad, gen_len)
    x, _, e = gpt.trunk(config, params, tokens[:, None].astype(jnp.int32), positions, cache=view,
                    prev_emb=cache.prev_emb)
    return gpt.logits_from_hidden(config, params, x[:, 0]), view.c._replace(prev_emb=e.astype(cache.prev_emb.dtype))
