"""REINFORCE on rollouts: advantages, the padded batch, the token-normalised loss, the train step.

Like nanochat's chat_rl.py, "GRPO" here is much simpler and closer to plain REINFORCE:
1. no trust region: no KL to a reference model;
2. on policy: no PPO ratio and clip;
3. token-level normalisation (per micro-batch of `device_batch_size` rows, as nanochat), not
   sequence-level;
4. advantage = reward − mean reward over the samples of one question (no division by the std).
Options, each off by default: z-score advantages (`advantage = "zscore"`), one token
normalisation over the whole step (`token_norm = "global"`), and training on the terminal
`<|assistant_end|>` (`train_on_end_token`; nanochat never makes it a target, SPEC §9.3).

The train step is one jitted function: rows are split over the "data" mesh axis with shard_map,
each device scans over its micro-batches accumulating gradients, gradients are summed across
devices, and the optimizer update runs replicated. Non-finite loss or gradients skip the update.

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
    chunk_rows: int = 0  # rows per forward/backward on a device (0: device_batch_size); memory knob only

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


def row_weights(targets, advantages, spec: "LossSpec", n_global_tokens):
    """Per-row weight w[r] such that the objective is Σ_r Σ_t logp[r,t]·w[r] (targets >= 0).

    "pass" (nanochat): w = adv / (N_pass · num_passes · examples_per_step), N_pass = valid
    targets of the row's pass of device_batch_size rows. "global": w = adv / N_step.
    """
    if spec.token_norm == "global":
        return advantages / n_global_tokens
    dbs = spec.device_batch_size
    counts = jnp.sum(targets >= 0, axis=1).reshape(-1, dbs).sum(axis=1).astype(jnp.float32)
    per_pass = jnp.maximum(counts, 1.0) * (spec.num_passes * spec.examples_per_step)
    return advantages / jnp.repeat(per_pass, dbs, total_repeat_length=targets.shape[0])


def _chunk_terms(config, params, inputs, targets, weights, sampler_logp):
    """−objective of one chunk of rows, its valid-token count, and the logp mismatch sum."""
    logits = gpt.forward(config, params, inputs)
    nll = gpt.nll_from_logits(logits, targets)
    valid = targets >= 0
    loss = jnp.sum(nll * weights[:, None])  # = −Σ logp·w; nll is 0 where target is -1
    mismatch = jnp.sum(jnp.where(valid, jnp.abs(-nll - sampler_logp), 0.0))
    return loss, (jnp.sum(valid).astype(jnp.float32), mismatch)


def _local_grads(config, spec: "LossSpec", params, batch: Batch, n_global_tokens):
    """Gradient of −objective over this device's rows, scanned over chunks of `spec.chunk_rows`.

    The normalisation is nanochat's per pass of device_batch_size rows whatever the chunk size, so
    `chunk_rows` only trades memory for speed (bigger chunks: fewer, larger kernels).
    """
    weights = row_weights(batch.targets, batch.advantages, spec, n_global_tokens)
    chunk = min(spec.chunk_rows, batch.inputs.shape[0])
    data = (batch.inputs, batch.targets, weights, batch.sampler_logp)
    data = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), data)
    n = data[0].shape[0]
    grad_fn = jax.value_and_grad(lambda p, x: _chunk_terms(config, p, *x), has_aux=True)

    def body(acc, x):
        stack, i, l, c, mm = acc
        (loss, (count, mismatch)), g = grad_fn(params, x)
        return (_push_pairwise(stack, g, i), i + 1, l + loss, c + count, mm + mismatch), None

    levels = max(1, (n - 1).bit_length() + 1)
    stack = jax.tree.map(lambda p: jnp.zeros((levels, *p.shape), p.dtype), params)
    (stack, _, loss, count, mismatch), _ = jax.lax.scan(body, (stack, 0, 0.0, 0.0, 0.0), data)
    return _pop_pairwise(stack, n), loss, count, mismatch


def _push_pairwise(stack, g, i):
    """Add chunk gradient `g` (index i) to a binary-counter stack of aligned block sums.

    Level l holds the sum of the last complete aligned block of 2**l chunks. Summing in this
    fixed pairwise tree (instead of left to right) makes the total independent of how chunks are
    split over devices: each device's sum is a subtree of the same tree. Only the levels that
    merge are read (trailing ones of i) and one level is written, in place.
    """
    carries = jnp.int32(0)
    for lvl in range(jax.tree.leaves(stack)[0].shape[0]):  # trailing ones of i
        carries = carries + jnp.where((i + 1) % (2 ** (lvl + 1)) == 0, 1, 0)

    def one(st, gl):
        new = jax.lax.fori_loop(0, carries, lambda l, acc: jax.lax.dynamic_index_in_dim(st, l, 0, False) + acc, gl)
        return jax.lax.dynamic_update_index_in_dim(st, new, carries, 0)

    return jax.tree.map(one, stack, g)


def _pop_pairwise(stack, n: int):
    """Total of a stack after n pushes: combine the partial blocks from the largest down."""
    def one(st):
        total = None
        for lvl in reversed(range(st.shape[0])):
            if (n >> lvl) & 1:
                total = st[lvl] if total is None else total + st[lvl]
        return total

    return jax.tree.map(one, stack)


def _tree_allreduce(x, n_dev: int):
    """Sum over the data axis by recursive doubling: the same pairwise tree on every device count
    (a power of two), so the result is bit-identical to one device summing the same blocks."""
    for r in range(n_dev.bit_length() - 1):
        perm = [(d, d ^ (1 << r)) for d in range(n_dev)]
        x = jax.tree.map(lambda a: a + jax.lax.ppermute(a, sharding.DATA, perm), x)
    return x


class StepMetrics(NamedTuple):
    loss: jax.Array
    grad_norm: jax.Array
    tokens: jax.Array  # trained (valid-target) tokens in the step
    logp_mismatch: jax.Array  # mean |sampler logp − learner logp| over trained tokens
    skipped: jax.Array  # 1 if the update was skipped (non-finite loss or gradients)


def _grads_and_metrics(config, spec, mesh, params, batch):
    n_global = jnp.maximum(jnp.sum(batch.targets >= 0).astype(jnp.float32), 1.0)

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
    return local(params, batch)


def train_step(config, spec: LossSpec, optimizer, mesh, params, opt_state, batch: Batch):
    """One optimizer step on a whole RL step's rows. Returns (params, opt_state, StepMetrics)."""
    grads, loss, count, mismatch = _grads_and_metrics(config, spec, mesh, params, batch)
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
    opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, opt_state)
    metrics = StepMetrics(loss, grad_norm, count, mismatch / jnp.maximum(count, 1.0), (~finite).astype(jnp.int32))
    return params, opt_state, metrics


@functools.lru_cache(maxsize=16)
def compiled_train_step(config, spec: LossSpec, optimizer, mesh):
    """jit of `train_step` with params/opt_state donated (they are replaced every step)."""
    return jax.jit(functools.partial(train_step, config, spec, optimizer, mesh), donate_argnums=(0, 1))
