"""The names on disk of everything jaxrl writes, and the one error class of the run state.

`RunPaths(dir)` names every path of a train_rl run directory and of a jaxrl import directory
(both hold model.json and tokenizer/; a run adds checkpoints/ and its logs, an import params/).
No other module spells these names. The layout is described in jaxrl/run_state/__init__.py.

Test: `python -m pytest -q tests/test_run_state.py`.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.pkl", "token_bytes.pt")  # what nanochat keeps in <base>/tokenizer
STATE, META = "state", "meta"  # the two orbax items of a checkpoint step
CONFIG_TOML = "config.toml"  # beside the checkpoints and in each step: the resolved config, for people to read
CHECKSUMS = "checksums.json"  # in each step, written last


class RunStateError(ValueError):
    """A run directory, a checkpoint, an import directory or a nanochat file cannot be used as asked
    (missing, damaged, of another shape, held by another run); the message names the path and the fix."""


CheckpointError = RunStateError  # the name convert/ and the tests catch; one class, two names


@dataclasses.dataclass(frozen=True)
class RunPaths:
    """Every path of a jaxrl directory `root`: a train_rl run directory <out_dir>/<run>, or an import."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    model_json = property(lambda self: self.root / MODEL_JSON)  # model_config, generation, source record
    tokenizer = property(lambda self: self.root / TOKENIZER_DIR)  # nanochat's tokenizer.pkl (+ token_bytes.pt)
    params = property(lambda self: self.root / PARAMS_DIR)  # an import: orbax tree of the float32 params
    config = property(lambda self: self.root / CONFIG_TOML)  # the run's resolved config
    checkpoints = property(lambda self: self.root / "checkpoints")  # <step>/{state,meta,config.toml,checksums.json}
    damaged = property(lambda self: self.root / "damaged_checkpoints")  # steps a resume found damaged, kept
    export = property(lambda self: self.root / "chatrl_checkpoints")  # nanochat export: d<n_layer>/model_<step>.pt
    metrics = property(lambda self: self.root / "metrics.jsonl")
    tensorboard = property(lambda self: self.root / "tensorboard")
    lock = property(lambda self: self.root / "run.lock")  # pid, host and start time of the run using it

    def step(self, step: int) -> Path:
        """The folder of checkpoint `step`."""
        return self.checkpoints / str(int(step))


def is_jaxrl_import(path: str | os.PathLike) -> bool:
    """True if `path` is a directory holding model.json and params/ (an import or trainer checkpoint)."""
    p = RunPaths(path)
    return p.model_json.is_file() and p.params.is_dir()


def is_run_dir(path: str | os.PathLike) -> bool:
    """True if `path` is a train_rl run directory: model.json and checkpoints/."""
    p = RunPaths(path)
    return p.model_json.is_file() and p.checkpoints.is_dir()


def replace_dir(tmp: Path, dst: Path) -> None:
    """Rename tmp onto dst; an existing dst is moved aside first and deleted after the swap."""
    if not dst.exists():
        tmp.rename(dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    dst.rename(old)
    tmp.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
