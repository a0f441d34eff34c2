"""Reading and writing nanochat's `.pt` state dicts: the only module of the project that imports torch.

Reading streams: the file is memory-mapped (`torch.load(mmap=True, weights_only=True)`), each
tensor is converted to a float32 numpy array and dropped before the next, and the mapped pages of
a converted tensor are released, so peak memory stays near one float32 copy of the model.

Test: `pytest tests/test_convert.py` (the d20-sized memory check is marked slow).
"""
from __future__ import annotations

import collections
import ctypes
import functools
import mmap
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from jaxrl.run_state import CheckpointError

ORIG_MOD = "_orig_mod."  # prefix torch.compile adds to every key; nanochat strips it
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class StateDictFile:
    """A memory-mapped state dict being consumed key by key."""

    path: Path
    state: dict[str, torch.Tensor]  # keys with the `_orig_mod.` prefix removed
    stripped_prefix: bool  # whether any key carried `_orig_mod.`
    mapped: list[tuple[int, int]]  # address ranges of this file's mapping (for page release)


def open_state_dict(path: Path) -> StateDictFile:
    """Memory-map a torch.save'd {name: tensor} dict, with errors naming the file."""
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... depending on the damage
        first_line = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: not a readable torch checkpoint (truncated, or not written by torch.save "
                              f"of a state dict): {type(e).__name__}: {first_line}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict {{name: tensor}}, found a {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: expected a state dict {{name: tensor}}; entry {bad[0]!r} is a "
                              f"{type(obj[bad[0]]).__name__}")
    stripped = any(k.startswith(ORIG_MOD) for k in obj)
    state = {k.removeprefix(ORIG_MOD): v for k, v in obj.items()}
    if len(state) != len(obj):
        raise CheckpointError(f"{path}: keys collide after removing the {ORIG_MOD!r} prefix")
    return StateDictFile(path, state, stripped, _file_mappings(path))


def tensor_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def tensor_dtypes(state: dict[str, torch.Tensor], path: Path) -> dict[str, str]:
    """{key: dtype name}; only the floating dtypes nanochat saves (and float16) are accepted."""
    names = {v: k for k, v in DTYPES.items()}
    out = {}
    for key, t in state.items():
        if t.dtype not in names:
            raise CheckpointError(f"{path}: key {key!r} has dtype {t.dtype}; expected one of {', '.join(DTYPES)}")
        out[key] = names[t.dtype]
    return out


def pop_as_float32(sdf: StateDictFile, key: str) -> np.ndarray:
    """Remove `key` from the file's dict and return it as a fresh float32 array (exact for bf16/fp16)."""
    t = sdf.state.pop(key)
    if t.dtype == torch.float32:
        arr = t.numpy().copy()
    else:
        arr = t.to(torch.float32).numpy()  # a fresh buffer owned by the new tensor
    _release_pages(t, sdf.mapped)
    del t
    return arr


def write_state_dict(path: Path, tensors: dict[str, np.ndarray], dtypes: dict[str, str]) -> None:
    """torch.save {key: tensor in dtypes[key]} (in the given key order) atomically: temp file + rename."""
    state = collections.OrderedDict()  # the type nn.Module.state_dict() returns
    with warnings.catch_warnings():  # read-only arrays (from jax) are fine: torch.save only reads them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for key, arr in tensors.items():
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            state[key] = t.to(DTYPES[dtypes[key]])
    # torch.save names the zip's top-level folder after the file stem, so save under the final
    # name inside a temporary directory (same filesystem) and rename it into place.
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        torch.save(state, tmp_dir / path.name)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps `path` (Linux /proc/self/maps; empty elsewhere)."""
    target = str(Path(path).resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].strip() == target:
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return ranges


def _release_pages(t: torch.Tensor, mapped: list[tuple[int, int]]) -> None:
    """Drop a converted tensor's pages of the file mapping (Linux madvise MADV_DONTNEED).

    The mapping lives until the last tensor of the file is freed, so without this the whole file
    would count in the process's memory next to the float32 copy. Only whole pages inside both
    the tensor and this file's mapping are released; clean file pages are re-read from disk if
    touched again, so this never changes data.
    """
    if not mapped or not hasattr(mmap, "MADV_DONTNEED") or t.numel() == 0:
        return
    page = mmap.PAGESIZE
    start = t.untyped_storage().data_ptr()
    end = start + t.untyped_storage().nbytes()
    first, last = -(-start // page) * page, (end // page) * page
    if last > first and any(lo <= first and last <= hi for lo, hi in mapped):
        _libc().madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), ctypes.c_int(mmap.MADV_DONTNEED))


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)
