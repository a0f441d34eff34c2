"""REINFORCE on rollouts: advantages, the padded batch, the token-normalised loss, the train step.

Like nanochat's chat_rl.py, "GRPO" here is much simpler and closer to plain REINFORCE:
1. no trust region: no KL to a reference model;
2. on policy: no PPO ratio and clip;
3. token-level normalisation (per micro-batch of `device_batch_size` rows, as nanochat), not
   sequence-level;
4. advantage = reward − mean reward over the samples of one question (no division by the std).
Options, each off by default: z-score advantages (`advantage = "zscore"`), one token
normalisation over the whole step (`token_norm = "global"`), and training on the terminal
`<|assistant_end|>` (`train_on_end_token`; never a target in nanochat: docs/nanochat.md#end-token-never-a-target).

The train step is one jitted function: rows are split over the "data" mesh axis with shard_map,
each device packs its rows end to end into bins (`pack`: no compute on padding, none on rows
whose advantage is 0) and scans over chunks of bins accumulating gradients, gradients are summed
across devices, and the optimizer update runs replicated. The normalisation is computed from the
unpacked rows, so the objective is nanochat's whatever the packing. Non-finite loss or gradients
skip the update.

Test: `pytest tests/test_rl.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl import model as gpt
from jaxrl import sharding

SEQ_BUCKET = 64  # training sequences are padded to a multiple of this: few compilations per run


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Static knobs of the compiled train step."""

    device_batch_size: int  # rows per micro-batch (nanochat's pass)
    num_passes: int  # micro-batches per question: num_samples // device_batch_size
    examples_per_step: int  # questions per optimizer step, all devices together
    token_norm: str = "pass"  # "pass" (nanochat) | "global"
    chunk_rows: int = 0  # packed bins per forward/backward on a device (0: device_batch_size); memory knob only

    def __post_init__(self):
        if self.chunk_rows == 0:
            object.__setattr__(self, "chunk_rows", self.device_batch_size)


class Batch(NamedTuple):
    """One step's training rows, question-major, padded to a common length T."""

    inputs: np.ndarray  # (R, T) int32
    targets: np.ndarray  # (R, T) int32, -1 = not trained on
    advantages: np.ndarray  # (R,) f32
    sampler_logp: np.ndarray  # (R, T) f32, the sampler's model log-prob of each target (0 if none)


def advantages(rewards, num_samples: int, mode: str = "mean") -> np.ndarray:
    """rewards (R,) question-major -> r − mean over each question's samples ("zscore": / (std + 1e-4))."""
    r = np.asarray(rewards, np.float32).reshape(-1, num_samples)
    adv = r - r.mean(axis=1, keepdims=True)
    if mode == "zscore":
        adv = adv / (r.std(axis=1, keepdims=True) + 1e-4)
    elif mode != "mean":
        raise ValueError(f"advantage must be 'mean' or 'zscore', found {mode!r}")
    return adv.reshape(-1)


def build_batch(sequences, masks, advantages_, pad_id: int, *, sampler_logp=None, end_rows=None,
                end_id: int | None = None) -> Batch:
    """nanochat's padded batch from generate_batch-style rows.

    sequences/masks: lists of token/mask lists (prompt included). Each row is padded with
    `pad_id` (mask 0) to the bucketed common length; targets are the next tokens where the next
    mask is 1, else -1. `sampler_logp[r]` holds one value per generated token (aligned to the end
    of the row). `end_rows` (bool per row): append `end_id` as a trained target (train_on_end_token).
    """
    R = len(sequences)
    lengths = [len(s) + (1 if end_rows is not None and end_rows[r] else 0) for r, s in enumerate(sequences)]
    T = -(-(max(lengths) - 1) // SEQ_BUCKET) * SEQ_BUCKET
    ids = np.full((R, T + 1), pad_id, np.int32)
    msk = np.zeros((R, T + 1), np.int32)
    lp = np.zeros((R, T + 1), np.float32)
    for r, (s, m) in enumerate(zip(sequences, masks)):
        ids[r, : len(s)], msk[r, : len(m)] = s, m
        if sampler_logp is not None and len(sampler_logp[r]):
            lp[r, len(s) - len(sampler_logp[r]): len(s)] = sampler_logp[r]
        if end_rows is not None and end_rows[r]:
            ids[r, len(s)], msk[r, len(s)] = end_id, 1
    targets = np.where(msk[:, 1:] == 1, ids[:, 1:], -1).astype(np.int32)
    return Batch(ids[:, :-1], targets, np.asarray(advantages_, np.float32), lp[:, 1:])


class Packed(NamedTuple):
    """A step's rows packed for training: on each device, rows are laid end to end in bins of T
    tokens, and the samples of one question attend to one copy of their common prompt, so the
    forward/backward runs on the tokens that carry a gradient (plus one prompt per bin) instead
    of on every row padded to the longest one. Every token sees what it sees in its own row.

    Bin arrays (n_dev · bins_per_device, T) and row arrays (R,) are both split over the data axis:
    device d holds bins [d·B, (d+1)·B) and rows [d·R/n, (d+1)·R/n), `rows` indexing the latter.
    """

    inputs: np.ndarray  # (NB, T) int32 token ids (pad where empty)
    targets: np.ndarray  # (NB, T) int32, -1 = not trained on
    positions: np.ndarray  # (NB, T) int32 position of each token in its own row
    segments: np.ndarray  # (NB, T) int32 piece id within the bin (a prompt copy or a continuation), 0 = empty
    parents: np.ndarray  # (NB, T) int32 the prompt copy a continuation extends (else its own id)
    prev_index: np.ndarray  # (NB, T) int32 index in the bin of the previous token of the same row
    rows: np.ndarray  # (NB, T) int32 the token's row, indexed within its device's rows; -1 = none
    sampler_logp: np.ndarray  # (NB, T) f32
    advantages: np.ndarray  # (R,) f32, rows in the Batch's order
    row_tokens: np.ndarray  # (R,) int32 trained tokens of each row (all rows, packed or not)
    bins: np.ndarray  # (n_dev,) int32 bins in use on each device

    def packing(self) -> gpt.Packing:
        return gpt.Packing(self.segments, self.parents, self.prev_index)


def pack(batch: Batch, pad_id: int, n_dev: int = 1, chunk: int = 8, min_len: int = 0,
         skip_zero_advantage: bool = True, group: int = 1) -> Packed:
    """Pack each device's share of `batch` (contiguous blocks of R/n_dev rows) into bins.

    A row is cut after its last target (later tokens cannot change earlier ones); rows without a
    target, and with `skip_zero_advantage` rows whose advantage is exactly 0 (their gradient is
    exactly 0), are left out; their tokens still count in the normalisation (`row_tokens`).
    Rows of one `group` (a question's samples, contiguous) share their common untrained prefix
    (the prompt): a bin holds one copy of it, and each row's continuation (from the prompt's last
    token on) attends to that copy. Bins hold T = max(batch length, min_len) tokens (a caller
    keeps T fixed across steps to avoid recompiling); first fit, longest first. Each device gets
    the same number of bin slots, a multiple of `chunk` (bins per forward/backward), enough for
    the unpacked worst case.
    """
    inputs, targets = np.asarray(batch.inputs), np.asarray(batch.targets)
    adv = np.asarray(batch.advantages, np.float32)
    R, T0 = inputs.shape
    if R % n_dev:
        raise ValueError(f"{R} training rows do not split over {n_dev} devices")
    T = max(T0, int(min_len))
    per = R // n_dev
    nb = -(-per // chunk) * chunk
    valid = targets >= 0
    row_tokens = valid.sum(axis=1).astype(np.int32)
    rows = _RowInfo(inputs, targets, np.asarray(batch.sampler_logp, np.float32), np.argmax(valid, axis=1),
                    np.where(row_tokens > 0, T0 - np.argmax(valid[:, ::-1], axis=1), 0))
    keep = (row_tokens > 0) & ~(skip_zero_advantage & (adv == 0))
    out = {k: np.full((n_dev * nb, T), fill, dt) for k, fill, dt in (
        ("inputs", pad_id, np.int32), ("targets", -1, np.int32), ("positions", 0, np.int32),
        ("segments", 0, np.int32), ("parents", 0, np.int32), ("rows", -1, np.int32),
        ("sampler_logp", 0.0, np.float32))}
    out["prev_index"] = np.tile(np.arange(T, dtype=np.int32), (n_dev * nb, 1))
    bins = np.zeros(n_dev, np.int32)
    for d in range(n_dev):
        bins[d] = _Bins(out, d * nb, d * per, T).pack(rows, keep, range(d * per, (d + 1) * per), group)
    return Packed(**out, advantages=adv, row_tokens=row_tokens, bins=bins)


class _RowInfo(NamedTuple):
    inputs: np.ndarray
    targets: np.ndarray
    logp: np.ndarray
    first: np.ndarray  # index of each row's first target
    end: np.ndarray  # one past each row's last target (0: no target)


class _Bins:
    """One device's bins in the packed arrays `out`: rows [base, base + B), row ids from row0."""

    def __init__(self, out: dict, base: int, row0: int, T: int):
        self.out, self.base, self.row0, self.T = out, base, row0, T
        self.fill, self.pieces, self.prompts = [], [], {}  # per bin: tokens used, pieces; (bin, group) -> prompt copy

    def pack(self, info: _RowInfo, keep, rows: range, group: int) -> int:
        """Place the kept rows group by group, longest continuation first; returns the bins used."""
        for g0 in range(rows.start, rows.stop, group):
            mine = [r for r in range(g0, min(g0 + group, rows.stop)) if keep[r]]
            if not mine:
                continue
            P = int(min(info.first[r] for r in mine)) if len(mine) > 1 else 0
            for r in mine[1:]:  # the common prefix of the kept rows (the prompt)
                diff = np.nonzero(info.inputs[r, :P] != info.inputs[mine[0], :P])[0]
                P = int(diff[0]) if len(diff) else P
            for r in sorted(mine, key=lambda r: (-info.end[r], r)):
                self._place(info, r, g0, P)
        return len(self.fill)

    def _place(self, info: _RowInfo, r: int, g0: int, P: int):
        c = int(info.end[r]) - P
        b = next((j for j in range(len(self.fill)) if (j, g0) in self.prompts and self.fill[j] + c <= self.T), None)
        if b is None:  # first bin with room for a prompt copy and the continuation
            b = next((j for j, f in enumerate(self.fill) if f + P + c <= self.T), len(self.fill))
            if b == len(self.fill):
                self.fill.append(0)
                self.pieces.append(0)
            if P:
                seg, o = self._write(b, info.inputs[r, :P], None, None, -1, 0, None, None)
                self.prompts[(b, g0)] = (seg, o + P - 1)
        parent, prev0 = self.prompts[(b, g0)] if P else (None, None)
        sl = slice(P, int(info.end[r]))
        self._write(b, info.inputs[r, sl], info.targets[r, sl], info.logp[r, sl], r - self.row0, P, parent, prev0)

    def _write(self, b, ids, targets, logp, row, pos0, parent, prev0):
        """Append one piece to bin b; returns (its segment id, its offset)."""
        out, g, o, n = self.out, self.base + b, self.fill[b], len(ids)
        self.pieces[b] += 1
        seg = self.pieces[b]
        out["inputs"][g, o:o + n] = ids
        if targets is not None:
            out["targets"][g, o:o + n] = targets
            out["sampler_logp"][g, o:o + n] = logp
            out["rows"][g, o:o + n] = row
        out["positions"][g, o:o + n] = np.arange(pos0, pos0 + n)
        out["segments"][g, o:o + n] = seg
        out["parents"][g, o:o + n] = seg if parent is None else parent
        out["prev_index"][g, o:o + n] = np.concatenate([[o if prev0 is None else prev0], np.arange(o, o + n - 1)])
        self.fill[b] += n
        return seg, o


def row_weights(row_tokens, advantages, spec: "LossSpec", n_global_tokens):
    """Per-row weight w[r] such that the objective is Σ_r Σ_t logp[r,t]·w[r] (targets >= 0).

    "pass" (nanochat): w = adv / (N_pass · num_passes · examples_per_step), N_pass = valid
    targets of the row's pass of device_batch_size rows. "global": w = adv / N_step.
    `row_tokens` (R,): valid targets per row, rows in nanochat's order (passes contiguous).
    """
    if spec.token_norm == "global":
        return advantages / n_global_tokens
    dbs = spec.device_batch_size
    counts = row_tokens.reshape(-1, dbs).sum(axis=1).astype(jnp.float32)
    per_pass = jnp.maximum(counts, 1.0) * (spec.num_passes * spec.examples_per_step)
    return advantages / jnp.repeat(per_pass, dbs, total_repeat_length=row_tokens.shape[0])


def _chunk_terms(config, params, inputs, targets, positions, packing, weights, sampler_logp):
    """−objective of one chunk of bins, its trained-token count, and the logp mismatch sum."""
    logits = gpt.forward(config, params, inputs, positions, packing)
    nll = gpt.nll_from_logits(logits, targets)
    valid = targets >= 0
    loss = jnp.sum(nll * weights)  # = −Σ logp·w; nll is 0 where target is -1
    mismatch = jnp.sum(jnp.where(valid, jnp.abs(-nll - sampler_logp), 0.0))
    return loss, (jnp.sum(valid).astype(jnp.float32), mismatch)


def _local_grads(config, spec: "LossSpec", params, batch: Packed, n_global_tokens):
    """Gradient of −objective over this device's bins, scanned over chunks of `spec.chunk_rows` bins.

    Chunks past the device's last used bin are skipped. The normalisation is nanochat's per pass
    of device_batch_size rows whatever the packing, so `chunk_rows` only trades memory for speed.
    """
    w_row = row_weights(batch.row_tokens, batch.advantages, spec, n_global_tokens)
    w_tok = jnp.where(batch.rows >= 0, w_row[jnp.maximum(batch.rows, 0)], 0.0)
    chunk = min(spec.chunk_rows, batch.inputs.shape[0])
    data = (batch.inputs, batch.targets, batch.positions, batch.packing(), w_tok, batch.sampler_logp)
    data = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), data)
    n_used = (batch.bins.reshape(-1)[0] + chunk - 1) // chunk
    grad_fn = jax.value_and_grad(lambda p, x: _chunk_terms(config, p, *x), has_aux=True)

    def step(acc, x):
        g_acc, i, l, c, mm = acc
        (loss, (count, mismatch)), g = grad_fn(params, x)
        return (jax.tree.map(jnp.add, g_acc, g), i + 1, l + loss, c + count, mm + mismatch)

    def body(acc, x):
        return jax.lax.cond(acc[1] < n_used, step, lambda a, _: a, acc, x), None

    zero = jnp.float32(0.0)
    init = (jax.tree.map(jnp.zeros_like, params), jnp.int32(0), zero, zero, zero)
    (grads, _, loss, count, mismatch), _ = jax.lax.scan(body, init, data)
    return grads, loss, count, mismatch


def _tree_allreduce(x, n_dev: int):
    """Sum over the data axis by recursive doubling (a power of two of devices): a fixed order, so
    2 processes x 2 devices give the bits of 1 process x 4 devices, whatever the collectives'
    own reduction order."""
    for r in range(n_dev.bit_length() - 1):
        perm = [(d, d ^ (1 << r)) for d in range(n_dev)]
        x = jax.tree.map(lambda a: a + jax.lax.ppermute(a, sharding.DATA, perm), x)
    return x


class StepMetrics(NamedTuple):
    loss: jax.Array
    grad_norm: jax.Array
    tokens: jax.Array  # trained (valid-target) tokens in the step
    logp_mismatch: jax.Array  # mean |sampler logp − learner logp| over the trained tokens computed
    skipped: jax.Array  # 1 if the update was skipped (non-finite loss or gradients)


def _grads_and_metrics(config, spec, mesh, params, batch: Packed):
    """(gradient of −objective, −objective, trained tokens of the step, mean |logp mismatch|
    over the tokens computed)."""
    tokens = jnp.sum(batch.row_tokens).astype(jnp.float32)
    n_global = jnp.maximum(tokens, 1.0)

    def local(p, b):
        g, loss, count, mm = _local_grads(config, spec, p, b, n_global)
        n_dev = 1 if mesh is None else sharding.data_size(mesh)
        if n_dev > 1 and n_dev & (n_dev - 1) == 0:
            g, loss, count, mm = _tree_allreduce((g, loss, count, mm), n_dev)
        elif n_dev > 1:  # not a power of two: plain psum (equal to one device up to summation order)
            g, loss, count, mm = jax.lax.psum((g, loss, count, mm), sharding.DATA)
        return g, loss, count, mm

    if mesh is not None and sharding.data_size(mesh) > 1:
        rows, rep = sharding.data_spec(), sharding.replicated_spec()
        local = sharding.shard_map(local, mesh, in_specs=(rep, rows), out_specs=rep)
    g, loss, count, mismatch = local(params, batch)
    return g, loss, tokens, mismatch / jnp.maximum(count, 1.0)


def train_step(config, spec: LossSpec, optimizer, mesh, params, opt_state, batch: Packed):
    """One optimizer step on a whole RL step's packed rows. Returns (params, opt_state, StepMetrics)."""
    grads, loss, count, mismatch = _grads_and_metrics(config, spec, mesh, params, batch)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
    opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, opt_state)
    metrics = StepMetrics(loss, grad_norm, count, mismatch, (~finite).astype(jnp.int32))
    return params, opt_state, metrics


@functools.lru_cache(maxsize=16)
def compiled_train_step(config, spec: LossSpec, optimizer, mesh):
    """jit of `train_step` with params/opt_state donated (they are replaced every step); on a mesh
    the outputs are pinned replicated, so step 2 sees the shardings step 1 compiled for."""
    out = None if mesh is None else sharding.replicated(mesh)
    return jax.jit(functools.partial(train_step, config, spec, optimizer, mesh), donate_argnums=(0, 1),
                   out_shardings=out)
