"""Load a nanochat checkpoint (or a jaxrl import dir) as (GPTConfig, float32 params), as nanochat would.

Mirrors nanochat's `checkpoint_manager.load_model` (docs/nanochat.md#loading): pick tag and step, strip
`_orig_mod.`, patch a missing `window_pattern` ("L") and missing resid/x0 lambdas (ones/zeros),
check every key and shape strictly, and check the tokenizer's vocab size. The generation is
detected from the keys and the reason is recorded (never silently).

Test: `pytest tests/test_convert.py`.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from convert import detect, layout, torch_io
from jaxrl.run_state import (CheckpointError, RunPaths, check_finite, check_param_shapes, is_jaxrl_import,
                             load_jaxrl_import)
from jaxrl.model import GPTConfig, Params, unflatten_params

CONFIG_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def load_nanochat(path: str | os.PathLike, step: int | None = None, generation: str | None = None,
                  **kw: Any) -> tuple[GPTConfig, Params]:
    """(config, nested float32 numpy params) of a nanochat base dir, checkpoint dir, model_<step>.pt,
    or jaxrl import dir. Keywords as `read_nanochat`; the detection reason is printed to stderr."""
    config, params, info = read_nanochat(path, step=step, generation=generation, **kw)
    print(f"convert: {info['generation_reason']}", file=sys.stderr)
    for note in info.get("notes", []):
        print(f"convert: note: {note}", file=sys.stderr)
    return config, params


def read_nanochat(path: str | os.PathLike, *, step: int | None = None, generation: str | None = None,
                  source: str = "sft", model_tag: str | None = None,
                  tokenizer_dir: str | os.PathLike | None = None) -> tuple[GPTConfig, Params, dict[str, Any]]:
    """Like `load_nanochat` but also returns the info dict recorded in an import's model.json:
    {"generation", "generation_reason", "notes", "tokenizer_dir", "source": {path, step, model_tag,
    meta, dtypes, stripped_orig_mod}}."""
    if generation is not None:
        detect.check_generation_name(generation)
    if is_jaxrl_import(path):
        return _read_import(Path(path), step, generation, model_tag, tokenizer_dir)
    files = layout.resolve_checkpoint(path, step=step, model_tag=model_tag, source=source)
    meta = layout.read_meta(files.meta_file)
    sdf = torch_io.open_state_dict(files.model_file)
    where = str(files.model_file)
    detected, reason = detect.detect_generation(torch_io.tensor_shapes(sdf.state), where)
    reason = detect.reconcile(detected, reason, generation, where)
    config, notes = config_from_meta(meta, detected, files.meta_file)
    dtypes = torch_io.tensor_dtypes(sdf.state, files.model_file)
    shapes = torch_io.tensor_shapes(sdf.state)
    missing_lambdas = _missing_lambdas(config, shapes)
    check_param_shapes(config, {**shapes, **{k: v.shape for k, v in missing_lambdas.items()}}, where)
    tok_dir = Path(tokenizer_dir) if tokenizer_dir is not None else files.tokenizer_dir
    notes += check_tokenizer(tok_dir, config, files.meta_file, explicit=tokenizer_dir is not None)
    flat = {key: torch_io.pop_as_float32(sdf, key) for key in list(sdf.state)}
    check_finite(flat, where)
    for key, value in missing_lambdas.items():
        notes.append(f"{key} missing from the checkpoint: filled with {value[0]:g} as nanochat's loader does")
        flat[key] = value
    source_info = {"path": str(files.model_file.resolve()), "step": files.step, "model_tag": files.model_tag,
                   "meta": meta, "dtypes": dtypes, "stripped_orig_mod": sdf.stripped_prefix}
    info = {"generation": config.generation, "generation_reason": reason, "notes": notes,
            "tokenizer_dir": str(tok_dir.resolve()) if (tok_dir / "tokenizer.pkl").is_file() else None,
            "source": source_info}
    return config, unflatten_params(flat, consume=True), info


def config_from_meta(meta: dict[str, Any], generation: str, meta_file: Path) -> tuple[GPTConfig, list[str]]:
    """GPTConfig from meta["model_config"] (nanochat's `GPTConfig(**model_config)`), plus patch notes."""
    mc = dict(meta["model_config"])
    allowed = CONFIG_FIELDS + (() if generation == "gen-2025-10" else ("window_pattern",))
    unknown = sorted(set(mc) - set(allowed))
    missing = [f for f in CONFIG_FIELDS if f not in mc]
    if unknown or missing:
        raise CheckpointError(f"{meta_file}: model_config fields do not fit {generation}'s GPTConfig: "
                              f"unknown {unknown}, missing {missing}; expected {list(allowed)}")
    notes = []
    if generation != "gen-2025-10" and "window_pattern" not in mc:
        mc["window_pattern"] = "L"
        notes.append(f"{meta_file}: model_config has no window_pattern: using 'L' as nanochat's loader does")
    try:
        return GPTConfig(**mc, generation=generation), notes
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_file}: invalid model_config {meta['model_config']}: {e}") from e


def check_tokenizer(tok_dir: Path, config: GPTConfig, meta_file: Path, explicit: bool) -> list[str]:
    """Assert the tokenizer's vocab size equals model_config.vocab_size (nanochat's build_model check)."""
    pkl = tok_dir / "tokenizer.pkl"
    if not pkl.is_file():
        if explicit:
            raise CheckpointError(f"tokenizer directory {tok_dir} has no tokenizer.pkl")
        return [f"no tokenizer at {pkl}: vocab size check skipped (pass --tokenizer-dir to check and copy one)"]
    vocab = layout.tokenizer_vocab_size(tok_dir)
    if vocab != config.vocab_size:
        raise CheckpointError(f"tokenizer {pkl} has vocab size {vocab} but {meta_file} says "
                              f"model_config.vocab_size = {config.vocab_size}; they must be equal")
    return []


def _missing_lambdas(config: GPTConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """nanochat's state patch (gen-2026-01+): absent resid_lambdas -> ones, x0_lambdas -> zeros."""
    if not config.has_lambdas:
        return {}
    fills = {"resid_lambdas": 1.0, "x0_lambdas": 0.0}
    return {k: np.full((config.n_layer,), v, np.float32) for k, v in fills.items() if k not in shapes}


def _read_import(path: Path, step, generation, model_tag, tokenizer_dir):
    """An import (or trainer) directory through jaxrl.run_state, with the same checks."""
    if step is not None or model_tag is not None:
        raise CheckpointError(f"{path} is a jaxrl import dir (one fixed checkpoint): --step/--model-tag do not apply")
    config, params, info = load_jaxrl_import(path)
    if generation is not None and generation != config.generation:
        raise CheckpointError(f"{path}: generation {generation!r} was requested but this import is "
                              f"{config.generation} ({info.get('generation_reason', 'no reason recorded')})")
    info.setdefault("generation_reason", f"{config.generation} as recorded in {RunPaths(path).model_json}")
    if tokenizer_dir is not None:
        check_tokenizer(Path(tokenizer_dir), config, RunPaths(path).model_json, explicit=True)
        info["tokenizer_dir"] = str(Path(tokenizer_dir).resolve())
    return config, params, info

