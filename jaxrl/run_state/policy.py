"""A policy from any checkpoint kind, and the run directory's own record of it.

`load_policy(path)` takes a jaxrl import (model.json + params/), a jaxrl run directory
(model.json + checkpoints/: its latest complete checkpoint, or `model_step`), or anything nanochat
writes (a base dir, a checkpoint dir, a model_<step>.pt), which is imported on the fly through
convert/ (needs torch; the only place jaxrl reaches into convert/, lazily, for nanochat's own
files). `write_run_record` makes a run directory itself such a loadable policy.

Test: `python -m pytest -q tests/test_bad_inputs.py -k policy`.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from jaxrl.model import GPTConfig, Params
from jaxrl.run_state.import_dir import load_jaxrl_import, load_run_dir
from jaxrl.run_state.paths import MODEL_JSON, TOKENIZER_FILES, RunPaths, RunStateError, is_jaxrl_import, is_run_dir
from jaxrl.tokenizer import Tokenizer


def load_policy(path: str | os.PathLike | None, *, generation: str | None = None, model_step: int | None = None,
                model_tag: str | None = None, tokenizer_dir: str | os.PathLike | None = None,
                source: str = "sft") -> tuple[GPTConfig, Params, Tokenizer, dict[str, Any]]:
    """-> (GPTConfig, host params, Tokenizer, info dict with at least generation and tokenizer_dir).

    Raises RunStateError naming the path and the fix when `path` is missing, unreadable, of
    another generation than `generation`, or when its tokenizer's vocabulary differs from the model's.
    """
    if path is None:
        raise RunStateError("no checkpoint given: set `checkpoint` in the config or pass --checkpoint PATH (a jaxrl "
                            "import, a jaxrl run dir, a nanochat base dir, checkpoint dir or model_<step>.pt)")
    p = Path(path)
    if not p.exists():
        raise RunStateError(f"checkpoint {p} does not exist (resolved against the current directory {Path.cwd()})")
    if is_run_dir(p):
        config, params, info = load_run_dir(p, model_step)
        print(f"loaded {p} checkpoint step {info['step']}", file=sys.stderr)
    elif is_jaxrl_import(p):
        config, params, info = load_jaxrl_import(p)
    else:
        config, params, info = _read_nanochat(p, step=model_step, generation=generation, source=source,
                                              model_tag=model_tag, tokenizer_dir=tokenizer_dir)
        print(f"imported {p}: {info['generation_reason']}", file=sys.stderr)
    if generation is not None and config.generation != generation:
        raise RunStateError(f"{p} holds a {config.generation} model but the config asks for generation={generation}")
    tok_dir = Path(tokenizer_dir) if tokenizer_dir else _tokenizer_dir(p, info)
    tokenizer = Tokenizer.from_directory(tok_dir)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise RunStateError(f"tokenizer {tok_dir / TOKENIZER_FILES[0]} has {tokenizer.get_vocab_size()} tokens but "
                            f"the model in {p} expects vocab_size {config.vocab_size}")
    return config, params, tokenizer, dict(info, tokenizer_dir=str(tok_dir))


def _read_nanochat(p: Path, **kwargs) -> tuple[GPTConfig, Params, dict[str, Any]]:
    try:
        import convert  # torch is optional: only nanochat's own files need it
    except ImportError as e:
        raise RunStateError(f"{p} is a nanochat checkpoint; reading .pt files needs torch "
                            f"(pip install -e '.[torch]'): {e}") from None
    return convert.read_nanochat(p, **kwargs)


def _tokenizer_dir(p: Path, info: dict) -> Path:
    if (RunPaths(p).tokenizer / TOKENIZER_FILES[0]).is_file():
        return RunPaths(p).tokenizer
    if info.get("tokenizer_dir"):
        return Path(info["tokenizer_dir"])
    raise RunStateError(f"no tokenizer found for {p}: pass tokenizer_dir (a folder holding nanochat's tokenizer.pkl)")


def write_run_record(run_dir: str | os.PathLike, model_config: GPTConfig, info: dict[str, Any]) -> None:
    """model.json + tokenizer/ in the run dir, so the run dir itself is a loadable policy.

    `info` is load_policy's: everything but "tokenizer_dir" goes into model.json, and the files of
    info["tokenizer_dir"] are copied into <run_dir>/tokenizer/ (unless that is the same folder).
    """
    paths = RunPaths(run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in info.items() if k != "tokenizer_dir"}
    record.update(model_config=model_config.to_dict(), generation=model_config.generation)
    tmp = paths.root / (MODEL_JSON + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    tmp.replace(paths.model_json)
    src = Path(info["tokenizer_dir"])
    if src.resolve() != paths.tokenizer.resolve():
        paths.tokenizer.mkdir(exist_ok=True)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, paths.tokenizer / name)
