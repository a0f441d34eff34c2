"""`python scripts/bench.py memory`: per-device bytes of one RL step's programs, as XLA plans them.

Nothing runs and no weights are allocated: the train step (`rl.compiled_train_step`) and the
sampler's rollout function (`sampler.rollout_call`) are lowered on abstract params and optimizer
state (`jax.ShapeDtypeStruct`, placed as train_rl places them) and compiled for a mesh of
`--mesh-data` x `--mesh-fsdp` simulated CPU devices; each executable's `memory_analysis()` gives,
per device:

- `arguments`, `outputs`, `temporaries` (XLA's argument, output and temp sizes) and `aliased`
  (outputs written into donated inputs: the train step donates params and optimizer state);
- `peak` = arguments + outputs + temporaries − aliased: what the device holds at once during the
  call (XLA's temporaries are already the peak of its buffer assignment).

`train_compile_s` and `sampler_compile_s` time each program's lowering and compilation (no
execution: the compile time of models too large to run on the host).

`train_state_bytes_per_device` is the fp32 master params plus the optimizer state (Muon momenta,
AdamW moments, step counts) as each device holds them under the mesh's sharding. The step's shape
is the seed's: `--questions` 16 x `--num-samples` 16 rows, each a `--prompt-len` (128) prompt
plus `--max-new-tokens` (256) generated tokens (every row at the full budget: the worst case),
`--device-batch-size` 8 rows per pass; the sampler samples without the calculator (its queue adds
a few KB) on a replicated copy of the params in the compute dtype, the rollout layout.

Test: `pytest tests/test_bench.py -k memory`.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from benchmarks import device as bench_device
from benchmarks.context import SyntheticTokenizer
from benchmarks.training import random_batch
from jaxrl import optim, rl, sampler, sharding
from jaxrl.model import init_params
from jaxrl.tokenizer import SpecialIds

FIELDS = ("arguments", "outputs", "temporaries", "aliased", "peak")


def check_mesh(data: int, fsdp: int) -> None:
    if data < 1 or fsdp < 1:
        raise SystemExit(f"--mesh-data {data} and --mesh-fsdp {fsdp} must both be >= 1")


def program_bytes(compiled) -> dict:
    """Per-device bytes of one compiled executable (see the module docstring)."""
    m = compiled.memory_analysis()
    out = {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
           "temporaries": int(m.temp_size_in_bytes), "aliased": int(m.alias_size_in_bytes)}
    out["peak"] = out["arguments"] + out["outputs"] + out["temporaries"] - out["aliased"]
    return out


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (its largest shard)."""
    return int(sum(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree)))


def abstract_state(config, optimizer, mesh):
    """(params, optimizer state) as ShapeDtypeStructs, placed as train_rl places them (the
    training layout of jaxrl/sharding.py: split over fsdp, replicated over data)."""
    def place(tree):
        shardings = sharding.tree_shardings(tree, mesh)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    params = place(jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0)))
    return params, place(jax.eval_shape(optimizer.init, params))


def rollout_layout(tree, mesh, dtype):
    """The rollout layout: every device holds the whole params in the compute dtype (gathered once per step)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype, sharding=sharding.replicated(mesh)), tree)


def run(config, args, mesh) -> tuple[dict, list[str], list[list]]:
    Q, S, dbs = args.questions, args.num_samples, args.device_batch_size
    n_dev = sharding.row_shards(mesh)
    if Q % n_dev or S % dbs:
        raise SystemExit(f"--questions {Q} must split over the {n_dev} devices and --num-samples {S} "
                         f"into passes of --device-batch-size {dbs}")
    optimizer = optim.build_optimizer(config, num_steps=100)
    params, opt_state = abstract_state(config, optimizer, mesh)
    T = args.prompt_len + args.max_new_tokens
    batch = random_batch(config, Q * S, T, args.seed)
    batch.targets[:, : args.prompt_len] = -1  # the prompt is not trained on
    packed = rl.global_batch(batch, mesh, pad_id=0, chunk=dbs, group=S)
    spec = rl.LossSpec(device_batch_size=dbs, num_passes=S // dbs, examples_per_step=Q, remat=args.remat)
    step = rl.compiled_train_step(config, spec, optimizer, mesh)
    t0 = time.perf_counter()
    train = program_bytes(step.lower(params, opt_state, packed).compile())
    train_compile_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    prompts = [list(rng.integers(0, config.vocab_size - 9, args.prompt_len)) for _ in range(Q)]
    specials = SpecialIds.from_tokenizer(SyntheticTokenizer(config.vocab_size))
    fn, inputs = sampler.rollout_call(config, prompts, num_samples=S, max_new_tokens=args.max_new_tokens,
                                      specials=specials, mesh=mesh,
                                      slots=sampler.default_slots("gpu"))  # an accelerator's sampler, not the CPU's
    t0 = time.perf_counter()
    sample = program_bytes(fn.lower(rollout_layout(params, mesh, config.dtype), *inputs).compile())
    sampler_compile_s = time.perf_counter() - t0
    state = per_device_bytes((params, opt_state))
    figures = {"rows": Q * S, "questions": Q, "num_samples": S, "prompt_len": args.prompt_len,
               "max_new_tokens": args.max_new_tokens, "device_batch_size": dbs, "train_remat": args.remat,
               "mesh": {"data": sharding.data_size(mesh), "fsdp": sharding.fsdp_size(mesh)},
               "params_bytes_per_device": per_device_bytes(params),
               "train_state_bytes_per_device": state,
               "train_step_peak_bytes_per_device": train["peak"], "sampler_peak_bytes_per_device": sample["peak"],
               "train_step": train, "sampler": sample,
               "train_compile_s": round(train_compile_s, 2), "sampler_compile_s": round(sampler_compile_s, 2),
               "shapes": bench_device.shapes(config)}
    gb = lambda b: f"{b / 1e9:.2f}"
    table = [["train state (params + optimizer)", gb(state), "", "", "", ""]]
    table += [[name, *(gb(b[k]) for k in FIELDS)] for name, b in (("train step", train), ("sampler", sample))]
    return figures, ["per device, GB", *FIELDS], table
