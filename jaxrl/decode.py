"""KV-cache inference for the sampler: prefill left-padded prompts, then one token per row per step.

Two cache layouts, both read by the model's own trunk through an attention "view":
- `KVCache` + `decode_step`: one (L,B,S,K,Dh) cache, slot s of row b = position s − pad[b]
  (left padding puts every row's next token in the same slot: one in-place update per step);
- `SharedCache` + `decode_shared` (what the sampler runs): N samples per prompt read the prompt's
  keys once per prompt, and their own generated keys from per-row blocks of GEN_BLOCK columns
  (stored in the layouts the attention einsums read, one buffer per block stacked over the
  layers, so a decode step writes one column per layer in place).
Every cache array has a leading layer axis: the model's layer scan (jaxrl/stack.py) carries the
cache and each layer writes and reads its own slice. Where the layers run unrolled, the sampler's
cache is `stack.Layers` instead (one array per layer), so a decode step copies no layer out of a
stack.

Test: `pytest tests/test_model.py` (cache = full forward) and `pytest tests/test_sampler.py`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrl import model as gpt
from jaxrl import stack
from jaxrl.model import GPTConfig, Params

GEN_BLOCK = 64  # generated keys/values live in blocks of this many columns (the sampler's decode phases)


class KVCache(NamedTuple):
    """Decode state. Slot s of a row holds the key/value of that row's absolute position s."""

    k: jax.Array  # (L, B, S, K, Dh)
    v: jax.Array  # (L, B, S, K, Dh)
    prev_emb: jax.Array  # (B, D) pre-smear embedding of the last token (gen-2026-07; zeros otherwise)


class SlotView:
    """Decode against one (L,B,S,K,Dh) cache: every row writes slot `slot`; slot s of row b holds
    position s - pad[b]. State: (k, v)."""

    def __init__(self, k, v, slot, pad):
        self.state, self.slot, self.pad = (k, v), slot, pad

    def attend(self, state, i, q, k, v, positions, window):
        ck, cv = state
        ck = jax.lax.dynamic_update_slice(ck, k[None].astype(ck.dtype), (i, 0, self.slot, 0, 0))
        cv = jax.lax.dynamic_update_slice(cv, v[None].astype(cv.dtype), (i, 0, self.slot, 0, 0))
        k_pos = jnp.arange(ck.shape[2], dtype=jnp.int32)[None, :] - self.pad[:, None]
        y = gpt.attend(q, ck[i].astype(q.dtype), cv[i].astype(q.dtype), positions, k_pos, window)
        return y, (ck, cv)


class SharedView:
    """Decode for N samples per prompt: the prompt's keys are read once per prompt, each row's
    generated keys from its own blocks of GEN_BLOCK columns, of which only the first
    `gen_len` columns (whole blocks) are read; column `col` lies in the last of them.
    State: (kg, vg), the cache's generated blocks."""

    def __init__(self, cache: "SharedCache", col, pad, gen_len: int):
        self.c, self.col, self.pad, self.gen_len = cache, col, pad, gen_len
        self.state = (cache.kg, cache.vg)

    def attend(self, state, i, q, k, v, positions, window):
        c = self.c
        n_blocks = -(-self.gen_len // GEN_BLOCK)
        last = n_blocks - 1
        # write column `col` of layer i into its block (keys (L,R,K,Dh,B), values (L,R,K,B,Dh): per
        # layer the operand layouts of the einsums below, so a step writes one column in place)
        kgs, vgs = state
        off = self.col - last * GEN_BLOCK
        kb = stack.write_layer(kgs[last], i, jnp.transpose(k, (0, 2, 3, 1)), (0, 0, 0, off))
        vb = stack.write_layer(vgs[last], i, jnp.transpose(v, (0, 2, 1, 3)), (0, 0, off, 0))
        kgs, vgs = kgs[:last] + (kb,) + kgs[n_blocks:], vgs[:last] + (vb,) + vgs[n_blocks:]
        kg = [b[i] for b in kgs[:n_blocks]]
        vg = [b[i] for b in vgs[:n_blocks]]
        P, Tp, K = c.kp[0].shape[:3]
        R, _, H, hd = q.shape
        N = R // P
        G = sum(b.shape[-1] for b in kg)
        qp = q.reshape(P, N, K, H // K, hd)
        qr = q.reshape(R, K, H // K, hd)
        sp = jnp.einsum("pnkgd,pskd->pnkgs", qp, c.kp[i].astype(q.dtype), preferred_element_type=jnp.float32)
        sg = [jnp.einsum("rkgd,rkds->rkgs", qr, b.astype(q.dtype), preferred_element_type=jnp.float32) for b in kg]
        kp_pos = jnp.arange(Tp, dtype=jnp.int32)[None, :] - self.pad[:, None]  # (P, Tp)
        kg_pos = (Tp - self.pad)[:, None] + jnp.arange(G, dtype=jnp.int32)[None, :]  # (P, G)
        kp_pos = jnp.repeat(kp_pos, N, axis=0, total_repeat_length=R)
        kg_pos = jnp.repeat(kg_pos, N, axis=0, total_repeat_length=R)
        ok_p = gpt.attention_mask(positions, kp_pos, window)[:, 0]  # (R, Tp); positions (R, 1)
        ok_g = gpt.attention_mask(positions, kg_pos, window)[:, 0]  # (R, G)
        low = jnp.finfo(jnp.float32).min
        scores = jnp.concatenate([jnp.where(ok_p[:, None, None], sp.reshape(R, K, H // K, Tp), low),
                                  jnp.where(ok_g[:, None, None], jnp.concatenate(sg, axis=-1), low)],
                                 axis=-1) / math.sqrt(hd)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        pp = probs[..., :Tp].reshape(P, N, K, H // K, Tp)
        y = jnp.einsum("pnkgs,pskd->pnkgd", pp, c.vp[i].astype(q.dtype),
                       preferred_element_type=jnp.float32).reshape(R, K, H // K, hd)
        start = Tp
        for b in vg:
            width = b.shape[2]
            y = y + jnp.einsum("rkgs,rksd->rkgd", probs[..., start:start + width], b.astype(q.dtype),
                               preferred_element_type=jnp.float32)
            start += width
        return y.astype(q.dtype).reshape(R, 1, H, hd), (kgs, vgs)


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
    x, (k, v), e_last = gpt.trunk(config, params, idx, positions)
    widths = ((0, 0), (0, 0), (0, cache_len - T), (0, 0), (0, 0))
    return gpt.logits_from_hidden(config, params, x[:, -1]), KVCache(jnp.pad(k, widths), jnp.pad(v, widths), e_last)


def decode_step(config: GPTConfig, params: Params, tokens, slot, pad, cache: KVCache):
    """One token per row at cache slot `slot` (scalar): tokens (B,), pad (B,).

    Returns (logits (B,V) f32, updated cache).
    """
    idx = tokens[:, None].astype(jnp.int32)
    positions = (slot - pad)[:, None].astype(jnp.int32)
    view = SlotView(cache.k, cache.v, slot, pad)
    x, (k, v), e = gpt.trunk(config, params, idx, positions, cache=view, prev_emb=cache.prev_emb)
    return gpt.logits_from_hidden(config, params, x[:, 0]), KVCache(k, v, e.astype(cache.prev_emb.dtype))


class SharedCache(NamedTuple):
    """Decode state of N samples per prompt (rows prompt-major: row = prompt * N + sample)."""

    kp: jax.Array  # (L, P, Tp, K, Dh) prompt keys, shared by the prompt's samples
    vp: jax.Array  # (L, P, Tp, K, Dh)
    kg: tuple  # per block of GEN_BLOCK columns: (L, R, K, Dh, B) keys of generated tokens
    vg: tuple  # the same blocks of their values, (L, R, K, B, Dh)
    # (every array here is `stack.Layers` of its L per-layer arrays where the layers run unrolled)
    prev_emb: jax.Array  # (R, D) pre-smear embedding of the last token (gen-2026-07)


def shared_cache(config: GPTConfig, cache: KVCache, num_samples: int, max_new_tokens: int) -> SharedCache:
    """From a prefill cache of P prompts (S = Tp) to the decode state of P * num_samples rows
    (stacked arrays, or `stack.Layers` when the layers run unrolled)."""
    L, P, Tp, K, hd = cache.k.shape
    R = P * num_samples
    widths = [min(GEN_BLOCK, max_new_tokens - s) for s in range(0, max_new_tokens, GEN_BLOCK)]
    kg = tuple(jnp.zeros((L, R, K, hd, w), cache.k.dtype) for w in widths)
    vg = tuple(jnp.zeros((L, R, K, w, hd), cache.k.dtype) for w in widths)
    prev = jnp.repeat(cache.prev_emb, num_samples, axis=0, total_repeat_length=R)
    kp, vp = cache.k, cache.v
    if not stack.scan_layers(config.n_layer):
        kp, vp, kg, vg = jax.tree.map(lambda a: stack.Layers(a[i] for i in range(L)), (kp, vp, kg, vg))
    return SharedCache(kp, vp, kg, vg, prev)


def decode_shared(config: GPTConfig, params: Params, tokens, col, pad, cache: SharedCache, gen_len: int):
    """One token per row at generated column `col`: tokens (R,), pad (P,) of the prompts.

    Attends to the prompt (read once per prompt) and to generated columns [0, gen_len): `gen_len` is
    static, the end of the GEN_BLOCK block that holds `col` (or max_new_tokens), so early columns
    read less. Returns (logits (R,V) f32, cache).
    """
    P, Tp = pad.shape[0], cache.kp[0].shape[1]
    R = tokens.shape[0]
    row_pad = jnp.repeat(pad, R // P, axis=0, total_repeat_length=R)
    positions = ((Tp - row_pad) + col)[:, None].astype(jnp.int32)
    view = SharedView(cache, col, pad, gen_len)
    x, (kg, vg), e = gpt.trunk(config, params, tokens[:, None].astype(jnp.int32), positions, cache=view,
                               prev_emb=cache.prev_emb)
    return gpt.logits_from_hidden(config, params, x[:, 0]), cache._replace(kg=kg, vg=vg,
                                                                            prev_emb=e.astype(cache.prev_emb.dtype))
