"""Tests for jaxrl/optim.py and jaxrl/muon.py: groups, lr schedule, and nanochat's own optimizer steps.

Run: `python -m pytest -q tests/test_optim.py`.
Golden tests read ../shared/fixtures/nanochat/gen-*/golden_optim*.npz (two chat_rl optimizer steps
made by each generation's nanochat code from its fixture checkpoint); the start params come from the
checkpoint .pt, so those tests need torch and are skipped without it.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import FIXTURES, GENERATIONS, tiny_config
from jaxrl.model import GPTConfig, flatten_params, param_table, unflatten_params
from jaxrl.muon import BETA2, muon
from jaxrl.optim import (adamw, build_optimizer, default_muon_dtype, group_lrs, group_specs, lr_multiplier,
                         param_labels)

NUM_STEPS = 467  # chat_rl: 7473 // 16, as in the goldens
# Absolute tolerances on params after each golden step (fixture README "Suggested tolerances").
# Set once here; never loosen them to make a test pass. The bf16 Muon one (1e-4) is about one
# step's mean update, so it only catches gross errors: the sharp Muon checks are relative to each
# tensor's step, below (MUON_FP32_REL, BF16_LAYER_SPREAD).
TOL = {"adamw": 1e-6, "muon_float32": 1e-6, "muon_bfloat16": 1e-4,
       "jit_vs_eager": 1e-8}  # updates (~1e-4) of eager op-by-op vs jit: fusions reorder fp32 sums
# fp32 Muon vs nanochat's fp32 Muon, per tensor and step: ‖Δours − Δgolden‖ / ‖Δgolden‖ (Δ = the
# step's change of the param). fp32 rounding (2^-24) amplified by the iterations' cancellation
# (coefficients up to 8.2, 5 steps) and different summation orders; measured ≤ 3.8e-5 here. A
# group's lr off by 10 % gives 0.1, momentum 0.9 instead of 0.95 gives ≥ 0.01 at step 2.
MUON_FP32_REL = 1e-4
# bf16 Muon: how much larger than nanochat's own bf16 rounding error of a shape on layer 0 (the
# only layer with an fp32 golden) a layer's error may be. Measured: ≤ 1.04 over layers 0–3.
BF16_LAYER_SPREAD = 1.25
BF16_MISMATCH_LIMIT = {"gen-2025-10": 0, "gen-2026-07": 16}  # elements off by exactly 1 bf16 ulp


def abstract_params(config: GPTConfig, dtype=np.float32) -> dict:
    return unflatten_params({k: np.zeros(s, dtype) for k, s, _ in param_table(config)})


def at_step(state, k: int):
    """The optimizer state with every group's update counter set to k."""
    def set_count(path, x):
        return jnp.full_like(x, k) if jax.tree_util.keystr(path).endswith(".count") else x
    return jax.tree_util.tree_map_with_path(set_count, state)


# ------------------------------------------------------------------------------------------
# Groups and learning rates


@pytest.mark.parametrize("gen", GENERATIONS)
def test_groups_match_golden(gen):
    """Every param in exactly one group; groups and lrs as in golden_optim.json (../shared/fixtures)."""
    golden = json.loads((FIXTURES / gen / "golden_optim.json").read_text())
    meta = json.loads((FIXTURES / gen / "chatsft_checkpoints/d4/meta_000000.json").read_text())
    config = GPTConfig(**meta["model_config"], generation=gen)
    labels = flatten_params(param_labels(config, abstract_params(config)), n_layer=config.n_layer)
    assert sorted(labels) == sorted(p for g in golden["param_groups"] for p in g["params"])
    lrs = [group_lrs(config, k, num_steps=NUM_STEPS) for k in range(2)]
    ours_per_golden = []
    for i, group in enumerate(golden["param_groups"]):
        ours = {labels[p] for p in group["params"]}
        assert len(ours) == 1, f"golden group {group['params']} split over {ours}"
        (name,) = ours
        ours_per_golden.append(name)
        for k, entry in enumerate(golden["lrs_per_step"]):
            assert lrs[k][name] == pytest.approx(entry["group_lrs"][i], rel=1e-14), (name, k)
        spec = group_specs(config)[name]
        assert spec.kind == group.get("kind", group["optimizer_class"].lower())
        if spec.kind == "adamw":
            assert (list(spec.betas), spec.weight_decay) == (group["betas"], group["weight_decay"])
        else:
            assert BETA2[gen] == group.get("beta2") and spec.weight_decay == group.get("weight_decay", 0.0)
    merged = 3 if gen == "gen-2025-10" else 1  # gen-2025-10: nanochat's 3 numel groups are one Muon group
    assert len(set(ours_per_golden)) == len(ours_per_golden) - merged + 1
    assert set(ours_per_golden) == set(group_lrs(config, 0, num_steps=NUM_STEPS))


@pytest.mark.parametrize("gen", GENERATIONS)
def test_last_step_lr_and_multiplier(gen):
    config = tiny_config(gen)
    assert lr_multiplier(0, NUM_STEPS) == 1.0 and lr_multiplier(1, NUM_STEPS) == 1 - 1 / NUM_STEPS
    first, last = group_lrs(config, 0, num_steps=NUM_STEPS), group_lrs(config, NUM_STEPS - 1, num_steps=NUM_STEPS)
    for name in first:
        assert last[name] == pytest.approx(first[name] / NUM_STEPS, rel=1e-12)


def test_unassigned_params_raise():
    config = tiny_config("gen-2026-07")
    params = abstract_params(config)
    with pytest.raises(ValueError, match=r"foo\.bar -> no group"):
        param_labels(config, {**params, "foo": {"bar": np.zeros(3)}})
    params["transformer"]["h"]["attn"]["scale"] = np.zeros(4)
    with pytest.raises(ValueError, match=r"transformer\.h\.attn\.scale .*not a matrix"):
        param_labels(config, params)
    old = abstract_params(tiny_config("gen-2026-01"))  # value_embeds, lambdas: not gen-2025-10 params
    with pytest.raises(ValueError, match=r"value_embeds\.weight -> no group"):
        param_labels(tiny_config("gen-2025-10"), old)
    opt = build_optimizer(config, num_steps=NUM_STEPS)
    with pytest.raises(ValueError, match="foo"):
        opt.init({**abstract_params(config), "foo": np.zeros(3)})


def _reference(config, name, spec):
    """The group's transform with lr 1 at every step, so update / reference = the effective lr."""
    ones = np.ones(NUM_STEPS)
    if spec.kind == "muon":
        return muon(ones, generation=config.generation, dtype="float32")
    return adamw(ones, betas=spec.betas, weight_decay=0.0, generation=config.generation)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_effective_lr(gen):
    """Each group's actual step equals its configured lr (Muon: × sqrt(max(1, rows/cols))) at
    updates 0, 1 and num_steps-1. Params are 0, so weight decay cannot contribute."""
    config = tiny_config(gen)
    params = abstract_params(config)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    label_fn = functools.partial(param_labels, config)
    opt = build_optimizer(config, num_steps=NUM_STEPS, muon_dtype="float32")
    ref = optax.multi_transform({n: _reference(config, n, s) for n, s in group_specs(config).items()}, label_fn)
    labels = flatten_params(label_fn(params), n_layer=config.n_layer)
    opt_update, ref_update = jax.jit(opt.update), jax.jit(ref.update)
    for k in (0, 1, NUM_STEPS - 1):
        lrs = group_lrs(config, k, num_steps=NUM_STEPS)
        got, _ = opt_update(grads, at_step(opt.init(params), k), params)
        want, _ = ref_update(grads, at_step(ref.init(params), k), params)
        for path, u in flatten_params(got).items():
            lr = np.float32(lrs[labels[path]])
            np.testing.assert_allclose(u, lr * flatten_params(want)[path], rtol=2e-6, atol=0,
                                       err_msg=f"{path} ({labels[path]}) at update {k}")


@pytest.mark.parametrize("gen", GENERATIONS)
def test_zero_grads_give_zero_updates(gen):
    """Zero grads: finite updates, zero except AdamW's decoupled decay p·(−lr·wd) (gen-2026-07)."""
    config = tiny_config(gen)
    leaves, treedef = jax.tree.flatten(abstract_params(config))
    params = treedef.unflatten([jnp.full(p.shape, 0.5, jnp.float32) for p in leaves])
    opt = build_optimizer(config, num_steps=NUM_STEPS)
    updates, state = jax.jit(opt.update)(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    specs, lrs = group_specs(config), group_lrs(config, 0, num_steps=NUM_STEPS)
    labels = flatten_params(param_labels(config, params), n_layer=config.n_layer)
    for path, u in flatten_params(updates).items():
        spec = specs[labels[path]]
        decay = 0.0
        if spec.kind == "adamw":  # p·(1 − lr·wd) − p with nanochat's fp32 scalar arithmetic
            factor = np.float32(1) - np.float32(lrs[labels[path]]) * np.float32(spec.weight_decay)
            decay = np.float32(0.5) * factor - np.float32(0.5)
        assert np.all(np.isfinite(u)), path
        np.testing.assert_allclose(u, decay, rtol=1e-6, atol=0, err_msg=path)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))


def test_jit_matches_eager():
    """Traced and op-by-op updates agree (no Python branching on traced values)."""
    config = tiny_config("gen-2025-10")
    leaves, treedef = jax.tree.flatten(abstract_params(config))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
    grads = jax.tree.map(lambda p: 0.01 * p[::-1], params)
    opt = build_optimizer(config, num_steps=NUM_STEPS, muon_dtype="float32")
    eager, _ = opt.update(grads, opt.init(params), params)
    jitted, _ = jax.jit(opt.update)(grads, opt.init(params), params)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=0, atol=TOL["jit_vs_eager"])


def test_default_muon_dtype():
    assert default_muon_dtype(tiny_config("gen-2025-10")) == "bfloat16"
    assert default_muon_dtype(tiny_config("gen-2026-01")) == "bfloat16"
    assert default_muon_dtype(tiny_config("gen-2026-07")) == "float32"
    assert default_muon_dtype(tiny_config("gen-2026-07").replace(compute_dtype="bfloat16")) == "bfloat16"


# ------------------------------------------------------------------------------------------
# Golden: two chat_rl optimizer steps made by nanochat itself (../shared/fixtures/nanochat)


@functools.lru_cache(maxsize=None)
def fixture_start(gen: str, bf16_embeddings: bool):
    """(config, flat params) of the fixture checkpoint: float32 as nanochat's CPU loader gives them,
    or with the bf16-saved tables (wte, value_embeds) kept in bf16 as on a GPU."""
    torch = pytest.importorskip("torch")
    ckpt = FIXTURES / gen / "chatsft_checkpoints" / "d4"
    meta = json.loads((ckpt / "meta_000000.json").read_text())
    state_dict = torch.load(ckpt / "model_000000.pt", map_location="cpu")
    flat = {}
    for name, t in state_dict.items():
        keep_bf16 = bf16_embeddings and t.dtype == torch.bfloat16
        flat[name] = jnp.asarray(t.float().numpy(), jnp.bfloat16 if keep_bf16 else jnp.float32)  # exact
    return GPTConfig(**meta["model_config"], generation=gen), flat


@functools.lru_cache(maxsize=None)
def two_steps(gen: str, muon_dtype: str | None = None, bf16_embeddings: bool = False):
    """Params after golden steps 1 and 2 ({"param1/<name>": float32 array}) and the final state."""
    config, flat = fixture_start(gen, bf16_embeddings)
    grads_npz = np.load(FIXTURES / gen / "golden_optim.npz")
    opt = build_optimizer(config, num_steps=NUM_STEPS, muon_dtype=muon_dtype)
    params = unflatten_params(flat)
    state, update, out = opt.init(params), jax.jit(opt.update), {}
    for s in (1, 2):
        grads = unflatten_params({k: jnp.asarray(grads_npz[f"grad{s}/{k}"]) for k in flat})
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        for name, value in flatten_params(params).items():
            assert value.dtype == flat[name].dtype, f"{name}: dtype changed to {value.dtype}"
            out[f"param{s}/{name}"] = np.asarray(value, np.float32)
    return config, out, state


def compare(gen, ours, golden_file, tolerance_of, skip=()):
    """Max abs error per golden tensor; fails listing every tensor above its tolerance."""
    golden = np.load(FIXTURES / gen / golden_file)
    keys = [k for k in golden.files if k.startswith("param") and k not in skip]
    errors = {k: float(np.max(np.abs(ours[k] - golden[k]))) for k in keys}
    bad = {k: (e, tolerance_of(k)) for k, e in errors.items() if not e <= tolerance_of(k)}
    assert not bad, f"{gen} {golden_file}: (max abs error, tolerance) " + json.dumps(bad, indent=1)
    return errors


def kind_tolerance(config, muon_dtype):
    """key "param1/<name>" -> the tolerance of that parameter's optimizer."""
    kinds = {n: s.kind for n, s in group_specs(config).items()}
    labels = flatten_params(param_labels(config, abstract_params(config)), n_layer=config.n_layer)
    muon_tol = TOL[f"muon_{muon_dtype}"]
    return lambda key: TOL["adamw"] if kinds[labels[key.split("/", 1)[1]]] == "adamw" else muon_tol


@pytest.mark.parametrize("gen", GENERATIONS)
def test_golden_two_steps(gen):
    """golden_optim.npz: the default Muon dtype (bf16 before gen-2026-07, fp32 on CPU after)."""
    config, ours, _ = two_steps(gen)
    compare(gen, ours, "golden_optim.npz", kind_tolerance(config, default_muon_dtype(config)))


def step_update(params_after: dict, start: dict, name: str, s: int) -> np.ndarray:
    """float64 change of param `name` made by golden step s (1 or 2)."""
    before = start[name] if s == 1 else params_after[f"param1/{name}"]
    return np.asarray(params_after[f"param{s}/{name}"], np.float64) - np.asarray(before, np.float64)


def rel_update_error(ours: dict, golden, start: dict, name: str, s: int) -> float:
    """‖Δours − Δgolden‖_F / ‖Δgolden‖_F of step s: an error relative to the step's own size."""
    want = step_update(golden, start, name, s)
    return float(np.linalg.norm(step_update(ours, start, name, s) - want) / np.linalg.norm(want))


def labels_of(config) -> dict[str, str]:
    return flatten_params(param_labels(config, abstract_params(config)), n_layer=config.n_layer)


def muon_names(config) -> list[str]:
    kinds = {n: s.kind for n, s in group_specs(config).items()}
    return [name for name, label in labels_of(config).items() if kinds[label] == "muon"]


@pytest.mark.parametrize("gen", ["gen-2025-10", "gen-2026-01"])
def test_golden_muon_fp32(gen):
    """golden_optim_muon_fp32.npz: nanochat's Muon with its bf16 casts made fp32 (eager). Every
    Muon group has a tensor there (layer 0 holds every matrix shape; both ve_gates are stored), so
    a group's wrong lr or momentum shows up as a relative step error far above MUON_FP32_REL."""
    config, ours, _ = two_steps(gen, "float32")
    compare(gen, ours, "golden_optim_muon_fp32.npz", lambda k: TOL["muon_float32"])
    golden = np.load(FIXTURES / gen / "golden_optim_muon_fp32.npz")
    start = {k: np.asarray(v) for k, v in fixture_start(gen, False)[1].items()}
    stored = {k.split("/", 1)[1] for k in golden.files}
    assert {labels_of(config)[n] for n in stored} == {n for n, s in group_specs(config).items() if s.kind == "muon"}
    errors = {(n, s): rel_update_error(ours, golden, start, n, s) for n in sorted(stored) for s in (1, 2)}
    bad = {f"{n} step {s}": e for (n, s), e in errors.items() if not e <= MUON_FP32_REL}
    assert not bad, f"{gen}: relative step errors above {MUON_FP32_REL}: {bad}"


def bf16_rounding_per_shape(gen: str, start: dict) -> dict[tuple, float]:
    """nanochat's own bf16 rounding error of Muon's step, per matrix shape: ‖Δbf16 − Δfp32‖ /
    ‖Δbf16‖ of its golden_optim.npz against golden_optim_muon_fp32.npz, max over the stored
    tensors of that shape (layer 0, ve_gates) and both steps."""
    bf16, fp32 = np.load(FIXTURES / gen / "golden_optim.npz"), np.load(FIXTURES / gen / "golden_optim_muon_fp32.npz")
    eps: dict[tuple, float] = {}
    for key in fp32.files:
        name = key.split("/", 1)[1]
        for s in (1, 2):
            e = rel_update_error(fp32, bf16, start, name, s)
            eps[start[name].shape] = max(eps.get(start[name].shape, 0.0), e)
    return eps


@pytest.mark.parametrize("gen", ["gen-2025-10", "gen-2026-01"])
def test_golden_muon_bf16_every_layer(gen):
    """golden_optim.npz, every Muon tensor of every layer, each step's update relative to its size.

    The bound comes from bf16 rounding of the orthogonalisation. bf16 keeps 8 significant bits
    (unit roundoff u = 2^-9 ≈ 0.2 %); each of the 5 iterations rounds X and its polynomial terms,
    which cancel from |a|·‖X‖ (a = 3.4 in Newton–Schulz, up to 8.2 in Polar Express) down to ‖X‖,
    so each adds ~a·u of relative error, and the iteration does not damp errors in the singular
    vectors: a few percent in all. ε(shape), nanochat's own error measured against its fp32 run on
    layer 0, is 2.2–4.3 % for the block matrices (6–15 % for the 2×32 ve_gates). Then:
      1. our fp32 step vs nanochat's bf16 step ≤ BF16_LAYER_SPREAD·ε (that is nanochat's rounding);
      2. our bf16 step vs our fp32 step ≤ BF16_LAYER_SPREAD·ε (our rounding is no larger);
      3. our bf16 step vs nanochat's bf16 step ≤ 2·BF16_LAYER_SPREAD·ε (1 and 2, triangle inequality).
    A group's lr off by 10 % breaks 1 on every tensor of the group in every layer (≥ 0.1 against
    bounds ≤ 0.054 for block matrices); momentum 0.9 instead of 0.95 moves step 2 by 2.5–7.7 %,
    which breaks 1 on most of them (test_golden_muon_fp32 catches it in every group).
    """
    config, bf16_ours, _ = two_steps(gen)
    _, fp32_ours, _ = two_steps(gen, "float32")
    start = {k: np.asarray(v) for k, v in fixture_start(gen, False)[1].items()}
    golden = np.load(FIXTURES / gen / "golden_optim.npz")
    eps = bf16_rounding_per_shape(gen, start)
    bad = {}
    for name in muon_names(config):
        bound = BF16_LAYER_SPREAD * eps[start[name].shape]
        for s in (1, 2):
            checks = {"fp32 vs nanochat bf16": (rel_update_error(fp32_ours, golden, start, name, s), bound),
                      "bf16 vs our fp32": (rel_update_error(bf16_ours, fp32_ours, start, name, s), bound),
                      "bf16 vs nanochat bf16": (rel_update_error(bf16_ours, golden, start, name, s), 2 * bound)}
            bad.update({f"{name} step {s} {what}": (round(e, 4), round(b, 4))
                        for what, (e, b) in checks.items() if not e <= b})
    assert not bad, f"{gen}: (relative step error, bound) " + json.dumps(bad, indent=1)


def bf16_ulp(x):
    """Spacing of bf16 numbers at |x| (x bf16-representable, given as float32)."""
    exponent = np.abs(x).astype(np.float32).view(np.int32) & 0x7F800000
    return np.maximum(exponent.view(np.float32) * 2.0**-7, 2.0**-133)


@pytest.mark.parametrize("gen", ["gen-2025-10", "gen-2026-07"])
def test_golden_bf16_embeddings(gen):
    """golden_optim_bf16emb.npz: bf16 embedding params and AdamW state, rounded on store as on a
    GPU. gen-2025-10 bit-exact; gen-2026-07 at most a few elements 1 bf16 ulp away."""
    config, ours, state = two_steps(gen, bf16_embeddings=True)
    golden = np.load(FIXTURES / gen / "golden_optim_bf16emb.npz")
    for key in golden.files:
        diff = np.abs(ours[key] - golden[key])
        assert np.all(diff <= bf16_ulp(golden[key])), f"{key}: more than 1 bf16 ulp off"
        assert np.count_nonzero(diff) <= BF16_MISMATCH_LIMIT[gen], f"{key}: {np.count_nonzero(diff)} differ"
    for group in ("embedding", "value_embeds") if gen == "gen-2026-07" else ("embedding",):
        adam_state = state.inner_states[group].inner_state  # optax PartitionState -> MaskedState
        dtypes = {x.dtype for x in jax.tree.leaves((adam_state.mu, adam_state.nu))}
        assert dtypes == {jnp.dtype(jnp.bfloat16)}, f"{group}: AdamW moments {dtypes}, want bf16"
    # every other parameter is unaffected by the embeddings' dtype
    compare(gen, ours, "golden_optim.npz", kind_tolerance(config, default_muon_dtype(config)), skip=golden.files)
