"""The jaxrl import directory, and reading the params of a train_rl run directory; no torch.

An import directory is what `python -m convert.import_nanochat` writes and the trainer reads:

    DIR/params/              orbax tree of the nested float32 params (torch (out, in) layout, layers stacked)
    DIR/model.json           {"model_config": GPTConfig.to_dict(), "generation": ...,
                              "generation_reason": ..., "source": {path, step, model_tag, meta,
                              dtypes, ...}, ...}
    DIR/tokenizer/           tokenizer.pkl (+ token_bytes.pt) copied from the nanochat base dir

Writes are atomic: everything goes to a temporary sibling directory that is renamed onto DIR
at the end, so DIR is never half-written. Loading checks every key and shape against
`model.param_table` (integrity.check_param_shapes) and refuses NaN or inf. A run directory's
params are read from its newest (or a given) checkpoint step, after its checksums. Both orbax
trees are written and read by `write_tree` / `read_tree` (orbax's `args=` Checkpointer). See
docs/checkpoints.md.

Test: `pytest tests/test_run_state.py tests/test_convert.py -k "import or before"` (torch only makes the input).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrl.model import GPTConfig, Params, flatten_params, unflatten_params
from jaxrl.run_state.integrity import check_finite, check_param_shapes, checksum_problem
from jaxrl.run_state.paths import STATE, TOKENIZER_FILES, RunPaths, RunStateError, replace_dir


def save_jaxrl_import(
    dir: str | os.PathLike,
    config: GPTConfig,
    params: Params,
    info: dict[str, Any],
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Atomically write `dir` = params/ (orbax, float32) + model.json + tokenizer/ (if given).

    `info` is stored next to "model_config" in model.json (generation, generation_reason, source,
    ...). Refuses an existing `dir` unless `overwrite`. Returns the absolute path of `dir`.
    """
    dst = Path(dir).resolve()
    if dst.exists() and not overwrite:
        raise RunStateError(f"output {dst} already exists; choose another path or pass --force to replace it")
    if "model_config" in info:
        raise RunStateError("info must not contain 'model_config'; it is written from `config`")
    tree = jax.tree.map(lambda value: np.asarray(value, np.float32), params)  # no copy of host fp32
    check_param_shapes(config, {k: np.shape(v) for k, v in flatten_params(tree).items()}, where="params to save")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an import is an ordinary folder (0755 under umask 022)
    out = RunPaths(tmp)
    try:
        write_tree(out.params, tree)
        del tree
        _write_json(out.model_json, {"model_config": config.to_dict(), **info})
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, out.tokenizer)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def load_jaxrl_import(dir: str | os.PathLike) -> tuple[GPTConfig, Params, dict[str, Any]]:
    """Read an import (or trainer) directory. Returns (config, host float32 numpy params, info).

    `info` is model.json without "model_config", plus "tokenizer_dir": the path of DIR/tokenizer
    if it holds tokenizer.pkl, else None (derived at load time, not stored).
    """
    d = RunPaths(Path(dir).resolve())
    config, info = _read_record(d)
    if not d.params.is_dir():
        raise RunStateError(f"{d.root}: no params directory at {d.params} (expected an orbax checkpoint)")
    return config, _checked_params(config, read_tree(d.params), str(d.params)), info


def load_run_dir(run_dir: str | os.PathLike, step: int | None = None) -> tuple[GPTConfig, Params, dict[str, Any]]:
    """The params of a train_rl run's latest (or given) checkpoint, with the run's model.json.

    Returns (config, host float32 numpy params, info): model.json without "model_config", plus
    "step" (the checkpoint's) and "tokenizer_dir" (<run_dir>/tokenizer if it holds tokenizer.pkl).
    """
    d = RunPaths(Path(run_dir).resolve())
    config, info = _read_record(d)
    steps = sorted(int(p.name) for p in d.checkpoints.glob("*") if p.name.isdigit() and p.is_dir())
    step = (steps[-1] if steps else None) if step is None else step
    if step is None or step not in steps:
        raise RunStateError(f"{d.checkpoints} holds no complete checkpoint "
                            f"{'yet' if step is None else f'of step {step} (it has {steps})'}")
    _check_intact(d, step, steps)
    params = read_tree(d.step(step) / STATE, keys=("params",))["params"]  # any device count can read them
    where = str(d.step(step))
    return config, _checked_params(config, params, where, f"checkpoint step {step} of {d.root}"), dict(info, step=step)


def _read_record(d: RunPaths) -> tuple[GPTConfig, dict[str, Any]]:
    """(config, info) of d's model.json: info is the record without "model_config", plus "tokenizer_dir"."""
    record = read_model_json(d.root)
    try:
        config = GPTConfig.from_dict(record["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise RunStateError(f"{d.model_json}: bad or missing 'model_config': {e}") from e
    info = {k: v for k, v in record.items() if k != "model_config"}
    info["tokenizer_dir"] = str(d.tokenizer) if (d.tokenizer / TOKENIZER_FILES[0]).is_file() else None
    return config, info


def _checked_params(config: GPTConfig, tree: Params, where: str, what: str | None = None) -> Params:
    """`tree` as float32 numpy params in the stacked layout after the key/shape check and the
    finiteness check. The per-layer tree (transformer.h.<i>) that older jaxrl versions saved is
    stacked here, so their import dirs and run checkpoints still load."""
    tree = jax.tree.map(lambda v: np.asarray(v, np.float32), tree)
    flat = flatten_params(tree)  # nanochat's names; views of the stacked arrays
    check_param_shapes(config, {k: np.shape(v) for k, v in flat.items()}, where=where)
    if what is None:
        check_finite(flat, where=where)
    elif bad := [k for k, v in flat.items() if not np.isfinite(v).all()]:
        raise RunStateError(f"{what} holds NaN or inf in {len(bad)} tensors (first: {bad[0]}); "
                            "do not use or export it: pick an earlier step")
    if any(str(k).isdigit() for k in tree.get("transformer", {}).get("h", {})):
        return unflatten_params(flat, consume=True)
    return tree


def _check_intact(d: RunPaths, step: int, steps: list[int]) -> None:
    """Raise RunStateError naming the damage and the newest intact step unless `step` matches its checksums."""
    if problem := checksum_problem(d.step(step)):
        # hash steps newest first and stop at the first intact one (each check reads a whole checkpoint)
        intact = next((s for s in reversed(steps) if s != step and not checksum_problem(d.step(s))), None)
        fix = (f"use step {intact}, the newest intact one (eval_rl.py --model-step {intact}, "
               f"convert.export_nanochat --step {intact})" if intact is not None else "no step of this run is intact")
        raise RunStateError(f"checkpoint step {step} of {d.root} is damaged: {problem}; {fix}")


def read_model_json(dir: str | os.PathLike) -> dict[str, Any]:
    """model.json of an import directory, with errors naming the file."""
    path = RunPaths(dir).model_json
    if not path.is_file():
        raise RunStateError(f"{Path(dir)}: not a jaxrl import directory, {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RunStateError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(record, dict) or "model_config" not in record:
        raise RunStateError(f"{path}: expected a JSON object with a 'model_config' entry")
    return record


def copy_tokenizer(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[Path]:
    """Copy tokenizer.pkl (required) and token_bytes.pt (if present) into dst_dir; return the copies."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / TOKENIZER_FILES[0]).is_file():
        raise RunStateError(f"tokenizer directory {src} has no {TOKENIZER_FILES[0]}")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            tmp = dst / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
            copied.append(dst / name)
    return copied


# ------------------------------------------------------------------------------------------
# Plain orbax trees (an import's params, a checkpoint step's state read without its manager)


def write_tree(path: Path, tree: Params) -> None:
    """Synchronous orbax save of a tree of numpy arrays, tuned for peak host memory.

    Orbax's default numpy handler deep-copies every array first and OCDBT buffers the data file,
    which roughly tripled peak memory for a d20 model; we never mutate the arrays during this
    synchronous save, so the copy is not needed, and plain zarr (one directory per array) streams.
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused; registering it keeps orbax from warning
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False)
    absl = logging.getLogger("absl")
    absl.addFilter(_no_ocdbt_merge_warning)
    try:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(path, args=ocp.args.PyTreeSave(tree))
    finally:
        absl.removeFilter(_no_ocdbt_merge_warning)


def read_tree(path: Path, keys: tuple[str, ...] | None = None) -> dict:
    """The orbax tree at `path` (only its top-level `keys` if given) as host numpy arrays, whatever
    the device count or topology it was saved from. RunStateError names `path` if it cannot be read."""
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            saved = ckptr.metadata(path).item_metadata.tree
            if keys is not None:
                saved = {k: saved[k] for k in keys}
            as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
            return ckptr.restore(path, args=ocp.args.PyTreeRestore(
                item=saved, restore_args=as_numpy, partial_restore=keys is not None))
    except Exception as e:  # orbax raises a variety of types for a damaged directory
        raise RunStateError(f"{path}: cannot restore the orbax checkpoint: {type(e).__name__}: {e}") from e


def _no_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """Drop orbax's 'Skipping merge of OCDBT checkpoints' warning, meaningless without OCDBT."""
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
