"""The jaxrl import directory: nanochat weights as an orbax checkpoint plus a JSON record, no torch.

Owns the on-disk layout that `python -m convert.import_nanochat` writes and that the trainer
reads (and, with a `step`, writes at each save next to its nanochat export):

    DIR/params/              orbax checkpoint of the nested float32 params (torch (out, in) layout)
    DIR/model.json           {"model_config": GPTConfig.to_dict(), "generation": ...,
                              "generation_reason": ..., "source": {path, step, model_tag, meta,
                              dtypes, ...}, ...}
    DIR/tokenizer/           tokenizer.pkl (+ token_bytes.pt) copied from the nanochat base dir

Writes are atomic: everything goes to a temporary sibling directory that is renamed onto DIR
at the end, so DIR is never half-written. Loading checks every key and shape against
`model.param_table`. See docs/checkpoints.md.

Test: `pytest tests/test_convert.py -k import` (needs torch only to make the input).
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

from jaxrl.checkpoint import STATE
from jaxrl.model import GPTConfig, Params, flatten_params, param_table, unflatten_params
from jaxrl.run_safety import checksum_problem

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.pkl", "token_bytes.pt")  # what nanochat keeps in <base>/tokenizer
RUN_CHECKPOINTS = "checkpoints"  # a train_rl run dir: model.json, tokenizer/, checkpoints/<step>/


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed, or does not match the model config."""


def is_jaxrl_import(path: str | os.PathLike) -> bool:
    """True if `path` is a directory holding model.json and params/ (an import or trainer checkpoint)."""
    p = Path(path)
    return (p / MODEL_JSON).is_file() and (p / PARAMS_DIR).is_dir()


def check_param_shapes(config: GPTConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise CheckpointError unless `shapes` has exactly the keys and shapes of `param_table(config)`.

    `where` names the file the shapes came from; every problem is listed with expected vs found.
    """
    expected = {key: tuple(shape) for key, shape, _ in param_table(config)}
    problems = []
    for key, shape in expected.items():
        if key not in shapes:
            problems.append(f"missing key {key!r} (expected shape {shape})")
        elif tuple(shapes[key]) != shape:
            problems.append(f"key {key!r}: expected shape {shape}, found {tuple(shapes[key])}")
    problems += [f"unexpected key {key!r} with shape {tuple(s)}" for key, s in shapes.items() if key not in expected]
    if problems:
        shown = "\n  - ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise CheckpointError(
            f"{where}: state dict does not match nanochat {config.generation} GPT with model_config "
            f"{config.model_config()} (padded vocab {config.padded_vocab}):\n  - {shown}"
        )


def check_finite(flat: dict[str, np.ndarray], where: str) -> None:
    """Raise CheckpointError naming every tensor of `flat` that holds a NaN or an infinity: such weights
    would train silently on garbage (a NaN logit row gives reward 0 and advantage 0 forever)."""
    bad = [(k, int(np.size(v) - np.isfinite(v).sum()), np.size(v)) for k, v in flat.items()
           if not np.isfinite(v).all()]
    if bad:
        listed = ", ".join(f"{k!r} ({n} of {size} values)" for k, n, size in bad[:5])
        raise CheckpointError(f"{where}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {listed}; the "
                              "checkpoint is damaged or its training diverged: use an earlier checkpoint")


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
        raise CheckpointError(f"output {dst} already exists; choose another path or pass --force to replace it")
    if "model_config" in info:
        raise CheckpointError("info must not contain 'model_config'; it is written from `config`")
    flat = {key: np.asarray(value, np.float32) for key, value in flatten_params(params).items()}
    check_param_shapes(config, {k: v.shape for k, v in flat.items()}, where="params to save")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; an import is an ordinary folder (0755 under umask 022)
    try:
        _write_params(tmp / PARAMS_DIR, unflatten_params(flat))
        del flat
        record = {"model_config": config.to_dict(), **info}
        _write_json(tmp / MODEL_JSON, record)
        if tokenizer_dir is not None:
            copy_tokenizer(tokenizer_dir, tmp / TOKENIZER_DIR)
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
    d = Path(dir).resolve()
    record = read_model_json(d)
    try:
        config = GPTConfig.from_dict(record["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{d / MODEL_JSON}: bad or missing 'model_config': {e}") from e
    if not (d / PARAMS_DIR).is_dir():
        raise CheckpointError(f"{d}: no params directory at {d / PARAMS_DIR} (expected an orbax checkpoint)")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            tree = ckptr.restore(d / PARAMS_DIR)
        except Exception as e:  # orbax raises a variety of types for a damaged directory
            raise CheckpointError(f"{d / PARAMS_DIR}: cannot restore the orbax checkpoint: {e}") from e
    flat = flatten_params(tree)
    check_param_shapes(config, {k: np.shape(v) for k, v in flat.items()}, where=str(d / PARAMS_DIR))
    flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    check_finite(flat, where=str(d / PARAMS_DIR))
    params = unflatten_params(flat)
    info = {k: v for k, v in record.items() if k != "model_config"}
    tok = d / TOKENIZER_DIR
    info["tokenizer_dir"] = str(tok) if (tok / TOKENIZER_FILES[0]).is_file() else None
    return config, params, info


def is_run_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a train_rl run directory: model.json and checkpoints/."""
    p = Path(path)
    return (p / MODEL_JSON).is_file() and (p / RUN_CHECKPOINTS).is_dir()


def load_run_dir(run_dir: str | os.PathLike, step: int | None = None) -> tuple[GPTConfig, Params, dict[str, Any]]:
    """The params of a train_rl run's latest (or given) checkpoint, with the run's model.json.

    Returns (config, host float32 numpy params, info): model.json without "model_config", plus
    "step" (the checkpoint's) and "tokenizer_dir" (<run_dir>/tokenizer if it holds tokenizer.pkl).
    """
    d = Path(run_dir).resolve()
    record = read_model_json(d)
    config = GPTConfig.from_dict(record["model_config"])
    mgr = ocp.CheckpointManager(d / RUN_CHECKPOINTS)
    step = mgr.latest_step() if step is None else step
    if step is None or step not in mgr.all_steps():
        raise CheckpointError(f"{d / RUN_CHECKPOINTS} holds no complete checkpoint "
                              f"{'yet' if step is None else f'of step {step} (it has {sorted(mgr.all_steps())})'}")
    _check_intact(d / RUN_CHECKPOINTS, step, sorted(mgr.all_steps()))
    state = d / RUN_CHECKPOINTS / str(step) / STATE  # jaxrl.checkpoint's layout
    with ocp.PyTreeCheckpointer() as ckptr:  # params only, as host numpy: any device count can read them
        saved = ckptr.metadata(state).item_metadata.tree["params"]
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
        args = ocp.args.PyTreeRestore(item={"params": saved}, restore_args={"params": as_numpy}, partial_restore=True)
        raw = ckptr.restore(state, args=args)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(raw["params"]).items()}
    check_param_shapes(config, {k: v.shape for k, v in flat.items()}, where=str(d / RUN_CHECKPOINTS / str(step)))
    if bad := [k for k, v in flat.items() if not np.isfinite(v).all()]:
        raise CheckpointError(f"checkpoint step {step} of {d} holds NaN or inf in {len(bad)} tensors "
                              f"(first: {bad[0]}); do not use or export it: pick an earlier step")
    info = {k: v for k, v in record.items() if k != "model_config"}
    tok = d / TOKENIZER_DIR
    info.update(step=step, tokenizer_dir=str(tok) if (tok / TOKENIZER_FILES[0]).is_file() else None)
    return config, unflatten_params(flat), info


def _check_intact(checkpoints: Path, step: int, steps: list[int]) -> None:
    """Raise CheckpointError naming the damage and the newest intact step unless `step` matches its checksums."""
    if problem := checksum_problem(checkpoints / str(step)):
        # hash steps newest first and stop at the first intact one (each check reads a whole checkpoint)
        intact = next((s for s in reversed(steps) if s != step and not checksum_problem(checkpoints / str(s))), None)
        fix = (f"use step {intact}, the newest intact one (eval_rl.py --model-step {intact}, "
               f"convert.export_nanochat --step {intact})" if intact is not None else "no step of this run is intact")
        raise CheckpointError(f"checkpoint step {step} of {checkpoints.parent} is damaged: {problem}; {fix}")


def read_model_json(dir: str | os.PathLike) -> dict[str, Any]:
    """model.json of an import directory, with errors naming the file."""
    path = Path(dir) / MODEL_JSON
    if not path.is_file():
        raise CheckpointError(f"{Path(dir)}: not a jaxrl import directory, {path} is missing")
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
    if not isinstance(record, dict) or "model_config" not in record:
        raise CheckpointError(f"{path}: expected a JSON object with a 'model_config' entry")
    return record


def copy_tokenizer(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[Path]:
    """Copy tokenizer.pkl (required) and token_bytes.pt (if present) into dst_dir; return the copies."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not (src / TOKENIZER_FILES[0]).is_file():
        raise CheckpointError(f"tokenizer directory {src} has no {TOKENIZER_FILES[0]}")
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            tmp = dst / f".{name}.tmp-{os.getpid()}"
            shutil.copyfile(src / name, tmp)
            os.replace(tmp, dst / name)
            copied.append(dst / name)
    return copied


def _write_params(path: Path, params: Params) -> None:
    """Synchronous orbax save of a tree of numpy arrays, tuned for peak host memory.

    Orbax's default numpy handler deep-copies every array first and OCDBT buffers the data file,
    which roughly tripled peak memory for a d20 model; we never mutate the arrays during this
    synchronous save, so the copy is not needed, and plain zarr (one directory per array) streams.
    The result restores with any orbax restore (StandardCheckpointer / PyTreeCheckpointer).
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()),  # unused; registering it keeps orbax from warning
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False)
    absl = logging.getLogger("absl")
    absl.addFilter(_no_ocdbt_merge_warning)
    try:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(path, args=ocp.args.PyTreeSave(params))
    finally:
        absl.removeFilter(_no_ocdbt_merge_warning)


def _no_ocdbt_merge_warning(record: logging.LogRecord) -> bool:
    """Drop orbax's 'Skipping merge of OCDBT checkpoints' warning, meaningless without OCDBT."""
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename tmp onto dst; an existing dst is moved aside first and deleted after the swap."""
    if not dst.exists():
        tmp.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
