"""Integrity of saved state: checksums, finite values, the one tree check, the data fingerprint.

- `write_checksums` lists the size and sha256 of every file of a checkpoint step in
  <step>/checksums.json; `checksum_problem` re-reads them.
- `nonfinite_leaves` names the float leaves of a tree holding NaN or inf (one jitted reduction);
  `check_finite` does the same for host arrays and raises.
- `check_tree` is the one comparison of saved keys, shapes and dtypes against the expected ones,
  used for an import's params (`check_param_shapes`, against `model.param_table`) and for a
  train-state restore (against the abstract state); every problem names the key, expected and found.
- `data_fingerprint` (row count + sha256 of the rows) is saved with every checkpoint; `check_data`
  refuses a resume on changed data unless `allow_data_change`.

Test: `python -m pytest -q tests/test_run_safety.py -m "not slow"`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.model import GPTConfig, param_table
from jaxrl.run_state.paths import CHECKSUMS, RunStateError

GENERATED_ROWS = 256  # a generated task (arith) is fingerprinted by its size and its first rows
SHOWN = 12  # problems listed in one error message


# ------------------------------------------------------------------------------------------
# Checksums


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(step_dir: str | os.PathLike) -> None:
    """<step_dir>/checksums.json: {"sha256": {relative path: [size, sha256]}} of every other file, atomically."""
    step_dir = Path(step_dir)
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    record = {"sha256": {p.relative_to(step_dir).as_posix(): [p.stat().st_size, _sha256(p)] for p in files}}
    tmp = step_dir / f".{CHECKSUMS}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, step_dir / CHECKSUMS)


def checksum_problem(step_dir: str | os.PathLike) -> str | None:
    """None if every file listed in <step_dir>/checksums.json has its saved size and sha256, else what is wrong."""
    step_dir = Path(step_dir)
    path = step_dir / CHECKSUMS
    try:
        listed = json.loads(path.read_text(encoding="utf-8"))["sha256"]
        if not isinstance(listed, dict) or not listed:
            raise ValueError("no files listed")
        entries = [(rel, int(size), str(digest)) for rel, (size, digest) in listed.items()]
    except FileNotFoundError:
        return f"{path} is missing (its save was cut short, or jaxrl did not write checksums then)"
    except (OSError, ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError too
        return f"{path} is unreadable, truncated or overwritten ({type(e).__name__}: {e})"
    for rel, size, digest in entries:
        f = step_dir / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, {size} when saved (truncated or overwritten)"
        if _sha256(f) != digest:
            return f"{f} differs from the file saved (sha256 mismatch: bit rot or an overwrite)"
    return None


# ------------------------------------------------------------------------------------------
# Finite values


@jax.jit
def _all_finite(leaves: list) -> list:
    return [jnp.all(jnp.isfinite(x)) for x in leaves]


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths ('params/lm_head/weight') of the floating-point leaves of `tree` holding a NaN or an inf."""
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    flags = jax.device_get(_all_finite([x for _, x in flat])) if flat else []
    return [jax.tree_util.keystr(p, simple=True, separator="/") for (p, _), ok in zip(flat, flags) if not ok]


def check_finite(flat: dict[str, np.ndarray], where: str) -> None:
    """Raise RunStateError naming every tensor of `flat` that holds a NaN or an infinity: such weights
    would train silently on garbage (a NaN logit row gives reward 0 and advantage 0 forever)."""
    bad = [(k, int(np.size(v) - np.isfinite(v).sum()), np.size(v)) for k, v in flat.items()
           if not np.isfinite(v).all()]
    if bad:
        listed = ", ".join(f"{k!r} ({n} of {size} values)" for k, n, size in bad[:5])
        raise RunStateError(f"{where}: non-finite weights (NaN or inf) in {len(bad)} tensor(s): {listed}; the "
                            "checkpoint is damaged or its training diverged: use an earlier checkpoint")


# ------------------------------------------------------------------------------------------
# Keys, shapes and dtypes


class Leaf(NamedTuple):
    """What a saved array must be: its shape, and its dtype when that is checked too (None: any dtype)."""
    shape: tuple[int, ...]
    dtype: str | None = None


def _show(leaf: Leaf) -> str:
    return f"shape {tuple(leaf.shape)}" + (f", {leaf.dtype}" if leaf.dtype else "")


def tree_problems(expected: dict[str, Leaf], found: dict[str, Leaf]) -> list[str]:
    """One line per key that is missing, unexpected, or of another shape or dtype, in the order of `expected`."""
    problems = []
    for key, want in expected.items():
        have = found.get(key)
        if have is None:
            problems.append(f"missing key {key!r} (expected {_show(want)})")
        elif tuple(have.shape) != tuple(want.shape):
            problems.append(f"key {key!r}: expected shape {tuple(want.shape)}, found {tuple(have.shape)}")
        elif want.dtype and have.dtype and want.dtype != have.dtype:
            problems.append(f"key {key!r}: expected dtype {want.dtype}, found {have.dtype}")
    return problems + [f"unexpected key {key!r} with {_show(leaf)}" for key, leaf in found.items() if key not in expected]


def check_tree(expected: dict[str, Leaf], found: dict[str, Leaf], where: str, mismatch: str, fix: str = "") -> None:
    """Raise RunStateError "<where>: <mismatch>:" plus the first SHOWN problems (and `fix`) unless they match."""
    problems = tree_problems(expected, found)
    if problems:
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise RunStateError(f"{where}: {mismatch}:\n  - " + "\n  - ".join(problems[:SHOWN]) + more
                            + (f"\n{fix}" if fix else ""))


def check_param_shapes(config: GPTConfig, shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise RunStateError unless `shapes` has exactly the keys and shapes of `param_table(config)`.

    `where` names the file the shapes came from; every problem is listed with expected vs found.
    """
    check_tree({key: Leaf(tuple(shape)) for key, shape, _ in param_table(config)},
               {key: Leaf(tuple(shape)) for key, shape in shapes.items()}, where,
               f"state dict does not match nanochat {config.generation} GPT with model_config "
               f"{config.model_config()} (padded vocab {config.padded_vocab})")


# ------------------------------------------------------------------------------------------
# Data fingerprint


def data_fingerprint(task) -> dict:
    """{"rows": number of rows, "sha256": of the rows in training order} of a task (GSM8K-format
    rows from a file or the hub; a generated task by its size and its first GENERATED_ROWS rows)."""
    rows = getattr(task, "rows", None)
    if rows is None:
        rows = [task[i] for i in range(min(len(task), GENERATED_ROWS))]
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
    return {"rows": int(task.num_examples()), "sha256": h.hexdigest()}


def check_data(saved: dict | None, now: dict, allow_change: bool) -> str | None:
    """Compare the {split: fingerprint} saved with a checkpoint to the data now. Raises RunStateError
    on a change unless `allow_change`; returns a note to print (or None when nothing is to be said)."""
    if saved is None:
        return "note: the checkpoint has no data fingerprint (saved by an older jaxrl): the data is not checked"
    show = lambda fp: f"{fp['rows']} rows, sha256 {fp['sha256'][:16]}" if fp else "<absent>"
    changed = [f"{split}: saved {show(saved.get(split))}, now {show(now.get(split))}"
               for split in dict.fromkeys([*saved, *now]) if saved.get(split) != now.get(split)]
    if not changed:
        return None
    lines = "\n  - " + "\n  - ".join(changed)
    if allow_change:
        return f"warning: resuming on changed data (allow_data_change):{lines}"
    raise RunStateError(f"cannot resume: the data differs from the data the checkpoint was trained on:{lines}\n"
                        "Resume with the data the run started with, or pass --allow_data_change to go on with "
                        "this data (the run then differs from an uninterrupted one)")
