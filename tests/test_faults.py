"""Faults inside a run: non-finite steps are skipped, logged and, when consecutive, stop the run with
the last good state saved; a failing checkpoint write names the path and the OS error and leaves
the previous checkpoint intact.

Run: python -m pytest -q tests/test_faults.py   (the trainer runs are slow: about 2 minutes on 2 CPU cores
with the reference run; the hook's own tests are quick)

NaNs come from the one fault-injection hook, jaxrl/faults.py: its environment variable
(faults.NAN_STEPS_ENV, a comma-separated list of steps whose advantages become NaN) is set for the
trainer subprocess only, and each injected step is announced on stderr and in metrics.jsonl. The
full disk is simulated with RLIMIT_FSIZE: every write past 1 MB fails with EFBIG ("File too
large"), which hits orbax's data files but not the small run files.
"""
import shutil
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest
from conftest import REPO, TINY_STEPS, differing_leaves, load_state, run_trainer, trainer_cmd, trainer_env

from jaxrl import faults
from jaxrl.run_state import CheckpointManager
from jaxrl.metrics import read_metrics



class _Batch(NamedTuple):
    advantages: np.ndarray
    inputs: np.ndarray


class _Writer:
    def __init__(self):
        self.rows = []

    def log(self, row):
        self.rows.append(row)


def test_hook_is_inert_unless_its_variable_lists_the_step(capsys):
    batch, writer = _Batch(np.ones(4, np.float32), np.arange(4)), _Writer()
    for environ in ({}, {faults.NAN_STEPS_ENV: ""}, {faults.NAN_STEPS_ENV: "0,2"}, {"JAXRL_INJECT_NAN_STEP": "1"}):
        assert faults.inject_nan_advantages(batch, 1, writer, environ) is batch
    assert writer.rows == [] and capsys.readouterr().err == ""


def test_hook_poisons_the_listed_step_and_says_so(capsys):
    batch, writer = _Batch(np.ones(4, np.float32), np.arange(4)), _Writer()
    out = faults.inject_nan_advantages(batch, 3, writer, {faults.NAN_STEPS_ENV: " 1, 3 "})
    assert np.isnan(out.advantages).all() and out.advantages.dtype == np.float32 and out.inputs is batch.inputs
    assert writer.rows == [{"step": 3, "event": "test_fault", "phase": "rl", "fault": "nan_advantages",
                            "env": faults.NAN_STEPS_ENV}]
    err = capsys.readouterr().err
    assert f"WARNING: test fault injected: step 3's advantages set to NaN by {faults.NAN_STEPS_ENV}" in err
    with pytest.raises(ValueError, match=f"{faults.NAN_STEPS_ENV}='1;3' must list step numbers"):
        faults.nan_steps({faults.NAN_STEPS_ENV: "1;3"})


def _params(state: dict) -> dict:
    return {k: v for k, v in state.items() if k.startswith("['params']")}


@pytest.mark.slow
@pytest.mark.cli
def test_nan_steps_are_skipped_logged_and_stop_the_run_when_consecutive(tmp_path, compile_cache, shared_dir):
    # step 1 alone is non-finite: skipped, and the run goes on; steps 3 and 4 in a row: stop
    env = trainer_env(compile_cache, **{faults.NAN_STEPS_ENV: "1,3,4"})
    proc = run_trainer(tmp_path, "nan", "--max_nonfinite_skips=2", env=env)
    assert proc.returncode == 3, proc.stderr[-3000:]
    run_dir = tmp_path / "nan"
    rows = {r["step"]: r for r in read_metrics(run_dir) if r["event"] == "step"}
    assert [rows[s]["skipped"] for s in range(TINY_STEPS)] == [0, 1, 0, 1, 1]
    # the hook announces every injected step, and only those, on stderr and in the metrics
    assert [r["step"] for r in read_metrics(run_dir) if r["event"] == "test_fault"] == [1, 3, 4]
    assert proc.stderr.count("WARNING: test fault injected") == 3
    assert f"step 3's advantages set to NaN by {faults.NAN_STEPS_ENV}" in proc.stderr
    assert rows[1]["skipped_questions"] == [4, 5, 6, 7] and rows[3]["skipped_questions"] == [12, 13, 14, 15]
    assert np.isfinite(rows[2]["loss"]) and rows[2]["grad_norm"] > 0  # the run went on after step 1
    assert "Step 1: non-finite loss nan" in proc.stdout and "update skipped (questions [4, 5, 6, 7])" in proc.stdout
    assert "stopping: 2 consecutive non-finite steps" in proc.stdout
    # the stop saved step 4 holding the last good state, the one after step 2, bit for bit
    assert CheckpointManager(run_dir / "checkpoints").all_steps() == [2, 3, 4]
    last_good = _params(load_state(run_dir, 2)[1])
    assert differing_leaves(_params(load_state(run_dir, 4)[1]), last_good) == []


# Runs its arguments as a program with writes past 1 MB failing with EFBIG (Python ignores SIGXFSZ).
SMALL_DISK = ("import os, resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
              "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


@pytest.mark.slow
@pytest.mark.cli
def test_failed_save_names_path_and_os_error_and_keeps_the_previous(tmp_path, reference_run, compile_cache):
    run_dir = tmp_path / "ref"
    shutil.copytree(reference_run, run_dir)
    last = TINY_STEPS - 1
    shutil.rmtree(run_dir / "checkpoints" / str(last))  # the resumed run redoes the last step; its save fails
    cmd = [sys.executable, "-c", SMALL_DISK, *trainer_cmd(tmp_path, "ref", "--resume")[1:]]
    proc = subprocess.run(cmd, cwd=REPO, env=trainer_env(compile_cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 4, proc.stderr[-3000:]
    err = proc.stderr  # also holds orbax's own noise ("Event loop is closed") from the aborted write
    assert f"error: saving checkpoint step {last} to {run_dir.resolve() / 'checkpoints' / str(last)} failed " \
           f"(step {last - 1} is intact)" in err
    assert "File too large" in err and "Free disk space" in err
    mgr = CheckpointManager(run_dir / "checkpoints")  # opening it deletes the unfinished save
    assert mgr.all_steps() == [last - 2, last - 1]
    assert differing_leaves(load_state(run_dir, last - 1)[1], load_state(reference_run, last - 1)[1]) == []
