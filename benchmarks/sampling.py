"""`python scripts/bench.py sampler`: rollout speed of jaxrl.sampler.sample at several batch sizes.

Per configuration (P prompts × S samples = R rows), each timed after a compiling first call:
- `gen_tokens_per_s`: tokens kept by the sampler (sampled + forced) / the whole `sample` call
  (prefill, decode loop, transfer back), median of `--repeats` calls with one seed;
- `prefill_tokens_per_s`: prompt tokens / `model.prefill` jitted alone on the same padded prompts;
- `ttft_s`: prefill + one decode step (decode time = call − prefill, over the decode steps): when
  the first token has been sampled and fed back. The host sees tokens only when the call returns
  (no streaming), so a caller waits `call_s` whatever the count;
- `compile_s`: first call − median call;
- tool: callbacks, host seconds inside them, and the time per decode step against the same call
  with no tool (`tool_overhead_frac`);
- `mbu`: decode steps × bytes one step must read / (call − prefill time) / the device's bandwidth;
  bytes = weights in the compute dtype + prompt keys and values once per prompt (the sampler
  shares them across a prompt's samples; with slots, once per slot) + each decoded row's
  generated keys and values (mean count);
- `slot_utilization`: kept tokens / (decode steps × rows decoded in each): 1 when no decoded row
  is idle or past its end (`--slots`: rows decoded at once, a finished row's slot going to the next).
Test: `pytest tests/test_bench.py -k sampler`.
"""
from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from benchmarks import device as bench_device
from benchmarks import profiling
from benchmarks.context import make_tool
from jaxrl import decode, sampler
from jaxrl.tokenizer import SpecialIds


def configurations(args) -> list[tuple[int, int]]:
    """(prompts, samples) pairs: the one given by --prompts/--num-samples, else the --rows sweep."""
    if args.prompts or args.num_samples:
        return [(args.prompts or 1, args.num_samples or 1)]
    out = []
    for rows in args.rows:
        samples = min(rows, 16)
        if rows % samples:
            raise SystemExit(f"--rows {rows}: rows above 16 must be a multiple of 16 (prompts x 16 samples)")
        out.append((rows // samples, samples))
    return out


def special_ids(ctx, ignore_eos: bool) -> SpecialIds:
    specials = SpecialIds.from_tokenizer(ctx.tokenizer)
    if ignore_eos:  # an id outside the vocabulary is never sampled: every row runs to max_new_tokens
        never = ctx.config.vocab_size
        specials = dataclasses.replace(specials, bos=never, assistant_end=never)
    return specials


def time_prefill(ctx, prompts, repeats: int) -> float:
    """Median seconds of the sampler's prefill alone on the same left-padded prompt block."""
    ids, pad = sampler.left_pad(prompts)
    fn = jax.jit(decode.prefill, static_argnums=(0, 4))
    run = lambda: fn(ctx.config, ctx.params, ids, pad, ids.shape[1])  # noqa: E731
    jax.block_until_ready(run())
    return bench_device.median_time(run, repeats)[0]


def run_one(ctx, args, P: int, S: int, ceil: dict) -> dict:
    prompts = [ctx.tokenizer.render_for_completion(ctx.task[i]) for i in range(P)]
    tool = None if args.no_tool else make_tool(ctx, args.max_new_tokens + 2)
    specials = special_ids(ctx, args.ignore_eos)

    def call(max_new_tokens=args.max_new_tokens, tool=tool):
        """(Rollout, prompt lengths, the sampler's stats)"""
        stats = {}
        return (*sampler.sample(ctx.config, ctx.params, prompts, num_samples=S, max_new_tokens=max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k, seed=args.seed, tool=tool,
                                specials=specials, mesh=ctx.mesh, slots=args.slots, stats=stats), stats)

    t0 = time.perf_counter()
    call()
    first_s = time.perf_counter() - t0
    if tool is not None:
        tool.reset()
    results = []
    call_s, _ = bench_device.median_time(lambda: results.append(call()), args.repeats)
    ro, lengths, stats = results[-1]
    tool_stats = None if tool is None else (tool.callbacks, tool.expressions, tool.seconds)
    gen = int(ro.length.sum())
    steps = stats["decode_steps"]
    prefill_s = time_prefill(ctx, prompts, args.repeats)
    decode_s = max(call_s - prefill_s, 1e-9)
    out = {"prompts": P, "num_samples": S, "rows": P * S, "prompt_len_mean": float(np.mean(lengths)),
           "gen_tokens": gen, "decode_steps": steps, "row_steps": stats["row_steps"],
           "slot_utilization": stats["slot_utilization"], "call_s": call_s, "gen_tokens_per_s": gen / call_s,
           "prefill_s": prefill_s, "prefill_tokens_per_s": float(np.sum(lengths)) / prefill_s,
           "ttft_s": prefill_s + decode_s / steps,
           "compile_s": max(first_s - call_s, 0.0)}
    out.update(tool_figures(call, tool_stats, type(tool.bridge).__name__ if tool else "none", steps, decode_s,
                            prefill_s, args.repeats))
    rows_step = stats["row_steps"] / steps  # rows decoded per step (fewer with slots or compaction)
    out["slots"] = stats["slots"]  # per device, as decoded; 0: every row decoded from the start
    prompt_reads = rows_step if out["slots"] else P  # a slot reads its own
    bytes_step = bench_device.decode_bytes_per_step(ctx.config, prompt_reads, rows_step, out["prompt_len_mean"],
                                                    (steps + 1) / 2)
    achieved = steps * bytes_step / decode_s
    out.update(decode_s=decode_s, bytes_per_step=bytes_step, achieved_bytes_per_s=achieved,
               mbu=achieved / ceil["bytes_per_s"])
    if args.profile:
        out["profile"] = profiling.profile(args.profile, f"sampler_{P}x{S}", call)
    return out


def tool_figures(call, stats, name: str, steps: int, decode_s: float, prefill_s: float, calls_seen: int) -> dict:
    """Tool callbacks and host seconds per call, and the cost per decode step against no tool.

    Per step, not per token: without the calculator the model writes other completions (other
    lengths), but every step computes all rows whatever they hold.
    """
    if stats is None:
        return {"tool": "none", "tool_callbacks": 0.0, "tool_expressions": 0.0, "tool_host_s": 0.0,
                "notool_step_s": decode_s / steps, "tool_overhead_frac": 0.0}
    callbacks, expressions, seconds = (x / calls_seen for x in stats)
    call(tool=None)
    results = []
    notool_s, _ = bench_device.median_time(lambda: results.append(call(tool=None)), calls_seen)
    notool_steps = results[-1][2]["decode_steps"]
    notool_step_s = max(notool_s - prefill_s, 1e-9) / notool_steps
    return {"tool": name, "tool_callbacks": callbacks, "tool_expressions": expressions, "tool_host_s": seconds,
            "notool_step_s": notool_step_s, "tool_overhead_frac": (decode_s / steps) / notool_step_s - 1.0}


def run(ctx, args, ceil: dict) -> tuple[dict, list[str], list[list]]:
    """Every configuration; the record's top-level figures are the last (largest) one's."""
    results = [run_one(ctx, args, P, S, ceil) for P, S in configurations(args)]
    profiles = [r.pop("profile") for r in results if "profile" in r]
    figures = dict(results[-1], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   ignore_eos=args.ignore_eos, sweep=results if len(results) > 1 else [])
    if profiles:
        figures["profile"] = profiles
    headers = ["rows", "PxS", "gen tok/s", "prefill tok/s", "TTFT s", "compile s", "tool cb/call", "tool host s",
               "tool overhead", "MBU"]
    table = [[r["rows"], f"{r['prompts']}x{r['num_samples']}", f"{r['gen_tokens_per_s']:,.0f}",
              f"{r['prefill_tokens_per_s']:,.0f}", f"{r['ttft_s']:.3f}", f"{r['compile_s']:.1f}",
              f"{r['tool_callbacks']:.1f}", f"{r['tool_host_s']:.4f}", f"{100 * r['tool_overhead_frac']:+.1f}%",
              f"{100 * r['mbu']:.1f}%"] for r in results]
    return figures, headers, table
