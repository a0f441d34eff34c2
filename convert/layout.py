"""nanochat's checkpoint directory conventions, without torch (docs/nanochat.md#checkpoint-layout).

Owns: which files a source path means (base dir, checkpoint dir, or model_<step>.pt), the
model_tag and step choice exactly as nanochat's checkpoint_manager makes it, the meta JSON,
and where the tokenizer lives and its vocab size.

Test: `pytest tests/test_convert.py -k "tag or step or meta or tokenizer"`.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxrl.run_state import TOKENIZER_DIR, CheckpointError
from jaxrl.tokenizer import Tokenizer

SOURCE_DIRS = {"base": "base_checkpoints", "mid": "mid_checkpoints", "sft": "chatsft_checkpoints",
               "rl": "chatrl_checkpoints"}
MODEL_FILE_RE = re.compile(r"model_(\d+)\.pt$")  # nanochat HEAD's pattern for the last-step search
TAG_RE = re.compile(r"d(\d+)")  # re.match: the tag must *start* with d<digits> (d20, d20_x)


@dataclass(frozen=True)
class CheckpointFiles:
    """The files of one nanochat checkpoint, as resolved from a user-given path."""

    model_file: Path  # <...>/<tag>/model_<step:06d>.pt
    meta_file: Path  # <...>/<tag>/meta_<step:06d>.json
    step: int
    model_tag: str  # the directory name holding the files
    tokenizer_dir: Path  # where nanochat would look: <base>/tokenizer (may not exist)


def find_model_tag(checkpoints_dir: Path) -> str:
    """nanochat's `find_largest_model`: highest d<N> prefix (first listed on ties), else newest subdir."""
    if not checkpoints_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {checkpoints_dir} does not exist")
    tags = [name for name in os.listdir(checkpoints_dir) if (checkpoints_dir / name).is_dir()]
    if not tags:
        raise CheckpointError(f"no model directories (model tags) in {checkpoints_dir}")
    candidates = [(int(m.group(1)), tag) for tag in tags if (m := TAG_RE.match(tag))]
    if candidates:
        candidates.sort(key=lambda c: c[0], reverse=True)  # stable: ties keep listing order
        return candidates[0][1]
    tags.sort(key=lambda tag: os.path.getmtime(checkpoints_dir / tag), reverse=True)
    return tags[0]


def find_last_step(checkpoint_dir: Path) -> int:
    """nanochat's `find_last_step`: the largest integer N among files model_<N>.pt."""
    steps = [int(m.group(1)) for name in os.listdir(checkpoint_dir) if (m := MODEL_FILE_RE.search(name))]
    if not steps:
        raise CheckpointError(f"no model_<step>.pt files in {checkpoint_dir}")
    return max(steps)


def is_base_dir(path: Path) -> bool:
    return path.is_dir() and any((path / sub).is_dir() for sub in SOURCE_DIRS.values())


def resolve_checkpoint(path: str | os.PathLike, *, step: int | None = None, model_tag: str | None = None,
                       source: str = "sft") -> CheckpointFiles:
    """Map a base dir, a <source>_checkpoints dir, a checkpoint dir (<...>/d4/) or a model_<step>.pt file
    to its files."""
    path = Path(path)
    if source not in SOURCE_DIRS:
        raise CheckpointError(f"unknown source {source!r}; expected one of {', '.join(SOURCE_DIRS)}")
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    if path.is_file():
        return _resolve_file(path, step, model_tag)
    if MODEL_FILE_RE.search(path.name):
        raise CheckpointError(f"{path} is a directory, not a torch file: a model_<step>.pt must be the file "
                              "torch.save wrote; pass that file, or the checkpoint directory holding it")
    if not any(path.iterdir()):
        raise CheckpointError(f"checkpoint directory {path} is empty: pass a jaxrl import or run directory, a "
                              "nanochat base dir, a checkpoint dir holding model_<step>.pt files, or such a file")
    if is_base_dir(path):
        ckpts = path / SOURCE_DIRS[source]
        if not ckpts.is_dir():
            found = [s for s, sub in SOURCE_DIRS.items() if (path / sub).is_dir()]
            raise CheckpointError(f"base dir {path} has no {SOURCE_DIRS[source]}/ (source {source!r}); "
                                  f"it has sources {found}: pass --source")
        tag = model_tag if model_tag is not None else find_model_tag(ckpts)
        if not (ckpts / tag).is_dir():
            raise CheckpointError(f"model tag {tag!r} not found: {ckpts / tag} is not a directory")
        return _resolve_dir(ckpts / tag, step, tokenizer_dir=path / TOKENIZER_DIR)
    if _has_model_files(path):
        if model_tag is not None and model_tag != path.name:
            raise CheckpointError(f"--model-tag {model_tag!r} given but {path} is the checkpoint dir of tag "
                                  f"{path.name!r}")
        return _resolve_dir(path, step, tokenizer_dir=path.parent.parent / TOKENIZER_DIR)
    if any(_has_model_files(path / name) for name in os.listdir(path)):  # <base>/<source>_checkpoints itself
        tag = model_tag if model_tag is not None else find_model_tag(path)
        return _resolve_dir(path / tag, step, tokenizer_dir=path.parent / TOKENIZER_DIR)
    raise CheckpointError(f"{path} is neither a nanochat base dir (with {'/, '.join(SOURCE_DIRS.values())}/), "
                          f"a <source>_checkpoints dir, a checkpoint dir (with model_<step>.pt files), "
                          f"nor a jaxrl import dir (with model.json and params/)")


def _has_model_files(path: Path) -> bool:
    return path.is_dir() and any(MODEL_FILE_RE.search(name) for name in os.listdir(path))


def _resolve_dir(ckpt_dir: Path, step: int | None, tokenizer_dir: Path) -> CheckpointFiles:
    step = find_last_step(ckpt_dir) if step is None else step
    model_file = ckpt_dir / f"model_{step:06d}.pt"
    if not model_file.is_file():
        saved = sorted(int(m.group(1)) for name in os.listdir(ckpt_dir) if (m := MODEL_FILE_RE.search(name))
                       and (ckpt_dir / name).is_file())
        state = "is a directory, not a torch file" if model_file.is_dir() else "does not exist"
        raise CheckpointError(f"step {step}: {model_file} {state}; model_<step>.pt files in {ckpt_dir}: steps "
                              f"{saved}: pass one of them as the step (--model-step / --step / model_step)"
                              + (f" or remove the directory {model_file.name}" if model_file.is_dir() else ""))
    return CheckpointFiles(model_file, ckpt_dir / f"meta_{step:06d}.json", step, ckpt_dir.name, tokenizer_dir)


def _resolve_file(model_file: Path, step: int | None, model_tag: str | None) -> CheckpointFiles:
    m = MODEL_FILE_RE.search(model_file.name)
    if m is None:
        raise CheckpointError(f"{model_file}: a checkpoint file must be named model_<step>.pt "
                              f"(nanochat's naming; its meta is found as meta_<step>.json)")
    file_step = int(m.group(1))
    if step is not None and step != file_step:
        raise CheckpointError(f"--step {step} given but {model_file} is step {file_step}")
    if model_tag is not None and model_tag != model_file.parent.name:
        raise CheckpointError(f"--model-tag {model_tag!r} given but {model_file} is in tag {model_file.parent.name!r}")
    ckpt_dir = model_file.parent
    return CheckpointFiles(model_file, ckpt_dir / f"meta_{m.group(1)}.json", file_step, ckpt_dir.name,
                           ckpt_dir.parent.parent / TOKENIZER_DIR)


def read_meta(meta_file: Path) -> dict[str, Any]:
    """The meta JSON saved next to a checkpoint; it must hold a `model_config` object."""
    if not meta_file.is_file():
        raise CheckpointError(f"missing meta JSON: expected {meta_file} next to the model file "
                              f"(nanochat writes meta_<step:06d>.json with every model_<step:06d>.pt)")
    try:
        with open(meta_file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{meta_file}: cannot read JSON: {e}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{meta_file}: expected a JSON object with a 'model_config' object")
    return meta


def tokenizer_vocab_size(tokenizer_dir: Path) -> int:
    """Vocab size of <tokenizer_dir>/tokenizer.pkl (nanochat's pickled tiktoken Encoding, read safely)."""
    try:
        return Tokenizer.from_directory(tokenizer_dir).get_vocab_size()
    except (OSError, ValueError) as e:  # jaxrl.tokenizer names the file in its messages
        raise CheckpointError(f"cannot read the tokenizer in {tokenizer_dir}: {e}") from e
