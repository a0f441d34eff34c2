"""Run logging: `print0`, one writer for metrics.jsonl, TensorBoard events and (optionally) wandb,
and train_rl's per-step row (`step_row`, `step_line`; the rl-step benchmark logs the very same row).

Every row is a flat dict of scalars with `step`, `event` ("step" or "eval") and `phase`
("warmstart" or "rl"). Only process 0 writes. wandb is used only when the run name is not
"dummy" and wandb is importable, as nanochat's DummyWandb rule.

Test: `pytest tests/test_demo.py` (checks the files a run leaves) and `tests/test_bench.py -k rl-step`.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax
import numpy as np

from jaxrl import distributed, optim

from jaxrl.run_state.paths import RunPaths


def is_main() -> bool:
    return jax.process_index() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def _clean(value):
    """JSON-safe scalar: numpy/jax scalars to Python, non-finite floats kept as strings."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsWriter:
    """Appends rows to <run_dir>/metrics.jsonl and TensorBoard; a no-op on processes other than 0."""

    def __init__(self, run_dir: str | Path, run_name: str = "dummy", config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.active = is_main()
        self._tb = self._wandb = None
        if not self.active:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(RunPaths(self.run_dir).metrics, "a", encoding="utf-8")
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(RunPaths(self.run_dir).tensorboard))
        except ImportError:  # tensorboardX is a core dependency; tolerate its absence anyway
            print0("tensorboardX is not installed: no TensorBoard events")
        if run_name != "dummy":
            try:
                import wandb

                self._wandb = wandb.init(project="jaxrl", name=run_name, config=config or {})
            except Exception as e:  # wandb missing or not logged in: jsonl and TensorBoard still work
                print0(f"wandb disabled ({type(e).__name__}: {e})")

    def log(self, row: dict):
        if not self.active:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        step = int(row.get("step", 0))
        prefix = f"{row.get('phase', 'rl')}/{row.get('event', 'step')}/"
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                if self._tb is not None:
                    self._tb.add_scalar(prefix + k, v, step)
        if self._tb is not None:
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=step)

    def close(self):
        if not self.active:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of <run_dir>/metrics.jsonl (a truncated last line from a killed run is skipped)."""
    rows = []
    path = RunPaths(run_dir).metrics
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def write_metrics(run_dir: str | Path, rows: list[dict]) -> None:
    """Replace <run_dir>/metrics.jsonl with `rows` atomically (a temp file, then a rename)."""
    path = RunPaths(run_dir).metrics
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    os.replace(tmp, path)


def step_row(model_config, step: int, num_steps: int, res, m, *, reward_s: float, train_s: float,
             lrs: dict | None = None) -> dict:
    """train_rl's metrics row of one RL step: `res` a rollout.RoundResult of this process, `m` the
    fetched rl.StepMetrics, `lrs` the base learning rates (optim.group_lrs keywords; None: nanochat's).
    Reward and length are means over processes, generated tokens/s counts every process."""
    row = {"step": step, "event": "step", "phase": "rl",
           "reward": distributed.mean_scalar(float(res.rewards.mean())),
           "seq_len": distributed.mean_scalar(float(np.mean([len(s) for s in res.sequences]))),
           "loss": float(m.loss), "grad_norm": float(m.grad_norm), "tokens": int(m.tokens),
           "logp_mismatch": float(m.logp_mismatch), "rollout_s": res.seconds, "reward_s": reward_s,
           "train_s": train_s, "gen_tokens_per_s": distributed.sum_scalar(res.gen_tokens) / max(res.seconds, 1e-9),
           "slot_utilization": res.slot_utilization(),
           "skipped": int(m.skipped), "lrm": optim.lr_multiplier(step, num_steps)}
    row.update({f"lr/{g}": lr for g, lr in optim.group_lrs(model_config, step, num_steps=num_steps,
                                                             **(lrs or {})).items()})
    return row


def step_line(row: dict, num_steps: int) -> str:
    """nanochat's step line plus loss, throughput and timings."""
    return (f"Step {row['step']}/{num_steps} | Average reward: {row['reward']:.4f} | Average sequence length: "
            f"{row['seq_len']:.2f} | loss {row['loss']:.6f} | {row['gen_tokens_per_s']:.0f} tok/s | "
            f"rollout {row['rollout_s']:.2f}s train {row['train_s']:.2f}s")
