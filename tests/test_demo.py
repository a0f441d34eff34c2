"""The demo end to end, shortened: `scripts/demo.py` with a 3-step warm start and 2 RL steps, in a
subprocess on 2 simulated CPU devices. Checks every artifact the README promises: metrics.jsonl rows
with a phase (the warm start's first, then the first RL eval before the first RL update),
TensorBoard events of both phases, report.png, the orbax checkpoint, the rustbpe tokenizer in
nanochat's shape, the warm start's ordinary jaxrl import dir that train_rl.py ran on, and the
nanochat export (loaded back with convert.load_nanochat when torch is installed). Hermetic:
nothing from ../shared.

Run: `python -m pytest tests/test_demo.py -q` (about three minutes on 2 CPU cores)
"""
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

SHORT = ["--num_steps=2", "--examples_per_step=8", "--warmstart_steps=3", "--warmstart_eval_every=3",
         "--eval_every=1", "--eval_examples=8", "--save_every=1", "--max_new_tokens=48"]


pytestmark = pytest.mark.cli  # every test here runs scripts/demo.py in a subprocess


def _demo(tmp_path, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "scripts/demo.py", f"--out_dir={tmp_path}", "--run=demo", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    proc = _demo(tmp, *SHORT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, tmp / "demo", proc


def test_demo_refuses_a_checkpoint(tmp_path):
    """The demo trains its own model: a checkpoint would be ignored, so it is refused before anything runs."""
    proc = _demo(tmp_path, "--checkpoint=x.pt", "--model_step=5")
    assert proc.returncode == 1 and not (tmp_path / "demo").exists()
    assert ("the demo trains its own model and tokenizer, so checkpoint, model_step would be ignored: remove them, "
            "or run scripts/train_rl.py") in proc.stderr, proc.stderr


@pytest.mark.slow
def test_metrics_rows_carry_phase_and_eval_comes_first(demo_run):
    from jaxrl.metrics import read_metrics

    _, run_dir, _ = demo_run
    rows = read_metrics(run_dir)
    assert len(rows) == len((run_dir / "metrics.jsonl").read_text().splitlines())  # every line parses
    assert {r["phase"] for r in rows} == {"warmstart", "rl"}
    assert all(r["event"] in ("step", "eval") for r in rows)
    phases = [r["phase"] for r in rows]
    assert phases == sorted(phases, key=lambda p: p == "rl")  # the warm start's rows come first
    ws_steps = [r for r in rows if r["phase"] == "warmstart" and r["event"] == "step"]
    assert [r["step"] for r in ws_steps] == [0, 1, 2] and all(r["loss"] > 0 for r in ws_steps)
    ws_eval = [r for r in rows if r["phase"] == "warmstart" and r["event"] == "eval"]
    assert [r["step"] for r in ws_eval] == [3] and 0 <= ws_eval[0]["unbiased_pass@1"] <= 1
    assert read_metrics(run_dir / "warmstart") == rows[:4]  # the warm start's own log, put in front
    rl = [r for r in rows if r["phase"] == "rl"]
    first_eval = next(i for i, r in enumerate(rl) if r["event"] == "eval")
    first_step = next(i for i, r in enumerate(rl) if r["event"] == "step")
    assert first_eval < first_step and rl[first_eval]["step"] == 0
    assert [r["step"] for r in rl if r["event"] == "eval"] == [0, 1, 2]
    for r in rl:
        if r["event"] == "eval":
            assert {f"pass@{k}" for k in range(1, 9)} <= set(r) and "unbiased_pass@1_lo" in r
        else:
            assert 0 <= r["reward"] <= 1 and r["seq_len"] > 0
        assert 0 < r["slot_utilization"] <= 1  # kept tokens / decoded row-steps of the sampler


@pytest.mark.slow
def test_run_dir_artifacts(demo_run):
    from jaxrl.run_state import CheckpointManager
    from jaxrl.tasks.arith import ArithTask
    from jaxrl.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer

    _, run_dir, proc = demo_run
    # both progress bars ran to completion (3 warm-start steps, 2 RL steps) on stderr, and stdout
    # has nanochat's step and pass@k lines for each RL step
    assert re.search(r"warm start: 100%\|[^\r\n]*\| 3/3 ", proc.stderr), proc.stderr[-2000:]
    assert re.search(r"rl: 100%\|[^\r\n]*\| 2/2 ", proc.stderr), proc.stderr[-2000:]
    for step in (0, 1):
        assert re.search(rf"^Step {step}/2 \| Average reward: [01]\.\d{{4}} \|", proc.stdout, re.M), proc.stdout[-2000:]
        assert re.search(rf"^Step {step} \| Pass@1: [01]\.\d{{4}}, .*Pass@8: ", proc.stdout, re.M), proc.stdout[-2000:]
    for tb in (run_dir / "tensorboard", run_dir / "warmstart" / "tensorboard"):  # RL's and the warm start's
        events = list(tb.glob("events.out.tfevents.*"))
        assert events and all(e.stat().st_size > 0 for e in events), tb
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert CheckpointManager(run_dir / "checkpoints").latest_step() == 1
    # nanochat's tokenizer shape: its split pattern, 503 ranks (256 bytes first), then the nine specials
    tok = Tokenizer.from_directory(run_dir / "tokenizer")
    assert tok.get_vocab_size() == 512 and tok.enc._pat_str == SPLIT_PATTERN
    assert [tok.encode_special(t) for t in SPECIAL_TOKENS] == list(range(503, 512))
    assert all(tok.enc.encode_single_token(bytes([b])) == b for b in range(256))
    question = ArithTask("test")[0]["messages"][0]["content"]  # ~0.27 tokens per byte; bytes alone give 1
    assert tok.decode(tok.encode(question + " ünïcode ✓")) == question + " ünïcode ✓"
    assert len(tok.encode(question)) < 0.4 * len(question.encode())  # the merges learned the task's words
    assert (run_dir / "model.json").is_file() and (run_dir / "config.toml").is_file()


@pytest.mark.slow
def test_rl_ran_on_the_warm_start_import_dir(demo_run):
    """The warm start's result is an ordinary jaxrl import dir, and the RL job started from it."""
    import tomllib

    import jax
    import numpy as np

    from jaxrl.run_state import load_jaxrl_import
    from jaxrl.metrics import read_metrics
    from jaxrl.model import flatten_params, init_params

    _, run_dir, _ = demo_run
    policy = run_dir / "warmstart" / "policy"
    config, params, info = load_jaxrl_import(policy)
    assert (config.n_layer, config.n_embd, config.vocab_size, config.generation) == (2, 128, 512, "gen-2026-07")
    assert info["source"]["kind"] == "demo" and info["warmstart"]["steps"] == 3
    init = flatten_params(init_params(config, jax.random.key(0)))  # seed 0's random init
    moved = [not np.array_equal(init[k], v) for k, v in flatten_params(params).items()]
    assert all(moved), "the import holds the random init, not the warm-started model"
    assert tomllib.loads((run_dir / "config.toml").read_text())["checkpoint"] == str(policy)
    pkl = "tokenizer/tokenizer.pkl"
    assert (policy / pkl).read_bytes() == (run_dir / pkl).read_bytes()
    # the same params, eval settings and keys: RL's step-0 eval repeats the warm start's last one
    evals = [r for r in read_metrics(run_dir) if r["event"] == "eval"]
    drop = ("step", "phase")
    assert {k: v for k, v in evals[0].items() if k not in drop} == {k: v for k, v in evals[1].items() if k not in drop}


@pytest.mark.slow
def test_nanochat_export_loads(demo_run, tmp_path):
    pytest.importorskip("torch")
    import numpy as np

    from convert import export_nanochat, load_nanochat
    from jaxrl.run_state import load_run_dir
    from jaxrl.model import flatten_params

    _, run_dir, _ = demo_run
    assert (run_dir / "chatrl_checkpoints" / "d2" / "model_000001.pt").is_file()
    config, params = load_nanochat(run_dir, source="rl")  # the run dir is a nanochat base dir
    assert (config.n_layer, config.n_embd, config.vocab_size) == (2, 128, 512)
    assert config.generation == "gen-2026-07"
    _, latest, _ = load_run_dir(run_dir)  # the export is the latest checkpoint, float32 bit for bit
    for key, value in flatten_params(latest).items():
        np.testing.assert_array_equal(flatten_params(params)[key], value, err_msg=key)
    # the README's export step: a run dir -> a fresh nanochat base dir with its tokenizer
    assert export_nanochat.main([str(run_dir), "--out", str(tmp_path / "base"), "--base-dir"]) == 0
    assert (tmp_path / "base" / "tokenizer" / "tokenizer.pkl").is_file()
    assert load_nanochat(tmp_path / "base", source="rl")[0] == config


@pytest.mark.slow
def test_eval_rl_on_the_run_dir(demo_run, tmp_path):
    import json

    _, run_dir, _ = demo_run
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "scripts/eval_rl.py", "--checkpoint", str(run_dir), "--task", "arith", "--max-examples", "4",
           "--num-samples", "2", "--max-new-tokens", "48", "--independent-keys", "--json", str(tmp_path / "e.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["num_examples"] == 4 and set(result["unbiased"]) == {"pass@1", "pass@2"}
    assert "Pass@2:" in proc.stdout and "checkpoint step 1" in proc.stderr


@pytest.mark.slow
def test_rerun_without_resume_is_refused_before_touching_the_run(demo_run):
    tmp, run_dir, _ = demo_run
    files = [run_dir / "metrics.jsonl", run_dir / "warmstart" / "metrics.jsonl", run_dir / "tokenizer/tokenizer.pkl"]
    before = [f.read_bytes() for f in files]
    proc = _demo(tmp, *SHORT)
    assert proc.returncode == 1 and "pass --resume to continue it" in proc.stderr, proc.stderr[-2000:]
    assert [f.read_bytes() for f in files] == before
