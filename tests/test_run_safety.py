"""Run state and preemption: checksummed checkpoints and the fall back from a damaged one, finite
state, the data fingerprint, the run-directory lock, a clean log on a restart from step 0, the
non-finite and zero-reward watchdogs, and SIGTERM/SIGINT handling (docs/errors.md, "Run state,
checkpoints and preemption").

Run: python -m pytest -q tests/test_run_state.py -m "not slow"   (the trainer runs are `slow`)
"""
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARITH, REPO, SHARED, TINY_STEPS, differing_leaves, load_state, run_trainer, trainer_cmd, \
    trainer_env

from jaxrl import faults, run_state
from jaxrl.run_state import CheckpointError, CheckpointManager, RunStateError, check_resume_compatible, load_run_dir
from jaxrl.run_state import guard, train_state
from jaxrl.config import RLConfig
from jaxrl.metrics import read_metrics
from jaxrl.tasks import load_task
from jaxrl.tasks.arith import ArithTask


def small_state(seed: int) -> dict:
    k = jax.random.split(jax.random.key(seed), 2)
    return {"params": {"w": jax.random.normal(k[0], (64, 64)), "b": jax.random.normal(k[1], (64,))},
            "step": jnp.asarray(seed, jnp.int32)}


def two_steps(directory: Path) -> None:
    with CheckpointManager(directory) as mgr:
        for step in (1, 2):
            mgr.save(step, small_state(step), {"step": step})


def largest_file(folder: Path) -> Path:
    return max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def xor_bytes(path: Path, count: int = 4096) -> None:
    """Flip every bit of `count` bytes in the middle of the file (its size stays)."""
    data = np.frombuffer(path.read_bytes(), np.uint8).copy()
    data[max(0, len(data) // 2 - count // 2):][:count] ^= 0xFF
    path.write_bytes(data.tobytes())


DAMAGE = {  # kind -> (how, a fragment of the message)
    "bit rot in the largest state file": (lambda d: xor_bytes(largest_file(d / "state")), "sha256 mismatch"),
    "a truncated state file": (lambda d: os.truncate(largest_file(d / "state"), 100), "bytes, "),
    "orbax's manifest deleted": (lambda d: (d / "state" / "manifest.ocdbt").unlink(), "manifest.ocdbt is missing"),
    "the meta folder deleted": (lambda d: shutil.rmtree(d / "meta"), "is missing"),
    "bit rot in the meta file": (lambda d: xor_bytes(largest_file(d / "meta"), 1), "sha256 mismatch"),
    "checksums.json deleted": (lambda d: (d / "checksums.json").unlink(), "checksums.json is missing"),
    "checksums.json truncated": (lambda d: os.truncate(d / "checksums.json", 40), "is unreadable"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_checkpoint_is_named_and_resume_falls_back(tmp_path, kind):
    damage, fragment = DAMAGE[kind]
    ckpt = tmp_path / "run" / "checkpoints"
    two_steps(ckpt)
    damage(ckpt / "2")
    with CheckpointManager(ckpt) as mgr:
        for restore in (lambda: mgr.restore(2, small_state(0)), lambda: mgr.restore_saved(2)):
            with pytest.raises(CheckpointError) as e:
                restore()
            assert f"checkpoint step 2 in {ckpt} is damaged" in str(e.value) and fragment in str(e.value)
        step, notes = mgr.resume_step()
        assert step == 1 and len(notes) == 1 and fragment in notes[0]
        assert f"moved to {tmp_path / 'run' / 'damaged_checkpoints' / '2'}" in notes[0]
        assert mgr.all_steps() == [1] and (tmp_path / "run" / "damaged_checkpoints" / "2").is_dir()
        state, meta = mgr.restore(1, small_state(0))
        assert meta == {"step": 1} and np.array_equal(state["params"]["w"], small_state(1)["params"]["w"])
        mgr.save(2, small_state(2), {"step": 2})  # the redone step saves again
        assert mgr.all_steps() == [1, 2]


def test_no_intact_checkpoint_names_every_step_and_the_command(tmp_path):
    ckpt = tmp_path / "run" / "checkpoints"
    two_steps(ckpt)
    xor_bytes(largest_file(ckpt / "2" / "state"))
    (ckpt / "1" / "checksums.json").unlink()
    with CheckpointManager(ckpt) as mgr, pytest.raises(CheckpointError) as e:
        mgr.resume_step()
    assert all(f in str(e.value) for f in ("no intact checkpoint to resume from", "step 2", "step 1",
                                           f"run: mv {ckpt} {tmp_path / 'run' / 'damaged_checkpoints'}"))
    assert sorted(p.name for p in ckpt.iterdir()) == ["1", "2"]  # nothing moved


def test_nonfinite_state_is_never_saved_nor_restored(tmp_path, monkeypatch):
    bad = small_state(1)
    bad["params"]["b"] = bad["params"]["b"].at[3].set(jnp.nan)
    with CheckpointManager(tmp_path) as mgr:
        with pytest.raises(CheckpointError, match="refusing to save checkpoint step 1: 1 state leaves hold NaN or "
                                                  "inf \\(first: params/b\\)"):
            mgr.save(1, bad, {})
        assert mgr.all_steps() == []
        monkeypatch.setattr(train_state, "nonfinite_leaves", lambda tree: [])  # a checkpoint from elsewhere
        mgr.save(1, bad, {})
        monkeypatch.undo()
        with pytest.raises(CheckpointError, match="holds NaN or inf in 1 leaves \\(first: params/b\\)"):
            mgr.restore(1, small_state(0))
    assert run_state.nonfinite_leaves({"a": np.ones(3), "n": np.arange(3), "i": jnp.array([1.0, jnp.inf])}) == ["i"]


def test_resume_accepts_the_same_path_relative_or_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt").mkdir()
    saved = RLConfig(checkpoint="ckpt", data_dir="./data").to_dict()
    assert check_resume_compatible(saved, RLConfig(checkpoint=str(tmp_path / "ckpt"),
                                                   data_dir=str(tmp_path / "data")).to_dict()) == []
    with pytest.raises(CheckpointError, match="checkpoint: saved 'ckpt', now 'other'"):
        check_resume_compatible(saved, RLConfig(checkpoint="other", data_dir="./data").to_dict())


def _data_dir(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        (path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_data_fingerprint_sees_a_rewritten_answer(tmp_path):
    rows = [json.loads(line) for line in (SHARED / "data" / "arith" / "test.jsonl").read_text().splitlines()[:40]]
    before = run_state.data_fingerprint(load_task(_data_dir(tmp_path / "a", rows), "train"))
    rows[17] = dict(rows[17], answer=rows[17]["answer"].rsplit("####", 1)[0] + "#### 123456")
    after = run_state.data_fingerprint(load_task(_data_dir(tmp_path / "b", rows), "train"))
    assert before["rows"] == after["rows"] == 40 and before["sha256"] != after["sha256"]
    assert run_state.data_fingerprint(ArithTask("test")) == run_state.data_fingerprint(ArithTask("test"))
    assert run_state.data_fingerprint(ArithTask("test", difficulty=1)) != run_state.data_fingerprint(
        ArithTask("test"))
    saved, now = {"train": before, "test": before}, {"train": after, "test": before}
    with pytest.raises(RunStateError) as e:
        run_state.check_data(saved, now, allow_change=False)
    msg = str(e.value)
    assert f"train: saved 40 rows, sha256 {before['sha256'][:16]}, now 40 rows, sha256 {after['sha256'][:16]}" in msg
    assert "test:" not in msg and "--allow_data_change" in msg
    assert run_state.check_data(saved, now, allow_change=True).startswith("warning: resuming on changed data")
    assert run_state.check_data(saved, saved, allow_change=False) is None
    assert "no data fingerprint" in run_state.check_data(None, now, allow_change=False)


def _lock_of(proc: subprocess.Popen, **fields) -> dict:
    return {"pid": proc.pid, "host": socket.gethostname(), "start_time": guard._start_time(proc.pid),
            "started": "2026-01-01 00:00:00 UTC", **fields}


@pytest.fixture
def sleeper():
    """A live process whose pid holds a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.cli
def test_run_dir_lock(tmp_path, sleeper):
    run_dir = tmp_path / "out" / "run"
    claim = run_state.claim_run_dir(run_dir)
    assert claim.created == tmp_path / "out" and json.loads((run_dir / "run.lock").read_text())["pid"] == os.getpid()
    claim.release()  # failed before training: the folders it made go, the lock with them
    assert not (tmp_path / "out").exists()
    run_dir.mkdir(parents=True)
    (run_dir / "run.lock").write_text(json.dumps(_lock_of(sleeper)))
    with pytest.raises(RunStateError) as e:
        run_state.claim_run_dir(run_dir)
    assert f"run directory {run_dir} is in use by pid {sleeper.pid} on host {socket.gethostname()}" in str(e.value)
    assert f"rm {run_dir / 'run.lock'}" in str(e.value) and run_dir.is_dir()
    (run_dir / "run.lock").write_text(json.dumps(_lock_of(sleeper, host="elsewhere")))
    with pytest.raises(RunStateError, match="on host elsewhere .*jaxrl cannot check"):
        run_state.claim_run_dir(run_dir)
    (run_dir / "run.lock").write_text(json.dumps(_lock_of(sleeper, start_time="1")))  # pid reused since
    run_state.claim_run_dir(run_dir).release()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_dir / "run.lock").write_text(json.dumps(_lock_of(gone)))  # its holder is gone: stale
    claim = run_state.claim_run_dir(run_dir)
    claim.training_started = True
    claim.release()
    assert run_dir.is_dir() and not (run_dir / "run.lock").exists()
    (run_dir / "run.lock").write_text("{trunc")
    with pytest.raises(RunStateError, match="cannot be read; if no other run uses this directory, delete the lock"):
        run_state.claim_run_dir(run_dir)


@pytest.mark.cli
def test_trainer_refuses_a_locked_run_dir(tmp_path, compile_cache, sleeper):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "run.lock").write_text(json.dumps(_lock_of(sleeper)))
    proc = run_trainer(tmp_path, "busy", env=trainer_env(compile_cache), timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: run directory {tmp_path / 'busy'} is in use by pid {sleeper.pid}" in proc.stderr
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["run.lock"]


def test_a_restart_from_step_0_sets_the_old_log_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    (tmp_path / "tensorboard").mkdir()
    moved = run_state.set_aside_logs(tmp_path)
    assert [p.name.split("-restart-")[0] for p in moved] == ["metrics.before", "tensorboard.before"]
    assert moved[0].name.endswith(".jsonl") and moved[0].read_text() == '{"step": 0}\n'
    assert not (tmp_path / "metrics.jsonl").exists() and run_state.set_aside_logs(tmp_path) == []


def test_max_nonfinite_skips_0_never_stops():
    stops = [[run_state.stop_for_nonfinite(n, limit) for n in range(5)] for limit in (0, 1, 3)]
    assert stops == [[False] * 5, [False, True, True, True, True], [False, False, False, True, True]]


def test_zero_reward_warning():
    zero_eval = {"step": 0, "pass@1": 0.0, "pass@2": 0.0}
    assert run_state.zero_reward_warning([3, 4], 3, zero_eval) is None
    msg = run_state.zero_reward_warning([3, 4, 5], 3, zero_eval)
    assert "reward was 0 on every sample for 3 consecutive steps (steps 3-5; the last eval (step 0) had pass@k 0" in msg
    assert "broken weights" in msg and "reward that never fires" in msg
    assert "pass@1 0.250" in run_state.zero_reward_warning([1, 2, 3], 3, {"step": 0, "pass@1": 0.25})
    assert [run_state.zero_reward_warning(list(range(n)), 3, None) is None for n in (4, 6)] == [True, False]
    assert run_state.zero_reward_warning(list(range(50)), 0, None) is None


SIGNALS = """
import os, signal, sys, time
from jaxrl.run_state import StopSignal
stop = StopSignal(on_exit=lambda: print("on_exit ran", flush=True))
if sys.argv[1] == "training":
    stop.defer()
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.5)
    print("first signal deferred:", stop.signum == signal.SIGINT, flush=True)
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(5)
print("still running")
"""


@pytest.mark.cli
@pytest.mark.parametrize("phase", ["setup", "training"])
def test_signals_defer_once_then_exit_at_once(phase):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SIGNALS, phase], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr and "still" not in proc.stdout
    if phase == "training":
        assert "first signal deferred: True" in proc.stdout and "on_exit ran" in proc.stdout
        assert "SIGINT: finishing this step, then saving a checkpoint and exiting (exit 5)" in proc.stderr
        assert "SIGTERM again: exiting now without saving" in proc.stderr
    else:
        assert "SIGTERM: stopping before the first step (nothing to save)" in proc.stderr
    assert run_state.resume_command(["scripts/train_rl.py", "--config", "a b.toml", "--resume"]) == \
        "python scripts/train_rl.py --config 'a b.toml' --resume"


# ------------------------------------------------------------------------------------------
# The trainer (slow): bit rot, preemption, watchdogs, data changes


def _no_traceback(proc) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


@pytest.mark.cli
@pytest.mark.slow
def test_bit_rot_in_the_latest_checkpoint_falls_back_and_ends_identical(tmp_path, reference_run, compile_cache):
    """4096 flipped bytes in the largest data file of the last checkpoint: eval/export refuse it, --resume
    names it, sets it aside, redoes the step from the one before and ends bit-identical; with every
    checkpoint damaged, --resume names them all and the command that starts again."""
    run_dir, last = tmp_path / "ref", TINY_STEPS - 1
    shutil.copytree(reference_run, run_dir)
    xor_bytes(largest_file(run_dir / "checkpoints" / str(last) / "state"))
    with pytest.raises(CheckpointError, match=f"checkpoint step {last} of .* is damaged: .*sha256 mismatch.*use step "
                                          f"{last - 1}, the newest intact one"):
        load_run_dir(run_dir)
    proc = run_trainer(tmp_path, "ref", "--resume", env=trainer_env(compile_cache))
    assert proc.returncode == 0 and _no_traceback(proc), proc.stderr[-3000:]
    assert f"warning: checkpoint step {last} in {run_dir.resolve() / 'checkpoints'} is damaged" in proc.stderr
    assert f"moved to {run_dir.resolve() / 'damaged_checkpoints' / str(last)}" in proc.stderr
    assert f"resuming from step {last - 1}, the newest intact checkpoint" in proc.stderr
    step, state = load_state(run_dir)
    assert step == last and differing_leaves(state, load_state(reference_run)[1]) == []
    for step_dir in (run_dir / "checkpoints").iterdir():
        (step_dir / "checksums.json").unlink()
    proc = run_trainer(tmp_path, "ref", "--resume", env=trainer_env(compile_cache))
    _no_traceback(proc)
    assert proc.returncode == 1 and "error: no intact checkpoint to resume from" in proc.stderr
    assert f"run: mv {run_dir.resolve() / 'checkpoints'} {run_dir.resolve() / 'damaged_checkpoints'}-2" in proc.stderr


def _start(out: Path, extra: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(trainer_cmd(out, "run", *extra), cwd=REPO, env=env, stdout=f, stderr=f, text=True)


def _wait_for(proc: subprocess.Popen, log: Path, until, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert proc.poll() is None, f"the trainer ended too early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the signal point was never reached"
        time.sleep(0.01)


def _step_rows(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["event"] == "step"] if (run_dir / "metrics.jsonl").is_file() else []


@pytest.mark.cli
@pytest.mark.slow
def test_signals_then_resume_end_bit_identical(tmp_path, reference_run, compile_cache):
    """A signal before step 0 removes the new run dir; two SIGINTs exit at once; a restart from step 0
    sets the old log aside; SIGTERM at a random step saves it (save_every is 100: only the signal saves)
    and prints the resume command; the resume (checkpoint path now relative) ends bit-identical."""
    rng, env, out = random.Random(14), trainer_env(compile_cache), tmp_path / "out"
    run_dir, extra = out / "run", ["--save_every=100"]
    proc = _start(out, extra, env, tmp_path / "0.log")
    _wait_for(proc, tmp_path / "0.log", lambda: (run_dir / "run.lock").exists())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM and not run_dir.exists()
    assert "SIGTERM: stopping before the first step" in (tmp_path / "0.log").read_text()
    # 1. two SIGINTs after step 0: out at once, nothing saved, no traceback
    proc = _start(out, extra, env, tmp_path / "1.log")
    _wait_for(proc, tmp_path / "1.log", lambda: len(_step_rows(run_dir)) >= 1)
    for _ in range(2):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.2)
    assert proc.wait(timeout=120) == 128 + signal.SIGINT
    log = (tmp_path / "1.log").read_text()
    assert "SIGINT again: exiting now without saving" in log and "Traceback" not in log
    # no complete checkpoint (the second signal may have cut the save of step 0 short: a tmp folder)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()] + list(run_dir.glob("run.lock"))
    # 2. restarted (from step 0: no checkpoint), SIGTERM once step k is logged
    k = rng.randint(0, 2)
    proc = _start(out, [*extra, "--resume"], env, tmp_path / "2.log")
    _wait_for(proc, tmp_path / "2.log", lambda: list(run_dir.glob("metrics.before-restart-*"))  # the new log
              and any(r["step"] == k for r in _step_rows(run_dir)))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == run_state.EXIT_PREEMPTED
    log = (tmp_path / "2.log").read_text()
    assert "fresh start: the earlier log is kept as " in log and "Traceback" not in log
    stopped = CheckpointManager(run_dir / "checkpoints").all_steps()
    assert len(stopped) == 1 and stopped[0] >= k
    assert f"stopped by a signal after step {stopped[0]}, saved as checkpoint step {stopped[0]}" in log
    assert re.search(r"resume with:\n  python \S*train_rl\.py .* --save_every=100 --resume\n", log), log[-2000:]
    # 3. resumed with the checkpoint given relative to the working directory
    proc = run_trainer(out, "run", *extra, "--resume", f"--checkpoint={os.path.relpath(ARITH, REPO)}", env=env)
    assert proc.returncode == 0, _no_traceback(proc)[-3000:]
    step, state = load_state(run_dir)
    assert step == TINY_STEPS - 1 and differing_leaves(state, load_state(reference_run)[1]) == []
    ref = {r["step"]: r["loss"] for r in _step_rows(reference_run)}
    assert [(r["step"], r["loss"]) for r in _step_rows(run_dir)] == sorted(ref.items())  # one row per step
    assert len(list(run_dir.glob("metrics.before-restart-*.jsonl"))) == 1


@pytest.fixture(scope="module")
def zero_reward_run(tmp_path_factory, compile_cache, shared_dir):
    """3 steps on data whose answers the model never produces, steps 0 and 1 non-finite, max_nonfinite_skips=0."""
    out = tmp_path_factory.mktemp("zero")
    rows = [json.loads(line) for line in (SHARED / "data" / "arith" / "test.jsonl").read_text().splitlines()[:20]]
    rows = [dict(r, answer=r["answer"].rsplit("####", 1)[0] + "#### 987654321") for r in rows]
    data = _data_dir(out / "data", rows)
    env = trainer_env(compile_cache, **{faults.NAN_STEPS_ENV: "0,1"})
    proc = run_trainer(out, "zero", f"--data_dir={data}", "--num_steps=3", "--max_nonfinite_skips=0",
                       "--zero_reward_warn_steps=2", env=env)
    return out, data, proc


@pytest.mark.cli
@pytest.mark.slow
def test_zero_rewards_warn_and_max_nonfinite_skips_0_never_stops(zero_reward_run):
    out, _, proc = zero_reward_run
    assert proc.returncode == 0, _no_traceback(proc)[-3000:]
    rows = _step_rows(out / "zero")
    assert [r["skipped"] for r in rows] == [1, 1, 0] and [r["reward"] for r in rows] == [0, 0, 0]
    assert "warning: the reward was 0 on every sample for 2 consecutive steps (steps 0-1; the last eval (step 0) " \
           "had pass@k 0 for every k)" in proc.stderr


@pytest.mark.cli
@pytest.mark.slow
def test_resume_refuses_changed_data_unless_allowed(zero_reward_run, compile_cache):
    out, data, _ = zero_reward_run
    text = (data / "train.jsonl").read_text()
    (data / "train.jsonl").write_text(text.replace("987654321", "987654322", 1))  # one answer rewritten
    before = sorted(p.name for p in (out / "zero" / "checkpoints").iterdir())
    args = ("zero", f"--data_dir={data}", "--num_steps=3", "--resume")
    proc = run_trainer(out, *args, env=trainer_env(compile_cache))
    _no_traceback(proc)
    assert proc.returncode == 1 and "error: cannot resume: the data differs from the data the checkpoint" in proc.stderr
    assert "train: saved 20 rows, sha256 " in proc.stderr and "test:" not in proc.stderr
    assert "pass --allow_data_change" in proc.stderr
    assert sorted(p.name for p in (out / "zero" / "checkpoints").iterdir()) == before
    proc = run_trainer(out, *args, "--allow_data_change", env=trainer_env(compile_cache))
    assert proc.returncode == 0 and "warning: resuming on changed data (allow_data_change)" in _no_traceback(proc)
