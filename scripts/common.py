"""Shared by the scripts: a policy from any checkpoint kind, a task from a name or folder, and
train_rl's per-step metrics row (the rl-step benchmark logs the very same row).

A policy path may be: a jaxrl import (model.json + params/), a jaxrl run directory (model.json +
checkpoints/: its latest complete checkpoint), or anything nanochat writes (a base dir, a
checkpoint dir, a model_<step>.pt), which is imported on the fly through convert/ (needs torch).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

from jaxrl import checkpoint_io
from jaxrl import tasks
from jaxrl.tokenizer import Tokenizer

@contextlib.contextmanager
def exit_on_bad_input():
    """A bad input found while loading (a damaged checkpoint, an empty data file, a prompt that does not
    fit) ends the script with its message and exit status 1, before the run directory exists."""
    try:
        yield
    except (ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        raise SystemExit(f"error: {e}") from None


def load_policy(path, *, generation=None, model_step=None, model_tag=None, tokenizer_dir=None, source="sft"):
    """-> (GPTConfig, params, Tokenizer, info dict with at least generation and tokenizer_dir)."""
    if path is None:
        raise SystemExit("no checkpoint given: set `checkpoint` in the config or pass --checkpoint PATH "
                         "(a jaxrl import, a jaxrl run dir, a nanochat base dir, checkpoint dir or model_<step>.pt)")
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"checkpoint {p} does not exist (resolved against the current directory {Path.cwd()})")
    if checkpoint_io.is_run_dir(p):
        config, params, info = _load_run_dir(p, model_step)
    elif checkpoint_io.is_jaxrl_import(p):
        config, params, info = checkpoint_io.load_jaxrl_import(p)
    else:
        try:
            import convert
        except ImportError as e:
            raise SystemExit(f"{p} is a nanochat checkpoint; reading .pt files needs torch "
                             f"(pip install -e '.[torch]'): {e}")
        config, params, info = convert.read_nanochat(p, step=model_step, generation=generation, source=source,
                                                     model_tag=model_tag, tokenizer_dir=tokenizer_dir)
        print(f"imported {p}: {info['generation_reason']}", file=sys.stderr)
    if generation is not None and config.generation != generation:
        raise SystemExit(f"{p} holds a {config.generation} model but the config asks for generation={generation}")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else _tokenizer_dir(p, info)
    tokenizer = Tokenizer.from_directory(tok_dir)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise SystemExit(f"tokenizer {tok_dir / 'tokenizer.pkl'} has {tokenizer.get_vocab_size()} tokens but the "
                         f"model in {p} expects vocab_size {config.vocab_size}")
    info = dict(info, tokenizer_dir=str(tok_dir))
    return config, params, tokenizer, info


def _tokenizer_dir(p: Path, info: dict) -> Path:
    if (p / checkpoint_io.TOKENIZER_DIR / "tokenizer.pkl").is_file():
        return p / checkpoint_io.TOKENIZER_DIR
    if info.get("tokenizer_dir"):
        return Path(info["tokenizer_dir"])
    raise SystemExit(f"no tokenizer found for {p}: pass tokenizer_dir (a folder holding nanochat's tokenizer.pkl)")


def _load_run_dir(run_dir: Path, step):
    """The params of a jaxrl run's latest (or given) checkpoint, with the run's model.json."""
    try:
        config, params, info = checkpoint_io.load_run_dir(run_dir, step)
    except checkpoint_io.CheckpointError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"loaded {run_dir} checkpoint step {info['step']}", file=sys.stderr)
    return config, params, info


def open_task(task: str, data_dir, split: str, difficulty: int = 2):
    """gsm8k (hub, or data_dir), arith (built-in generator at `difficulty`, or data_dir), or a folder of jsonl."""
    return tasks.open_task(task, data_dir, split, difficulty=difficulty)


def write_run_record(run_dir, model_config, info) -> None:
    """model.json + tokenizer/ in the run dir, so the run dir itself is a loadable policy."""
    import json
    import shutil

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in info.items() if k != "tokenizer_dir"}
    record.update(model_config=model_config.to_dict(), generation=model_config.generation)
    tmp = run_dir / (checkpoint_io.MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    tmp.replace(run_dir / checkpoint_io.MODEL_JSON)
    src = Path(info["tokenizer_dir"])
    dst = run_dir / checkpoint_io.TOKENIZER_DIR
    if src.resolve() != dst.resolve():
        dst.mkdir(exist_ok=True)
        for name in checkpoint_io.TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)


def export_nanochat_or_warn(model_config, params, run_dir, step, info):
    """nanochat-format export to <run_dir>/chatrl_checkpoints/d<n_layer>/model_<step:06d>.pt (+ meta)."""
    try:
        import convert
    except ImportError:
        print(f"warning: torch is not installed, skipping the nanochat export of step {step} "
              "(pip install -e '.[torch]' to enable it)", file=sys.stderr)
        return None
    import jax
    import numpy as np

    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    tag = f"d{model_config.n_layer}"
    out = Path(run_dir) / "chatrl_checkpoints" / tag
    return convert.export_params(model_config, host, out, step, phase="rl", source_info=info.get("source"))


def step_row(model_config, step: int, num_steps: int, res, m, *, reward_s: float, train_s: float,
             lrs: dict | None = None) -> dict:
    """train_rl's metrics row of one RL step: `res` a rollout.RoundResult of this process, `m` the
    fetched rl.StepMetrics, `lrs` the base learning rates (optim.group_lrs keywords; None: nanochat's).
    Reward and length are means over processes, generated tokens/s counts every process."""
    import numpy as np

    from jaxrl import distributed, optim

    row = {"step": step, "event": "step", "phase": "rl",
           "reward": distributed.mean_scalar(float(res.rewards.mean())),
           "seq_len": distributed.mean_scalar(float(np.mean([len(s) for s in res.sequences]))),
           "loss": float(m.loss), "grad_norm": float(m.grad_norm), "tokens": int(m.tokens),
           "logp_mismatch": float(m.logp_mismatch), "rollout_s": res.seconds, "reward_s": reward_s,
           "train_s": train_s, "gen_tokens_per_s": distributed.sum_scalar(res.gen_tokens) / max(res.seconds, 1e-9),
           "skipped": int(m.skipped), "lrm": optim.lr_multiplier(step, num_steps)}
    row.update({f"lr/{g}": lr for g, lr in optim.group_lrs(model_config, step, num_steps=num_steps,
                                                             **(lrs or {})).items()})
    return row


def step_line(row: dict, num_steps: int) -> str:
    """nanochat's step line plus loss, throughput and timings."""
    return (f"Step {row['step']}/{num_steps} | Average reward: {row['reward']:.4f} | Average sequence length: "
            f"{row['seq_len']:.2f} | loss {row['loss']:.6f} | {row['gen_tokens_per_s']:.0f} tok/s | "
            f"rollout {row['rollout_s']:.2f}s train {row['train_s']:.2f}s")
