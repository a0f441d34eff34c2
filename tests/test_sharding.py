"""jaxrl/sharding.py: the mesh keys, the logical-axis rules, and FSDP giving one device's RL run.

The equivalence test runs three RL steps (rollouts on the gathered copy, packed batch, sharded
update) on 8 simulated CPU devices as (data 8, fsdp 1), (data 2, fsdp 4) and (data 1, fsdp 8),
and on 1 device. XLA sums gradients over devices in its own order, so bits differ by float32
rounding; the bounds after 3 steps (below) are what rounding gives:
- the rollouts of every step are the same tokens;
- every optimizer moment (Muon momentum and second moment, AdamW m and v) within MOMENT_RTOL of
  its leaf's largest value: the gradients agree step after step;
- Muon's matrices within PARAM_ATOL (absolute, on weights of scale ~0.1 that the 3 steps move by
  ~1e-3);
- AdamW's leaves within PARAM_ATOL except for at most ADAMW_FRACTION of their entries: where a
  gradient is a sum that cancels exactly (the first generated token's logits are computed from
  one hidden state for all of a question's samples, whose mean-baseline advantages sum to 0), it
  is rounding noise whose sign differs between orders, and AdamW's normalised step turns it into
  up to ±lr per step.
"""
import functools

import jax
import numpy as np
import pytest
from conftest import tiny_config, tiny_params
from jax.sharding import PartitionSpec as P

from jaxrl import optim, rl, sampler, sharding
from jaxrl.params import PARAM_AXES, param_table, unflatten_params
from jaxrl.tokenizer import SpecialIds

PARAM_ATOL = 1e-6  # Muon's matrices: measured gap <= 6e-8 after 3 steps
MOMENT_RTOL = 1e-4  # every optimizer moment, of its leaf's largest value: measured <= 4e-5
ADAMW_FRACTION, ADAMW_ATOL = 0.01, 5e-4  # AdamW leaves: measured <= 0.3% of entries off, by <= 1.1e-4


@pytest.mark.parametrize("n,data,fsdp,want", [(8, -1, 1, (8, 1)), (8, 2, -1, (2, 4)), (8, -1, 8, (1, 8)),
                                              (6, 3, 2, (3, 2)), (1, -1, 1, (1, 1))])
def test_mesh_shape_infers_one_side(n, data, fsdp, want):
    assert sharding.mesh_shape(n, data, fsdp) == want


@pytest.mark.parametrize("n,data,fsdp,match", [(8, 3, 2, "product must be the device count"),
                                               (8, -1, 3, "does not divide the 8 devices"),
                                               (8, -1, -1, "cannot both be -1"), (8, 0, 1, "positive int or -1")])
def test_mesh_shape_errors_name_the_keys(n, data, fsdp, match):
    with pytest.raises(ValueError, match=match):
        sharding.mesh_shape(n, data, fsdp)


def test_every_param_dimension_has_a_logical_axis_and_the_rules_cover_them():
    """The axes table names every param of every generation with one name per dimension, and
    every name is in RULES; a dimension that does not divide stays replicated; a mesh axis is
    used once per spec (value_embeds: vocab takes fsdp, kv does not)."""
    for gen in ("gen-2025-10", "gen-2026-01", "gen-2026-07"):
        config = tiny_config(gen, n_layer=3)
        params = unflatten_params({k: np.zeros(s, np.float32) for k, s, _ in param_table(config)})
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        for path, leaf in flat:
            name = ".".join(str(k.key) for k in path)
            assert name in PARAM_AXES and len(PARAM_AXES[name]) == leaf.ndim, name
    assert {a for axes in PARAM_AXES.values() for a in axes if a} <= set(sharding.RULES)
    mesh = sharding.make_mesh(jax.devices()[:8], data=2, fsdp=4)
    assert sharding.spec(("layers", "vocab", "kv"), (3, 320, 32), mesh) == P(None, "fsdp")
    assert sharding.spec(("layers", "mlp", "embed"), (3, 6, 64), mesh) == P()  # 6 does not divide by 4
    assert sharding.spec(("batch",)) == P(("data", "fsdp"))
    one = sharding.make_mesh(jax.devices()[:8], data=8, fsdp=1)
    assert sharding.spec(("layers", "heads", "embed"), (3, 64, 64), one) == P()  # fsdp 1: replicated


def test_place_splits_params_and_optimizer_state():
    """Under fsdp 4 every big matrix and its Muon momentum / AdamW moments hold 1/4 per device;
    step counts and per-layer scalars stay whole."""
    config = tiny_config()
    mesh = sharding.make_mesh(jax.devices()[:8], data=2, fsdp=4)
    params = sharding.place(tiny_params(config), mesh)
    optimizer = optim.build_optimizer(config, num_steps=3)
    state = sharding.place(optimizer.init(params), mesh)
    for path, x in jax.tree_util.tree_flatten_with_path((params, state))[0]:
        shard = x.addressable_shards[0].data.shape
        name = jax.tree_util.keystr(path)
        if x.size >= 64 * 64 and min(x.shape) > 1:
            assert np.prod(shard) * 4 == x.size, name
        if x.ndim <= 1:
            assert shard == x.shape, name


def _synthetic_reward(tokens, length):
    """A reward that varies between samples: the share of even tokens in the completion."""
    return np.array([np.mean(t[:n] % 2 == 0) if n else 0.0 for t, n in zip(tokens, length)], np.float32)


# 5 layers: the blocks run under lax.scan (a layer before it, then pairs), so the per-layer gather is
# tested inside the scan; and backout reads layer 2, not the last one (with 2 layers the final norm
# cancels backout_lambda exactly, its gradient is rounding noise and AdamW turns that into a step).
CONFIG = tiny_config(n_layer=5)


def _rl_run(mesh, rollout_mesh, steps=3):
    """`steps` RL steps of the tiny model: rollouts on a gathered copy, a packed batch, the update."""
    config = CONFIG
    specials = SpecialIds(bos=256, user_start=257, user_end=258, assistant_start=259, assistant_end=260,
                          python_start=261, python_end=262, output_start=263, output_end=264)
    rng = np.random.default_rng(11)
    prompts = [[256] + list(rng.integers(0, 256, int(rng.integers(4, 12)))) for _ in range(8)]
    N, dbs = 4, 2
    spec = rl.LossSpec(device_batch_size=dbs, num_passes=N // dbs, examples_per_step=len(prompts))
    optimizer = optim.build_optimizer(config, num_steps=steps)
    params = sharding.place(tiny_params(config, seed=3), mesh)
    opt_state = sharding.place(optimizer.init(params), mesh)
    step_fn = rl.compiled_train_step(config, spec, optimizer, mesh)
    gather = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))
    tokens = []
    for step in range(steps):
        ro, _ = sampler.sample(config, gather(params), prompts, num_samples=N, max_new_tokens=12, seed=5,
                               step=step, specials=specials, mesh=rollout_mesh)
        ro = jax.device_get(ro)
        tokens.append(np.asarray(ro.tokens))
        seqs = [prompts[r // N] + list(ro.tokens[r, : ro.length[r]]) for r in range(len(ro.length))]
        masks = [[0] * len(prompts[r // N]) + list(ro.mask[r, : ro.length[r]]) for r in range(len(ro.length))]
        adv = rl.advantages(_synthetic_reward(ro.tokens, ro.length), N)
        batch = rl.global_batch(rl.build_batch(seqs, masks, adv, specials.assistant_end), mesh,
                                pad_id=specials.assistant_end, chunk=dbs, group=N)
        params, opt_state, m = step_fn(params, opt_state, batch)
        assert int(m.skipped) == 0
    return tokens, jax.device_get(params), jax.device_get(opt_state)


@functools.cache
def _reference():
    one = sharding.make_mesh(jax.devices()[:1])
    return _rl_run(one, one)


@pytest.mark.parametrize("data,fsdp", [(8, 1), (2, 4), (1, 8)])
def test_fsdp_mesh_shapes_give_one_devices_run(data, fsdp):
    ref_tokens, ref_params, ref_state = _reference()
    mesh = sharding.make_mesh(jax.devices()[:8], data=data, fsdp=fsdp)
    tokens, params, state = _rl_run(mesh, sharding.make_mesh(jax.devices()[:8]))
    for step, (a, b) in enumerate(zip(ref_tokens, tokens)):
        np.testing.assert_array_equal(a, b, err_msg=f"rollouts of step {step}")
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(ref_state)[0], jax.tree.leaves(state)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        gap = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
        assert gap <= MOMENT_RTOL, f"optimizer state {jax.tree_util.keystr(path)}: gap {gap:.1e} of its scale"
    moved = 0.0
    for (path, a), b, p0 in zip(jax.tree_util.tree_flatten_with_path(ref_params)[0], jax.tree.leaves(params),
                                jax.tree.leaves(tiny_params(CONFIG, seed=3))):
        name, gap = jax.tree_util.keystr(path), np.abs(np.asarray(a) - np.asarray(b))
        moved = max(moved, np.abs(np.asarray(a) - np.asarray(p0)).max())
        if "['h']" in name:  # Muon's matrices
            assert gap.max() <= PARAM_ATOL, f"{name}: gap {gap.max():.1e}"
        else:  # AdamW's
            assert np.mean(gap > PARAM_ATOL) <= ADAMW_FRACTION and gap.max() <= ADAMW_ATOL, \
                f"{name}: {np.mean(gap > PARAM_ATOL):.2%} of entries off by > {PARAM_ATOL}, the most {gap.max():.1e}"
    assert moved > 100 * PARAM_ATOL  # the 3 updates really moved the params


def test_no_other_module_spells_a_mesh_axis_or_a_partition_spec():
    """Sharding is declared once: outside jaxrl/sharding.py no library, script or benchmark builds a
    PartitionSpec, NamedSharding or Mesh, or names a mesh axis in a collective."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = [p for d in ("jaxrl", "scripts", "benchmarks", "convert") for p in (repo / d).rglob("*.py")]
    assert len(files) > 20
    offenders = []
    for path in files:
        if path == repo / "jaxrl" / "sharding.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            name = (node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else
                    node.name if isinstance(node, ast.alias) else None)
            if name in ("PartitionSpec", "NamedSharding", "Mesh"):
                offenders.append(f"{path.relative_to(repo)}:{getattr(node, 'lineno', '?')} {name}")
            if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value in sharding.MESH_AXES
                                                  for a in node.args[1:]):  # psum(x, "data") and the like
                offenders.append(f"{path.relative_to(repo)}:{node.lineno} a mesh axis as a string")
    assert offenders == []


@pytest.mark.cli
def test_train_rl_in_bf16_on_an_fsdp_mesh(tmp_path):
    """End to end in the accelerator setting: bf16 compute, params split over fsdp pairs, rollouts
    from the bf16 copy gathered once per step; the run finishes, logs finite numbers and its
    checkpoint holds fp32 masters."""
    from conftest import load_state, run_trainer, trainer_env

    from jaxrl.metrics import read_metrics

    proc = run_trainer(tmp_path, "bf16", "--dtype=bfloat16", "--mesh_fsdp=2", "--num_steps=2", "--eval_examples=4",
                       env=trainer_env(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh data 2 x fsdp 2" in proc.stdout
    steps = [r for r in read_metrics(tmp_path / "bf16") if r["event"] == "step"]
    assert [r["step"] for r in steps] == [0, 1] and all(np.isfinite(r["loss"]) for r in steps)
    assert all(r["tokens"] > 0 and 0 <= r["reward"] <= 1 and np.isfinite(r["grad_norm"]) for r in steps)
    _, state = load_state(tmp_path / "bf16")
    assert all(v.dtype == np.float32 for k, v in state.items() if k.startswith("['params']"))
