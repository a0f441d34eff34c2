"""Kill-and-resume: a trainer SIGKILLed during rollouts, updates and saves, resumed each time, ends
bit-identical to an uninterrupted run; resume refuses equivalence-breaking config changes.

Run: python -m pytest -q tests/test_resume.py   (slow: about 3 minutes on 2 CPU cores)

The trainer runs as a subprocess on the arith fixture with conftest's TINY_RL settings (1 process x
4 simulated CPU devices, a checkpoint after every step, a shared compilation cache for the train
step, nanochat export on). Three kills, at seeded random offsets: just after checkpoint 1 lands
(in its export or step 2's rollouts), during step 3's update (checkpoint 2 plus the reference
run's rollout time plus part of its update time), and inside the save of step 3 (an unfinished
`*.orbax-checkpoint-tmp*` folder is left behind). Every restart passes `--resume`, one of them with
safe changes (eval cadence, logging). The end state, the exports and the log must equal the
uninterrupted run's.
"""
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_STEPS, differing_leaves, load_state, run_trainer, trainer_cmd, trainer_env

from jaxrl.metrics import read_metrics
from jaxrl.model import flatten_params
from jaxrl.run_state import load_run_dir

pytestmark = [pytest.mark.slow, pytest.mark.cli]


def _unfinished_saves(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


def _saved(step: int):
    """Kill point: checkpoint `step` is complete, its checksums.json (written last) included: the trainer is
    now in its nanochat export or step + 1's rollouts. (The folder alone appears before config.toml and the
    checksums; a kill in that gap leaves a step that a resume rightly refuses, see test_run_safety.py.)"""
    return lambda run_dir: (run_dir / "checkpoints" / str(step) / "checksums.json").is_file()


def _saving(run_dir: Path) -> bool:
    """Kill point: an orbax save is half written."""
    return bool(_unfinished_saves(run_dir))


def _run_and_kill(out: Path, extra: list[str], env: dict, log: Path, when, delay: float) -> bool:
    """Start the trainer, SIGKILL it `delay` seconds after `when(run dir)` holds; True if the kill
    left a half-written save behind."""
    run_dir = out / "run"
    with open(log, "w") as f:
        proc = subprocess.Popen(trainer_cmd(out, "run", *extra), cwd=REPO, env=env, stdout=f,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not when(run_dir):
            assert proc.poll() is None, f"the trainer ended before the kill point:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.005)
        time.sleep(delay)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return bool(_unfinished_saves(run_dir))


def test_killed_and_resumed_run_is_bit_identical(tmp_path, reference_run, compile_cache):
    torch = pytest.importorskip("torch")
    rng = random.Random(8)
    env = trainer_env(compile_cache)
    export = "--export_nanochat=true"  # the reference run does not export: the switch is a safe change
    out = tmp_path / "out"
    run_dir = out / "run"
    ref = {r["step"]: r for r in read_metrics(reference_run) if r["event"] == "step"}
    # 1. just after checkpoint 1 lands: during its nanochat export or step 2's rollouts
    _run_and_kill(out, [export], env, tmp_path / "1.log", _saved(1), rng.uniform(0.0, 0.3))
    # 2. resumed at step 2; killed during step 3's update (its rollouts take about ref's rollout_s)
    delay = ref[3]["rollout_s"] + rng.uniform(0.3, 0.7) * ref[3]["train_s"]
    _run_and_kill(out, [export, "--resume"], env, tmp_path / "2.log", _saved(2), delay)
    # 3. resumed at step 3 with safe changes (eval cadence, logging); killed while step 3 is being saved
    half_written = _run_and_kill(out, [export, "--resume", "--eval_every=2", "--log_every=2"], env, tmp_path / "3.log",
                                 _saving, rng.uniform(0.0, 0.02))
    assert half_written, "the third kill did not land inside a save"
    # 4. resumed to the end
    proc = run_trainer(out, "run", export, "--resume", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {run_dir.resolve() / 'checkpoints'} step 2 (next step 3)" in proc.stdout

    step, state = load_state(run_dir)
    ref_step, ref_state = load_state(reference_run)
    assert step == ref_step == TINY_STEPS - 1
    assert differing_leaves(state, ref_state) == []
    assert not _unfinished_saves(run_dir)
    # the nanochat export of every saved step, the last one equal to the final params, no temp files
    exports = run_dir / "chatrl_checkpoints" / "d4"
    assert sorted(p.name for p in exports.iterdir()) == sorted(
        f"{kind}_{s:06d}.{ext}" for s in range(1, TINY_STEPS) for kind, ext in (("meta", "json"), ("model", "pt")))
    exported = torch.load(exports / f"model_{TINY_STEPS - 1:06d}.pt", weights_only=True)
    final = flatten_params(load_run_dir(run_dir)[1])  # nanochat's names of the stacked params
    assert sorted(exported) == sorted(final)
    for key, tensor in exported.items():
        np.testing.assert_array_equal(tensor.numpy(), final[key], err_msg=key)
    # the log holds every step once, with the uninterrupted run's numbers
    rows = [r for r in read_metrics(run_dir) if r["event"] == "step"]
    assert [r["step"] for r in rows] == list(range(TINY_STEPS))
    for r in rows:
        assert [r[k] for k in ("loss", "reward", "grad_norm")] == [ref[r["step"]][k] for k in ("loss", "reward", "grad_norm")]


def test_resume_refuses_a_config_change_that_breaks_equivalence(reference_run, compile_cache, tmp_path):
    """Changing a batch shape on resume is refused before any state is touched, naming the key."""
    before = sorted(p.name for p in (reference_run / "checkpoints").iterdir())
    proc = run_trainer(reference_run.parent, "ref", "--resume", "--examples_per_step=8",
                       env=trainer_env(compile_cache), timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "error: cannot resume" in proc.stderr and "examples_per_step: saved 4, now 8" in proc.stderr
    assert sorted(p.name for p in (reference_run / "checkpoints").iterdir()) == before


def test_stop_after_steps_then_resume_equals_the_whole_run(tmp_path, reference_run, compile_cache):
    """`stop_after_steps` runs a prefix of the LR schedule (lrm from num_steps, not from the stop),
    saves and evaluates where it stops; resuming without it finishes bit-identical to the whole run."""
    env = trainer_env(compile_cache)
    stop = 3
    first = run_trainer(tmp_path, "run", f"--stop_after_steps={stop}", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir)
    steps = [r for r in rows if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(stop))
    assert [r["lrm"] for r in steps] == pytest.approx([1 - s / TINY_STEPS for s in range(stop)])
    assert [r["step"] for r in rows if r["event"] == "eval"][-1] == stop  # the evaluation after the last step
    assert load_state(run_dir)[0] == stop - 1
    rest = run_trainer(tmp_path, "run", "--resume", env=env)
    assert rest.returncode == 0, rest.stderr[-3000:]
    step, state = load_state(run_dir)
    ref_step, ref_state = load_state(reference_run)
    assert step == ref_step == TINY_STEPS - 1
    assert differing_leaves(state, ref_state) == []


def test_resume_under_another_mesh_shape(tmp_path, fsdp_reference_run, compile_cache):
    """A run saved with params split over fsdp (data 2 x fsdp 2) resumes replicated (data 4 x fsdp 1):
    the checkpoint is read into the new layout, the resumed step samples exactly the rollouts of the
    uninterrupted fsdp run (the restored params are its bits), and its update differs only by the
    order XLA sums the gradients in (bounds as tests/test_sharding.py: Muon's matrices within 1e-6,
    AdamW's leaves within 1e-6 but for at most 1% of their entries)."""
    env = trainer_env(compile_cache)
    first = run_trainer(tmp_path, "run", "--mesh_fsdp=2", f"--stop_after_steps={TINY_STEPS - 1}", env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    rest = run_trainer(tmp_path, "run", "--resume", "--mesh_fsdp=1", env=env)
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "mesh data 4 x fsdp 1" in rest.stdout and f"(next step {TINY_STEPS - 1})" in rest.stdout
    assert "mesh_fsdp" in rest.stdout.split("safe changes:")[1].splitlines()[0]
    ref = {r["step"]: r for r in read_metrics(fsdp_reference_run) if r["event"] == "step"}
    last = [r for r in read_metrics(tmp_path / "run") if r["event"] == "step"][-1]
    assert last["step"] == TINY_STEPS - 1 and last["reward"] == ref[TINY_STEPS - 1]["reward"]
    assert last["loss"] == pytest.approx(ref[TINY_STEPS - 1]["loss"], rel=1e-5, abs=1e-7)
    step, state = load_state(tmp_path / "run")
    _, ref_state = load_state(fsdp_reference_run)
    assert step == TINY_STEPS - 1 and state.keys() == ref_state.keys()
    for key, a in ref_state.items():
        if not key.startswith("['params']"):
            continue
        gap = np.abs(a - state[key])
        if "['h']" in key:
            assert gap.max() <= 1e-6, f"{key}: gap {gap.max():.1e}"
        else:
            assert np.mean(gap > 1e-6) <= 0.01, f"{key}: {np.mean(gap > 1e-6):.2%} of entries off by > 1e-6"
