"""`python scripts/bench.py train` and `rl-step`: the REINFORCE update alone, and one whole RL step.

train: a random (rows, seq_len) batch (the first third of each row untrained, as a prompt is; random
advantages) through the REINFORCE forward+backward (`rl.grads_and_metrics`, jitted) in chunks of
`--chunk-rows` rows (default `--device-batch-size`, as train_rl runs it; gradients accumulated over
a scan): `tokens_per_s`, `mfu`; and with the whole batch in one chunk (`*_one_pass`; null where it
does not fit in memory). Then the optimizer update alone and the whole `rl.compiled_train_step`.
FLOPs = tokens × (6·N_matmul + 12·n_layer·n_embd·(T+1)/2); padded tokens count (they are computed).

rl-step: the composition of scripts/train_rl.py (rollout.run_round → make_batch → global_batch →
compiled_train_step → metrics row and MetricsWriter) for 1 warm-up + `--repeats` steps, split into
rollout (sampling, assembly), reward (task rewards + batch building and transfer), train (update
+ metrics fetch) and logging. Steps that traced anything new (a new prompt or sequence-length
bucket) are counted in `recompiles` and left out of the medians (`step_s_all` keeps them).
Test: `pytest tests/test_bench.py -k "train or rl_step"`.
"""
from __future__ import annotations

import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bench_device
import bench_profile
import common
from bench_setup import make_tool
from jaxrl import optim, rl, rollout, sampler, sharding
from jaxrl.metrics import MetricsWriter


def random_batch(config, rows: int, seq_len: int, seed: int) -> rl.Batch:
    rng = np.random.default_rng(seed)
    high = config.vocab_size - 9  # no special tokens
    inputs = rng.integers(0, high, (rows, seq_len), dtype=np.int32)
    targets = rng.integers(0, high, (rows, seq_len), dtype=np.int32)
    targets[:, : seq_len // 3] = -1
    adv = rng.standard_normal(rows).astype(np.float32)
    return rl.Batch(inputs, targets, adv, np.zeros((rows, seq_len), np.float32))


def _first_and_median(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    return first, bench_device.median_time(fn, repeats)[0]


def run_train(ctx, args, ceil: dict) -> tuple[dict, list[str], list[list]]:
    config, mesh = ctx.config, ctx.mesh
    rows, T = args.rows, args.seq_len
    local = rows // sharding.data_size(mesh)
    chunk = args.chunk_rows or args.device_batch_size
    if rows % sharding.data_size(mesh) or local % chunk or local % args.device_batch_size:
        raise SystemExit(f"--rows {rows} must split into {sharding.data_size(mesh)} device(s) x whole chunks of "
                         f"--chunk-rows {chunk} and whole passes of --device-batch-size {args.device_batch_size}")
    batch = rl.global_batch(random_batch(config, rows, T, args.seed), mesh, pad_id=0, chunk=chunk)
    flops = bench_device.train_flops_per_token(config, T) * rows * T
    out = {"rows": rows, "seq_len": T, "tokens": rows * T, "flops_per_step": flops,
           "device_batch_size": args.device_batch_size, "chunk_rows": args.chunk_rows or args.device_batch_size}
    table, dbs, fns = [], args.device_batch_size, []
    for suffix, c in (("", chunk), ("_one_pass", local))[: 1 if local == chunk else 2]:
        spec = rl.LossSpec(device_batch_size=dbs, num_passes=local // dbs, examples_per_step=1, chunk_rows=c)
        fn = jax.jit(functools.partial(rl.grads_and_metrics, config, spec, mesh))
        fns.append(fn)
        try:
            first, s = _first_and_median(lambda: fn(ctx.params, batch), args.repeats)
        except jax.errors.JaxRuntimeError as e:  # one pass of a large batch may not fit: report, go on
            if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
                raise
            out.update({f"fwdbwd_s{suffix}": None, f"tokens_per_s{suffix}": None, f"mfu{suffix}": None,
                        f"compile_s{suffix}": None, f"error{suffix}": "out of memory"})
            table.append([f"fwd+bwd, {local // c} chunk(s) of {c} rows", "out of memory", "", "", ""])
            continue
        out.update({f"fwdbwd_s{suffix}": s, f"tokens_per_s{suffix}": rows * T / s,
                    f"mfu{suffix}": flops / s / ceil["flops_per_s"], f"compile_s{suffix}": max(first - s, 0.0)})
        table.append([f"fwd+bwd, {local // c} chunk(s) of {c} rows", f"{s:.3f}", f"{rows * T / s:,.0f}",
                      f"{100 * flops / s / ceil['flops_per_s']:.1f}%", f"{max(first - s, 0.0):.1f}"])
    if local == chunk:  # one chunk is the whole batch: the same program
        out.update({f"{k}_one_pass": out[k] for k in ("fwdbwd_s", "tokens_per_s", "mfu", "compile_s")})
    grads = fns[0](ctx.params, batch)[0]
    spec = rl.LossSpec(device_batch_size=dbs, num_passes=local // dbs, examples_per_step=1, chunk_rows=chunk)
    optimizer = optim.build_optimizer(config, num_steps=100)
    opt_state = jax.jit(optimizer.init)(ctx.params)

    def apply(p, st, g):
        updates, st = optimizer.update(g, st, p)
        return optax.apply_updates(p, updates), st

    upd = jax.jit(apply)
    first, opt_s = _first_and_median(lambda: upd(ctx.params, opt_state, grads), args.repeats)
    table.append(["optimizer update", f"{opt_s:.3f}", "", "", f"{max(first - opt_s, 0.0):.1f}"])
    step_s = _time_train_step(ctx, optimizer, spec, batch, args.repeats)
    table.append([f"whole train step (chunks of {chunk} rows)", f"{step_s:.3f}",
                  f"{rows * T / step_s:,.0f}", f"{100 * flops / step_s / ceil['flops_per_s']:.1f}%", ""])
    out.update(optimizer_s=opt_s, train_step_s=step_s, step_tokens_per_s=rows * T / step_s,
               step_mfu=flops / step_s / ceil["flops_per_s"])
    if args.profile:
        out["profile"] = [bench_profile.profile(args.profile, "train_fwdbwd", lambda: fns[0](ctx.params, batch)),
                          bench_profile.profile(args.profile, "train_optimizer",
                                                lambda: upd(ctx.params, opt_state, grads))]
    return out, ["what", "seconds", "tokens/s", "MFU", "compile s"], table


def _time_train_step(ctx, optimizer, spec, batch, repeats: int) -> float:
    """Median seconds of rl.compiled_train_step (donating), on copies of the params."""
    step = rl.compiled_train_step(ctx.config, spec, optimizer, ctx.mesh)
    # inputs sharded like the step's outputs (as train_rl places them), or the 2nd call recompiles
    params = jax.device_put(jax.tree.map(jnp.copy, ctx.params), sharding.replicated(ctx.mesh))
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.replicated(ctx.mesh))(params)
    params, opt_state, m = step(params, opt_state, batch)
    jax.block_until_ready(m)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        params, opt_state, m = step(params, opt_state, batch)
        jax.block_until_ready((params, m))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


# ------------------------------------------------------------------------------------------
# rl-step


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
    specials = sampler.SpecialIds.from_tokenizer(tok)
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
        writer = MetricsWriter(run_dir, "dummy", {})

        def one_step(step: int) -> dict:
            nonlocal params, opt_state, train_len
            compiled_before = (sampler.TRACE_COUNTS.get("rollout", 0), rl.TRACE_COUNTS.get("train_step", 0))
            task.seconds, tool_s = 0.0, (tool.seconds if tool else 0.0)
            t0 = time.perf_counter()
            questions = np.arange(step * Q, (step + 1) * Q) % len(task)
            res = rollout.run_round(config, params, tokenizer=tok, task=task, indices=questions, args=sargs, tool=tool,
                                    step=step, mesh=mesh)
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
        profiles = [bench_profile.profile(args.profile, "rl_step", lambda: one_step(num_steps))] if args.profile else []
        writer.close()
    out, headers, table = _rl_figures(steps, Q, S, M, dbs, ctx, ceil)
    if profiles:
        out["profile"] = profiles
    return out, headers, table


def _log_step(writer, config, step, num_steps, res, m, reward_s, train_s):
    """train_rl's per-step metrics row, printed and written (the `logging` part of a step)."""
    row = common.step_row(config, step, num_steps, res, m, reward_s=reward_s, train_s=train_s)
    writer.log(row)
    print(common.step_line(row, num_steps), flush=True)


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
