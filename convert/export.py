"""Write jaxrl params back as a nanochat checkpoint that nanochat's own loader loads strictly.

`export_params` is what the trainer calls at each save: it writes `model_<step:06d>.pt` (the
source generation's key names and order, each tensor in its recorded source dtype, default the
dtype nanochat saves on GPU) and `meta_<step:06d>.json` (docs/nanochat.md#meta-json). float32 -> bf16 rounds to
nearest even, so bf16 -> float32 -> bf16 is the identity: an unchanged model round-trips bit for bit.

Test: `pytest tests/test_convert.py -k "round_trip or export"`.
"""
from __future__ import annotations

import filecmp
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from convert import torch_io
from jaxrl.run_state import TOKENIZER_DIR, TOKENIZER_FILES, CheckpointError, check_param_shapes, copy_tokenizer
from jaxrl.model import GPTConfig, Params, flatten_params, param_table

PHASES = ("sft", "rl")
# chat_sft's meta fields per generation, in nanochat's order (values are placeholders when the
# source has no SFT meta; nanochat's loaders only read model_config). gen-2026-01 follows the
# fixture's commit 85b3e95; chat_sft from 1ddaad1 writes gen-2026-07's fields instead.
SFT_META_FIELDS = {
    "gen-2025-10": ("step", "val_loss", "mmlu_acc", "arc_easy_acc", "gsm8k_acc", "humaneval_acc", "model_config"),
    "gen-2026-01": ("step", "val_loss", "mmlu_acc", "arc_easy_acc", "model_config"),
    "gen-2026-07": ("step", "val_bpb", "model_config", "user_config"),
}


def export_params(config: GPTConfig, params: Params, out_dir: str | os.PathLike, step: int,
                  phase: str = "rl", source_info: dict[str, Any] | None = None) -> Path:
    """Write out_dir/model_<step:06d>.pt and meta_<step:06d>.json; return the model file's path.

    `source_info` is the "source" entry of an import's model.json ({"dtypes", "meta", ...}); it
    fixes key order, dtypes and the SFT meta values. Files are replaced atomically (temp + rename);
    the meta is written first so a model file never appears without its meta.
    """
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; expected one of {', '.join(PHASES)}")
    if not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, found {step!r}")
    source_info = source_info or {}
    flat = {k: np.asarray(v) for k, v in flatten_params(params).items()}
    check_param_shapes(config, {k: v.shape for k, v in flat.items()}, where="params to export")
    order, dtypes = export_layout(config, source_info.get("dtypes"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_meta(out / f"meta_{step:06d}.json", export_meta(config, step, phase, source_info.get("meta")))
    model_file = out / f"model_{step:06d}.pt"
    torch_io.write_state_dict(model_file, {k: flat[k] for k in order}, dtypes)
    return model_file


def export_layout(config: GPTConfig, source_dtypes: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    """(key order, {key: dtype}): the source's order when it has exactly the model's keys, else
    nanochat's state-dict order; the source's dtypes where recorded, else nanochat's GPU dtypes."""
    table = {key: dtype for key, _, dtype in param_table(config)}
    source_dtypes = source_dtypes or {}
    unknown = {k: v for k, v in source_dtypes.items() if v not in torch_io.DTYPES}
    if unknown:
        raise CheckpointError(f"recorded source dtypes {unknown} are not among {list(torch_io.DTYPES)}")
    order = list(source_dtypes) if set(source_dtypes) == set(table) else list(table)
    return order, {key: source_dtypes.get(key, table[key]) for key in order}


def export_meta(config: GPTConfig, step: int, phase: str, source_meta: dict[str, Any] | None) -> dict[str, Any]:
    """The meta dict nanochat's chat_rl (phase "rl") or chat_sft (phase "sft") writes for this model."""
    if phase == "rl":  # chat_rl saves only the config (6 fields in gen-2025-10, 7 later)
        return {"model_config": config.model_config()}
    if source_meta and set(source_meta) - {"model_config"}:  # an SFT-style meta: keep its fields and values
        meta = dict(source_meta)
    else:
        meta = {f: ({} if f == "user_config" else None) for f in SFT_META_FIELDS[config.generation]}
    meta["step"] = step
    meta["model_config"] = config.model_config()
    return meta


def write_meta(path: Path, meta: dict[str, Any]) -> None:
    """json.dump(meta, indent=2) exactly as nanochat's save_checkpoint, via temp file + rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def export_tokenizer(src_dir: str | os.PathLike, base_dir: str | os.PathLike, force: bool = False) -> list[Path]:
    """Copy tokenizer.pkl (+ token_bytes.pt) to <base_dir>/tokenizer/, refusing to replace different files."""
    dst = Path(base_dir) / TOKENIZER_DIR
    for name in TOKENIZER_FILES:
        src_file, dst_file = Path(src_dir) / name, dst / name
        differs = dst_file.exists() and src_file.is_file() and not filecmp.cmp(src_file, dst_file, shallow=False)
        if differs and not force:
            raise CheckpointError(f"{dst_file} exists and differs from {src_file}; pass --force to replace it")
    return copy_tokenizer(src_dir, dst)
