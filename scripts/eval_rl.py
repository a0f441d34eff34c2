"""pass@k of any policy on a GSM8K-format task, sampled as nanochat's Engine does (calculator on).

    python scripts/eval_rl.py --checkpoint PATH [--task gsm8k|arith|<jsonl dir>] [--num-samples 8]
        [--max-examples N] [--temperature 1.0] [--slots S] [--cpu-devices D] [--json OUT]

PATH is a jaxrl import, a jaxrl run directory (its latest checkpoint), or anything nanochat writes
(a base dir, a checkpoint dir, a model_<step>.pt; read through convert/, which needs torch).
`--task arith` is the built-in generator (at --difficulty) unless --data-dir is given; a directory
is read as GSM8K-format train/test jsonl. Questions are the first --max-examples of the split, in
the task's order (nanochat's seed-42 shuffle for jsonl), each sampled with the same keys unless
--independent-keys, as nanochat seeds 42 per question. Prints nanochat's `Pass@k` lines: the
fraction of questions solved by one of the FIRST k samples (nanochat's estimator), then the
unbiased estimate (Chen et al. 2021) with a 95% interval over questions. `--json` also writes, in
the task's order, `per_question` = [{index, question, correct (int, of --num-samples), first_correct,
samples (each sample's outcome)}], the schema of nanochat's Engine reference files plus `samples`,
so two runs can be paired question by question. Rows (questions x samples, --batch-rows per
sampler call) are split over the devices (on a CPU host, one device per core: --cpu-devices) and
decode in --slots rows per device at a time, each slot taking the next row as its row ends; the
tokens are the same for any --slots (0: all rows of a call at once) and any device count. The
share of decoded row-steps that kept a token goes to stderr and the JSON (`slot_utilization`).
Bad values and an unwritable --json are refused before anything runs (docs/errors.md lists every
check).
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

from jaxrl.config import GENERATIONS, ConfigError, check_writable_dir  # (no jax import yet)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="jaxrl import, jaxrl run dir, or nanochat checkpoint")
    p.add_argument("--task", default="gsm8k", help='"gsm8k", "arith" (built in), or a folder of GSM8K-format jsonl')
    p.add_argument("--data-dir", default=None, help="local train/test jsonl for a named task")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--difficulty", type=int, default=2, help="built-in arith task: most calculator steps (1-3)")
    p.add_argument("--num-samples", type=int, default=8, help="samples per question; pass@1..pass@this")
    p.add_argument("--max-examples", type=int, default=None, help="first N questions (default: all)")
    p.add_argument("--temperature", type=float, default=1.0, help=">= 0; 0 is greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=42, help="sampling seed (train_rl's eval_seed), below 2**32")
    p.add_argument("--independent-keys", action="store_true",
                   help="independent sampling keys per question (default: the same keys for every question, as "
                        "nanochat's seed 42; its first-sample pass@1 then swings with the seed: see docs/demo.md)")
    p.add_argument("--batch-rows", type=int, default=4096, help="rows (questions x samples) per sampler call: "
                   "all their prompts are prefilled and kept for the call (memory grows with it)")
    p.add_argument("--slots", type=int, default=None, help="rows each device decodes at once, a finished row's slot "
                   "going to the next (default: per device kind, jaxrl.sampler.default_slots: 256 on GPU/TPU, "
                   "128 per CPU host split over its devices; 0: all at once)")
    p.add_argument("--cpu-devices", type=int, default=None, help="on a CPU host, jax devices to split the rows "
                   "over, one thread each (default: one per core, unless XLA_FLAGS or JAX_NUM_CPU_DEVICES sets it)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--generation", default=None, choices=GENERATIONS, help="nanochat generation, when it cannot "
                   "be detected")
    p.add_argument("--source", default="sft", choices=("base", "mid", "sft", "rl"),
                   help="which <source>_checkpoints of a nanochat base dir")
    p.add_argument("--model-step", type=int, default=None)
    p.add_argument("--model-tag", default=None)
    p.add_argument("--tokenizer-dir", default=None)
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.num_samples < 1 or args.batch_rows < 1 or (args.max_examples is not None and args.max_examples < 1):
        p.error("--num-samples, --batch-rows and --max-examples must be positive")
    bad = [f"--max-new-tokens must be >= 1, found {args.max_new_tokens}"] * (args.max_new_tokens < 1)
    bad += [f"--temperature must be a finite number >= 0 (0 is greedy), found {args.temperature}"] * (
        not math.isfinite(args.temperature) or args.temperature < 0)
    bad += [f"--top-k must be >= 0 (0 disables it), found {args.top_k}"] * (args.top_k < 0)
    bad += [f"--seed must be in [0, 2**32), found {args.seed}"] * (not 0 <= args.seed < 2**32)
    bad += [f"--difficulty must be 1, 2 or 3, found {args.difficulty}"] * (not 1 <= args.difficulty <= 3)
    bad += [f"--slots must be >= 0 (0: all rows at once), found {args.slots}"] * (args.slots is not None and args.slots < 0)
    bad += [f"--cpu-devices must be >= 1, found {args.cpu_devices}"] * (args.cpu_devices is not None and
                                                                       args.cpu_devices < 1)
    if bad:
        p.error("; ".join(bad))
    if args.json:  # checked before the eval, not after it
        try:
            check_writable_dir(Path(args.json).parent, "--json's folder")
        except ConfigError as e:
            p.error(str(e))
        if Path(args.json).is_dir():
            p.error(f"--json {args.json} is a directory; pass a file path such as {Path(args.json) / 'eval.json'}")
    return args


args = parse_args()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxrl import model, rollout, run_state, sampler, sharding, tasks  # noqa: E402

with run_state.exit_on_bad_input():  # JAX_PLATFORMS without cpu: no host for the calculator (before jax starts)
    sampler.check_host_backend()
sharding.use_cpu_cores(args.cpu_devices)  # before jax starts: rows spread over every core of a CPU host

# ------------------------------------------------------------------------------------------
# Policy and task

mesh = sharding.make_mesh(jax.local_devices())
with run_state.exit_on_bad_input():
    attention = model.attention_impl()  # the einsum default, or the JAXRL_ATTENTION override
    config, params, tokenizer, info = run_state.load_policy(
        args.checkpoint, generation=args.generation, model_step=args.model_step, model_tag=args.model_tag,
        tokenizer_dir=args.tokenizer_dir, source=args.source)
    task = tasks.open_task(args.task, args.data_dir, args.split, difficulty=args.difficulty)
    n = len(task) if args.max_examples is None else min(args.max_examples, len(task))
    rollout.check_prompt_lengths(config, tokenizer, task, n, args.max_new_tokens, args.split)
config = config.replace(compute_dtype=args.dtype, attention=attention)
params = jax.device_put(params, sharding.replicated(mesh))
print(f"{config.generation} model, {config.n_layer} layers, vocab {config.vocab_size} on {len(jax.local_devices())} "
      f"x {jax.devices()[0].device_kind}; {n} {args.split} questions x {args.num_samples} samples", file=sys.stderr)

# ------------------------------------------------------------------------------------------
# Sampling: fixed-size chunks (the last one padded with repeats, dropped after), one compile

tool = sampler.tool_for(tokenizer, args.max_new_tokens + 2, config.generation)
sampling = rollout.SamplingArgs(args.num_samples, args.max_new_tokens, args.temperature, args.top_k, args.seed)
chunk = max(1, min(n, args.batch_rows // args.num_samples))
order = np.arange(-(-n // chunk) * chunk) % n
correct, gen_tokens, row_steps, t0 = [], 0, 0, time.perf_counter()
for a in tqdm(range(0, len(order), chunk), desc="eval", unit="chunk", file=sys.stderr):
    res = rollout.run_round(config, params, tokenizer=tokenizer, task=task, indices=order[a: a + chunk], args=sampling,
                            tool=tool, step=0, mesh=mesh, same_keys_per_question=not args.independent_keys,
                            slots=args.slots)
    correct.append(res.correct)
    gen_tokens, row_steps = gen_tokens + res.gen_tokens, row_steps + res.row_steps
correct = np.concatenate(correct)[:n]
seconds = time.perf_counter() - t0

# ------------------------------------------------------------------------------------------
# Report

first = rollout.pass_at_k_first(correct)
unbiased = rollout.pass_at_k_unbiased(correct)
for k in range(1, args.num_samples + 1):
    mean, lo, hi = unbiased[f"pass@{k}"]
    print(f"Pass@{k}: {first[f'pass@{k}']:.4f} | unbiased {mean:.4f} [{lo:.4f}, {hi:.4f}]")
print(f"mean per-sample accuracy {correct.mean():.4f} over {n} questions in {seconds:.1f}s")
print(f"slot utilization {gen_tokens / max(row_steps, 1):.3f} ({gen_tokens} kept tokens / {row_steps} decoded rows)",
      file=sys.stderr)
if args.json:
    out = {"checkpoint": str(args.checkpoint), "generation": config.generation, "task": args.task,
           "data_dir": args.data_dir, "split": args.split, "num_examples": n, "num_samples": args.num_samples,
           "temperature": args.temperature, "top_k": args.top_k, "max_new_tokens": args.max_new_tokens,
           "seed": args.seed, "independent_keys": args.independent_keys, "dtype": args.dtype,
           "devices": len(jax.local_devices()), **first,
           "unbiased": {k: {"mean": m, "lo": lo, "hi": hi} for k, (m, lo, hi) in unbiased.items()},
           "mean_sample_accuracy": float(correct.mean()), "seconds": round(seconds, 1),
           "gen_tokens": gen_tokens, "row_steps": row_steps, "slot_utilization": gen_tokens / max(row_steps, 1),
           "per_question": [{"index": i, "question": task[i]["messages"][0]["content"], "correct": int(c.sum()),
                             "first_correct": bool(c[0]), "samples": [bool(x) for x in c]}
                            for i, c in enumerate(correct)]}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.json}", file=sys.stderr)
