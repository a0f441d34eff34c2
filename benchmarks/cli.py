"""Benchmarks of jaxrl: sampler, train step, whole RL step, checkpoint conversion, decode matmul floor.

    python scripts/bench.py sampler  [--model d20 | --checkpoint PATH] [--prompts N --num-samples S] ...
    python scripts/bench.py train    [--rows 256 --seq-len 384 --device-batch-size 8]
    python scripts/bench.py rl-step  [--questions 16 --num-samples 16 --max-new-tokens 256]
    python scripts/bench.py convert  [--model d20 | --checkpoint PATH]
    python scripts/bench.py floor    [--rows 1,8,64,256 --steps 256]   # decode's weight matmuls alone
    python scripts/bench.py memory   --model d20|d32 [--mesh-data N --mesh-fsdp M]   # compiled, not run

`--model d<N>` builds nanochat's d<N> shapes of `--generation` with random params (no file needed);
`--checkpoint` takes a jaxrl import, a jaxrl run dir or a nanochat checkpoint (then the task is
the GSM8K-format `--data-dir`, default ../shared/data/arith, and the calculator is live).
Defaults depend on the platform: accelerators get the GPU goals' sizes (d20, bf16, seed RL step),
the CPU gets sizes that finish in minutes on 2 cores (d4, float32); every flag overrides.
Each run prints a table and, as its last stdout line, one JSON object (device, jax version,
shapes, dtype, every figure, the ceilings used); `--out FILE` appends that line to a JSONL.
What each figure means: the docstrings of the `benchmarks` package (sampling.py, training.py,
rl_step.py, conversion.py, floor.py, memory.py) and docs/benchmarks.md. `--profile DIR` (sampler, train,
rl-step) adds where one call's time goes (benchmarks/profiling.py). Test: `pytest tests/test_bench.py`.
"""
import argparse
import datetime
import json
import os
import shlex
import sys
import warnings

from jaxrl.config import GENERATIONS  # no jax import

# (accelerator, CPU) defaults per subcommand; a flag left at None takes its platform's value
DEFAULTS = {"model": ("d20", "d4"), "dtype": ("bfloat16", "float32"), "repeats": (3, 2), "prompt_len": (128, 32)}
BENCH_DEFAULTS = {
    "sampler": {"rows": ([1, 8, 64, 256], [1, 8, 64]), "max_new_tokens": (256, 16)},
    "train": {"rows": (256, 8), "seq_len": (384, 64)},
    "rl-step": {"questions": (16, 2), "num_samples": (16, 4), "max_new_tokens": (256, 32)},
    "convert": {},
    "floor": {"rows": ([1, 8, 64, 256], [1, 8, 64]), "steps": (256, 64)},
    "memory": {"model": ("d20", "d20"), "dtype": ("bfloat16", "bfloat16"), "prompt_len": (128, 128)},
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", choices=["d4", "d12", "d20", "d32"], help="nanochat shape, random params "
                        "(default d20 on accelerators, d4 on CPU)")
    common.add_argument("--generation", default="gen-2025-10", choices=GENERATIONS)
    common.add_argument("--checkpoint", help="a jaxrl import or run dir, or a nanochat base/checkpoint dir or .pt")
    common.add_argument("--data-dir", help="GSM8K-format task for --checkpoint (default ../shared/data/arith)")
    common.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default bfloat16 on "
                        "GPU/TPU, float32 on CPU)")
    common.add_argument("--repeats", type=int, help="timed repeats after the compiling call (default 3; CPU 2)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--prompt-len", type=int, help="tokens per synthetic prompt (default 128; CPU 32)")
    common.add_argument("--measure-ceilings", action="store_true", help="measure peak FLOP/s and bandwidth "
                        "(a large matmul and copy) instead of the device table")
    common.add_argument("--out", help="append the JSON record to this JSONL file")
    common.add_argument("--cpu-devices", type=int, help="on a CPU host, jax devices (one thread each) the rows are "
                        "split over (default: sampler one per core, as eval_rl; others jax's 1; XLA_FLAGS' device "
                        "count is kept when set)")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="bench", required=True)
    s = sub.add_parser("sampler", parents=[common], help="generated and prefill tokens/s, TTFT, tool cost, MBU")
    s.add_argument("--prompts", type=int, help="prompts (with --num-samples: one configuration, no sweep)")
    s.add_argument("--num-samples", type=int, help="samples per prompt")
    s.add_argument("--rows", type=lambda v: [int(x) for x in v.split(",")], help="sweep of rows = prompts x "
                   "samples, samples = min(rows, 16) (default 1,8,64,256; CPU 1,8,64)")
    s.add_argument("--ignore-eos", action="store_true", help="run every row to --max-new-tokens")
    t = sub.add_parser("train", parents=[common], help="REINFORCE forward+backward tokens/s and MFU")
    t.add_argument("--rows", type=int, help="batch rows (default 256; CPU 8)")
    t.add_argument("--seq-len", type=int, help="tokens per row (default 384; CPU 64)")
    r = sub.add_parser("rl-step", parents=[common], help="one whole RL step: rollout, reward, train, logging")
    r.add_argument("--questions", type=int, help="questions per step (default 16; CPU 2)")
    r.add_argument("--num-samples", type=int, help="samples per question (default 16; CPU 4)")
    for q in (s, r):
        q.add_argument("--max-new-tokens", type=int, help="default 256; CPU: sampler 16, rl-step 32")
        q.add_argument("--temperature", type=float, default=1.0)
        q.add_argument("--top-k", type=int, default=50)
        q.add_argument("--no-tool", action="store_true", help="sample without the calculator tool")
        q.add_argument("--slots", type=int, default=None, help="rows each device decodes at once, a finished row's "
                       "slot going to the next (default: per device kind; 0: all rows at once)")
    for q in (s, t, r):
        q.add_argument("--profile", metavar="DIR", help="after timing, run the subject once more under "
                       "jax.profiler: trace in DIR/<name>/, per-op self times in the table and the JSON (`profile`)")
    for q in (t, r):
        q.add_argument("--device-batch-size", type=int, default=8, help="rows per pass (nanochat's 8): the "
                       "loss normalisation")
        q.add_argument("--chunk-rows", type=int, default=0, help="rows per forward/backward (train_chunk_rows; "
                       "0 = device batch size)")
    sub.add_parser("convert", parents=[common], help="nanochat -> jaxrl import and export: time, peak RSS")
    f = sub.add_parser("floor", parents=[common], help="a decode step's weight matmuls alone: ms per step")
    f.add_argument("--rows", type=lambda v: [int(x) for x in v.split(",")], help="decode rows, a sweep "
                   "(default 1,8,64,256; CPU 1,8,64)")
    f.add_argument("--steps", type=int, help="steps per timed loop (default 256; CPU 64)")
    m = sub.add_parser("memory", parents=[common], help="per-device bytes of the train step and sampler for a mesh, "
                       "from XLA's memory analysis of the compiled programs (nothing runs)")
    m.add_argument("--mesh-data", type=int, default=1, help="data-parallel devices (simulated CPU devices)")
    m.add_argument("--remat", action="store_true", help="recompute each block in the backward pass (train_remat)")
    m.add_argument("--mesh-fsdp", type=int, default=1, help="devices the params and optimizer state are split over (jaxrl/sharding.py)")
    m.add_argument("--questions", type=int, default=16, help="questions per step (the seed's 16)")
    m.add_argument("--num-samples", type=int, default=16, help="samples per question (the seed's 16)")
    m.add_argument("--max-new-tokens", type=int, default=256, help="generated tokens per row (the seed's 256)")
    m.add_argument("--device-batch-size", type=int, default=8, help="rows per pass (nanochat's 8)")
    return p


def resolve_defaults(args, accelerator: bool) -> None:
    pick = 0 if accelerator else 1
    for name, values in {**DEFAULTS, **BENCH_DEFAULTS[args.bench]}.items():
        if getattr(args, name) is None:
            setattr(args, name, values[pick])


def print_table(headers, rows) -> None:
    cells = [[str(c) for c in r] for r in [headers, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for n, r in enumerate(cells):
        print(" | ".join(c.rjust(w) if n and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if n == 0:
            print("-+-".join("-" * w for w in widths))


def record(args, device, figures, config, ceil) -> dict:
    import jax

    from benchmarks import device as bench_device
    from jaxrl import model

    shapes = figures.pop("shapes", None) or bench_device.shapes(config)
    load = os.getloadavg()
    return {"bench": args.bench, "device": device.device_kind, "platform": device.platform,
            "n_devices": jax.device_count(), "jax_version": jax.__version__,
            "model": str(args.checkpoint) if args.checkpoint else args.model, "shapes": shapes,
            "dtype": args.dtype, "attention": config.attention if config is not None else model.attention_impl(),
            "rows": figures.pop("rows"), **figures, "ceilings": ceil,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": {"cpu_count": os.cpu_count(), "load_avg": [round(x, 2) for x in load]},
            "command": "python scripts/bench.py " + shlex.join(sys.argv[1:])}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.bench == "memory":  # simulated CPU devices, set before jax starts
        devices = args.mesh_data * args.mesh_fsdp
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={devices}").strip()
    if args.cpu_devices is not None and args.bench == "memory":
        raise SystemExit("memory: the devices are --mesh-data x --mesh-fsdp, not --cpu-devices")
    if args.cpu_devices is not None and args.cpu_devices < 1:
        raise SystemExit(f"--cpu-devices must be >= 1, found {args.cpu_devices}")
    import jax

    from benchmarks import device as bench_device
    from jaxrl import sharding

    if args.cpu_devices or args.bench == "sampler":  # before jax starts a backend
        sharding.use_cpu_cores(args.cpu_devices)
    device = jax.devices()[0]
    resolve_defaults(args, device.platform != "cpu")
    warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
    if args.bench == "convert":
        try:
            import torch  # noqa: F401
        except ImportError:
            print("convert: skipped, torch is not installed (pip install -e '.[torch]')", file=sys.stderr)
            print(json.dumps({"bench": "convert", "skipped": "torch is not installed"}))
            return 0
        from benchmarks import conversion

        figures, headers, table = conversion.run(args)
        config, ceil = None, None
    elif args.bench == "memory":
        from benchmarks import memory

        memory.check_mesh(args.mesh_data, args.mesh_fsdp)
        if args.checkpoint:
            raise SystemExit("memory compiles nanochat's shapes with abstract params: use --model d<N>, not --checkpoint")
        config = bench_device.nanochat_config(int(args.model[1:]), args.generation, args.dtype)
        mesh = sharding.make_mesh(jax.devices()[: args.mesh_data * args.mesh_fsdp], data=args.mesh_data,
                                  fsdp=args.mesh_fsdp)
        figures, headers, table = memory.run(config, args, mesh)
        ceil = None
    else:
        from benchmarks import context, floor, rl_step, sampling, training

        ctx = context.load_context(args)
        config = ctx.config
        ceil = bench_device.ceilings(device.device_kind, args.dtype, args.measure_ceilings)
        run = {"sampler": sampling.run, "train": training.run_train, "rl-step": rl_step.run_rl_step,
               "floor": floor.run}
        figures, headers, table = run[args.bench](ctx, args, ceil)
    rec = record(args, device, figures, config, ceil)
    print(f"\n{args.bench}: {rec['model']} ({rec['shapes']['generation']}, {rec['dtype']}) on "
          f"{rec['n_devices']} x {rec['device']}, jax {rec['jax_version']}, load {rec['host']['load_avg']}")
    print_table(headers, table)
    if rec.get("profile"):
        from benchmarks import profiling

        profiling.print_summary(rec["profile"])
    line = json.dumps(rec)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    print(line, flush=True)
    return 0
