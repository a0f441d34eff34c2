"""Trainer checkpoints: bit-exact round trips (also replicated over 8 devices), meta and config.toml,
atomicity (a killed save never becomes latest), max_to_keep, write failures, structure checks, resume.

Run: python -m pytest -q tests/test_checkpoint.py
"""
import errno
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrl.run_state import (
    RESUME_BREAKING, RESUME_SAFE, CheckpointError, CheckpointManager, check_resume_compatible,
)
from jaxrl.config import FIELDS, RLConfig
from jaxrl.sharding import make_mesh, replicated

REPO = Path(__file__).resolve().parents[1]


def make_state(seed: int = 0) -> dict:
    """A small train state shaped like the trainer's: nested params (one bf16 leaf), the optax
    state of a two-group multi_transform (adamw + momentum) after one update, a step counter
    and raw uint32 key data."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "transformer": {"wte": {"weight": jax.random.normal(k[0], (16, 8), jnp.bfloat16)},
                        "h": {"0": {"attn": {"c_q": {"weight": jax.random.normal(k[1], (8, 8))}}}}},
        "lm_head": {"weight": jax.random.normal(k[2], (16, 8))},
        "resid_lambdas": jnp.ones((2,), jnp.float32),
    }
    labels = jax.tree.map(lambda x: "matrix" if x.ndim == 2 else "scalar", params)
    tx = optax.multi_transform({"matrix": optax.adamw(1e-3, weight_decay=0.1),
                                "scalar": optax.sgd(0.5, momentum=0.9)}, labels)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.25), params)
    _, opt_state = tx.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(7, jnp.int32),
            "rng": jax.random.key_data(k[3]), "data_rng": np.arange(4, dtype=np.uint32)}


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        where = jax.tree_util.keystr(path)
        assert (x.dtype, x.shape) == (y.dtype, y.shape), where
        assert x.tobytes() == y.tobytes(), where


def config_dict(**kw) -> dict:
    return RLConfig(**kw).to_dict()


def test_round_trip_is_bit_exact(tmp_path):
    state, meta = make_state(), {"config": config_dict(), "cursor": 48, "metrics": {"reward": 0.25}}
    with CheckpointManager(tmp_path / "checkpoints") as mgr:
        assert mgr.latest_step() is None
        assert mgr.save(5, state, meta) == tmp_path / "checkpoints" / "5"
        restored, restored_meta = mgr.restore(abstract_state=jax.eval_shape(make_state))
    assert_bit_equal(restored, state)
    assert restored["params"]["transformer"]["wte"]["weight"].dtype == jnp.bfloat16
    # optax's namedtuple states come back as themselves, so update() accepts them
    assert type(restored["opt_state"]) is type(state["opt_state"])
    assert restored_meta == meta


def test_round_trip_replicated_over_8_devices(tmp_path):
    assert jax.device_count() == 8, "conftest.py should simulate 8 CPU devices"
    sharding = replicated(make_mesh())
    state = jax.device_put(make_state(), sharding)
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state, {"cursor": 0})
        from_abstract, _ = mgr.restore(1, jax.eval_shape(make_state), sharding=sharding)
        from_template, _ = mgr.restore(1, state)  # a concrete template brings its own shardings
    for restored in (from_abstract, from_template):
        assert_bit_equal(restored, state)
        assert all(x.sharding == sharding for x in jax.tree.leaves(restored))


def test_meta_and_config_toml_survive(tmp_path):
    cfg = RLConfig(run="r1", matrix_lr=0.03, num_steps=12, data_dir="data/gsm8k")
    meta = {"config": cfg.to_dict(), "cursor": {"epoch": 0, "index": 32},
            "model_config": {"n_layer": 2, "window_pattern": "SL"}, "generation": "gen-2026-07",
            "seed": {"seed": 0, "fold": [1, 2]}, "metrics": {"reward": 0.5, "nan": None}}
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(3, make_state(), meta)
        assert mgr.read_meta() == meta
        assert mgr.read_meta(3) == meta
    toml = tomllib.loads((tmp_path / "3" / "config.toml").read_text())
    assert RLConfig.from_dict(toml) == cfg


def test_latest_step_ignores_unfinished_tmp_dirs(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state, {})
    for name in ("2.orbax-checkpoint-tmp-1700000000", "3.orbax-checkpoint-tmp"):
        (tmp_path / name / "state").mkdir(parents=True)  # what a killed save leaves behind
        (tmp_path / name / "state" / "_METADATA").write_text("{truncated")
    with CheckpointManager(tmp_path) as mgr:
        assert (mgr.latest_step(), mgr.all_steps()) == (1, [1])
        assert_bit_equal(mgr.restore(abstract_state=state)[0], state)
        mgr.save(2, state, {})
        assert mgr.latest_step() == 2


KILL_MID_SAVE = """
import os, signal, sys
import jax.numpy as jnp
from jaxrl.run_state import CheckpointManager
mgr = CheckpointManager(sys.argv[1])
mgr.save(1, {"w": jnp.arange(4.0)}, {"step": 1})
def die(src, dst, *a, **k):  # orbax commits with a rename: die just before the first one
    os.kill(os.getpid(), signal.SIGKILL)
os.rename = os.replace = die
mgr.save(2, {"w": jnp.arange(4.0) + 1}, {"step": 2})
print("save 2 finished without a rename")
"""


@pytest.mark.cli
def test_killed_save_never_becomes_latest(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_MID_SAVE), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stdout + proc.stderr[-3000:]
    assert any(".orbax-checkpoint-tmp" in p.name for p in tmp_path.iterdir()), list(tmp_path.iterdir())
    with CheckpointManager(tmp_path) as mgr:
        assert (mgr.latest_step(), mgr.all_steps()) == (1, [1])
        state, meta = mgr.restore(abstract_state={"w": jax.ShapeDtypeStruct((4,), jnp.float32)})
        assert meta == {"step": 1} and np.array_equal(state["w"], np.arange(4.0))


def test_max_to_keep(tmp_path):
    with CheckpointManager(tmp_path, max_to_keep=2) as mgr:
        for step in (10, 20, 30, 40):
            mgr.save(step, {"x": jnp.full((2,), step)}, {"step": step})
        assert mgr.all_steps() == [30, 40] and mgr.latest_step() == 40
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["30", "40"]


def _make_writes_fail(directory: Path, monkeypatch) -> str:
    """Make new writes under `directory` fail; returns the expected OS error text.

    chmod 0o555 does not stop root (tests often run as root, e.g. in containers): then the
    commit rename of the save fails with ENOSPC, as on a full disk.
    """
    directory.chmod(0o555)
    try:
        (directory / "probe").touch()
    except PermissionError:
        return os.strerror(errno.EACCES)
    (directory / "probe").unlink()
    directory.chmod(0o755)
    real_rename, real_replace = os.rename, os.replace

    def no_space(real):
        def fail(src, dst, *args, **kwargs):
            if str(dst).startswith(str(directory)):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
            return real(src, dst, *args, **kwargs)
        return fail

    monkeypatch.setattr(os, "rename", no_space(real_rename))
    monkeypatch.setattr(os, "replace", no_space(real_replace))
    return os.strerror(errno.ENOSPC)


def test_failed_save_raises_and_keeps_previous(tmp_path, monkeypatch):
    state = make_state()
    ckpt = tmp_path / "checkpoints"
    with CheckpointManager(ckpt, max_to_keep=1) as mgr:
        mgr.save(1, state, {"config": config_dict()})
        os_error = _make_writes_fail(ckpt, monkeypatch)
        try:
            with pytest.raises(CheckpointError) as e:
                mgr.save(2, make_state(1), {"config": config_dict()})
        finally:
            ckpt.chmod(0o755)
            monkeypatch.undo()
        assert str(ckpt / "2") in str(e.value) and os_error in str(e.value)
        assert "step 1 is intact" in str(e.value)
        assert (mgr.latest_step(), mgr.all_steps()) == (1, [1])
        assert_bit_equal(mgr.restore(abstract_state=state)[0], state)
        mgr.save(2, state, {})  # the next attempt, once the cause is fixed, succeeds
        assert mgr.all_steps() == [2]


def test_unwritable_directory_is_a_checkpoint_error(tmp_path):
    (tmp_path / "run").write_text("a file where the run folder should be")
    with pytest.raises(CheckpointError, match=str(tmp_path / "run" / "checkpoints")):
        CheckpointManager(tmp_path / "run" / "checkpoints")


def test_structure_mismatch_names_the_first_differing_leaf(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, state, {})
        wrong_dtype = jax.eval_shape(make_state)  # orbax alone would silently cast bf16 -> f32
        wrong_dtype["params"]["transformer"]["wte"]["weight"] = jax.ShapeDtypeStruct((16, 8), jnp.float32)
        with pytest.raises(CheckpointError, match=r"key 'params/transformer/wte/weight': expected dtype "
                           r"float32, found bfloat16"):
            mgr.restore(1, wrong_dtype)
        wrong_shape = jax.eval_shape(make_state)
        wrong_shape["params"]["lm_head"]["weight"] = jax.ShapeDtypeStruct((32, 8), jnp.float32)
        with pytest.raises(CheckpointError, match=r"key 'params/lm_head/weight': expected shape \(32, 8\), found \(16, 8\)"):
            mgr.restore(1, wrong_shape)
        missing = jax.eval_shape(make_state)
        missing["extra"] = jax.ShapeDtypeStruct((2,), jnp.int32)
        del missing["data_rng"]
        with pytest.raises(CheckpointError) as e:
            mgr.restore(1, missing)
        assert "missing key 'extra' (expected shape (2,), int32)" in str(e.value)
        assert "unexpected key 'data_rng' with shape (4,), uint32" in str(e.value)


def test_per_layer_checkpoint_fails_with_the_layout_named(tmp_path):
    """A run checkpoint of the per-layer params layout (transformer/h/<i>/...) cannot resume a run of
    stacked layers: the error says so and how to go on, instead of listing leaves."""
    with CheckpointManager(tmp_path) as mgr:
        mgr.save(1, make_state(), {})
        stacked = jax.eval_shape(make_state)
        c_q = jax.ShapeDtypeStruct((1, 8, 8), jnp.float32)
        stacked["params"]["transformer"]["h"] = {"attn": {"c_q": {"weight": c_q}}}
        with pytest.raises(CheckpointError, match=r"per-layer params layout .*Start a new run from its params"):
            mgr.restore(1, stacked)


def test_save_and_restore_refuse_misuse(tmp_path):
    state = make_state()
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CheckpointError, match="no checkpoint in"):
            mgr.restore(abstract_state=state)
        with pytest.raises(TypeError, match="key_data"):
            mgr.save(1, {"key": jax.random.key(0)}, {})
        with pytest.raises(TypeError, match="JSON"):
            mgr.save(1, state, {"cursor": np.arange(2)})
        with pytest.raises(TypeError, match="not an array"):
            mgr.save(1, {"step": 3}, {})
        assert mgr.all_steps() == []
        mgr.save(1, state, {})
        with pytest.raises(CheckpointError, match="step 1 already exists"):
            mgr.save(1, state, {})
        with pytest.raises(CheckpointError, match=r"saved steps: \[1\]"):
            mgr.restore(2, state)
        with pytest.raises(TypeError, match="abstract_state"):
            mgr.restore(1)


def test_resume_keys_are_classified_once():
    assert set(RESUME_BREAKING).isdisjoint(RESUME_SAFE)
    assert set(RESUME_BREAKING) | set(RESUME_SAFE) == set(FIELDS)


def test_check_resume_compatible():
    saved = config_dict(run="a", eval_every=60)
    assert check_resume_compatible(saved, dict(saved)) == []
    safe = config_dict(run="b", eval_every=30, resume=True, export_nanochat=False)
    assert check_resume_compatible(saved, safe) == ["run", "resume", "eval_every", "export_nanochat"]
    with pytest.raises(CheckpointError) as e:
        check_resume_compatible(saved, config_dict(run="b", matrix_lr=0.03, seed=1, dtype="float32"))
    msg = str(e.value)
    assert "dtype: saved 'bfloat16', now 'float32'" in msg
    assert "matrix_lr: saved 0.02, now 0.03" in msg and "seed: saved 0, now 1" in msg
    assert "run:" not in msg
    newer = {**saved, "brand_new_knob": 1}
    with pytest.raises(CheckpointError, match="brand_new_knob: saved <absent>, now 1 "
                       r"\(not known to be safe\)"):
        check_resume_compatible(saved, newer)


RESTORE_ON_ONE_DEVICE = """
import sys
import jax, numpy as np
from jaxrl.run_state import CheckpointManager
assert jax.device_count() == 1
with CheckpointManager(sys.argv[1]) as mgr:
    state, meta = mgr.restore_saved()
leaves = jax.tree.leaves(state)
assert all(x.sharding.device_set == {jax.devices()[0]} for x in leaves)
print(meta["cursor"], [(str(x.dtype), x.shape, np.asarray(x).tobytes().hex()) for x in leaves])
"""


@pytest.mark.cli
def test_restore_saved_reads_an_8_device_save_on_one_device(tmp_path):
    """A run saved over 8 devices (or several hosts) is readable on one, e.g. by eval or export."""
    state = jax.device_put(make_state(), replicated(make_mesh()))
    with CheckpointManager(tmp_path / "ck") as mgr:
        mgr.save(1, state, {"cursor": 7})
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(RESTORE_ON_ONE_DEVICE), str(tmp_path / "ck")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    here = [(str(x.dtype), x.shape, np.asarray(x).tobytes().hex()) for x in jax.tree.leaves(state)]
    assert proc.stdout.strip() == f"7 {here}"
