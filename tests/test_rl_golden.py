"""REINFORCE against nanochat's own numbers: advantages, the per-token loss, the training batch.

Golden checks read ../shared/fixtures/nanochat/gen-*/ (written by each generation's nanochat):
`golden_forward.npz` (3 rows of 48 tokens with targets, chat_rl's advantages and policy-gradient
loss for rewards [1, 0, 0], and the plain NLL mean) and `golden_engine.json` `scripted_tool_use`
(three Engine rollouts driving the calculator, their rewards, and the padded batch chat_rl builds
from them). The loss test loads the fixture checkpoints, so it needs torch and is skipped without.

Run: `python -m pytest -q tests/test_rl_golden.py`.
"""
import json

import jax
import numpy as np
import pytest

from conftest import FIXTURES, GENERATIONS
from jaxrl import rl, rollout, sharding
from jaxrl.tasks import gsm8k
from jaxrl.tokenizer import Tokenizer

# fp32 relative tolerance of the losses. nanochat's and jaxrl's forwards agree to 5.7e-6 absolute
# per token NLL (tests/test_convert.py measures it; NLLs are ~11 here). The loss is Σ nll·adv / N
# with Σ|adv| over a token's row ≤ 1, so its error is at most 5.7e-6 · 2/3 ≈ 3.8e-6 absolute on
# losses ≥ 0.73: ≤ 5.2e-6 relative. The NLL mean's error is ≤ 5.7e-6 on ~11: ≤ 5.2e-7 relative.
PG_LOSS_RTOL = 1e-5
LOSS_MEAN_RTOL = 1e-6


def _forward_golden(gen):
    return np.load(FIXTURES / gen / "golden_forward.npz")


def _scripted(gen) -> dict:
    cases = json.loads((FIXTURES / gen / "golden_engine.json").read_text())["cases"]
    return next(c for c in cases if c["name"] == "scripted_tool_use")


# ------------------------------------------------------------------------------------------
# Advantages


@pytest.mark.parametrize("gen", GENERATIONS)
def test_advantages_match_nanochat(gen):
    """rl.advantages of nanochat's rewards equals nanochat's advantages bit for bit (both are
    float32 `r - r.mean()`), in golden_forward.npz and in the scripted rollouts' batch."""
    golden = _forward_golden(gen)
    rewards = golden["pg_rewards"]
    got = rl.advantages(rewards, num_samples=len(rewards))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, golden["pg_advantages"])
    case = _scripted(gen)
    got = rl.advantages(case["rewards"], num_samples=case["call"]["num_samples"])
    np.testing.assert_array_equal(got, np.asarray(case["rl_batch"]["advantages"], np.float32))


# ------------------------------------------------------------------------------------------
# The REINFORCE loss on nanochat's rows, through the train step's loss


def _train_step_losses(config, params, batches: list[rl.Batch], pad_id: int) -> list[tuple[float, int]]:
    """(−objective, trained tokens) as the train step computes them, for each batch holding one
    question's samples: one pass of all rows (nanochat's device_batch_size = num_samples), packed
    as train_rl.py packs them (rl.global_batch, one device)."""
    spec = _one_pass(batches[0])
    mesh = sharding.make_mesh(jax.devices()[:1])
    loss_fn = jax.jit(lambda p, b: rl.grads_and_metrics(config, spec, None, p, b)[1:3])
    out = []
    for batch in batches:
        packed = rl.global_batch(batch, mesh, pad_id=pad_id, chunk=spec.chunk_rows, group=spec.device_batch_size)
        loss, tokens = loss_fn(params, packed)
        out.append((float(loss), int(tokens)))
    return out


def _one_pass(batch: rl.Batch) -> rl.LossSpec:
    """One question whose samples are all one pass: nanochat's device_batch_size = num_samples."""
    return rl.LossSpec(device_batch_size=batch.inputs.shape[0], num_passes=1, examples_per_step=1)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_reinforce_loss_matches_nanochat(gen):
    """The train step's loss on golden_forward.npz's rows (jaxrl's model on the imported
    checkpoint) equals nanochat's pg_loss = −Σ(−nll · adv) / count(targets ≥ 0): one token count
    for the whole pass, not a per-row mean. With every advantage 1 the same loss is the plain NLL
    mean over trained tokens, which must equal nanochat's loss_mean. The reference objective,
    rl.pg_loss on the plain padded rows (no packing), equals both too."""
    pytest.importorskip("torch")
    from convert import load_nanochat

    config, params = load_nanochat(FIXTURES / gen)
    golden = _forward_golden(gen)
    formula = json.loads((FIXTURES / gen / "golden_forward.json").read_text())["pg_loss_formula"]
    assert "/ max(1, count(targets>=0))" in formula, f"fixture's loss definition changed: {formula}"
    idx, targets = golden["idx"].astype(np.int32), golden["targets"].astype(np.int32)
    pad_id = 2043  # <|assistant_end|>: nanochat's (and train_rl.py's) padding token
    adv = rl.advantages(golden["pg_rewards"], num_samples=len(idx))
    batch = rl.Batch(idx, targets, adv, np.zeros(idx.shape, np.float32))
    ones = batch._replace(advantages=np.ones(len(idx), np.float32))
    (loss, tokens), (nll_mean, _) = _train_step_losses(config, params, [batch, ones], pad_id)
    print(f"{gen}: pg_loss rel err {abs(loss / golden['pg_loss'] - 1):.2e}, "
          f"loss_mean rel err {abs(nll_mean / golden['loss_mean'] - 1):.2e}")
    assert tokens == int((targets >= 0).sum())
    np.testing.assert_allclose(loss, golden["pg_loss"], rtol=PG_LOSS_RTOL, atol=0)
    np.testing.assert_allclose(nll_mean, golden["loss_mean"], rtol=LOSS_MEAN_RTOL, atol=0)
    reference = jax.jit(lambda p, b: rl.pg_loss(config, p, b, _one_pass(batch)))
    ref_loss, ref_nll_mean = float(reference(params, batch)), float(reference(params, ones))
    print(f"{gen}: rl.pg_loss: pg_loss rel err {abs(ref_loss / golden['pg_loss'] - 1):.2e}, "
          f"loss_mean rel err {abs(ref_nll_mean / golden['loss_mean'] - 1):.2e}")
    np.testing.assert_allclose(ref_loss, golden["pg_loss"], rtol=PG_LOSS_RTOL, atol=0)
    np.testing.assert_allclose(ref_nll_mean, golden["loss_mean"], rtol=LOSS_MEAN_RTOL, atol=0)


# ------------------------------------------------------------------------------------------
# The training batch of the scripted tool-use rollouts


def _round_result(case, tokenizer) -> rollout.RoundResult:
    """nanochat's rollouts as jaxrl's sampler reports a round, rewards scored by jaxrl's task."""
    prompt_len = case["prompt_len"]
    seqs, masks = case["sequences"], case["masks"]
    completions = [tokenizer.decode(s[prompt_len:]) for s in seqs]
    assert completions == case["completion_texts"]
    rewards = np.array([gsm8k.reward(case["conversation"], c) for c in completions], np.float32)
    n = len(seqs)
    gen_len = [len(s) - prompt_len for s in seqs]
    return rollout.RoundResult(
        sequences=seqs, masks=masks, rewards=rewards, correct=(rewards > 0).reshape(1, n),
        prompt_lens=[prompt_len], sampler_logp=[np.zeros(k, np.float32) for k in gen_len],
        ended=np.array([k < case["call"]["max_tokens"] for k in gen_len]), gen_tokens=sum(gen_len), seconds=0.0)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_batch_matches_nanochat_rl_batch(gen):
    """rollout.make_batch (train_rl.py's path) on nanochat's scripted rollouts equals nanochat's
    rl_batch: rewards, advantages, and inputs/targets exactly over nanochat's padded length Tn
    (forced calculator output and the prompt are -1 targets, padding is <|assistant_end|>).

    jaxrl pads rows to a multiple of rl.SEQ_BUCKET (64) instead of to the longest row, so that a
    run compiles its train step for few lengths. Past Tn every target is -1, so those columns add
    nothing to the loss or to the token count; their inputs are the column nanochat's shift drops
    (padded_ids[:, Tn], the longest row's last token) and then the pad id."""
    case = _scripted(gen)
    tokenizer = Tokenizer.from_directory(FIXTURES / gen / "tokenizer")
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    result = _round_result(case, tokenizer)
    np.testing.assert_array_equal(result.rewards, np.asarray(case["rewards"], np.float32))
    batch = rollout.make_batch(result, case["call"]["num_samples"], pad_id, end_id=pad_id)
    gold = {k: np.asarray(v) for k, v in case["rl_batch"].items()}
    R, Tn = gold["inputs"].shape
    assert batch.inputs.shape == (R, -(-Tn // rl.SEQ_BUCKET) * rl.SEQ_BUCKET)
    np.testing.assert_array_equal(batch.inputs[:, :Tn], gold["inputs"])
    np.testing.assert_array_equal(batch.targets[:, :Tn], gold["targets"])
    np.testing.assert_array_equal(batch.targets[:, :Tn] >= 0, gold["padded_masks"][:, 1:] == 1)
    np.testing.assert_array_equal(batch.advantages, gold["advantages"].astype(np.float32))
    assert (batch.targets[:, Tn:] == -1).all()
    np.testing.assert_array_equal(batch.inputs[:, Tn], gold["padded_ids"][:, Tn])
    assert (batch.inputs[:, Tn + 1:] == pad_id).all()


@pytest.mark.parametrize("gen", GENERATIONS)
@pytest.mark.parametrize("n_dev", [1, 3])
def test_packed_batch_holds_nanochat_rl_batch(gen, n_dev):
    """rl.global_batch (train_rl.py's packing) of that batch holds exactly nanochat's
    rl_batch: every packed token sits at its row's position with nanochat's input and target,
    every trained target of rl_batch appears exactly once, the shared prompt copy is nanochat's
    prompt, and the per-row token counts and advantages are nanochat's."""
    case = _scripted(gen)
    tokenizer = Tokenizer.from_directory(FIXTURES / gen / "tokenizer")
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    N = case["call"]["num_samples"]
    batch = rollout.make_batch(_round_result(case, tokenizer), N, pad_id, end_id=pad_id)
    mesh = sharding.make_mesh(jax.devices()[:n_dev])
    packed = jax.device_get(rl.global_batch(batch, mesh, pad_id=pad_id, chunk=N, group=N))
    gold = {k: np.asarray(v) for k, v in case["rl_batch"].items()}
    R = len(gold["inputs"])
    np.testing.assert_array_equal(packed.row_tokens, (gold["targets"] >= 0).sum(axis=1))
    np.testing.assert_array_equal(packed.advantages, gold["advantages"].astype(np.float32))
    seen = np.zeros_like(gold["targets"], dtype=int)
    per_dev, bins_per_dev = R // n_dev, packed.inputs.shape[0] // n_dev
    for b, t in zip(*np.nonzero(packed.rows >= 0)):
        r, pos = (b // bins_per_dev) * per_dev + packed.rows[b, t], packed.positions[b, t]
        assert packed.inputs[b, t] == gold["inputs"][r, pos], (r, pos)
        assert packed.targets[b, t] == gold["targets"][r, pos], (r, pos)
        seen[r, pos] += packed.targets[b, t] >= 0
    np.testing.assert_array_equal(seen, (gold["targets"] >= 0).astype(int))
    prompt = (packed.rows < 0) & (packed.segments > 0)  # the shared prompt copies
    for b, t in zip(*np.nonzero(prompt)):
        assert packed.inputs[b, t] == case["prompt_tokens"][packed.positions[b, t]]
    if n_dev == 1:  # the three samples share one prompt copy
        assert prompt.sum() <= case["prompt_len"]
