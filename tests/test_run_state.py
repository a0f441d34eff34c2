"""The run-state package as one place: the names on disk, one error class, one tree check, and
directories written before the package existed (tests/data/jaxrl-efee6f2) still load.

Run: python -m pytest -q tests/test_run_state.py
"""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxrl import run_state
from jaxrl.model import flatten_params
from jaxrl.run_state import CheckpointError, CheckpointManager, Leaf, RunPaths, RunStateError

OLD = Path(__file__).resolve().parent / "data" / "jaxrl-efee6f2"


def test_run_paths_name_the_on_disk_layout(tmp_path):
    """The names other tools and older runs rely on (nanochat reads chatrl_checkpoints/)."""
    p = RunPaths(str(tmp_path))
    names = {"checkpoints": "checkpoints", "damaged": "damaged_checkpoints", "export": "chatrl_checkpoints",
             "metrics": "metrics.jsonl", "tensorboard": "tensorboard", "tokenizer": "tokenizer",
             "config": "config.toml", "model_json": "model.json", "lock": "run.lock", "params": "params"}
    assert {attr: getattr(p, attr) for attr in names} == {attr: tmp_path / name for attr, name in names.items()}
    assert p.step(12) == tmp_path / "checkpoints" / "12"


def test_every_part_raises_the_one_error_class(tmp_path):
    assert CheckpointError is RunStateError and issubclass(RunStateError, ValueError)
    claim = run_state.claim_run_dir(tmp_path / "run")
    RunPaths(tmp_path / "run").lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    failures = [lambda: run_state.read_model_json(tmp_path),  # import dir
                lambda: CheckpointManager(tmp_path / "ck").restore_saved(),  # train state
                lambda: run_state.check_data({"train": None}, {"train": {"rows": 1, "sha256": "0"}}, False),
                lambda: run_state.claim_run_dir(tmp_path / "run")]  # the lock
    for fail in failures:
        with pytest.raises(RunStateError):
            fail()
    claim.release()


def test_check_tree_names_each_key_expected_and_found():
    expected = {"a": Leaf((2, 3), "float32"), "b": Leaf((4,)), "c": Leaf((1,), "int32")}
    found = {"a": Leaf((2, 3), "bfloat16"), "b": Leaf((5,), "float32"), "z": Leaf((7,), "uint32")}
    assert run_state.tree_problems(expected, found) == [
        "key 'a': expected dtype float32, found bfloat16", "key 'b': expected shape (4,), found (5,)",
        "missing key 'c' (expected shape (1,), int32)", "unexpected key 'z' with shape (7,), uint32"]
    assert run_state.tree_problems(expected, dict(expected)) == []
    with pytest.raises(RunStateError, match=r"^somewhere: differs:\n  - key 'a'.*\nfix it$"):
        run_state.check_tree({"a": Leaf((1,))}, {"a": Leaf((2,))}, "somewhere", "differs", "fix it")


def _digests(params) -> dict:
    return {k: [list(v.shape), hashlib.sha256(np.ascontiguousarray(v, np.float32).tobytes()).hexdigest()]
            for k, v in sorted(flatten_params(params).items())}


def test_directories_written_before_the_package_load(tmp_path):
    """An import dir and a run dir of the old writer: params bit-equal to what it saved, checksums intact."""
    old = shutil.copytree(OLD, tmp_path / "old")  # a manager may tidy its folder: never the committed copy
    expected = json.loads((old / "expected.json").read_text())
    config, params, info = run_state.load_jaxrl_import(old / "import")
    assert _digests(params) == expected and info["source"] == {"step": 7} and info["tokenizer_dir"] is None
    config_run, params_run, info_run = run_state.load_run_dir(old / "run")
    assert config_run == config and info_run["step"] == 1 and _digests(params_run) == expected
    with CheckpointManager(RunPaths(old / "run").checkpoints, max_to_keep=None) as mgr:
        assert mgr.resume_step() == (1, [])
        state, meta = mgr.restore_saved(1)
    assert meta == {"step": 1, "next_step": 2} and int(state["step"]) == 1
    assert _digests(state["params"]) == expected and {np.asarray(x).dtype for x in flatten_params(
        state["params"]).values()} == {np.dtype(np.float32)}


def test_a_config_saved_by_an_earlier_release_resumes():
    """Before the attention key and before the demo left RLConfig, a saved config had warmstart_* keys
    and no attention: resuming it with today's equal config is no change; a real change still breaks."""
    from jaxrl.config import REMOVED_KEYS, RLConfig

    now = RLConfig(checkpoint="ck", num_steps=3).to_dict()
    old = {k: v for k, v in now.items() if k not in run_state.ADDED_KEYS} | {k: 1 for k in REMOVED_KEYS}
    assert "attention" not in old and run_state.check_resume_compatible(old, now) == []
    with pytest.raises(RunStateError, match="attention: saved 'einsum', now 'xla'"):
        run_state.check_resume_compatible(old, {**now, "attention": "xla"})
    with pytest.raises(RunStateError, match="seed: saved 0, now 1"):
        run_state.check_resume_compatible(old, {**now, "seed": 1})
