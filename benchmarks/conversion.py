"""`python scripts/bench.py convert`: nanochat → jaxrl import and jaxrl → nanochat export, time and peak RSS.

Each direction runs in its own Python process (JAX on the CPU: conversion is host work) that
reports its own time and peak RSS (VmHWM), so the peak is that of the conversion process alone,
not of this script; `baseline_rss_mb` is the child's peak after its imports, before converting.
- import: `convert.import_nanochat.main([SRC, "--out", DST])`, exactly the CLI;
- export: `run_state.load_jaxrl_import` (`load_s`, what the trainer does) then
  `convert.export_params` (`export_s`).
The source is the `--checkpoint` (a nanochat path, or a jaxrl import that is exported first), or a
synthetic nanochat checkpoint of the `--model` shape written with torch (random params, nanochat's
GPU dtypes). Needs torch; the caller skips with a message without it.
Test: `pytest tests/test_bench.py -k convert`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

from benchmarks import device as bench_device
from benchmarks.context import random_params
import jaxrl
from jaxrl import run_state

PACKAGES = Path(jaxrl.__file__).resolve().parents[1]  # the folder this process imports jaxrl from

# The peak is read from /proc/self/status VmHWM (KiB): after fork + exec, Linux's ru_maxrss of the
# child also counts the parent's RSS at the fork, which would report this script's memory.
_PEAK = """
import resource
def peak_kb():
    try:
        return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
_IMPORT = _PEAK + """
import json, sys, time
from convert import import_nanochat
base = peak_kb()
t0 = time.perf_counter()
import_nanochat.main([sys.argv[1], "--out", sys.argv[2]])
s = time.perf_counter() - t0
print(json.dumps({"import_s": s, "baseline_kb": base, "peak_kb": peak_kb()}))
"""
_EXPORT = _PEAK + """
import json, sys, time
from convert import export_params
from jaxrl.run_state import load_jaxrl_import
base = peak_kb()
t0 = time.perf_counter()
config, params, info = load_jaxrl_import(sys.argv[1])
t1 = time.perf_counter()
export_params(config, params, sys.argv[2], 1, phase="rl", source_info=info.get("source"))
t2 = time.perf_counter()
print(json.dumps({"load_s": t1 - t0, "export_s": t2 - t1, "baseline_kb": base, "peak_kb": peak_kb()}))
"""


def _child(code: str, *argv: str) -> dict:
    path = os.pathsep.join([str(PACKAGES), os.environ.get("PYTHONPATH", "")])  # jaxrl and convert, as here
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"conversion child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def synthetic_checkpoint(config, out_dir: Path, seed: int) -> Path:
    """nanochat's chatsft layout (<out>/chatsft_checkpoints/d<N>/model_000000.pt + meta) of random params."""
    import convert

    params = jax.tree.map(np.asarray, jax.device_get(random_params(config, seed)))
    ckpt_dir = out_dir / "chatsft_checkpoints" / f"d{config.n_layer}"
    convert.export_params(config, params, ckpt_dir, 0, phase="sft")
    return out_dir


def run(args) -> tuple[dict, list[str], list[list]]:
    with tempfile.TemporaryDirectory(prefix="jaxrl-bench-convert-") as tmp:
        tmp = Path(tmp)
        pre_export = None
        if args.checkpoint and run_state.is_jaxrl_import(args.checkpoint):
            pre_export = _child(_EXPORT, str(args.checkpoint), str(tmp / "nano" / "chatsft_checkpoints" / "d0"))
            src = tmp / "nano"
            model_file = next(src.rglob("model_*.pt"))
            config = run_state.load_jaxrl_import(args.checkpoint)[0]
        elif args.checkpoint:
            src = Path(args.checkpoint)
            model_file = next(iter(sorted(Path(src).rglob("model_*.pt"))), src)
            config = None
        else:
            config = bench_device.nanochat_config(int(args.model[1:]), args.generation, "float32")
            src = synthetic_checkpoint(config, tmp / "nano", args.seed)
            model_file = next(src.rglob("model_*.pt"))
        imported = _child(_IMPORT, str(src), str(tmp / "import"))
        exported = _child(_EXPORT, str(tmp / "import"), str(tmp / "export"))
        config = config or run_state.load_jaxrl_import(tmp / "import")[0]
        checkpoint_mb = model_file.stat().st_size / 2**20
    mb = 2.0**-10
    out = {"rows": None, "import_s": imported["import_s"], "peak_rss_mb": imported["peak_kb"] * mb,
           "baseline_rss_mb": imported["baseline_kb"] * mb, "load_s": exported["load_s"],
           "export_s": exported["export_s"], "export_peak_rss_mb": exported["peak_kb"] * mb,
           "export_baseline_rss_mb": exported["baseline_kb"] * mb,
           "checkpoint_mb": checkpoint_mb,
           "params_f32_mb": bench_device.param_counts(config)[0] * 4 / 2**20, "exported_first": pre_export is not None,
           "shapes": bench_device.shapes(config)}
    table = [["import (nanochat .pt -> jaxrl import)", f"{out['import_s']:.2f}", f"{out['peak_rss_mb']:,.0f}",
              f"{out['baseline_rss_mb']:,.0f}"],
             ["load jaxrl import", f"{out['load_s']:.2f}", "", ""],
             ["export (jaxrl -> nanochat .pt)", f"{out['export_s']:.2f}", f"{out['export_peak_rss_mb']:,.0f}",
              f"{out['export_baseline_rss_mb']:,.0f}"]]
    return out, ["what", "seconds", "peak RSS MB", "RSS after imports MB"], table
