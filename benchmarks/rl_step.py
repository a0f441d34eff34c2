"""`python scripts/bench.py rl-step`: one whole RL step, timed part by part.

The composition of scripts/train_rl.py (rollout.run_round → make_batch → global_batch →
compiled_train_step → metrics row and MetricsWriter) for 1 warm-up + `--repeats` steps, split into
rollout (sampling, assembly), reward (task rewards + batch building and transfer), train (update
+ metrics fetch) and logging. Steps that traced anything new (a new prompt or sequence-length
bucket) are counted in `recompiles` and left out of the medians (`step_s_all` keeps them).
Test: `pytest tests/test_bench.py -k rl-step`.
"""
from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device as bench_device
from benchmarks import profiling
from benchmarks.context import make_tool
from jaxrl import metrics, optim, rl, rollout, sampler, sharding
from jaxrl.tokenizer import SpecialIds


class TimedTask:
    """The task, with the seconds spent in `reward` summed (run_round scores inside its own timer)."""

    def __init__(self, task):
        self.task, self.seconds = task, 0.0

    def __len__(self):
        return len(self.task)

    def __getitem__(self, i):
        return self.task[i]

    def reward(self, conversation, completion):
        t0 = time.perf_counter()
        r = self.task.reward(conversation, completion)
        self.seconds += time.perf_counter() - t0
        return r


def run_rl_step(ctx, args, ceil: dict) -> tuple[dict, list[str], list[list]]:
    config, mesh, tok = ctx.config, ctx.mesh, ctx.tokenizer
    Q, S, M = args.questions, args.num_samples, args.max_new_tokens
    dbs = min(args.device_batch_size, S)
    if S % dbs:
        raise SystemExit(f"--num-samples {S} must be a multiple of --device-batch-size {dbs}")
    specials = SpecialIds.from_tokenizer(tok)
    tool = None if args.no_tool else make_tool(ctx, M + 2)
    task = TimedTask(ctx.task)
    num_steps = 1 + args.repeats
    optimizer = optim.build_optimizer(config, num_steps=num_steps + bool(args.profile))
    params = jax.device_put(jax.tree.map(jnp.copy, ctx.params), sharding.replicated(mesh))
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.replicated(mesh))(params)
    loss_spec = rl.LossSpec(device_batch_size=dbs, num_passes=S // dbs, examples_per_step=Q, chunk_rows=args.chunk_rows)
    train_step = rl.compiled_train_step(config, loss_spec, optimizer, mesh)
    sargs = rollout.SamplingArgs(S, M, args.temperature, args.top_k, args.seed)
    train_len = 0
    with tempfile.TemporaryDirectory() as run_dir:
        writer = metrics.MetricsWriter(run_dir, "dummy", {})

        def one_step(step: int) -> dict:
            nonlocal params, opt_state, train_len
            compiled_before = (sampler.TRACE_COUNTS.get("rollout", 0), rl.TRACE_COUNTS.get("train_step", 0))
            task.seconds, tool_s = 0.0, (tool.seconds if tool else 0.0)
            t0 = time.perf_counter()
            questions = np.arange(step * Q, (step + 1) * Q) % len(task)
            res = rollout.run_round(config, params, tokenizer=tok, task=task, indices=questions, args=sargs, tool=tool,
                                    step=step, mesh=mesh, slots=args.slots)
            t1 = time.perf_counter()
            batch = rollout.make_batch(res, S, specials.assistant_end)
            batch = rl.global_batch(batch, mesh, pad_id=specials.assistant_end, chunk=loss_spec.chunk_rows,
                                    min_len=train_len, group=S)
            train_len = batch.inputs.shape[1]
            t2 = time.perf_counter()
            params, opt_state, m = train_step(params, opt_state, batch)
            m = jax.device_get(m)
            t3 = time.perf_counter()
            _log_step(writer, config, step, num_steps, res, m, t2 - t1, t3 - t2)
            t4 = time.perf_counter()
            recompiled = compiled_before != (sampler.TRACE_COUNTS.get("rollout", 0), rl.TRACE_COUNTS.get("train_step", 0))
            return {"step_s": t4 - t0, "rollout_s": t1 - t0 - task.seconds, "reward_s": task.seconds + t2 - t1,
                    "train_s": t3 - t2, "logging_s": t4 - t3, "gen_tokens": res.gen_tokens,
                    "train_tokens": int(np.sum(jax.device_get(batch.bins))) * train_len,
                    "seq_len": int(batch.inputs.shape[1]),
                    "tool_host_s": (tool.seconds if tool else 0.0) - tool_s, "recompiled": recompiled}

        steps = [one_step(step) for step in range(num_steps)]
        # one more step, untimed, under the profiler (the optimizer's schedule has room for it)
        profiles = [profiling.profile(args.profile, "rl_step", lambda: one_step(num_steps))] if args.profile else []
        writer.close()
    out, headers, table = _rl_figures(steps, Q, S, M, dbs, ctx, ceil)
    if profiles:
        out["profile"] = profiles
    return out, headers, table


def _log_step(writer, config, step, num_steps, res, m, reward_s, train_s):
    """train_rl's per-step metrics row, printed and written (the `logging` part of a step)."""
    row = metrics.step_row(config, step, num_steps, res, m, reward_s=reward_s, train_s=train_s)
    writer.log(row)
    print(metrics.step_line(row, num_steps), flush=True)


def _rl_figures(steps, Q, S, M, dbs, ctx, ceil):
    """Medians over the timed steps that compiled nothing (all timed steps if every one did)."""
    timed = steps[1:] or steps
    steady = [s for s in timed if not s["recompiled"]] or timed
    med = {k: float(np.median([s[k] for s in steady])) for k in
           ("step_s", "rollout_s", "reward_s", "train_s", "logging_s", "gen_tokens", "train_tokens", "tool_host_s")}
    seq_len = int(np.median([s["seq_len"] for s in steady]))
    train_flops = bench_device.train_flops_per_token(ctx.config, seq_len) * med["train_tokens"]
    out = {"questions": Q, "num_samples": S, "rows": Q * S, "max_new_tokens": M, "device_batch_size": dbs,
           **med, "train_seq_len": seq_len, "rollout_tokens_per_s": med["gen_tokens"] / med["rollout_s"],
           "train_tokens_per_s": med["train_tokens"] / med["train_s"],
           "train_mfu": train_flops / med["train_s"] / ceil["flops_per_s"],
           "compile_s": max(steps[0]["step_s"] - med["step_s"], 0.0), "steps_timed": len(timed),
           "steps_steady": len(steady), "recompiles": int(sum(s["recompiled"] for s in timed)),
           "step_s_all": float(np.median([s["step_s"] for s in timed])), "per_step": steps}
    table = [[i, f"{s['step_s']:.2f}", f"{s['rollout_s']:.2f}", f"{s['reward_s']:.3f}", f"{s['train_s']:.2f}",
              f"{s['logging_s']:.3f}", s["gen_tokens"], f"{s['gen_tokens'] / s['rollout_s']:,.0f}",
              "warm-up" if i == 0 else ("yes" if s["recompiled"] else "")] for i, s in enumerate(steps)]
    table.append(["median (no compile)", f"{med['step_s']:.2f}", f"{med['rollout_s']:.2f}", f"{med['reward_s']:.3f}",
                  f"{med['train_s']:.2f}", f"{med['logging_s']:.3f}", f"{med['gen_tokens']:.0f}",
                  f"{out['rollout_tokens_per_s']:,.0f}", ""])
    headers = ["step", "step s", "rollout s", "reward s", "train s", "logging s", "gen tokens", "rollout tok/s",
               "compiled"]
    return out, headers, table
