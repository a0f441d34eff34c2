"""Correctness checks that need an NVIDIA GPU (marker `gpu`: on any other backend they are reported
as skipped, never silently passed). scripts/device_check.sh runs them first:

    JAX_PLATFORMS=cuda,cpu python -m pytest -q -m gpu tests/test_gpu.py   (cpu: the calculator's host callbacks)

Both read the arith fixture checkpoint (../shared/fixtures/nanochat-sft-arith, or a `shared/` copy
inside the repo on a machine without ../shared: see docs/benchmarks.md "GPU") through convert/,
which needs torch.

- cuDNN's fused attention (the config's attention = "cudnn", bf16 only) is checked against the einsum path in
  bf16, with the fp32 einsum logits as the yardstick: cuDNN may not be further from fp32 than the
  bf16 einsum path is, plus a small margin for a different summation order.
- bf16 greedy rollouts are checked against fp32 greedy rollouts: a row may leave the fp32 tokens only
  where fp32's own top-2 logit gap is within the bf16 forward's measured logit error (a near tie,
  where bf16 rounding legitimately picks the other token). Anywhere else a difference is a bug.
"""
import functools

import jax
import numpy as np
import pytest
from conftest import ARITH, SHARED

from jaxrl import model as gpt
from jaxrl import sampler
from jaxrl.tasks.gsm8k import GSM8K
from jaxrl.tokenizer import Tokenizer

pytestmark = pytest.mark.gpu

PROMPTS = 32  # arith test questions (their prompts are 60-120 tokens)
NEW_TOKENS = 96  # arith answers end within ~70 tokens
LONG = 224  # tokens per row of the attention check: past the fixture's 128-token sliding window


@functools.cache
def arith_policy():
    pytest.importorskip("torch")
    from convert import load_nanochat

    config, params = load_nanochat(ARITH, step=100)
    return config, jax.device_put(params), Tokenizer.from_directory(ARITH / "tokenizer")


def arith_prompts(tokenizer, n):
    task = GSM8K("test", data_dir=SHARED / "data" / "arith")
    return [tokenizer.render_for_completion(task[i]) for i in range(n)]


def logits_with(impl, config, params, ids):
    """Logits of the full forward with attention `impl` (a static config field: each compiles its own)."""
    config = config.replace(attention=impl)
    return np.asarray(jax.jit(lambda w, x: gpt.forward(config, w, x))(params, ids))


def test_cudnn_attention_matches_einsum_bf16():
    config, params, tokenizer = arith_policy()
    rng = np.random.default_rng(0)
    prompts = arith_prompts(tokenizer, 4)  # real text first, then random ids out to LONG tokens
    ids = rng.integers(0, config.vocab_size, (4, LONG)).astype(np.int32)
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = p
    want = logits_with("einsum", config, params, ids)  # fp32
    bf16 = config.replace(compute_dtype="bfloat16")
    einsum = logits_with("einsum", bf16, params, ids)
    cudnn = logits_with("cudnn", bf16, params, ids)
    err_einsum = np.abs(einsum - want).max()
    err_cudnn = np.abs(cudnn - want).max()
    print(f"max |logit - fp32|: einsum bf16 {err_einsum:.4f}, cudnn bf16 {err_cudnn:.4f}")
    assert np.isfinite(cudnn).all()
    assert err_cudnn <= 1.25 * err_einsum + 0.02, (err_cudnn, err_einsum)
    # the argmax agrees wherever fp32's top-2 gap is wider than both bf16 errors
    top2 = np.sort(want, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * max(err_einsum, err_cudnn)
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(cudnn.argmax(-1)[clear], want.argmax(-1)[clear])


def greedy(config, params, tokenizer, prompts):
    seqs, _ = sampler.generate(config, params, tokenizer, prompts, num_samples=1, max_new_tokens=NEW_TOKENS,
                               temperature=0.0)
    return [s[0] for s in seqs]


def test_bf16_greedy_rollouts_match_fp32():
    config, params, tokenizer = arith_policy()
    prompts = arith_prompts(tokenizer, PROMPTS)
    fp32 = greedy(config, params, tokenizer, prompts)
    bf16_config = config.replace(compute_dtype="bfloat16")
    bf16 = greedy(bf16_config, params, tokenizer, prompts)
    same = sum(a == b for a, b in zip(fp32, bf16))
    print(f"bf16 greedy rollouts identical to fp32: {same} of {len(prompts)}")
    forward = jax.jit(lambda c, w, x: gpt.forward(c, w, x), static_argnums=0)
    for r, (a, b) in enumerate(zip(fp32, bf16)):
        if a == b:
            continue
        n = len(prompts[r])
        first = next((i for i in range(n, min(len(a), len(b))) if a[i] != b[i]), min(len(a), len(b)))
        assert first >= n, f"row {r}: bf16 and fp32 differ in the prompt"
        ids = np.asarray([a[:first]], np.int32)  # the shared prefix; both picked the token after it
        want = np.asarray(forward(config, params, ids))[0, -1]
        got = np.asarray(forward(bf16_config, params, ids))[0, -1]
        err = np.abs(got - want).max()
        gap = np.sort(want)[-1] - np.sort(want)[-2]
        assert gap <= 2 * err, (f"row {r}: bf16 greedy left fp32's tokens at position {first - n} where fp32's "
                                f"top-2 gap {gap:.4f} exceeds twice the bf16 logit error {err:.4f}")
    assert same >= PROMPTS // 2, f"only {same} of {PROMPTS} bf16 greedy rollouts equal fp32's"
