"""jaxrl/model.py properties for every generation, without torch.

Shapes and finiteness, causality, KV-cache prefill + decode == full forward (with a sliding window
shorter than the sequence and per-row prompt lengths in one batch), and bf16 mode close to fp32.
Golden logits against nanochat's own forward are in tests/test_convert.py (reading .pt needs torch).
Params are conftest's `tiny_params` (not `init_params`, whose zero projections and gates would hide bugs).

Run: python -m pytest -q tests/test_model.py
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GENERATIONS, tiny_config, tiny_params
from jaxrl.decode import GEN_BLOCK, decode_shared, decode_step, prefill, shared_cache
from jaxrl.model import GPTConfig, Packing, attention_impl, forward, linear, token_nll

# Tolerances, set once. fp32: cache vs full forward differ only in summation order.
# bf16: nanochat's rounding points (8-bit mantissa, ~0.4 % per op) on logits of magnitude <= 5;
# measured max 0.12 / mean 0.012 on these configs.
FP32_ATOL = 1e-5
BF16_MAX_ATOL, BF16_MEAN_ATOL = 0.25, 0.03
T_LONG = 160  # longer than the short window (128) of both 2026 generations at sequence_len 256
SEQ_LEN = 256  # tiny model's sequence_len here: windows 128 (short) and 256 (long); T_LONG passes only the short

fwd = jax.jit(forward, static_argnums=0)
step = jax.jit(decode_step, static_argnums=0)


def random_tokens(config: GPTConfig, shape, seed: int = 1):
    return jax.random.randint(jax.random.key(seed), shape, 0, config.vocab_size, jnp.int32)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_shapes_and_finiteness(generation):
    config = tiny_config(generation, sequence_len=SEQ_LEN)
    params = tiny_params(config)
    idx = random_tokens(config, (2, 40))
    logits = fwd(config, params, idx)
    assert logits.shape == (2, 40, config.vocab_size) and logits.dtype == jnp.float32
    assert bool(jnp.isfinite(logits).all()) and float(jnp.abs(logits).max()) <= 15.0  # softcap
    targets = idx.at[:, :5].set(-1)
    nll = token_nll(config, params, idx, targets)
    assert nll.shape == (2, 40) and bool(jnp.isfinite(nll).all())
    assert bool((nll[:, :5] == 0).all()) and bool((nll[:, 5:] > 0).all())


@pytest.mark.parametrize("generation", GENERATIONS)
def test_causality(generation):
    """Changing token t leaves logits before t unchanged and changes logits at t."""
    config = tiny_config(generation, sequence_len=SEQ_LEN)
    params = tiny_params(config)
    idx = random_tokens(config, (2, T_LONG))
    for t in (0, 37, T_LONG - 1):
        changed = idx.at[:, t].set((idx[:, t] + 1) % config.vocab_size)
        a, b = fwd(config, params, idx), fwd(config, params, changed)
        np.testing.assert_allclose(a[:, :t], b[:, :t], rtol=0, atol=FP32_ATOL)
        assert float(jnp.abs(a[:, t] - b[:, t]).max()) > 1e-3


@pytest.mark.parametrize("generation", GENERATIONS)
def test_cached_prefill_and_decode_equal_full_forward(generation):
    """Rows with prompt lengths 5, 17, 30 prefilled in one left-padded batch, then decoded one
    token at a time to position T_LONG-1 (past the short window), match the full forward."""
    config = tiny_config(generation, sequence_len=SEQ_LEN)
    assert config.window_sizes()[0] is None or config.window_sizes()[0] < T_LONG
    params = tiny_params(config)
    seq = random_tokens(config, (3, T_LONG))
    full = np.asarray(fwd(config, params, seq))
    lengths = np.array([5, 17, 30])
    width = int(lengths.max())
    pad = width - lengths
    # left padding; the padding tokens are garbage that must not matter
    prompts = np.array(random_tokens(config, (3, width)))
    for r in range(3):
        prompts[r, pad[r]:] = np.asarray(seq[r, : lengths[r]])
    cache_len = width + T_LONG
    logits, cache = prefill(config, params, jnp.asarray(prompts), jnp.asarray(pad, jnp.int32), cache_len)
    rows = np.arange(3)
    np.testing.assert_allclose(logits, full[rows, lengths - 1], rtol=0, atol=FP32_ATOL)
    for j in range(T_LONG - width):
        pos = lengths + j
        logits, cache = step(config, params, seq[rows, pos], width + j, jnp.asarray(pad, jnp.int32), cache)
        np.testing.assert_allclose(logits, full[rows, pos], rtol=0, atol=FP32_ATOL,
                                   err_msg=f"decode step {j}, positions {pos}")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_shared_prompt_decode_equals_full_forward(generation):
    """The sampler's decode (one prompt cache shared by N samples, generated keys in blocks of
    GEN_BLOCK columns) matches the full forward of every row, across two block boundaries and a
    partial last block, with prompts of different lengths and samples that differ from column 0."""
    config = tiny_config(generation, sequence_len=SEQ_LEN)
    params = tiny_params(config)
    P, N, M = 2, 3, 2 * GEN_BLOCK + 6
    lengths = np.array([5, 17])
    width = int(lengths.max())
    pad = jnp.asarray(width - lengths, jnp.int32)
    prompt_tokens = np.asarray(random_tokens(config, (P, width), seed=2))
    gen = np.asarray(random_tokens(config, (P * N, M), seed=3))
    rows = [np.concatenate([prompt_tokens[r // N, width - lengths[r // N]:], gen[r]]) for r in range(P * N)]
    full = [np.asarray(fwd(config, params, jnp.asarray(row)[None]))[0] for row in rows]
    logits, cache = prefill(config, params, jnp.asarray(prompt_tokens), pad, width)
    cache = shared_cache(config, cache, N, M)
    step_shared = jax.jit(decode_shared, static_argnums=(0, 6))
    for col in range(M):
        gen_len = min(M, (col // GEN_BLOCK + 1) * GEN_BLOCK)
        logits, cache = step_shared(config, params, jnp.asarray(gen[:, col]), col, pad, cache, gen_len)
        want = np.stack([full[r][lengths[r // N] + col] for r in range(P * N)])
        np.testing.assert_allclose(logits, want, rtol=0, atol=FP32_ATOL, err_msg=f"column {col}")


@pytest.mark.parametrize("generation", GENERATIONS)
def test_fused_attention_path_equals_einsum(generation):
    """attention="xla" (jax.nn.dot_product_attention, the code path cuDNN takes on a GPU) gives
    the einsum path's logits and gradients: plain rows past the short window, one packed row (a
    prompt shared by two continuations), and left-padded prefill (padding slots excluded). The
    setting is a static field of the config, so each value compiles its own function."""
    config = tiny_config(generation, sequence_len=SEQ_LEN)
    params = tiny_params(config)
    seq = random_tokens(config, (2, T_LONG))
    p, a, b = 7, 9, 6  # packed row: prompt (piece 0), continuations (pieces 1, 2) that both extend it
    packed = random_tokens(config, (1, p + a + b), seed=5)
    positions = jnp.asarray([list(range(p)) + list(range(p, p + a)) + list(range(p, p + b))])
    segments = jnp.asarray([[0] * p + [1] * a + [2] * b])
    parents = jnp.asarray([[0] * p + [0] * a + [0] * b])
    prev = jnp.asarray([[max(i - 1, 0) for i in range(p + a)] + [p - 1] + list(range(p + a, p + a + b - 1))])
    packing = Packing(segments, parents, prev)
    lengths = jnp.asarray([5, 17], jnp.int32)
    pad = 24 - lengths
    prompts = random_tokens(config, (2, 24), seed=6)

    def run(impl):
        config = tiny_config(generation, attention=impl)
        loss = jax.jit(jax.value_and_grad(lambda w: token_nll(config, w, seq[:, :-1], seq[:, 1:]).sum()))
        packed_logits = jax.jit(lambda w: forward(config, w, packed, positions, packing))(params)
        logits, cache = jax.jit(lambda w: prefill(config, w, prompts, pad, 24))(params)
        return loss(params), packed_logits, logits, cache

    (l0, g0), pk0, pre0, c0 = run("einsum")
    (l1, g1), pk1, pre1, c1 = run("xla")
    lowered = lambda impl: fwd.lower(tiny_config(generation, attention=impl), params, seq).as_text()
    assert lowered("xla") != lowered("einsum")  # the setting reaches the compiled program: not the same one twice
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    scale = max(float(np.max(np.abs(y))) for y in jax.tree.leaves(g0))  # summation order only:
    for x, y in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):  # measured <= 1.1e-6 of the scale
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * scale)
    np.testing.assert_allclose(pk1, pk0, rtol=0, atol=FP32_ATOL)
    np.testing.assert_allclose(pre1, pre0, rtol=0, atol=FP32_ATOL)
    for r in range(2):  # keys/values of real tokens; padding slots hold unread garbage
        np.testing.assert_allclose(c1.k[:, r, int(pad[r]):], c0.k[:, r, int(pad[r]):], rtol=0, atol=FP32_ATOL)
        np.testing.assert_allclose(c1.v[:, r, int(pad[r]):], c0.v[:, r, int(pad[r]):], rtol=0, atol=FP32_ATOL)
    with pytest.raises(ValueError, match="attention must be one of einsum, xla, cudnn, found 'flash'"):
        tiny_config(generation, attention="flash")


def test_attention_env_overrides_the_config_key(monkeypatch):
    """JAXRL_ATTENTION, when set, wins over the configured value; unset, the configured value is used."""
    monkeypatch.delenv("JAXRL_ATTENTION", raising=False)
    assert [attention_impl(a) for a in ("einsum", "xla")] == ["einsum", "xla"]
    monkeypatch.setenv("JAXRL_ATTENTION", "xla")
    assert attention_impl("einsum") == "xla"
    monkeypatch.setenv("JAXRL_ATTENTION", "flash")
    with pytest.raises(ValueError, match="JAXRL_ATTENTION must be einsum, xla or cudnn, found 'flash'"):
        attention_impl("einsum")


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_linear_gradient_equals_autodiff(dtype, seed):
    """model.linear's hand-written backward (dw = (xᵀ·g)ᵀ) equals autodiff of the plain einsum, for
    random shapes drawn from `seed` (in the test id, so a failure reruns as it failed), with fp32
    weights cast to the compute dtype (bf16: same rounding points)."""
    rng = np.random.default_rng(seed)
    lead, n_in, n_out = tuple(rng.integers(1, 6, 2)), int(rng.integers(1, 40)), int(rng.integers(1, 40))
    print(f"seed {seed}: lead {lead}, n_in {n_in}, n_out {n_out}")
    kx, kw, kg = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 3)
    x = jax.random.normal(kx, (*lead, n_in)).astype(dtype)
    w = jax.random.normal(kw, (n_out, n_in))
    g = jax.random.normal(kg, (*lead, n_out)).astype(dtype)
    y, vjp = jax.vjp(linear, x, w)
    y_ref, vjp_ref = jax.vjp(lambda x, w: jnp.einsum("...i,oi->...o", x, w.astype(x.dtype)), x, w)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    for got, want in zip(vjp(g), vjp_ref(g)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_bf16_mode_is_close_to_fp32(generation):
    config = tiny_config(generation, sequence_len=SEQ_LEN)
    params = tiny_params(config)
    idx = random_tokens(config, (3, T_LONG))
    a = np.asarray(fwd(config, params, idx))
    b = np.asarray(fwd(config.replace(compute_dtype="bfloat16"), params, idx))
    assert b.dtype == np.float32 and np.isfinite(b).all()
    diff = np.abs(a - b)
    assert diff.max() <= BF16_MAX_ATOL and diff.mean() <= BF16_MEAN_ATOL, (diff.max(), diff.mean())
