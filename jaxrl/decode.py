"""KV-cache inference for the sampler: prefill left-padded prompts, then one token per row per step.

Two cache layouts, both read by the model's own trunk through an attention "view":
- `KVCache` + `decode_step`: one (L,B,S,K,Dh) cache, slot s of row b = position s − pad[b]
  (left padding puts every row's next token in the same slot: one in-place update per step);
- `SharedCache` + `decode_shared` (what the sampler runs): N samples per prompt read the prompt's
  keys once per prompt, and their own generated keys from per-row blocks of GEN_BLOCK columns
  (stored in the layouts the attention einsums read, one buffer per block stacked over the
  layers, so a decode step writes one column per layer in place);
- `SlotCache` + `decode_slots` (the sampler's slots): each slot holds one (prompt, sample) pair at
  its own column, with its own copy of its prompt's keys (`refill_slots` copies another prompt's
  in from `Prompts`, the prefill of every prompt of the call) in the generated blocks' layout.
Every cache array has a leading layer axis: the model's layer scan (jaxrl/stack.py) carries the
cache and each layer writes and reads its own slice. Where the layers run unrolled, the sampler's
cache is `stack.Layers` instead (one array per layer), so a decode step copies no layer out of a
stack.

Test: `pytest tests/test_model.py` (cache = full forward) and `pytest tests/test_sampler.py`.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

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
        kgs, vgs = self.write(state, i, k, v, n_blocks)
        kg = [b[i] for b in kgs[:n_blocks]]
        vg = [b[i] for b in vgs[:n_blocks]]
        Tp, K = self.prompt_len(), kg[0].shape[1]
        R, _, H, hd = q.shape
        G = sum(b.shape[-1] for b in kg)
        qr = q.reshape(R, K, H // K, hd)
        sp = self.prompt_scores(c.kp[i], q)  # (R, K, H // K, Tp)
        sg = [jnp.einsum("rkgd,rkds->rkgs", qr, b.astype(q.dtype), preferred_element_type=jnp.float32) for b in kg]
        row_pad = self.row_pad(R)
        kp_pos = jnp.arange(Tp, dtype=jnp.int32)[None, :] - row_pad[:, None]  # (R, Tp)
        kg_pos = (Tp - row_pad)[:, None] + jnp.arange(G, dtype=jnp.int32)[None, :]  # (R, G)
        ok_p = gpt.attention_mask(positions, kp_pos, window)[:, 0]  # (R, Tp); positions (R, 1)
        ok_g = gpt.attention_mask(positions, kg_pos, window)[:, 0]  # (R, G)
        low = jnp.finfo(jnp.float32).min
        scores = jnp.concatenate([jnp.where(ok_p[:, None, None], sp, low),
                                  jnp.where(ok_g[:, None, None], jnp.concatenate(sg, axis=-1), low)],
                                 axis=-1) / math.sqrt(hd)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        y = self.prompt_values(c.vp[i], probs[..., :Tp])
        start = Tp
        for b in vg:
            width = b.shape[2]
            y = y + jnp.einsum("rkgs,rksd->rkgd", probs[..., start:start + width], b.astype(q.dtype),
                               preferred_element_type=jnp.float32)
            start += width
        return y.astype(q.dtype).reshape(R, 1, H, hd), (kgs, vgs)

    def write(self, state, i, k, v, n_blocks):
        """Column `col` of layer i into its block (keys (L,R,K,Dh,B), values (L,R,K,B,Dh): per layer
        the operand layouts of the einsums, so a step writes one column in place)."""
        kgs, vgs = state
        last = n_blocks - 1
        off = self.col - last * GEN_BLOCK
        kb = stack.write_layer(kgs[last], i, jnp.transpose(k, (0, 2, 3, 1)), (0, 0, 0, off))
        vb = stack.write_layer(vgs[last], i, jnp.transpose(v, (0, 2, 1, 3)), (0, 0, off, 0))
        return kgs[:last] + (kb,) + kgs[n_blocks:], vgs[:last] + (vb,) + vgs[n_blocks:]

    def prompt_len(self):
        return self.c.kp[0].shape[1]  # (P, Tp, K, Dh) per layer

    def row_pad(self, R):
        return jnp.repeat(self.pad, R // self.pad.shape[0], axis=0, total_repeat_length=R)

    def prompt_scores(self, kp, q):
        """q (R,1,H,Dh) against its prompt's keys kp (P,Tp,K,Dh), read once per prompt: (R,K,H/K,Tp) f32."""
        P, Tp, K = kp.shape[:3]
        R, _, H, hd = q.shape
        qp = q.reshape(P, R // P, K, H // K, hd)
        s = jnp.einsum("pnkgd,pskd->pnkgs", qp, kp.astype(q.dtype), preferred_element_type=jnp.float32)
        return s.reshape(R, K, H // K, Tp)

    def prompt_values(self, vp, probs):
        P, Tp = vp.shape[:2]
        R, K, G = probs.shape[:3]
        pp = probs.reshape(P, R // P, K, G, Tp)
        y = jnp.einsum("pnkgs,pskd->pnkgd", pp, vp.astype(probs.dtype), preferred_element_type=jnp.float32)
        return y.reshape(R, K, G, -1)


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
    R = cache.k.shape[1] * num_samples
    return _decode_cache(config, cache, jnp.repeat(cache.prev_emb, num_samples, axis=0, total_repeat_length=R),
                         max_new_tokens)


def _decode_cache(config, cache: KVCache, prev_emb, max_new_tokens: int) -> SharedCache:
    return SharedCache(*_with_gen_blocks(config, cache.k, cache.v, prev_emb.shape[0], max_new_tokens), prev_emb)


def _with_gen_blocks(config, kp, vp, rows: int, max_new_tokens: int):
    """(kp, vp, kg, vg): the prompt keys/values (L, ...) and zero generated blocks of `rows` rows in
    the einsums' layouts (keys (L,R,K,Dh,B), values (L,R,K,B,Dh)); all as `stack.Layers` when the
    layers run unrolled."""
    L, K, hd = kp.shape[0], config.n_kv_head, config.head_dim
    widths = [min(GEN_BLOCK, max_new_tokens - s) for s in range(0, max_new_tokens, GEN_BLOCK)]
    kg = tuple(jnp.zeros((L, rows, K, hd, w), kp.dtype) for w in widths)
    vg = tuple(jnp.zeros((L, rows, K, w, hd), kp.dtype) for w in widths)
    if not stack.scan_layers(config.n_layer):
        kp, vp, kg, vg = jax.tree.map(lambda a: stack.Layers(a[i] for i in range(L)), (kp, vp, kg, vg))
    return kp, vp, kg, vg


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



# ------------------------------------------------------------------------------------------
# Slots: the sampler's refill loop. Each slot holds one (prompt, sample) pair at its own column,
# with its own copy of its prompt's keys; a slot whose pair ended is refilled with another
# prompt's keys (copied from the prefill of all prompts), so no prompt is prefilled twice.


class SlotCache(NamedTuple):
    """Decode state of S slots. Every array has the leading layer axis (`stack.Layers` when unrolled)."""

    kp: Any  # (L, S, K, Dh, Tp) the slot's prompt keys, in the layout of the generated blocks
    vp: Any  # (L, S, K, Tp, Dh)
    kg: tuple  # per block of GEN_BLOCK columns: (L, S, K, Dh, B)
    vg: tuple  # (L, S, K, B, Dh)
    prev_emb: jax.Array  # (S, D) pre-smear embedding of the last token (gen-2026-07)
    pad: jax.Array  # (S,) int32; left padding of the slot's prompt


class Prompts(NamedTuple):
    """The prefill of every prompt of a call, in the slot layout, where refills copy from."""

    k: jax.Array  # (L, P, K, Dh, Tp)
    v: jax.Array  # (L, P, K, Tp, Dh)
    prev_emb: jax.Array  # (P, D)
    pad: jax.Array  # (P,)


def prefill_prompts(config: GPTConfig, params: Params, idx, pad, chunk: int):
    """Prefill P left-padded prompts (P,T), `chunk` prompts at a time (a lax.map over chunks, so
    the activations are those of `chunk` prompts; the last chunk repeats prompt 0). Returns
    (logits (P,V) f32 at each prompt's last slot, Prompts)."""
    P, T = idx.shape
    n = -(-P // chunk)
    if n == 1:
        logits, c = prefill(config, params, idx, pad, T)
    else:
        ids = jnp.concatenate([idx, jnp.broadcast_to(idx[:1], (n * chunk - P, T))]).reshape(n, chunk, T)
        pads = jnp.concatenate([pad, jnp.broadcast_to(pad[:1], (n * chunk - P,))]).reshape(n, chunk)
        logits, c = jax.lax.map(lambda a: prefill(config, params, a[0], a[1], T), (ids, pads))
        rows = lambda a, axis: jnp.moveaxis(a, 0, axis).reshape(  # noqa: E731  ((n, ..., chunk, ...) -> (..., P, ...))
            *a.shape[1:axis + 1], n * chunk, *a.shape[axis + 2:])[(slice(None),) * axis + (slice(0, P),)]
        logits, c = rows(logits, 0), KVCache(rows(c.k, 1), rows(c.v, 1), rows(c.prev_emb, 0))
    return logits, Prompts(jnp.transpose(c.k, (0, 1, 3, 4, 2)), jnp.transpose(c.v, (0, 1, 3, 2, 4)), c.prev_emb,
                           pad.astype(jnp.int32))


def slot_cache(config: GPTConfig, prompts: Prompts, prompt, max_new_tokens: int) -> SlotCache:
    """The decode state of len(prompt) slots, slot r starting on prompt `prompt[r]`."""
    blocks = _with_gen_blocks(config, prompts.k[:, prompt], prompts.v[:, prompt], prompt.shape[0], max_new_tokens)
    return SlotCache(*blocks, prompts.prev_emb[prompt], prompts.pad[prompt])


def refill_slots(prompts: Prompts, cache: SlotCache, slots, prompt) -> SlotCache:
    """Slots `slots` (F,) take prompts `prompt` (F,): their prompt keys, padding and last embedding
    are copied from `prompts` (a slot index >= S is skipped). Their generated columns are left as
    they are: a column past a slot's own is masked by position, and each is written before read."""
    def put(a, src):  # a (L, S, ...) or Layers; src (L, P, ...)
        if isinstance(a, stack.Layers):
            return stack.Layers(x.at[slots].set(src[i, prompt].astype(x.dtype), mode="drop")
                                for i, x in enumerate(a.arrays))
        return a.at[:, slots].set(src[:, prompt].astype(a.dtype), mode="drop")

    return cache._replace(kp=put(cache.kp, prompts.k), vp=put(cache.vp, prompts.v),
                          prev_emb=cache.prev_emb.at[slots].set(prompts.prev_emb[prompt].astype(cache.prev_emb.dtype),
                                                                mode="drop"),
                          pad=cache.pad.at[slots].set(prompts.pad[prompt], mode="drop"))


class RefillView(SharedView):
    """Decode for slots, slot r at its own column col[r]: reads its own prompt keys (same layout as
    a generated block) and its own generated columns; column col[r] is written into whichever
    block holds it. Columns past a slot's own are masked by position."""

    def __init__(self, cache: SlotCache, col, gen_len: int):
        super().__init__(cache, col, cache.pad, gen_len)

    def write(self, state, i, k, v, n_blocks):
        kgs, vgs = list(state[0]), list(state[1])
        rows = jnp.arange(k.shape[0])
        for b in range(n_blocks):
            width = kgs[b][i].shape[-1]
            off = self.col - b * GEN_BLOCK
            off = jnp.where((off >= 0) & (off < width), off, width)  # elsewhere: out of range, dropped
            kgs[b] = stack.scatter_layer(kgs[b], i, (rows, slice(None), slice(None), off), k[:, 0])
            vgs[b] = stack.scatter_layer(vgs[b], i, (rows, slice(None), off, slice(None)), v[:, 0])
        return tuple(kgs), tuple(vgs)

    def prompt_len(self):
        return self.c.kp[0].shape[-1]  # (S, K, Dh, Tp) per layer

    def row_pad(self, R):
        return self.pad

    def prompt_scores(self, kp, q):
        R, _, H, hd = q.shape
        K = kp.shape[1]
        return jnp.einsum("rkgd,rkds->rkgs", q.reshape(R, K, H // K, hd), kp.astype(q.dtype),
                          preferred_element_type=jnp.float32)

    def prompt_values(self, vp, probs):
        return jnp.einsum("rkgs,rksd->rkgd", probs, vp.astype(probs.dtype), preferred_element_type=jnp.float32)


def decode_slots(config: GPTConfig, params: Params, tokens, col, cache: SlotCache, gen_len: int):
    """One token per slot, slot r at its own generated column col[r]: tokens, col (S,). Reads
    generated columns [0, gen_len) (static; more than the largest col). Returns (logits (S,V) f32, cache)."""
    Tp = cache.kp[0].shape[-1]
    positions = ((Tp - cache.pad) + col)[:, None].astype(jnp.int32)
    view = RefillView(cache, col, gen_len)
    x, (kg, vg), e = gpt.trunk(config, params, tokens[:, None].astype(jnp.int32), positions, cache=view,
                               prev_emb=cache.prev_emb)
    return gpt.logits_from_hidden(config, params, x[:, 0]), cache._replace(kg=kg, vg=vg,
                                                                            prev_emb=e.astype(cache.prev_emb.dtype))
