"""Trainer checkpoints: orbax save and restore of the train state plus a JSON meta record.

Owns the layout of `<run_dir>/checkpoints/` (RunPaths.checkpoints), written through orbax's `args=`
CheckpointManager:

    <step>/state/        orbax StandardSave of the state pytree (params, optax state, step, key data)
    <step>/meta/         orbax JsonSave of `meta` (resolved config under "config", data cursor, ...)
    <step>/config.toml   meta["config"] as TOML (jaxrl.config_io.save_config), for people to read
    <step>/checksums.json  size and sha256 of every file above, written last (atomically)
    <step>.orbax-checkpoint-tmp*/   an unfinished save: never listed, deleted when a manager opens

A save is atomic: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it to `<step>` only once
everything is written, so a killed or failed save never becomes `latest_step()`. config.toml is
written just after that rename; meta["config"] is the authoritative copy. Restores run against an
abstract tree (`jax.eval_shape` output or a concrete template) that is first checked leaf by leaf
against the saved metadata, because orbax itself silently casts a dtype that differs.

Integrity: a save refuses a state holding NaN or inf, and ends by writing checksums.json; a
restore first checks every file against it (`verify`), so bit rot, a truncated or deleted file,
or a save cut short before its checksums landed is a RunStateError naming the step and the
file, never a silently wrong state. `resume_step` finds the step a resume can use and moves
damaged newer steps aside into <run_dir>/damaged_checkpoints/ (nothing is deleted).

    mgr = CheckpointManager(RunPaths(run_dir).checkpoints, max_to_keep=3)
    mgr.save(step, {"params": params, "opt_state": opt_state}, {"config": cfg.to_dict(), ...})
    state, meta = mgr.restore(abstract_state={"params": params, "opt_state": opt_state})  # placed arrays:
                                                 # restored into their shardings, whatever mesh saved them

Test: `python -m pytest -q tests/test_checkpoint.py`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxrl.config import REMOVED_KEYS, RLConfig
from jaxrl.config_io import save_config
from jaxrl.run_state.integrity import Leaf, check_tree, checksum_problem, nonfinite_leaves, write_checksums
from jaxrl.run_state.paths import CHECKSUMS, CONFIG_TOML, META, STATE, RunPaths, RunStateError

# RLConfig keys whose change makes a resumed run differ from an uninterrupted one.
RESUME_BREAKING = (
    "source", "checkpoint", "model_tag", "model_step", "generation", "tokenizer_dir", "dtype", "attention",
    "device_batch_size", "examples_per_step", "num_samples", "max_new_tokens", "temperature",
    "top_k", "unembedding_lr", "embedding_lr", "matrix_lr", "weight_decay", "init_lr_frac",
    "num_epochs", "num_steps", "seed", "task", "data_dir", "advantage", "token_norm",
    "train_on_end_token", "train_chunk_rows", "train_remat", "train_skip_zero_advantage", "arith_difficulty",
)
# Keys that only touch naming, logging, evaluation, saving or process and device layout (a new mesh
# shape sums the same gradients in another order: the run goes on equal up to float rounding).
RESUME_SAFE = (
    "run", "out_dir", "resume", "stop_after_steps", "eval_every", "eval_examples", "eval_num_samples", "eval_seed",
    "eval_shared_keys", "save_every", "log_every", "export_nanochat", "max_nonfinite_skips", "coordinator_address",
    "num_processes", "process_id", "zero_reward_warn_steps", "allow_data_change", "mesh_data", "mesh_fsdp",
    "rollout_slots",
)
# What a config saved by an earlier release lacks or holds extra: keys added since (with the value
# those runs used) and keys removed since (settings that moved out of RLConfig, meaningless to a resume).
ADDED_KEYS = {"attention": "einsum", "train_remat": False, "mesh_data": -1, "mesh_fsdp": 1,
              "rollout_slots": None}  # (earlier runs decoded all rows at once; any value gives the same tokens)
# Path-valued keys: the same folder written relative or absolute is the same key (resolved paths compared).
PATH_KEYS = ("checkpoint", "tokenizer_dir", "data_dir", "task", "out_dir")


class CheckpointManager:
    """Numbered checkpoints in `directory` (the run's checkpoints folder); all processes call every method."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 3):
        self.directory = Path(directory).absolute()
        self.damaged = RunPaths(self.directory.parent).damaged  # beside checkpoints/: damaged steps, kept
        self._verified: set[int] = set()  # steps whose files matched their checksums in this process
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, cleanup_tmp_directories=True)
        handlers = {STATE: ocp.StandardCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
        try:
            self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
            # orbax deletes unfinished (killed) saves in a background thread and waits for it only at
            # the first save: wait now, so they are gone once the manager is open, and a process that
            # exits soon after (a bad input) does not kill that thread mid-flight (a traceback at exit)
            getattr(self._mgr, "_maybe_await_cleanup_tmp_directory", lambda: None)()
        except OSError as e:
            raise RunStateError(f"cannot open checkpoint directory {self.directory}: {e}; "
                                "choose a writable out_dir") from e

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, meta: dict) -> Path:
        """Write `state` and `meta` as checkpoint `step`; returns once it is durable (its folder).

        `meta` must be JSON-able; a "config" entry must be a full RLConfig dict and is also
        written as config.toml. Raises RunStateError, leaving earlier steps intact, on any
        write failure (disk full, read-only folder), and when `step` already exists.
        """
        step = int(step)
        _check_state_leaves(state)
        bad = nonfinite_leaves(state)
        if bad:
            raise RunStateError(f"refusing to save checkpoint step {step}: {len(bad)} state leaves hold NaN or inf "
                                f"(first: {bad[0]}); the previous checkpoint is the last good state")
        config = _meta_config(meta)
        if step in self.all_steps():
            raise RunStateError(f"checkpoint step {step} already exists at {self.step_dir(step)}; "
                                "save each step once (skip the save when step == latest_step())")
        previous = self.latest_step()
        args = ocp.args.Composite(**{STATE: ocp.args.StandardSave(state), META: ocp.args.JsonSave(meta)})
        try:
            self._mgr.save(step, args=args, force=True)
            self._mgr.wait_until_finished()
        except Exception as e:  # OSError, or tensorstore's ValueError wrapping an OS error
            # orbax 0.12.8 drops earlier steps from its in-memory list when a commit fails
            # (max_to_keep bookkeeping runs first); the folders are intact, so re-read them.
            self._mgr.reload()
            kept = "no earlier checkpoint" if previous is None else f"step {previous} is intact"
            raise RunStateError(
                f"saving checkpoint step {step} to {self.step_dir(step)} failed ({kept}): "
                f"{type(e).__name__}: {e}. Free disk space or fix the folder's permissions "
                "(or pick another out_dir), then resume") from e
        if config is not None and jax.process_index() == 0:
            path = self.step_dir(step) / CONFIG_TOML
            try:
                save_config(config, path)
            except OSError as e:
                raise RunStateError(f"checkpoint step {step} was saved, but writing {path} failed: "
                                    f"{e}; meta['config'] holds the same config") from e
        if jax.process_index() == 0:
            try:
                write_checksums(self.step_dir(step))
            except OSError as e:
                raise RunStateError(f"checkpoint step {step} was saved, but writing its {CHECKSUMS} failed: {e}. "
                                    "Free disk space or fix permissions, then resume (it falls back to "
                                    "the newest checkpoint with checksums)") from e
        self._verified.add(step)
        return self.step_dir(step)

    def verify(self, step: int) -> None:
        """Raise RunStateError naming the step and the first bad file unless every file of `step`
        matches its checksums.json (each step is read once per manager)."""
        if step in self._verified:
            return
        problem = checksum_problem(self.step_dir(step))
        if problem:
            raise RunStateError(f"checkpoint step {step} in {self.directory} is damaged: {problem}")
        self._verified.add(step)

    def resume_step(self) -> tuple[int, list[str]]:
        """(the newest intact step, one note per damaged newer step, each moved into
        <run_dir>/damaged_checkpoints/ so that it is redone). Raises RunStateError naming every
        damaged step and the command that starts the run again, moving nothing, if none is intact."""
        damaged = []
        for step in reversed(self.all_steps()):
            try:
                self.verify(step)
            except RunStateError as e:
                damaged.append((step, str(e)))
                continue
            return step, [f"{why}; moved to {self.set_aside(s)}" for s, why in damaged]
        if not damaged:
            raise RunStateError(f"no checkpoint in {self.directory}; start without resume")
        aside = self.damaged
        raise RunStateError("no intact checkpoint to resume from:\n  - " + "\n  - ".join(why for _, why in damaged)
                            + f"\nTo start this run again from step 0 (keeping them), run: mv {self.directory} "
                            f"{aside if not aside.exists() else str(aside) + '-2'}")

    def set_aside(self, step: int) -> Path:
        """Move checkpoint `step` into <run_dir>/damaged_checkpoints/ (process 0); returns where it went."""
        dest = self.damaged / str(step)
        n = 1
        while dest.exists():
            dest, n = dest.with_name(f"{step}-{n}"), n + 1
        if jax.process_index() == 0:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.step_dir(step), dest)
        self._mgr.reload()
        return dest

    def read_meta(self, step: int | None = None) -> dict:
        """meta of `step` (default latest) without touching the state, e.g. to build the abstract state."""
        step = self._existing_step(step)
        try:
            return self._mgr.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:
            raise RunStateError(f"cannot read the meta of {self.step_dir(step)}: {e}") from e

    def restore(self, step: int | None = None, abstract_state: Any = None, *,
                sharding: jax.sharding.Sharding | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default latest), with the tree structure of `abstract_state`.

        `abstract_state`: `jax.eval_shape(...)` output or a concrete template (arrays). Each leaf
        comes back as a jax.Array placed with `sharding` if given, else with the leaf's own
        sharding, else on the first local device. Every leaf's path, shape and dtype must equal
        the saved ones (else RunStateError); optax namedtuple states keep their types.
        """
        if abstract_state is None:
            raise TypeError("restore needs abstract_state: pass jax.eval_shape(make_state) or a "
                            "template state with the saved structure")
        step = self._existing_step(step)
        self.verify(step)
        target = jax.tree.map(lambda x: _abstract_leaf(x, sharding), abstract_state)
        where = self.step_dir(step) / STATE
        try:
            saved = self._mgr.item_metadata(step)[STATE]
        except Exception as e:
            raise RunStateError(f"cannot read the metadata of {where}: {e}") from e
        _check_structure(target, getattr(saved, "tree", saved), str(where))
        args = ocp.args.Composite(**{STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()})
        try:
            out = self._mgr.restore(step, args=args)
        except Exception as e:
            raise RunStateError(f"cannot restore {self.step_dir(step)}: {type(e).__name__}: {e}") from e
        return _finite_or_raise(out[STATE], self.step_dir(step)), out[META]

    def restore_saved(self, step: int | None = None) -> tuple[Any, dict]:
        """(state, meta) of `step` (default latest) with the saved tree, every leaf on this process's
        first device: for reading a run (eval, export, tests) on any device count, e.g. one CPU
        device after a multi-host run; orbax alone refuses a topology that differs from the save's."""
        step = self._existing_step(step)
        self.verify(step)
        one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        try:
            saved = self._mgr.item_metadata(step)[STATE]
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
                                  getattr(saved, "tree", saved), is_leaf=lambda x: hasattr(x, "shape"))
            out = self._mgr.restore(step, args=ocp.args.Composite(
                **{STATE: ocp.args.StandardRestore(target), META: ocp.args.JsonRestore()}))
        except Exception as e:
            raise RunStateError(f"cannot restore {self.step_dir(step)}: {type(e).__name__}: {e}") from e
        return _finite_or_raise(out[STATE], self.step_dir(step)), out[META]

    def close(self) -> None:
        self._mgr.close()

    def __enter__(self) -> "CheckpointManager":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _existing_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise RunStateError(f"no checkpoint in {self.directory} (unfinished "
                                    "*.orbax-checkpoint-tmp* folders do not count); start without resume")
            return steps[-1]
        if int(step) not in steps:
            raise RunStateError(f"no checkpoint step {step} in {self.directory}; saved steps: {steps}")
        return int(step)


# ------------------------------------------------------------------------------------------
# Integrity (the checksums, the finiteness check and the tree check live in integrity.py)


def _finite_or_raise(state: Any, where: Path) -> Any:
    bad = nonfinite_leaves(state)
    if bad:
        raise RunStateError(f"checkpoint {where} holds NaN or inf in {len(bad)} leaves (first: {bad[0]}); "
                            f"do not use it: move it aside (mv {where} {RunPaths(where.parent.parent).damaged}/) "
                            "and resume from the step before")
    return state


# ------------------------------------------------------------------------------------------
# Helpers of save and restore


def _is_key_array(x) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _check_state_leaves(state: Any) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        if _is_key_array(leaf):
            raise TypeError(f"state leaf {_path_str(path)} is a typed PRNG key; save "
                            "jax.random.key_data(key) (uint32) and rebuild it with jax.random.wrap_key_data")
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic)):
            raise TypeError(f"state leaf {_path_str(path)} is a {type(leaf).__name__}, not an array; "
                            "wrap it with np.asarray (scalars) or move it to meta")


def _meta_config(meta: dict) -> RLConfig | None:
    """Validate `meta` before anything is written; the RLConfig in meta["config"], if any."""
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a dict, found {type(meta).__name__}")
    try:
        json.dumps(meta, allow_nan=True)
    except (TypeError, ValueError) as e:
        raise TypeError(f"meta is not JSON-serializable: {e}; convert numpy values with "
                        "int()/float()/.tolist()") from e
    if "config" not in meta:
        return None
    if not isinstance(meta["config"], dict):
        raise TypeError(f"meta['config'] must be RLConfig.to_dict(), found {type(meta['config']).__name__}")
    return RLConfig.from_dict(meta["config"], source="in meta['config']")


def _abstract_leaf(x, sharding) -> jax.ShapeDtypeStruct:
    if _is_key_array(x) or jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key):
        raise TypeError("abstract_state holds a typed PRNG key; checkpoints store jax.random.key_data(key)")
    if sharding is None:
        sharding = getattr(x, "sharding", None) or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    return jax.ShapeDtypeStruct(np.shape(x), dtype, sharding=sharding)


def _path_str(path) -> str:
    """'opt_state/0/mu/wte' for dict keys, namedtuple fields and sequence indices alike."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts) or "<root>"


def _leaves(tree: Any) -> dict[str, Leaf]:
    """{'opt_state/0/mu/wte': Leaf(shape, dtype)} of a tree of arrays, abstract arrays or orbax ArrayMetadata."""
    is_leaf = lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
    return {_path_str(p): Leaf(tuple(x.shape), np.dtype(x.dtype).name)
            for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _check_structure(target: Any, saved_tree: Any, where: str) -> None:
    """Raise RunStateError naming every differing leaf path (expected vs found); a checkpoint in the
    per-layer params layout (transformer/h/<i>/...) of jaxrl before its layers were stacked is named as such."""
    want, have = _leaves(target), _leaves(saved_tree)
    per_layer = lambda paths: any(p.startswith("params/transformer/h/0/") for p in paths)  # noqa: E731
    if per_layer(have) and not per_layer(want):
        raise RunStateError(
            f"checkpoint {where} holds the per-layer params layout (transformer/h/<i>/...) of jaxrl before its "
            "layers were stacked; its optimizer state cannot resume a run of this version. Start a new run "
            "from its params instead (--checkpoint RUN_DIR reads them, converting the layout), or resume "
            "with the jaxrl version that wrote it.")
    check_tree(want, have, where, "the saved state does not match abstract_state",
               "Build abstract_state from the config saved in the checkpoint's meta.")


# ------------------------------------------------------------------------------------------
# Resume


def check_resume_compatible(saved_config: dict, new_config: dict) -> list[str]:
    """Keys whose change is safe on resume, in RESUME_SAFE order; raise if any other key changed.

    Both arguments are RLConfig.to_dict() outputs (the saved one from meta["config"]). A key
    missing from one side counts as changed; a changed key in neither tuple counts as breaking.
    PATH_KEYS compare as resolved paths (against the current directory): relative equals absolute.
    """
    saved_config = {**ADDED_KEYS, **{k: v for k, v in saved_config.items() if k not in REMOVED_KEYS}}
    missing = object()
    same = lambda k, a, b: a == b or (k in PATH_KEYS and isinstance(a, str) and isinstance(b, str)
                                      and os.path.realpath(a) == os.path.realpath(b))
    changed = [k for k in dict.fromkeys([*saved_config, *new_config])
               if not same(k, saved_config.get(k, missing), new_config.get(k, missing))]
    breaking = [k for k in changed if k not in RESUME_SAFE]
    if breaking:
        show = lambda d, k: repr(d[k]) if k in d else "<absent>"
        lines = [f"{k}: saved {show(saved_config, k)}, now {show(new_config, k)}"
                 + ("" if k in RESUME_BREAKING else " (not known to be safe)") for k in breaking]
        raise RunStateError(
            "cannot resume: these config changes would make the run differ from an "
            "uninterrupted one:\n  - " + "\n  - ".join(lines)
            + "\nRestore the saved values (see config.toml in the checkpoint folder), or start a "
            "new run (another run name or out_dir) without resume.")
    return [k for k in RESUME_SAFE if k in changed]
