"""REINFORCE pieces: advantages, the padded batch, the objective (rl.pg_loss) against a hand-written
formula, the fast path (packing, chunks, the cross-device sum) against rl.pg_loss, the sharded step.

Run: `python -m pytest tests/test_rl.py -q`. Uses small random models; no fixtures needed.
"""
import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxrl import model as gpt
from jaxrl import optim, packing, rl, sharding

# 3 layers: backout (at n_layer//2) is not the last block, whose output rms_norm makes scale-invariant.
# Vocabulary 300: the batches below draw tokens under 290 and pad with 299.
CFG = tiny_config(n_layer=3, window_pattern="SSL", vocab_size=300)
PAD = 299
SPEC = rl.LossSpec(device_batch_size=2, num_passes=2, examples_per_step=2)  # 2 questions x 4 samples


def _params(seed=0):
    p = gpt.init_params(CFG, jax.random.key(seed))
    # init has zero projections; perturb so every parameter gets a gradient. Not conftest's
    # tiny_params: the 1-vs-8-device tolerances below were measured on these smaller weights.
    # One key per nanochat tensor in the sorted order of its name's parts, so the values do not
    # depend on the layout (they are those of the per-layer tree before the stacked layout).
    flat = gpt.flatten_params(p)
    names = sorted(flat, key=lambda name: name.split("."))
    keys = jax.random.split(jax.random.key(seed + 1), len(names))
    return gpt.unflatten_params({n: flat[n] + 0.05 * jax.random.normal(k, flat[n].shape) for n, k in zip(names, keys)})


def test_advantages_hand_computed():
    rewards = [1, 0, 0, 1, 0, 0, 0, 1]
    np.testing.assert_allclose(rl.advantages(rewards, 4), [0.5, -0.5, -0.5, 0.5, -0.25, -0.25, -0.25, 0.75])
    z = rl.advantages(rewards, 4, "zscore")
    np.testing.assert_allclose(z[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-4), rtol=1e-6)
    with pytest.raises(ValueError, match="advantage"):
        rl.advantages(rewards, 4, "std")


def test_build_batch_masks_and_padding():
    seqs = [[1, 2, 3, 4, 5], [1, 2, 6]]
    masks = [[0, 0, 1, 0, 1], [0, 0, 1]]
    b = rl.build_batch(seqs, masks, [1.0, -1.0], PAD, sampler_logp=[np.array([-0.1, -0.2, -0.3]), np.array([-0.5])])
    assert b.inputs.shape == (2, rl.SEQ_BUCKET)
    assert b.inputs[0, :5].tolist() == [1, 2, 3, 4, 5] and b.inputs[1, 3] == PAD
    # target t is token t+1 where its mask is 1: forced tokens (mask 0), prompt and padding are -1
    assert b.targets[0, :5].tolist() == [-1, 3, -1, 5, -1]
    assert b.targets[1, :3].tolist() == [-1, 6, -1]
    assert (b.targets[:, 5:] == -1).all()
    # sampler log-probs line up with their targets (generated tokens are the last of each row)
    assert b.sampler_logp[0, 1:4].tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert b.sampler_logp[1, 1] == pytest.approx(-0.5)


def test_train_on_end_token_adds_one_target():
    seqs, masks = [[1, 2, 3]], [[0, 1, 1]]
    off = rl.build_batch(seqs, masks, [1.0], PAD)
    on = rl.build_batch(seqs, masks, [1.0], PAD, end_rows=[True], end_id=7)
    assert (on.targets >= 0).sum() == (off.targets >= 0).sum() + 1
    assert on.targets[0, 2] == 7


def _example_batch(rng, questions=2, samples=4):
    R = questions * samples
    seqs = [list(rng.integers(0, 290, size=int(rng.integers(8, 30)))) for _ in range(R)]
    masks = [[0] * 4 + list(rng.integers(0, 2, size=len(s) - 4)) for s in seqs]
    rewards = rng.integers(0, 2, size=R).astype(np.float32)
    return rl.build_batch(seqs, masks, rl.advantages(rewards, samples), PAD)


def test_loss_matches_nanochat_formula():
    """2 questions x 4 samples, device_batch_size 2: Σ_pass Σ logp·adv / (N_pass · passes · examples)."""
    rng = np.random.default_rng(0)
    b = _example_batch(rng)
    params = _params()
    nll = np.asarray(gpt.token_nll(CFG, params, b.inputs, b.targets))
    expected = 0.0
    for mb in range(4):
        rows = slice(2 * mb, 2 * mb + 2)
        n = max(1, int((b.targets[rows] >= 0).sum()))
        expected += -np.sum(-nll[rows] * b.advantages[rows, None]) / (n * 2 * 2)
    _, loss, count, _ = rl.grads_and_metrics(CFG, SPEC, None, params, packing.pack(b, PAD, chunk=2))
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert float(rl.pg_loss(CFG, params, b, SPEC)) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert int(count) == int((b.targets >= 0).sum())
    g_spec = rl.LossSpec(device_batch_size=2, num_passes=2, examples_per_step=2, token_norm="global")
    _, g_loss, _, _ = rl.grads_and_metrics(CFG, g_spec, None, params, packing.pack(b, PAD, chunk=2))
    expected_g = -np.sum(-nll * b.advantages[:, None]) / (b.targets >= 0).sum()
    assert float(g_loss) == pytest.approx(expected_g, rel=1e-5, abs=1e-7)
    assert float(rl.pg_loss(CFG, params, b, g_spec)) == pytest.approx(expected_g, rel=1e-5, abs=1e-7)


def test_one_vs_eight_devices_same_update():
    """The shard_mapped step on 8 simulated CPU devices equals the single-device step.

    Each device packs its own rows, so the rows share bins differently and the gradients agree
    to float32 rounding (checked relative to each leaf's scale); the updated params after one
    nanochat optimizer step agree within 1e-6. (Over several steps Adam's per-element
    normalisation can amplify rounding noise on gradients that are ~0 in theory.)
    """
    assert jax.device_count() >= 8, "conftest simulates 8 CPU devices"
    rng = np.random.default_rng(1)
    b = _example_batch(rng, questions=8, samples=4)
    spec = rl.LossSpec(device_batch_size=2, num_passes=2, examples_per_step=8)
    opt = optim.build_optimizer(CFG, num_steps=10, muon_dtype="float32")
    outs = []
    for mesh in (None, sharding.make_mesh()):
        params = _params()
        n_dev = 1 if mesh is None else sharding.row_shards(mesh)
        batch = packing.pack(b, PAD, n_dev=n_dev, chunk=2)
        batch = batch if mesh is None else jax.device_put(batch, sharding.rows_sharding(mesh))
        grads, loss, _, _ = jax.jit(lambda p, x: rl.grads_and_metrics(CFG, spec, mesh, p, x))(params, batch)
        new, _, m = rl.compiled_train_step(CFG, spec, opt, mesh)(params, opt.init(params), batch)
        outs.append((jax.device_get(grads), jax.device_get(new), float(m.loss)))
    (g1, p1, l1), (g8, p8, l8) = outs
    assert l1 == pytest.approx(l8, rel=1e-5)
    for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(g1), jax.tree.leaves(g8)):
        assert np.abs(a - c).max() <= 1e-5 * np.abs(a).max() + 1e-12, jax.tree_util.keystr(path)
    for (path, a), c in zip(jax.tree_util.tree_leaves_with_path(p1), jax.tree.leaves(p8)):
        np.testing.assert_allclose(a, c, atol=1e-6, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_nonfinite_step_is_skipped():
    rng = np.random.default_rng(2)
    b = _example_batch(rng)
    b = b._replace(advantages=b.advantages * np.float32("nan"))
    opt = optim.build_optimizer(CFG, num_steps=10, muon_dtype="float32")
    params = _params()
    state = opt.init(params)
    before = jax.device_get(params)
    new, _, m = rl.compiled_train_step(CFG, SPEC, opt, None)(params, state, packing.pack(b, PAD, chunk=2))
    assert int(m.skipped) == 1
    for a, c in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(new))):
        np.testing.assert_array_equal(a, c)


# The fast path against the reference: both add the same float32 terms (advantage-weighted
# log-probs) in different orders (bins instead of rows, chunks, a device tree) and through
# matmuls of different shapes, so they agree to accumulated rounding, not bit for bit. The loss
# gap is bounded relative to Σ|terms| (pg_loss with |advantages|), as the loss itself can cancel
# to near 0; each gradient leaf's gap relative to its largest entry, or that of the |advantages|
# gradient where the advantages cancel. Over 25 random draws of the test below (fresh seeds) the
# largest gaps seen were 2.1e-7 (loss, about 2 float32 epsilons) and 2.5e-6 (gradients); the
# bounds leave a margin of about 10, and a wrong weight, normalisation, or a dropped or duplicated
# token moves either by 1e-3 or more.
LOSS_RTOL, GRAD_RTOL = 2e-6, 2e-5


@pytest.mark.parametrize("seed,n_dev,fsdp", [(2, 1, 1), (8, 2, 1), (4, 3, 1), (4, 8, 1), (6, 8, 4), (7, 8, 8)])
def test_fast_path_equals_pg_loss(seed, n_dev, fsdp):
    """Property: the train step's fast path (rl.global_batch on n_dev simulated devices, `fsdp` of
    them sharing sharded params, chunks scanned per device, the cross-device sums) gives
    rl.pg_loss and its gradient, on fresh random rows: lengths, prompts and masks (some rows
    without a target), advantages (some exactly 0), pass size and count, token_norm, chunk size,
    bin length, prompt sharing and zero skipping."""
    rng = np.random.default_rng([15, seed])
    dbs, passes = int(rng.choice([1, 2, 3])), int(rng.choice([1, 2]))
    N, Q = dbs * passes, n_dev * int(rng.choice([1, 2]) if n_dev < 8 else 1)
    spec = rl.LossSpec(device_batch_size=dbs, num_passes=passes, examples_per_step=Q,
                       token_norm=str(rng.choice(["pass", "global"])), chunk_rows=int(rng.choice([0, 1, 3])))
    seqs, masks = _ragged_batch(rng, Q * N, group=N)
    adv = rng.standard_normal(Q * N).astype(np.float32)
    adv[rng.random(Q * N) < 0.25] = 0.0
    b = rl.build_batch(seqs, masks, adv, PAD)
    mesh = sharding.make_mesh(jax.devices()[:n_dev], fsdp=fsdp)
    packed = rl.global_batch(b, mesh, pad_id=PAD, chunk=spec.chunk_rows, min_len=int(rng.choice([0, 128])),
                             skip_zero_advantage=bool(rng.integers(2)), group=int(rng.choice([1, N])))
    params = sharding.place(_params(seed), mesh)
    if fsdp > 1:  # the big matrices really are split: each device holds 1/fsdp of them
        wte = params["transformer"]["wte"]["weight"]
        assert wte.addressable_shards[0].data.shape[0] == wte.shape[0] // fsdp
    grads, loss, tokens, _ = jax.jit(lambda p, x: rl.grads_and_metrics(CFG, spec, mesh, p, x))(params, packed)
    reference = jax.jit(jax.value_and_grad(lambda p, x: rl.pg_loss(CFG, p, x, spec)))
    ref_loss, ref_grads = reference(params, b)
    abs_loss, abs_grads = reference(params, b._replace(advantages=np.abs(adv)))  # the scales of the bounds
    assert int(tokens) == int((b.targets >= 0).sum())
    assert abs(float(loss) - float(ref_loss)) <= LOSS_RTOL * float(abs_loss) + 1e-12
    for (path, a), c, s in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree.leaves(grads),
                               jax.tree.leaves(abs_grads)):
        gap, scale = np.abs(a - c).max(), max(np.abs(a).max(), np.abs(s).max())
        assert gap <= GRAD_RTOL * scale + 1e-12, f"{jax.tree_util.keystr(path)}: gap {gap / scale:.1e} of its scale"


def _ragged_batch(rng, rows, T_max=60, group=1):
    """Rows of random lengths; each group of `group` rows shares a prompt of random length (the
    first continuation token of a row may equal the prompt's next one); some rows have no target."""
    seqs, masks = [], []
    for _ in range(rows // group):
        p = int(rng.integers(1, T_max // 2))
        prompt = list(rng.integers(0, 290, size=p))
        for _ in range(group):
            n = int(rng.integers(p + 1, T_max))
            seqs.append(prompt + list(rng.integers(0, 4, size=n - p)))
            masks.append([0] * p + list(rng.integers(0, 2, size=n - p)))
    return seqs, masks


@pytest.mark.parametrize("seed,group", [(0, 1), (1, 1), (2, 3), (3, 3), (4, 6)])
def test_pack_forward_equals_one_row_per_sequence(seed, group):
    """Packed bins give every trained token the log-prob it gets alone in its own row (property),
    with each group's samples attending to one shared copy of their prompt."""
    rng = np.random.default_rng(100 + seed)
    seqs, masks = _ragged_batch(rng, 12, group=group)
    adv = rng.standard_normal(12).astype(np.float32)
    adv[rng.integers(0, 12, size=3)] = 0.0
    b = rl.build_batch(seqs, masks, adv, PAD)
    pk = packing.pack(b, PAD, n_dev=2, chunk=4, min_len=int(rng.choice([0, 128])), group=group)
    assert pk.inputs.shape[0] == 2 * 8 and pk.inputs.shape[1] >= b.inputs.shape[1]
    params = _params(seed)
    ref = np.asarray(gpt.token_nll(CFG, params, b.inputs, b.targets))
    got = np.asarray(gpt.nll_from_logits(gpt.forward(CFG, params, pk.inputs, pk.positions, pk.packing()), pk.targets))
    per = 6  # rows per device
    seen = np.zeros(12, int)
    for g in range(pk.inputs.shape[0]):
        d = g // 8
        for t in np.nonzero(pk.rows[g] >= 0)[0]:
            r = d * per + pk.rows[g, t]
            pos = pk.positions[g, t]
            assert pk.inputs[g, t] == b.inputs[r, pos] and pk.targets[g, t] == b.targets[r, pos]
            if pk.targets[g, t] >= 0:
                seen[r] += 1
                assert got[g, t] == pytest.approx(ref[r, pos], abs=2e-5)
    trained = (b.targets >= 0).sum(axis=1)
    kept = (trained > 0) & (adv != 0)
    np.testing.assert_array_equal(seen, np.where(kept, trained, 0))  # every kept target once, no other
    np.testing.assert_array_equal(pk.row_tokens, trained)
    assert (pk.bins <= 6).all() and (pk.bins >= 1).all()
    if group > 1:  # the prompt is stored once per bin, not once per row
        used = (pk.segments > 0).sum()
        assert used < sum(int(np.nonzero(b.targets[r] >= 0)[0][-1]) + 1 for r in range(12) if kept[r])


def test_pack_keeps_the_objective_and_gradient():
    """Packing (shared prompts, zero-advantage rows dropped) changes neither the loss nor the gradient."""
    rng = np.random.default_rng(7)
    seqs, masks = _ragged_batch(rng, 8, group=4)
    rewards = np.array([1, 1, 1, 1, 0, 1, 0, 0], np.float32)  # question 0: all correct -> advantage 0
    b = rl.build_batch(seqs, masks, rl.advantages(rewards, 4), PAD)
    params = _params(5)
    outs = [rl.grads_and_metrics(CFG, SPEC, None, params, packing.pack(b, PAD, chunk=2, skip_zero_advantage=s, group=g))
            for s, g in ((False, 1), (True, 1), (True, 4))]
    for o in outs[1:]:
        assert float(outs[0][1]) == pytest.approx(float(o[1]), rel=1e-5, abs=1e-8)
        assert int(outs[0][2]) == int(o[2]) == int((b.targets >= 0).sum())
        for a, c in zip(jax.tree.leaves(outs[0][0]), jax.tree.leaves(o[0])):
            np.testing.assert_allclose(a, c, atol=1e-6, rtol=1e-4)
    assert int(packing.pack(b, PAD, chunk=2).bins[0]) < int(packing.pack(b, PAD, chunk=2, skip_zero_advantage=False).bins[0])


@pytest.mark.parametrize("generation", ["gen-2026-01", "gen-2025-10"])
def test_pack_forward_with_sliding_windows(generation):
    """Windows of 8 and 16 tokens (sequence_len 16, rows up to 60): packed continuations attending
    to a shared prompt copy see the same window as in their own row."""
    cfg = tiny_config(generation, sequence_len=16, n_layer=3, window_pattern="SSL", vocab_size=300)
    p = gpt.init_params(cfg, jax.random.key(3))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(4), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    rng = np.random.default_rng(11)
    seqs, masks = _ragged_batch(rng, 12, group=4)
    b = rl.build_batch(seqs, masks, rng.standard_normal(12).astype(np.float32), PAD)
    pk = packing.pack(b, PAD, chunk=4, group=4)
    assert (pk.segments != pk.parents).any()  # continuations do attend to shared prompt copies
    ref = np.asarray(gpt.token_nll(cfg, params, b.inputs, b.targets))
    got = np.asarray(gpt.nll_from_logits(gpt.forward(cfg, params, pk.inputs, pk.positions, pk.packing()), pk.targets))
    g, t = np.nonzero(pk.targets >= 0)
    np.testing.assert_allclose(got[g, t], ref[pk.rows[g, t], pk.positions[g, t]], atol=2e-5)
