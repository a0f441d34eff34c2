"""nanochat chat_rl's objective (`pg_loss`), then the fast train step that computes it.

The objective. For each question of the step, chat_rl samples `num_samples` completions, scores
them with the task's reward, and sets advantage = reward − mean reward of that question's
samples. It then runs the step's rows in passes of `device_batch_size` rows and accumulates
gradients over the passes before one optimizer step:

    for each pass (num_passes per question, examples_per_step questions):
        logp = log-prob of each target token (targets −1: prompt, forced tool output, padding)
        pg_obj = Σ logp · advantage / (valid targets of the pass · num_passes · examples_per_step)
        (−pg_obj).backward()

`pg_loss` below is that loop, summed, on plain padded rows on one device: the reference.
Like chat_rl, this "GRPO" is much simpler than GRPO and closer to plain REINFORCE:
1. no trust region: no KL to a reference model;
2. on policy: no PPO ratio and clip;
3. token-level normalisation per pass of device_batch_size rows, not sequence-level;
4. advantage = reward − mean reward over one question's samples (no division by the std).
Options, each off by default: z-score advantages (`advantage = "zscore"`), one token
normalisation over the whole step (`token_norm = "global"`), and training on the terminal
`<|assistant_end|>` (`train_on_end_token`; never a target in nanochat: docs/nanochat.md#end-token-never-a-target).

The fast path (`train_step`, jitted), equal to `pg_loss` and its gradient up to float32 rounding
(tests/test_rl.py `test_fast_path_equals_pg_loss`):
- `global_batch` assembles the step's rows for the mesh: split over every device, each
  device's rows packed end to end into bins (`packing.pack`: no compute on padding, none on rows
  whose advantage is 0, one copy of a question's prompt per bin);
- each device scans over chunks of `chunk_rows` bins accumulating gradients; per-row weights
  (`row_weights`, computed from the unpacked rows) carry the per-pass normalisation, so neither
  packing nor chunking changes the objective;
- gradients are summed across devices (over "data" in a fixed tree on a power of two of devices;
  over "fsdp", params and gradients stay split: each layer gathers its weights, the gather's
  transpose reduce-scatters their gradient), and the optimizer update runs on the params'
  training layout (jaxrl/sharding.py); a non-finite loss or gradient skips it.

Test: `pytest tests/test_rl.py tests/test_rl_golden.py`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl import distributed, sharding
from jaxrl import model as gpt
from jaxrl.packing import Packed, pack

SEQ_BUCKET = 64  # training sequences are padded to a multiple of this: few compilations per run
TRACE_COUNTS: dict[str, int] = {}  # how often train_step was traced (benchmarks count compiles)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LossSpec:
    """How the step's rows are normalised (chat_rl's passes), and the fast path's chunk size."""

    device_batch_size: int  # rows per micro-batch (nanochat's pass)
    num_passes: int  # micro-batches per question: num_samples // device_batch_size
    examples_per_step: int  # questions per optimizer step, all devices together
    token_norm: str = "pass"  # "pass" (nanochat) | "global"
    chunk_rows: int = 0  # packed bins per forward/backward on a device (0: device_batch_size); memory knob only
    remat: bool = False  # recompute each block in the backward pass (model.trunk); memory knob only

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


# ------------------------------------------------------------------------------------------
# The objective: chat_rl's loss, read top to bottom (the reference the fast path must equal)


def pg_loss(config, params, batch: Batch, spec: LossSpec) -> jax.Array:
    """chat_rl's loss of one optimizer step: −Σ over passes of pg_obj, on one device.

    `batch` holds the whole step's rows, question-major, so each pass of `device_batch_size` rows
    is contiguous: R = device_batch_size · num_passes · examples_per_step. jax.grad of this is the
    gradient chat_rl accumulates over its passes (and averages over ranks). The rows are
    independent, so one forward over all of them gives every pass its log-probs.
    """
    R, dbs = batch.inputs.shape[0], spec.device_batch_size
    assert R == dbs * spec.num_passes * spec.examples_per_step, \
        f"{R} rows are not {dbs} rows x {spec.num_passes} passes x {spec.examples_per_step} questions"
    logp = -gpt.token_nll(config, params, batch.inputs, batch.targets)  # (R, T), 0 where targets == -1
    valid = jnp.asarray(batch.targets) >= 0
    advantages = jnp.asarray(batch.advantages)
    loss = jnp.float32(0.0)
    for p0 in range(0, R, dbs):  # chat_rl's passes: its gradient accumulation is this sum
        rows = slice(p0, p0 + dbs)
        pg_obj = jnp.sum(logp[rows] * advantages[rows, None])
        if spec.token_norm == "global":  # one normalisation for the whole step
            pg_obj = pg_obj / jnp.maximum(jnp.sum(valid), 1)
        else:  # "pass": chat_rl's, by the valid targets of this pass
            num_valid = jnp.maximum(jnp.sum(valid[rows]), 1)
            pg_obj = pg_obj / (num_valid * spec.num_passes * spec.examples_per_step)
        loss = loss - pg_obj
    return loss


# ------------------------------------------------------------------------------------------
# The fast path: packed bins, chunks scanned per device, the cross-device sum


def global_batch(batch: Batch, mesh, *, pad_id: int, chunk: int, min_len: int = 0,
                 skip_zero_advantage: bool = True, group: int = 1) -> Packed:
    """This process's rows -> the step's packed arrays, their rows split over every device of the global mesh.

    Every process pads its rows to the same length (the global maximum, at least `min_len`) and
    packs each of its devices' rows (`packing.pack`: a multiple of `chunk` bins per device; `group`
    rows, a question's samples, share their prompt), so the global batch is exactly what one
    process holding all rows would build.
    """
    T = int(np.max(distributed.gather_rows(np.array([batch.inputs.shape[1]]))))

    def pad(a, value):
        return np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=value)

    local = Batch(pad(batch.inputs, pad_id), pad(batch.targets, -1), batch.advantages, pad(batch.sampler_logp, 0))
    n_local = sharding.row_shards(mesh) // jax.process_count()
    packed = pack(local, pad_id, n_dev=n_local, chunk=chunk, min_len=min_len,
                  skip_zero_advantage=skip_zero_advantage, group=group)
    target = sharding.rows_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(packed, target)
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(target, a), packed)


def row_weights(row_tokens, advantages, spec: LossSpec, n_global_tokens):
    """Per-row weight w[r] such that pg_loss = −Σ_r Σ_t logp[r,t]·w[r] (over targets >= 0).

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


def _chunk_terms(config, remat, params, inputs, targets, positions, packing, weights, sampler_logp):
    """This chunk of bins' share of pg_loss, its trained-token count, and the logp mismatch sum."""
    logits = gpt.forward(config, params, inputs, positions, packing, remat=remat)
    nll = gpt.nll_from_logits(logits, targets)
    valid = targets >= 0
    loss = jnp.sum(nll * weights)  # = −Σ logp·w; nll is 0 where target is -1
    mismatch = jnp.sum(jnp.where(valid, jnp.abs(-nll - sampler_logp), 0.0))
    return loss, (jnp.sum(valid).astype(jnp.float32), mismatch)


def _local_grads(config, spec: LossSpec, params, batch: Packed, n_global_tokens, fsdp_specs=None):
    """Gradient of this device's share of pg_loss over its bins, scanned over chunks of `spec.chunk_rows` bins.

    Chunks past the device's last used bin are skipped. The normalisation is nanochat's per pass
    of device_batch_size rows whatever the packing, so `chunk_rows` only trades memory for speed.
    `fsdp_specs` (the params' specs on an fsdp mesh, else None): `params` are this device's shards,
    which the model sees as `sharding.Sharded`; the devices of an fsdp group run as many chunks as
    the busiest of them (the layers' gathers are collectives every device of the group must join;
    an empty chunk adds zero).
    """
    w_row = row_weights(batch.row_tokens, batch.advantages, spec, n_global_tokens)
    w_tok = jnp.where(batch.rows >= 0, w_row[jnp.maximum(batch.rows, 0)], 0.0)
    chunk = min(spec.chunk_rows, batch.inputs.shape[0])
    data = (batch.inputs, batch.targets, batch.positions, batch.packing(), w_tok, batch.sampler_logp)
    data = jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), data)
    n_used = (batch.bins.reshape(-1)[0] + chunk - 1) // chunk
    if fsdp_specs is not None:
        n_used = jax.lax.pmax(n_used, sharding.FSDP)
    view = (lambda p: p) if fsdp_specs is None else (lambda p: sharding.wrap(p, fsdp_specs))
    grad_fn = jax.value_and_grad(lambda p, x: _chunk_terms(config, spec.remat, view(p), *x), has_aux=True)

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


def grads_and_metrics(config, spec: LossSpec, mesh, params, batch: Packed):
    """The fast path's (gradient of pg_loss, pg_loss, trained tokens of the step, mean |sampler
    logp − learner logp| over the tokens computed), summed over the mesh's devices.

    On a mesh every device takes its own rows. Over fsdp the params come in as shards, each layer
    gathers its weights and the gathers' transpose reduce-scatters their gradients; the gradients
    of replicated leaves and the scalars are summed over fsdp; then everything is summed over data.
    """
    tokens = jnp.sum(batch.row_tokens).astype(jnp.float32)
    n_global = jnp.maximum(tokens, 1.0)
    n_data, n_fsdp = (1, 1) if mesh is None else (sharding.data_size(mesh), sharding.fsdp_size(mesh))
    specs = None if mesh is None else sharding.tree_specs(params, mesh)

    def local(p, b):
        g, loss, count, mm = _local_grads(config, spec, p, b, n_global, specs if n_fsdp > 1 else None)
        if n_fsdp > 1:
            g = sharding.sum_replicated_over_fsdp(g, specs)
            loss, count, mm = jax.lax.psum((loss, count, mm), sharding.FSDP)
        if n_data > 1 and n_data & (n_data - 1) == 0:
            g, loss, count, mm = _tree_allreduce((g, loss, count, mm), n_data)
        elif n_data > 1:  # not a power of two: plain psum (equal to one device up to summation order)
            g, loss, count, mm = jax.lax.psum((g, loss, count, mm), sharding.DATA)
        return g, loss, count, mm

    if mesh is not None and sharding.row_shards(mesh) > 1:
        rows, rep = sharding.rows_spec(), sharding.replicated_spec()
        local = sharding.shard_map(local, mesh, in_specs=(specs, rows), out_specs=(specs, rep, rep, rep))
    g, loss, count, mismatch = local(params, batch)
    return g, loss, tokens, mismatch / jnp.maximum(count, 1.0)


def train_step(config, spec: LossSpec, optimizer, mesh, params, opt_state, batch: Packed):
    """One optimizer step on a whole RL step's packed rows. Returns (params, opt_state, StepMetrics)."""
    TRACE_COUNTS["train_step"] = TRACE_COUNTS.get("train_step", 0) + 1  # runs when jit traces
    with sharding.active(mesh):  # Muon places its matrix stacks by logical axis (jaxrl/sharding.py)
        grads, loss, count, mismatch = grads_and_metrics(config, spec, mesh, params, batch)
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_state = optimizer.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        params = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_params, params)
        opt_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, opt_state)
    metrics = StepMetrics(loss, grad_norm, count, mismatch, (~finite).astype(jnp.int32))
    # outputs keep the training layout, so step 2 sees the shardings step 1 compiled for
    return sharding.constrain_tree(params, mesh), sharding.constrain_tree(opt_state, mesh), metrics


@functools.lru_cache(maxsize=16)
def compiled_train_step(config, spec: LossSpec, optimizer, mesh):
    """jit of `train_step` with params/opt_state donated (they are replaced every step). On a mesh,
    params and optimizer state are in the training layout (`sharding.place`), in and out."""
    return jax.jit(functools.partial(train_step, config, spec, optimizer, mesh), donate_argnums=(0, 1))
