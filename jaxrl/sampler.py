"""Rollouts: every completion of an RL step in one jitted call, calculator tool on the host.

Owns the jitted prefill + `lax.while_loop` decode, top-k/temperature sampling with explicit keys,
nanochat Engine's tool state machine (python blocks, forced `<|output_start|> … <|output_end|>`
tokens with mask 0), and the host seam to `jaxrl.calculator`.

How one call works (R = prompts × samples rows):
1. Prompts are left-padded to a bucketed length and prefilled once (P rows). Their keys stay in
   one per-prompt cache that all N samples attend to (read once per prompt, not per sample);
   generated tokens get per-row slots, and decode phase j reads only the first 64 (j + 1).
2. A `lax.while_loop` decodes one column per step for all rows and exits as soon as every row has
   emitted `<|assistant_end|>`/`<|bos|>`, or after `max_new_tokens` columns (forced tokens count).
   When only a quarter of the rows are still running (the long tail), those rows are gathered into
   a quarter-size state (each with its own copy of its prompt's keys) and decoded alone.
3. A row that closes a non-empty python block triggers `jax.pure_callback` under `lax.cond`, so the
   host is reached only on those steps (rows sent in chunks of at most CALLBACK_BYTES of history);
   it decodes the expression, runs the calculator and returns the tokens to force.
Slots (`slots` per device, `rollout_slots` in the config; when a device has more rows than that):
instead of steps 1-2, every prompt is prefilled up front (`slots` prompts at a time) and kept;
`slots` rows decode side by side, each at its own column, with its own copy of its prompt's keys.
When a row ends (terminal token or max_new_tokens), its slot takes the next (prompt, sample) pair
at the start of the next step: its prompt's keys are copied in from the prefill, its first logits
are the prompt's prefill logits, and its tool state is cleared (at most slots // REFILL_DIVISOR
slots per step, a fixed-size copy). The decode phases still apply, by the furthest column of any
busy slot. No step then waits on the longest row of a batch: a 500 x 8 pass@k turns 0.95 of its
row-steps into kept tokens instead of about half.
Rows are independent, so the call is `shard_map`ped over the devices; each row's keys derive from
(seed, step, example, sample, column) only, so rollouts are identical on any device count and
any slot count. With fewer prompts than devices, each prompt's samples are split over several
devices (`sample_split`: one prompt x 16 samples on 2 devices decodes 8 rows on each), the prompt
prefilled on each.

Test: `pytest tests/test_sampler.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxrl import decode
from jaxrl import sharding
from jaxrl import stack
from jaxrl.tokenizer import SpecialIds  # the one record of the special ids (plain ints)

PROMPT_BUCKET = 64  # prompt lengths are rounded up to a multiple of this: few compilations per run
PHASE = decode.GEN_BLOCK  # decode columns per phase: phase j attends to generated slots [0, 64 (j + 1)) only
COMPACT_DIVISOR = 4  # the loop shrinks to rows // 4 once no more than that many rows are running
REFILL_DIVISOR = 8  # a step refills at most slots // 8 slots (a fixed-size copy of prompt keys); others wait a step
SLOTS_PER_DEVICE = {"gpu": 256, "cuda": 256, "rocm": 256, "tpu": 256}  # see default_slots
CPU_SLOTS = 128  # a CPU host's slots, split over its CPU devices (they share its cores and memory bandwidth)
# Most bytes of token history one host call is sent; more rows go in several calls. jax copies a
# callback's arguments onto a CPU device, and XLA:CPU hands a copy over 100 KiB to its intra-op
# thread pool: with as many simulated CPU devices as that pool has threads, every thread can sit in
# a callback waiting for its own copy, and the rollout hangs (2 devices on 2 cores, 128 rows x 256
# columns). Copies under the limit are made in the calling thread.
CALLBACK_BYTES = 64 * 1024
TRACE_COUNTS: dict[str, int] = {}  # how often the rollout function was traced (tests count compiles)


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """Static knobs of one compiled rollout function."""

    num_samples: int
    max_new_tokens: int
    top_k: int  # 0: full vocabulary (already clamped to the vocab size)
    greedy: bool  # temperature == 0: argmax
    shared_first_token: bool  # gen-2025-10 quirk: all samples of a prompt share the first token
    queue_len: int  # most tokens one calculator result may force (incl. output_start/end)
    specials: SpecialIds
    pad_id: int  # written where a row has ended (nanochat pads with <|assistant_end|>)
    compact_rows: int = 0  # once at most this many local rows are still running, decode only them (0: never)
    slots: int = 0  # decode this many local rows at a time, refilling each as it ends (0: all rows at once)


class Rollout(NamedTuple):
    """Generated columns for R rows (prompt excluded); column j is the j-th generated token."""

    tokens: jax.Array  # (R, M) int32; pad_id after the row's end
    mask: jax.Array  # (R, M) int32; 1 sampled, 0 forced or past the end
    logp: jax.Array  # (R, M) f32; log-prob under the model (T=1, full vocab), 0 where mask is 0
    sample_logp: jax.Array  # (R, M) f32; log-prob under the sampling distribution (top-k, T)
    length: jax.Array  # (R,) int32; tokens kept (terminal token excluded)


def check_host_backend(platforms: str | None = None) -> None:
    """The calculator runs on the host through jax's CPU backend (`jax.pure_callback` puts its
    arguments on a CPU device). JAX_PLATFORMS (`platforms`, default jax's setting) that names
    backends but not `cpu` leaves none, and every rollout with the tool would fail inside the loop:
    refuse it up front with the fix."""
    platforms = jax.config.jax_platforms if platforms is None else platforms
    named = [p.strip() for p in (platforms or "").split(",") if p.strip()]
    if named and "cpu" not in named:
        raise ValueError(f"JAX_PLATFORMS={platforms!r} leaves out jax's CPU backend, which the calculator tool runs "
                         f"on (host callbacks); add it: JAX_PLATFORMS={','.join(named + ['cpu'])}")


class ToolBridge:
    """Host side of the calculator seam: token ids in, forced token ids out. Hashed by identity."""

    def __init__(self, tokenizer, calculator, queue_len: int):
        check_host_backend()
        self.tokenizer, self.calculator, self.queue_len = tokenizer, calculator, queue_len
        self.specials = SpecialIds.from_tokenizer(tokenizer)
        self.calls = 0  # expressions evaluated (for the tool-overhead benchmark)

    def __call__(self, tokens, expr_start, n, need):
        """tokens (R, M) of each row so far; a row's expression is tokens[r, expr_start[r]:n[r]] (`n`,
        the column of its python_end, is one int for every row or one per row) where need[r]."""
        tokens, expr_start, need = np.asarray(tokens), np.asarray(expr_start), np.asarray(need)
        n = np.broadcast_to(np.asarray(n), need.shape)
        queue = np.zeros((tokens.shape[0], self.queue_len), np.int32)
        qlen = np.zeros((tokens.shape[0],), np.int32)
        for r in np.flatnonzero(need):
            self.calls += 1
            result = self.calculator(self.tokenizer.decode(tokens[r, expr_start[r]:n[r]].tolist()))
            if result is None:
                continue
            forced = [self.specials.output_start, *self.tokenizer.encode(str(result)), self.specials.output_end]
            forced = forced[: self.queue_len]
            queue[r, : len(forced)] = forced
            qlen[r] = len(forced)
        return queue, qlen


def sample_tokens(logits, keys, temperature, spec: SampleSpec):
    """nanochat's sample_next_token per row: argmax at T=0, else top-k then temperature.

    logits (R,V) f32, keys (R,) typed keys. Returns (tokens (R,), logp under the model,
    logp under the sampling distribution).
    """
    model_logp = jax.nn.log_softmax(logits, axis=-1)
    if spec.greedy:
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        slogp = jnp.zeros(tok.shape, jnp.float32)
    elif spec.top_k:
        vals, idx = jax.lax.top_k(logits, spec.top_k)
        scaled = vals / temperature
        choice = jax.vmap(jax.random.categorical)(keys, scaled)
        tok = jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        slogp = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), choice[:, None], -1)[:, 0]
    else:
        scaled = logits / temperature
        tok = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        slogp = jnp.take_along_axis(jax.nn.log_softmax(scaled, -1), tok[:, None], -1)[:, 0]
    return tok, jnp.take_along_axis(model_logp, tok[:, None], -1)[:, 0], slogp


@struct.dataclass
class _State:
    """The decode loop's carry. R rows (prompt-major), P prompts, M = max_new_tokens, Q = queue_len,
    V vocab. In the compacted tail R is the compact row count and P = R (each row its own prompt)."""

    n: jax.Array  # () int32; the column being generated
    out: Rollout  # (R, M) columns so far; length (R,)
    done: jax.Array  # (R,) bool; the row has emitted its terminal token
    pad: jax.Array  # (P,) int32; left padding of each prompt (prompt slot s holds position s - pad)
    logits: jax.Array  # (R, V) f32; next-token logits
    cache: decode.SharedCache  # prompt keys (L, P, ...) shared by the prompt's rows; generated keys (R, ...)
    in_py: jax.Array  # (R,) bool; inside a python block
    expr_start: jax.Array  # (R,) int32; first column of the current expression
    queue: jax.Array  # (R, Q) int32; tokens the calculator's result forces
    qlen: jax.Array  # (R,) int32; forced tokens queued
    qhead: jax.Array  # (R,) int32; forced tokens already emitted


def _keys(spec: SampleSpec, row_keys, first_keys, col):
    """Each row's sampling key at its column col (R,): its own key folded with the column; with the
    gen-2025-10 shared first token, column 0 folds its prompt's key instead (sample index 0)."""
    keys = jax.vmap(jax.random.fold_in)(row_keys, col)
    if spec.shared_first_token:
        first = jax.vmap(jax.random.fold_in)(first_keys, col)
        keys = jax.random.wrap_key_data(jnp.where((col == 0)[:, None], jax.random.key_data(first),
                                                  jax.random.key_data(keys)))
    return keys


def _choose(spec: SampleSpec, s, keys, temperature):
    """This column's token per row: the calculator's next queued token if one is pending, else a
    sample from the row's logits. Returns (token, forced, ends, logp under the model, under the sampler)."""
    sp = spec.specials
    sampled, lp, slp = sample_tokens(s.logits, keys, temperature, spec)
    forced = s.qhead < s.qlen
    queued = jnp.take_along_axis(s.queue, jnp.minimum(s.qhead, spec.queue_len - 1)[:, None], 1)[:, 0]
    tok = jnp.where(forced, queued, sampled)
    return tok, forced, (tok == sp.assistant_end) | (tok == sp.bos), lp, slp


def _tool_state(spec: SampleSpec, tool, s, tok, keep, forced, col, history) -> dict:
    """nanochat Engine's python-block state machine after emitting `tok` at column col (R,) of each
    row (`keep`: the row kept it): a kept python_end that closes a non-empty block calls the host
    calculator on history[r, expr_start:col] (the rows' tokens so far) and queues its forced tokens.
    Returns the new in_py, expr_start, queue, qlen, qhead."""
    sp = spec.specials
    starts = keep & (tok == sp.python_start)
    closes = keep & (tok == sp.python_end) & s.in_py
    need = closes & (col > s.expr_start)
    queue, qlen, qhead = s.queue, s.qlen, s.qhead + forced.astype(jnp.int32)
    if tool is not None:
        def call_host(args):
            q, ql, qh = args
            nq, nql = _host_calls(tool, history, s.expr_start, col, need, q.shape[1])
            return jnp.where(need[:, None], nq, q), jnp.where(need, nql, ql), jnp.where(need, 0, qh)

        queue, qlen, qhead = jax.lax.cond(jnp.any(need), call_host, lambda a: a, (queue, qlen, qhead))
    return dict(in_py=jnp.where(starts, True, jnp.where(closes, False, s.in_py)),
                expr_start=jnp.where(starts, col + 1, s.expr_start), queue=queue, qlen=qlen, qhead=qhead)


def _host_calls(tool, history, expr_start, col, need, queue_len):
    """The calculator's forced tokens (R, queue_len) and their counts (R,) for the rows that `need`
    a call: one host call if history (R, M) is at most CALLBACK_BYTES, else one per chunk of rows
    that fits, made only for chunks with a row in need."""
    R, M = history.shape
    shapes = lambda c: (jax.ShapeDtypeStruct((c, queue_len), jnp.int32), jax.ShapeDtypeStruct((c,), jnp.int32))  # noqa: E731
    C = max(1, CALLBACK_BYTES // (history.dtype.itemsize * M))
    if R <= C:
        return jax.pure_callback(tool, shapes(R), history, expr_start, col, need, vmap_method="sequential")
    K = -(-R // C)
    chunks = lambda a: jnp.pad(a, [(0, K * C - R)] + [(0, 0)] * (a.ndim - 1)).reshape(K, C, *a.shape[1:])  # noqa: E731

    def one(args):
        return jax.lax.cond(jnp.any(args[3]),
                            lambda a: jax.pure_callback(tool, shapes(C), *a, vmap_method="sequential"),
                            lambda a: (jnp.zeros((C, queue_len), jnp.int32), jnp.zeros((C,), jnp.int32)), args)

    nq, nql = jax.lax.map(one, tuple(map(chunks, (history, expr_start, col, need))))
    return nq.reshape(K * C, queue_len)[:R], nql.reshape(K * C)[:R]


def _step(config, spec: SampleSpec, tool, params, row_keys, first_keys, temperature, gen_len, s: _State) -> _State:
    col = jnp.broadcast_to(s.n, s.done.shape)
    tok, forced, ends, lp, slp = _choose(spec, s, _keys(spec, row_keys, first_keys, col), temperature)
    keep = ~s.done & ~ends
    m = keep & ~forced
    out = Rollout(
        s.out.tokens.at[:, s.n].set(jnp.where(keep, tok, spec.pad_id)),
        s.out.mask.at[:, s.n].set(m.astype(jnp.int32)),
        s.out.logp.at[:, s.n].set(jnp.where(m, lp, 0.0)),
        s.out.sample_logp.at[:, s.n].set(jnp.where(m, slp, 0.0)),
        s.out.length + keep.astype(jnp.int32),
    )
    tool_state = _tool_state(spec, tool, s, tok, keep, forced, col, out.tokens)
    logits, cache = decode.decode_shared(config, params, tok, s.n, s.pad, s.cache, gen_len)
    return s.replace(n=s.n + 1, out=out, done=s.done | ends, logits=logits, cache=cache, **tool_state)


def _rollout_local(config, spec: SampleSpec, tool, params, prompt_ids, pad, row_ids, live, seed, temperature):
    """Rollouts for left-padded local prompts (P,T) with padding (P,); row_ids (P,N,3) = (step, example, sample);
    live (P,) bool, False for the dummy prompts that pad the last device (their rows are not decoded).

    Returns (Rollout of the P * N rows, (2,) int32: decode steps, and those steps x rows decoded in each)."""
    TRACE_COUNTS["rollout"] = TRACE_COUNTS.get("rollout", 0) + 1
    P, T = prompt_ids.shape
    N, M = spec.num_samples, spec.max_new_tokens
    R = P * N
    # every use casts weights to the compute dtype anyway: do it once, not in every decode step
    params = jax.tree.map(lambda p: p.astype(config.dtype), params)
    params = stack.for_loop(config, params)  # unrolled layers: split once, not in every decode step
    base = jax.random.key(seed)

    def key_of(ids):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, ids[0]), ids[1]), ids[2])

    ids = row_ids.reshape(R, 3)
    row_keys = jax.vmap(key_of)(ids)
    first_keys = jax.vmap(key_of)(ids.at[:, 2].set(0))
    zeros_f = jnp.zeros((R, M), jnp.float32)
    out = Rollout(jnp.full((R, M), spec.pad_id, jnp.int32), jnp.zeros((R, M), jnp.int32), zeros_f, zeros_f,
                  jnp.zeros((R,), jnp.int32))
    if spec.slots:
        return _rollout_slots(config, spec, tool, params, prompt_ids, pad, row_keys, first_keys, temperature, out,
                              jnp.sum(live) * N)
    logits, cache = decode.prefill(config, params, prompt_ids, pad, T)
    cache = decode.shared_cache(config, cache, N, M)  # the prompt's keys stay shared by its samples
    rep = functools.partial(jnp.repeat, repeats=N, total_repeat_length=R)
    zi = jnp.zeros((R,), jnp.int32)
    state = _State(n=jnp.int32(0), out=out, done=~rep(live), pad=pad.astype(jnp.int32),
                   logits=rep(logits, axis=0), cache=cache, in_py=jnp.zeros((R,), bool), expr_start=zi,
                   queue=jnp.zeros((R, spec.queue_len), jnp.int32), qlen=zi, qhead=zi)
    C = spec.compact_rows
    running = (lambda s: jnp.sum(~s.done) > C) if C else (lambda s: True)
    state = _phases(config, spec, tool, params, row_keys, first_keys, temperature, state, running)
    if not C:
        return state.out, jnp.stack([state.n, state.n * R])

    def compact_rest(state):
        """Decode the rows still running (at most C) in a C-row state, then scatter them back."""
        idx = jnp.argsort(state.done, stable=True)[:C]  # running rows first, in row order
        prompt = idx // N
        c = state.cache
        rows = lambda x, r: stack.map_layers(lambda a: a[r], x)  # rows r of every layer
        small = state.replace(
            out=jax.tree.map(lambda a: a[idx], state.out), done=state.done[idx], pad=state.pad[prompt],
            logits=state.logits[idx], in_py=state.in_py[idx], expr_start=state.expr_start[idx],
            queue=state.queue[idx], qlen=state.qlen[idx], qhead=state.qhead[idx],
            cache=decode.SharedCache(rows(c.kp, prompt), rows(c.vp, prompt), tuple(rows(b, idx) for b in c.kg),
                                     tuple(rows(b, idx) for b in c.vg), c.prev_emb[idx]))
        small = _phases(config, spec, tool, params, row_keys[idx], first_keys[idx], temperature, small,
                        lambda s: True)  # each row now has its own copy of its prompt's keys (N = 1)
        return state.replace(n=small.n, out=jax.tree.map(lambda a, b: a.at[idx].set(b), state.out, small.out))

    unfinished = (state.n < M) & ~jnp.all(state.done)
    final = jax.lax.cond(unfinished, compact_rest, lambda s: s, state)
    return final.out, jnp.stack([final.n, state.n * R + (final.n - state.n) * C])


def _phases(config, spec, tool, params, row_keys, first_keys, temperature, state, running):
    """Decode phase by phase (static: early columns read fewer slots) while `running(state)`."""
    for end in range(PHASE, spec.max_new_tokens + PHASE, PHASE):
        end = min(end, spec.max_new_tokens)
        step = functools.partial(_step, config, spec, tool, params, row_keys, first_keys, temperature, end)
        state = jax.lax.while_loop(lambda s, end=end: (s.n < end) & ~jnp.all(s.done) & running(s), step, state)
    return state


@struct.dataclass
class _Slots:
    """The refill loop's carry: S slots, each decoding one (prompt, sample) pair of the R = P * N
    local pairs at its own column; pairs are handed out in order, `next` is the first not started."""

    out: Rollout  # (R, M) per pair
    pair: jax.Array  # (S,) int32; the pair a slot decodes (R: idle, nothing left to hand out)
    col: jax.Array  # (S,) int32; the column the slot generates next
    next: jax.Array  # () int32
    end: jax.Array  # () int32; pairs from here on are not handed out (the dummy prompts')
    steps: jax.Array  # () int32; decode steps so far
    logits: jax.Array  # (S, V) f32
    cache: decode.SlotCache  # per slot: its prompt's keys, its generated keys
    in_py: jax.Array  # (S,) bool
    expr_start: jax.Array  # (S,) int32
    queue: jax.Array  # (S, Q) int32
    qlen: jax.Array  # (S,) int32
    qhead: jax.Array  # (S,) int32


def _rollout_slots(config, spec: SampleSpec, tool, params, prompt_ids, pad, row_keys, first_keys, temperature,
                   out: Rollout, live_pairs):
    """Decode the R = P * N local pairs in `spec.slots` slots. All P prompts are prefilled up front,
    `slots` prompts at a time; a slot whose pair ends (terminal token or last column) takes the next
    pair at the end of the same step: its prompt's keys are copied in from that prefill, its first
    logits are its prompt's prefill logits, and its keys are its pair's, so every pair's tokens are
    those of the all-rows loop. At most REFILL_DIVISOR-th of the slots are refilled per step (a
    fixed-size copy); others wait a step. Pairs from `live_pairs` on (the dummy prompts') are never
    handed out."""
    P, T = prompt_ids.shape
    N, M, S = spec.num_samples, spec.max_new_tokens, spec.slots
    R = P * N
    logits0, prompts = decode.prefill_prompts(config, params, prompt_ids, pad, S)
    pair = jnp.arange(S, dtype=jnp.int32)
    zi = jnp.zeros((S,), jnp.int32)
    state = _Slots(out=out, pair=jnp.where(pair < live_pairs, pair, R), col=zi, next=jnp.int32(S),
                   end=live_pairs.astype(jnp.int32), steps=jnp.int32(0), logits=logits0[pair // N],
                   cache=decode.slot_cache(config, prompts, pair // N, M), in_py=jnp.zeros((S,), bool),
                   expr_start=zi, queue=jnp.zeros((S, spec.queue_len), jnp.int32), qlen=zi, qhead=zi)
    busy = lambda s: s.pair < R  # noqa: E731  (idle slots hold pair R)
    top = lambda s: jnp.max(jnp.where(busy(s), s.col, 0))  # noqa: E731  (the furthest column a slot writes)

    refill = functools.partial(_refill, spec, (logits0, prompts))
    work = lambda s: jnp.any(busy(s)) | (s.next < s.end)  # noqa: E731

    def phase(end):  # refill free slots and decode, while no slot needs a generated column at or past `end`
        step = functools.partial(_slot_step, config, spec, tool, params, row_keys, first_keys, temperature, end)
        return lambda s: jax.lax.while_loop(lambda s: work(s) & (top(s) < end), lambda s: step(refill(s)), s)

    ends = sorted({min(PHASE, M), M})
    phases = [phase(end) for end in ends]
    state = jax.lax.while_loop(work, lambda s: jax.lax.switch(jnp.minimum(top(s) // PHASE, len(ends) - 1), phases, s),
                               state)
    return state.out, jnp.stack([state.steps, state.steps * S])


def _slot_step(config, spec: SampleSpec, tool, params, row_keys, first_keys, temperature, gen_len,
               s: _Slots) -> _Slots:
    R, M = row_keys.shape[0], spec.max_new_tokens
    busy = s.pair < R
    pair = jnp.minimum(s.pair, R - 1)
    tok, forced, ends, lp, slp = _choose(spec, s, _keys(spec, row_keys[pair], first_keys[pair], s.col), temperature)
    keep = busy & ~ends
    m = keep & ~forced
    dst = jnp.where(keep, s.pair, R)  # row R does not exist: the write is dropped
    put = lambda a, v: a.at[dst, s.col].set(v, mode="drop")  # noqa: E731
    out = Rollout(put(s.out.tokens, tok), put(s.out.mask, m.astype(jnp.int32)), put(s.out.logp, jnp.where(m, lp, 0.0)),
                  put(s.out.sample_logp, jnp.where(m, slp, 0.0)), s.out.length.at[dst].add(1, mode="drop"))
    tool_state = _tool_state(spec, tool, s, tok, keep, forced, s.col, out.tokens[pair])
    logits, cache = decode.decode_slots(config, params, tok, s.col, s.cache, gen_len)
    done = busy & (ends | (s.col + 1 >= M))  # the pair ended (terminal token or last column): the slot is free
    return s.replace(out=out, pair=jnp.where(done, R, s.pair), col=s.col + 1, steps=s.steps + 1, logits=logits,
                     cache=cache, **tool_state)


def _refill(spec: SampleSpec, fresh, s: _Slots) -> _Slots:
    """Up to slots // REFILL_DIVISOR free slots take the next pairs in order (before the step that
    decodes them, so the copy of their prompt keys is written before it is read)."""
    S, N = s.pair.shape[0], spec.num_samples
    R = s.out.length.shape[0]
    F = max(1, S // REFILL_DIVISOR)
    slots = jnp.nonzero(s.pair >= R, size=F, fill_value=S)[0]  # slot index S: none, every write to it dropped
    new = s.next + jnp.arange(F, dtype=jnp.int32)
    slots = jnp.where(new < s.end, slots, S)
    prompt = jnp.minimum(new, R - 1) // N
    logits0, prompts = fresh
    at = lambda a, v: a.at[slots].set(v, mode="drop")  # noqa: E731
    return s.replace(pair=at(s.pair, new), col=at(s.col, 0), next=s.next + jnp.sum(slots < S, dtype=jnp.int32),
                     logits=at(s.logits, logits0[prompt]), cache=decode.refill_slots(prompts, s.cache, slots, prompt),
                     in_py=at(s.in_py, False), expr_start=at(s.expr_start, 0), qlen=at(s.qlen, 0),
                     qhead=at(s.qhead, 0))


@functools.lru_cache(maxsize=64)
def _compiled(config, spec, tool, mesh):
    f = functools.partial(_rollout_local, config, spec, tool)
    if mesh is not None and sharding.row_shards(mesh) > 1:
        rows, rep = sharding.rows_spec(), sharding.replicated_spec()
        f = sharding.shard_map(f, mesh, in_specs=(rep, rows, rows, rows, rows, rep, rep), out_specs=rows)
    return jax.jit(f)


def context_positions(config) -> int:
    """Positions a rollout (prompt + completion) can address: nanochat's rotary table length."""
    return 10 * config.sequence_len


def check_request(config, prompts, num_samples, max_new_tokens, temperature):
    """Validate a request before anything compiles; errors name the bad value and the limit."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, found {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, found {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), found {temperature}")
    if not prompts:
        raise ValueError("no prompts given")
    context = context_positions(config)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; it needs at least <|bos|>")
        if len(p) + max_new_tokens > context:
            raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens {max_new_tokens} that exceeds "
                             f"the model's context of {context} positions (10 x sequence_len {config.sequence_len})")


def left_pad(prompts, rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The prefill block of `sample`: prompts (token-id lists) right-aligned in (rows, T) int32 ids,
    T the longest prompt rounded up to PROMPT_BUCKET, so every row's next token goes to the same
    slot; and each row's left padding (rows,). Rows past the prompts (default: none) are one-token
    dummies."""
    rows = len(prompts) if rows is None else rows
    T = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    ids = np.zeros((rows, T), np.int32)
    pad = np.full((rows,), T - 1, np.int32)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = p
        pad[i] = T - len(p)
    return ids, pad


def sample(config, params, prompts, *, num_samples, max_new_tokens, temperature=1.0, top_k=50, seed=0,
           tool=None, specials: SpecialIds, step=0, example_ids=None, mesh=None, compact: bool = True,
           slots: int | None = None, stats: dict | None = None) -> tuple[Rollout, np.ndarray]:
    """Run all rollouts for `prompts` (list of token-id lists) in one jitted call.

    Rows are ordered prompt-major (row = prompt * num_samples + sample). `example_ids` (default
    0..P-1) and `step` feed the per-row keys, so the same (seed, step, example, sample) always gives
    the same completion. `slots` (per device; None: `default_slots()`, 0: all rows at once): when a
    device has more rows than slots, it decodes `slots` rows at a time and a row that ends hands its
    slot to the next row in the same step. Otherwise all rows decode together and, with `compact`,
    once at most 1/COMPACT_DIVISOR of a device's rows are still running, the rest of the loop
    decodes only those. Both give the same tokens. `stats`, if given, receives `decode_steps` (the
    most of any device), `row_steps` (decode steps x rows decoded in each, summed over devices),
    `slot_utilization` (kept tokens / row_steps) and `slots` (per device, as decoded: 0 when all
    rows decoded together).
    Returns (Rollout as numpy, prompt lengths (P,)).
    """
    spec, inputs = _plan(config, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, seed=seed, tool=tool, specials=specials, step=step,
                         example_ids=example_ids, mesh=mesh, compact=compact, slots=slots)
    rows = len(prompts) * num_samples
    out, steps = _compiled(config, spec, tool, mesh)(params, *inputs)
    out = Rollout(*jax.tree.map(lambda a: np.asarray(a)[:rows], out))
    if stats is not None:
        stats["slots"] = spec.slots
        steps = np.asarray(steps, np.int64).reshape(-1, 2)
        stats["decode_steps"], stats["row_steps"] = int(steps[:, 0].max()), int(steps[:, 1].sum())
        stats["slot_utilization"] = float(out.length.sum()) / max(stats["row_steps"], 1)
    return out, np.array([len(p) for p in prompts], np.int32)


def default_slots(platform: str | None = None) -> int:
    """Slots per device when a caller does not say: SLOTS_PER_DEVICE of the platform (default:
    jax's default backend); on a CPU host CPU_SLOTS split over its CPU devices (at least 16: 64
    each on 2 devices, measured best for a 2-core eval, docs/benchmarks.md); 0 (all rows at once)
    on an unknown platform."""
    platform = platform or jax.default_backend()
    if platform == "cpu":
        return max(16, CPU_SLOTS // jax.local_device_count("cpu"))
    return SLOTS_PER_DEVICE.get(platform, 0)


def sample_split(prompts: int, num_samples: int, n_dev: int) -> int:
    """Into how many parts each prompt's samples are split so the rows spread over `n_dev` devices:
    1 when the prompts split evenly; else n_dev / gcd(prompts, n_dev) if that divides num_samples
    (one prompt, 16 samples on 2 devices: 8 samples per device, the prompt prefilled on both),
    else 1 (dummy prompts fill the last device). The rows and their keys stay the same."""
    s = n_dev // np.gcd(prompts, n_dev)
    return s if s > 1 and num_samples % s == 0 else 1


def rollout_call(config, prompts, *, num_samples, max_new_tokens, temperature=1.0, top_k=50, seed=0, tool=None,
                 specials: SpecialIds, step=0, example_ids=None, mesh=None, compact: bool = True,
                 slots: int | None = None):
    """What `sample` runs, without running it: (the jitted rollout function, its inputs after params).

    `fn(params, *inputs)` is the call; `fn.lower(params, *inputs)` (params may be abstract,
    jax.ShapeDtypeStruct) compiles it without running, for memory and compile-time measurements.
    """
    spec, inputs = _plan(config, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, seed=seed, tool=tool, specials=specials, step=step,
                         example_ids=example_ids, mesh=mesh, compact=compact, slots=slots)
    return _compiled(config, spec, tool, mesh), inputs


def _plan(config, prompts, *, num_samples, max_new_tokens, temperature, top_k, seed, tool, specials: SpecialIds,
          step, example_ids, mesh, compact: bool, slots: int | None):
    """The rollout's static SampleSpec (slots as decoded: 0 when a device has no more rows than
    that) and its inputs after params."""
    check_request(config, prompts, num_samples, max_new_tokens, temperature)
    P = len(prompts)
    example_ids = list(range(P)) if example_ids is None else list(example_ids)
    n_dev = sharding.row_shards(mesh)
    split = sample_split(P, num_samples, n_dev)
    N = num_samples // split  # samples per (virtual) prompt: prompt p's samples j N .. (j + 1) N - 1 are v = p split + j
    P_pad = -(-P * split // n_dev) * n_dev  # dummy prompts so rows split evenly; `sample` drops their rows
    ids, pad = left_pad([p for p in prompts for _ in range(split)], P_pad)
    row_ids = np.zeros((P_pad, N, 3), np.int32)
    row_ids[:, :, 0] = step
    row_ids[:P * split, :, 1] = np.repeat(np.asarray(example_ids, np.int32), split)[:, None]
    row_ids[:, :, 2] = (np.arange(P_pad) % split)[:, None] * N + np.arange(N)[None]
    top_k = 0 if not top_k else min(int(top_k), config.vocab_size)
    local_rows = P_pad * N // n_dev
    slots = default_slots() if slots is None else slots
    if slots < 0:
        raise ValueError(f"slots must be >= 0 (0: all rows at once), found {slots}")
    slots = slots if 0 < slots < local_rows else 0
    spec = SampleSpec(N, max_new_tokens, top_k, temperature == 0,
                      config.generation == "gen-2025-10" and temperature > 0,
                      tool.queue_len if tool is not None else 1, specials, specials.assistant_end,
                      local_rows // COMPACT_DIVISOR if compact and local_rows >= 2 * COMPACT_DIVISOR else 0,
                      slots)
    live = np.arange(P_pad) < P * split  # dummy prompts (padding the last device) are not decoded
    return spec, (ids, pad, row_ids, live, jnp.uint32(seed), jnp.float32(max(temperature, 1e-6)))


def assemble(prompts, rollout: Rollout, num_samples):
    """nanochat's generate_batch convention: per row prompt + kept tokens, masks 0 for the prompt."""
    seqs, masks = [], []
    for i, p in enumerate(prompts):
        s_row, m_row = [], []
        for j in range(num_samples):
            r = i * num_samples + j
            n = int(rollout.length[r])
            s_row.append(list(p) + rollout.tokens[r, :n].tolist())
            m_row.append([0] * len(p) + rollout.mask[r, :n].tolist())
        seqs.append(s_row)
        masks.append(m_row)
    return seqs, masks


def generate(config, params, tokenizer, prompts, num_samples, max_new_tokens, temperature=1.0, top_k=50, seed=0,
             mesh=None):
    """Stable API: nested lists [prompt][sample] of token ids and masks, as nanochat's generate_batch.

    `mesh` (optional, jaxrl.sharding.make_mesh()) splits the rows over its devices.
    """
    specials = SpecialIds.from_tokenizer(tokenizer)
    tool = tool_for(tokenizer, max_new_tokens + 2, config.generation)
    rollout, _ = sample(config, params, prompts, num_samples=num_samples, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, seed=seed, tool=tool, specials=specials, mesh=mesh)
    return assemble(prompts, rollout, num_samples)


_TOOLS: dict = {}


def tool_for(tokenizer, queue_len: int, generation: str) -> ToolBridge:
    """One bridge per (tokenizer, queue length, generation), so repeated calls hit the same compiled
    function. The generation picks the calculator (gen-2025-10 has no `.count(` string path)."""
    from jaxrl.calculator import use_calculator

    key = (id(tokenizer), queue_len, generation)
    if key not in _TOOLS:
        _TOOLS[key] = ToolBridge(tokenizer, functools.partial(use_calculator, generation=generation), queue_len)
    return _TOOLS[key]
