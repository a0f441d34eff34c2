"""Shared by train_rl.py and eval_rl.py: a policy from any checkpoint kind, and the run record.

A policy path may be: a jaxrl import (model.json + params/), a jaxrl run directory (model.json +
checkpoints/: its latest complete checkpoint), or anything nanochat writes (a base dir, a
checkpoint dir, a model_<step>.pt), which is imported on the fly through convert/ (needs torch).
"""
from __future__ import annotations

import sys
from pathlib import Path

from jaxrl import checkpoint_io
from jaxrl.tokenizer import Tokenizer


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
