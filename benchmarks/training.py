"""`python scripts/bench.py train`: the REINFORCE update alone (forward+backward, optimizer, whole step).

A random (rows, seq_len) batch (the first third of each row untrained, as a prompt is; random
advantages) through the REINFORCE forward+backward (`rl.grads_and_metrics`, jitted) in chunks of
`--chunk-rows` rows (default `--device-batch-size`, as train_rl runs it; gradients accumulated over
a scan): `tokens_per_s`, `mfu`; and with the whole batch in one chunk (`*_one_pass`; null where it
does not fit in memory). Then the optimizer update alone and the whole `rl.compiled_train_step`.
FLOPs = tokens × (6·N_matmul + 12·n_layer·n_embd·(T+1)/2); padded tokens count (they are computed).

Test: `pytest tests/test_bench.py -k train`.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import device as bench_device
from benchmarks import profiling
from jaxrl import optim, rl, sharding


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
    local = rows // sharding.row_shards(mesh)
    chunk = args.chunk_rows or args.device_batch_size
    if rows % sharding.row_shards(mesh) or local % chunk or local % args.device_batch_size:
        raise SystemExit(f"--rows {rows} must split into {sharding.row_shards(mesh)} device(s) x whole chunks of "
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
        out["profile"] = [profiling.profile(args.profile, "train_fwdbwd", lambda: fns[0](ctx.params, batch)),
                          profiling.profile(args.profile, "train_optimizer",
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
