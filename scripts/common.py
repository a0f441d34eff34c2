"""Shared by the scripts: exiting on a bad input, a task from a name or folder, the nanochat export
of a step, and train_rl's per-step metrics row (the rl-step benchmark logs the very same row).
Loading a policy and the run directory's record live in jaxrl.run_state (load_policy, write_run_record).
"""
from __future__ import annotations

import contextlib
import sys

from jaxrl import tasks
from jaxrl.run_state import RunPaths

@contextlib.contextmanager
def exit_on_bad_input():
    """A bad input found while loading (a damaged checkpoint, an empty data file, a prompt that does not
    fit) ends the script with its message and exit status 1, before the run directory exists."""
    try:
        yield
    except (ValueError, OSError) as e:  # CheckpointError and ConfigError are ValueErrors
        raise SystemExit(f"error: {e}") from None


def open_task(task: str, data_dir, split: str, difficulty: int = 2):
    """gsm8k (hub, or data_dir), arith/demo (built-in generator at `difficulty`, or data_dir), or a folder of jsonl."""
    return tasks.open_task(task, data_dir, split, difficulty=difficulty)


def export_nanochat_or_warn(model_config, params, run_dir, step, info):
    """nanochat-format export to <run_dir>/chatrl_checkpoints/d<n_layer>/model_<step:06d>.pt (+ meta)."""
    try:
        import convert
    except ImportError:
        print(f"warning: torch is not installed, skipping the nanochat export of step {step} "
              "(pip install -e '.[torch]' to enable it)", file=sys.stderr)
        return None
    import jax
    import numpy as np

    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    tag = f"d{model_config.n_layer}"
    out = RunPaths(run_dir).export / tag
    return convert.export_params(model_config, host, out, step, phase="rl", source_info=info.get("source"))


def step_row(model_config, step: int, num_steps: int, res, m, *, reward_s: float, train_s: float,
             lrs: dict | None = None) -> dict:
    """train_rl's metrics row of one RL step: `res` a rollout.RoundResult of this process, `m` the
    fetched rl.StepMetrics, `lrs` the base learning rates (optim.group_lrs keywords; None: nanochat's).
    Reward and length are means over processes, generated tokens/s counts every process."""
    import numpy as np

    from jaxrl import distributed, optim

    row = {"step": step, "event": "step", "phase": "rl",
           "reward": distributed.mean_scalar(float(res.rewards.mean())),
           "seq_len": distributed.mean_scalar(float(np.mean([len(s) for s in res.sequences]))),
           "loss": float(m.loss), "grad_norm": float(m.grad_norm), "tokens": int(m.tokens),
           "logp_mismatch": float(m.logp_mismatch), "rollout_s": res.seconds, "reward_s": reward_s,
           "train_s": train_s, "gen_tokens_per_s": distributed.sum_scalar(res.gen_tokens) / max(res.seconds, 1e-9),
           "skipped": int(m.skipped), "lrm": optim.lr_multiplier(step, num_steps)}
    row.update({f"lr/{g}": lr for g, lr in optim.group_lrs(model_config, step, num_steps=num_steps,
                                                             **(lrs or {})).items()})
    return row


def step_line(row: dict, num_steps: int) -> str:
    """nanochat's step line plus loss, throughput and timings."""
    return (f"Step {row['step']}/{num_steps} | Average reward: {row['reward']:.4f} | Average sequence length: "
            f"{row['seq_len']:.2f} | loss {row['loss']:.6f} | {row['gen_tokens_per_s']:.0f} tok/s | "
            f"rollout {row['rollout_s']:.2f}s train {row['train_s']:.2f}s")
