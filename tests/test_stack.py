"""The stacked layer layout and the layer scan (jaxrl/params.py, jaxrl/stack.py), without torch.

nanochat's flat names <-> the stacked tree round trip (and the older per-layer tree); the scanned
blocks equal the unrolled ones (training forward and gradients, prefill, the sampler's decode)
for an even and an odd depth, where the odd one runs its first value-embedding layer before the
scan; the traced program does not grow with depth; an unrolled model's decode loops read no
stacked array (no per-step copy of a layer out of a stack); Muon batches stacked matrices on one
axis.

Run: python -m pytest -q tests/test_stack.py
"""
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import GENERATIONS, tiny_config, tiny_params
from jaxrl import stack
from jaxrl.decode import decode_shared, prefill, shared_cache
from jaxrl.model import GPTConfig, flatten_params, forward, param_table, token_nll, unflatten_params
from jaxrl.params import ve_layers

# Scan and unrolled loop run the same ops on the same values; XLA fuses them differently, so they
# agree to fp32 rounding of summation order, not to the bit (gradients: measured <= 2e-6 relative).
ATOL = 1e-5


def config_of(generation: str, n_layer: int) -> GPTConfig:
    """conftest's tiny model at a given depth (scan vs unrolled, odd vs even value-embedding pairs),
    with windows "SSL" so one scanned group mixes short and long windows, and sequence_len 128 so
    the training batch of 99 tokens runs past gen-2026-01's short window (64) within the context."""
    return tiny_config(generation, n_layer=n_layer, sequence_len=128, window_pattern="SSL")


def random_flat(config: GPTConfig, seed: int) -> dict:
    """conftest's random float32 params (every value away from 0 and 1) under nanochat's flat names."""
    return {k: np.asarray(v) for k, v in flatten_params(tiny_params(config, seed)).items()}


@pytest.mark.parametrize("generation", GENERATIONS)
def test_stacked_tree_round_trips_nanochat_names(generation):
    config = config_of(generation, 5)
    flat = random_flat(config, seed=11)
    tree = unflatten_params(flat)
    h = tree["transformer"]["h"]
    assert h["attn"]["c_q"]["weight"].shape == (5, 64, 64) and h["mlp"]["c_fc"]["weight"].shape == (5, 256, 64)
    if config.has_lambdas:  # value embeddings on layers 0, 2, 4 of 5
        assert ve_layers(5) == [0, 2, 4]
        assert tree["value_embeds"]["weight"].shape == (3, config.padded_vocab, 32)
        np.testing.assert_array_equal(h["attn"]["ve_gate"]["weight"][1], flat["transformer.h.2.attn.ve_gate.weight"])
    back = flatten_params(tree)
    assert sorted(back) == sorted(flat)
    for key, value in flat.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    # the per-layer tree of older checkpoints flattens to the same names
    old = {}
    for key, value in flat.items():
        node = old
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    assert flatten_params(old).keys() == flat.keys()
    # label trees (one string per stacked leaf) need the layer count
    labels = jax.tree.map(lambda _: "x", tree)
    with pytest.raises(ValueError, match="pass n_layer"):
        flatten_params(labels)
    assert sorted(flatten_params(labels, n_layer=5)) == sorted(flat)


def _run_both(fn, monkeypatch):
    """fn() with every model scanned, then with every model unrolled."""
    out = []
    for unroll_max in (0, 1000):
        monkeypatch.setattr(stack, "UNROLL_MAX_LAYERS", unroll_max)
        out.append(fn())
    return out


@pytest.mark.parametrize("n_layer", [4, 5])
@pytest.mark.parametrize("generation", GENERATIONS)
def test_scan_equals_unrolled_training(generation, n_layer, monkeypatch):
    """Loss, gradients (with and without remat) and packed-free logits of a batch past the short window."""
    config = config_of(generation, n_layer)
    params = jax.tree.map(jnp.asarray, unflatten_params(random_flat(config, seed=n_layer)))
    seq = jax.random.randint(jax.random.key(1), (2, 100), 0, config.vocab_size, jnp.int32)

    def run(remat=False):
        def loss(w):
            logits = forward(config, w, seq[:, :-1], remat=remat)
            logp = jax.nn.log_softmax(logits, -1)
            return -jnp.take_along_axis(logp, seq[:, 1:, None], -1).sum()
        return jax.jit(jax.value_and_grad(loss))(params)

    (scanned, unrolled) = _run_both(run, monkeypatch)
    monkeypatch.setattr(stack, "UNROLL_MAX_LAYERS", 0)
    remat = run(remat=True)
    for other in (unrolled, remat):
        np.testing.assert_allclose(other[0], scanned[0], rtol=1e-6)
        for key, g in flatten_params(scanned[1]).items():  # summation order: measured <= 2e-6 relative
            np.testing.assert_allclose(flatten_params(other[1])[key], g, rtol=1e-5,
                                       atol=1e-5 * float(np.max(np.abs(g))), err_msg=key)
    nll = jax.jit(lambda w: token_nll(config, w, seq[:, :-1], seq[:, 1:]).sum())(params)
    np.testing.assert_allclose(nll, scanned[0], rtol=1e-6)


@pytest.mark.parametrize("generation", GENERATIONS)
def test_scan_equals_unrolled_decode(generation, monkeypatch):
    """Prefill of left-padded prompts, then the sampler's shared-prompt decode across a block boundary."""
    config = config_of(generation, 5)
    params = jax.tree.map(jnp.asarray, unflatten_params(random_flat(config, seed=3)))
    P, N, M, width = 2, 2, 70, 12
    pad = jnp.asarray([0, 7], jnp.int32)
    prompts = jax.random.randint(jax.random.key(2), (P, width), 0, config.vocab_size, jnp.int32)
    gen = np.asarray(jax.random.randint(jax.random.key(3), (P * N, M), 0, config.vocab_size, jnp.int32))

    def run():
        logits, cache = jax.jit(prefill, static_argnums=(0, 4))(config, params, prompts, pad, width)
        cache = shared_cache(config, cache, N, M)
        step = jax.jit(decode_shared, static_argnums=(0, 6))
        out = [logits]
        for col in range(M):
            gen_len = min(M, (col // 64 + 1) * 64)
            logits, cache = step(config, params, jnp.asarray(gen[:, col]), col, pad, cache, gen_len)
            out.append(logits)
        return out, cache

    (scanned, cs), (unrolled, cu) = _run_both(run, monkeypatch)
    for col, (a, b) in enumerate(zip(scanned, unrolled)):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL, err_msg=f"step {col}")
    # unrolled, the cache holds one array per layer (stack.Layers): compare it stacked
    cu = jax.tree.map(lambda x: jnp.stack(x.arrays) if isinstance(x, stack.Layers) else x, cu,
                      is_leaf=lambda x: isinstance(x, stack.Layers))
    assert jax.tree.structure(cs) == jax.tree.structure(cu)
    for a, b in zip(jax.tree.leaves(cs), jax.tree.leaves(cu)):
        np.testing.assert_allclose(a, b, rtol=0, atol=ATOL)


def test_traced_program_is_flat_in_depth(monkeypatch):
    """The scanned forward traces the same number of matmuls at 6 and 12 layers (one scan body)."""
    monkeypatch.setattr(stack, "UNROLL_MAX_LAYERS", 0)

    def matmuls(n_layer):
        config = config_of("gen-2026-07", n_layer)
        params = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                              unflatten_params({k: jax.ShapeDtypeStruct(s, jnp.float32)
                                                for k, s, _ in param_table(config)}))
        jaxpr = jax.make_jaxpr(lambda w, x: forward(config, w, x))(params, jnp.zeros((1, 8), jnp.int32))
        return str(jaxpr).count("dot_general")

    assert matmuls(6) == matmuls(12)
    monkeypatch.setattr(stack, "UNROLL_MAX_LAYERS", 1000)
    assert matmuls(12) > matmuls(6)


def test_per_layer_import_dir_loads_stacked(tmp_path):
    """An import dir saved by older jaxrl (per-layer tree, transformer/h/<i>/...) loads into the
    stacked layout with the same values as one saved today."""
    from flax import traverse_util

    from jaxrl.run_state import load_jaxrl_import, save_jaxrl_import, write_tree

    config = config_of("gen-2026-07", 3)
    flat = random_flat(config, seed=4)
    info = {"generation": config.generation}
    save_jaxrl_import(tmp_path / "new", config, unflatten_params(dict(flat)), info)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.json").write_text((tmp_path / "new" / "model.json").read_text())
    write_tree(tmp_path / "old" / "params", traverse_util.unflatten_dict(flat, sep="."))  # per-layer nesting
    _, new, _ = load_jaxrl_import(tmp_path / "new")
    _, old, _ = load_jaxrl_import(tmp_path / "old")
    assert jax.tree.structure(new) == jax.tree.structure(old)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
        np.testing.assert_array_equal(a, b)
    for key, value in flatten_params(new).items():
        np.testing.assert_array_equal(value, flat[key], err_msg=key)


def _while_bodies(jaxpr):
    """Every while-loop body inside a closed jaxpr, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "while":
            yield eqn.params["body_jaxpr"].jaxpr
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _while_bodies(sub)


@pytest.mark.parametrize("n_layer", [3, 5])
def test_unrolled_decode_loop_reads_no_stack(n_layer):
    """The sampler's decode loops of an unrolled model see each layer's weights and cache as their
    own arrays (stack.Layers, split once before the loop): no array with a stacked parameter's or
    cache block's shape enters a loop body, where XLA would copy a layer out of the stack every
    step. A scanned model (5 layers) carries its stacks through its loops instead."""
    from jaxrl import sampler
    from jaxrl.tokenizer import SpecialIds

    config = config_of("gen-2026-07", n_layer)
    params = jax.tree.map(jnp.asarray, unflatten_params(random_flat(config, seed=5)))
    ids = SpecialIds(bos=0, user_start=6, user_end=7, assistant_start=8, assistant_end=1, python_start=2,
                     python_end=3, output_start=4, output_end=5)
    spec = sampler.SampleSpec(num_samples=2, max_new_tokens=70, top_k=0, greedy=False, shared_first_token=False,
                              queue_len=1, specials=ids, pad_id=1, compact_rows=1)
    P, T = 2, 64
    args = (params, jnp.zeros((P, T), jnp.int32), jnp.zeros((P,), jnp.int32), jnp.zeros((P, 2, 3), jnp.int32),
            jnp.ones((P,), bool), jnp.uint32(0), jnp.float32(1.0))
    R, K, hd = P * spec.num_samples, config.n_kv_head, config.head_dim
    stacked = {tuple(a.shape) for a in jax.tree.leaves(params["transformer"]["h"])}
    stacked |= {(n_layer, R, K, hd, 64), (n_layer, R, K, 64, hd), (n_layer, P, T, K, hd)}  # cache blocks
    jaxpr = jax.make_jaxpr(sampler._compiled(config, spec, None, None))(*args).jaxpr
    bodies = list(_while_bodies(jaxpr))
    assert len(bodies) >= 3  # two phases of the full loop, the compacted rows' loop
    seen = {tuple(v.aval.shape) for body in bodies for eqn in body.eqns for v in (*eqn.invars, *eqn.outvars)
            if hasattr(v, "aval") and hasattr(v.aval, "shape")}
    if stack.scan_layers(n_layer):
        assert seen & stacked
    else:
        assert not seen & stacked, f"stacked arrays in the decode loop: {sorted(seen & stacked)}"


def test_muon_batches_stacked_matrices_on_one_axis():
    """Muon orthogonalises the stacked layers' matrices as one (K, rows, cols) batch per matrix
    shape: every matmul has a single batch axis (XLA's CPU matmuls with two are several times
    slower), and stacks of the same matrix shape (c_q and attn.c_proj) share one batch."""
    from jaxrl import optim

    config = config_of("gen-2026-07", 5)
    params = jax.tree.map(jnp.asarray, unflatten_params(random_flat(config, seed=6)))
    opt = optim.build_optimizer(config, num_steps=3)
    jaxpr = jax.make_jaxpr(lambda g, s, p: opt.update(g, s, p))(params, opt.init(params), params).jaxpr
    dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    batch = {len(e.params["dimension_numbers"][1][0]) for e in dots}
    shapes = {tuple(e.invars[0].aval.shape) for e in dots}
    assert dots and batch == {1}, batch
    assert (2 * config.n_layer, 64, 64) in shapes  # c_q and attn.c_proj of 5 layers together
