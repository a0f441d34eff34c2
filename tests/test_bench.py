"""scripts/bench.py (the `benchmarks` package): every subcommand runs its smallest configuration and
ends with a complete JSON line.

Run: python -m pytest tests/test_bench.py -q   (about a minute on 2 CPU cores: the four benchmarks
run at once, each in its own process on one CPU device)

The figures themselves are not checked (they are timings); only that each run finishes, that its
last stdout line is one JSON object carrying the keys external checks read, and that `--out`
appends the same line. Plus the counting helpers on nanochat's published d20 shape, and that
scripts/ and benchmarks/ import the library as installed and call only its public functions.
"""
import ast
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, tiny_config, tiny_params

from benchmarks import device as bench_device
from benchmarks import floor as bench_floor
from benchmarks import profiling

COMMON_KEYS = ("device", "jax_version", "model", "dtype", "rows", "shapes", "ceilings", "date")
TINY = {
    "sampler": ["--prompts", "1", "--num-samples", "2", "--max-new-tokens", "4", "--prompt-len", "8"],
    "train": ["--rows", "2", "--seq-len", "16", "--device-batch-size", "1"],
    "rl-step": ["--questions", "1", "--num-samples", "2", "--max-new-tokens", "4", "--prompt-len", "8",
                "--device-batch-size", "2"],
    "convert": [],
    "floor": ["--rows", "2,3", "--steps", "2"],
    "memory": ["--mesh-data", "2", "--questions", "2", "--num-samples", "2", "--max-new-tokens", "4", "--prompt-len",
               "8", "--device-batch-size", "2", "--dtype", "float32"],
}
KEYS = {
    "sampler": ("gen_tokens_per_s", "prefill_tokens_per_s", "compile_s", "mbu", "ttft_s", "tool_host_s",
                "tool_overhead_frac", "slot_utilization", "row_steps"),
    "train": ("tokens_per_s", "mfu", "tokens_per_s_one_pass", "mfu_one_pass", "optimizer_s", "train_step_s"),
    "rl-step": ("step_s", "rollout_s", "reward_s", "train_s", "logging_s"),
    "convert": ("import_s", "peak_rss_mb", "export_s", "load_s"),
    "floor": ("floor_step_s", "floor_step_s_best", "matmul_flops_per_step", "weight_bytes_per_step", "mfu", "mbu"),
    "memory": ("train_state_bytes_per_device", "train_step_peak_bytes_per_device", "sampler_peak_bytes_per_device"),
}
PROFILED = {"sampler": ["sampler_1x2"], "train": ["train_fwdbwd", "train_optimizer"], "rl-step": ["rl_step"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every benchmark at once (each mostly compiles); {name: (returncode, stdout, stderr, out file)}."""
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", PYTHONPATH=str(REPO))
    procs = {}
    for name, extra in TINY.items():
        out = tmp / f"{name}.jsonl"
        cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), name, "--model", "d4", "--repeats", "1",
               "--out", str(out), *extra]
        if name in PROFILED:
            cmd += ["--profile", str(tmp / f"{name}-profile")]
        procs[name] = (subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True), out)
    results = {}
    for name, (proc, out) in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[name] = (proc.returncode, stdout, stderr, out)
    return results


@pytest.mark.cli
@pytest.mark.parametrize("name", list(TINY))
def test_subcommand_ends_with_complete_json(runs, name):
    if name == "convert":
        pytest.importorskip("torch")
    code, stdout, stderr, out = runs[name]
    assert code == 0, f"bench.py {name} failed ({code}):\n{stderr[-3000:]}"
    last = stdout.strip().splitlines()[-1]
    record = json.loads(last)
    missing = [k for k in COMMON_KEYS + KEYS[name] if k not in record]
    assert not missing, f"bench.py {name}: keys {missing} missing from {sorted(record)}"
    assert record["bench"] == name and record["model"] == "d4" and record["dtype"] == "float32"
    assert record["shapes"]["n_layer"] == 4
    for key in KEYS[name]:
        assert isinstance(record[key], (int, float)), f"{name}: {key} = {record[key]!r} is not a number"
    assert out.read_text().splitlines() == [last], "--out must append exactly the final JSON line"
    if name == "memory":  # compiled for --mesh-data 2 simulated devices, whatever XLA_FLAGS said
        assert record["n_devices"] == 2 and record["mesh"] == {"data": 2, "fsdp": 1}


@pytest.mark.cli
@pytest.mark.parametrize("name", list(PROFILED))
def test_profile_summarises_a_real_trace(runs, name):
    """--profile: one summary per profiled call, each naming a trace file that exists, with ops
    whose self times are positive, sorted, and no larger than the busy time they are part of."""
    record = json.loads(runs[name][1].strip().splitlines()[-1])
    assert [p["name"] for p in record["profile"]] == PROFILED[name]
    for p in record["profile"]:
        assert os.path.isfile(p["trace"]) and p["trace"].endswith(".trace.json.gz")
        assert p["busy_ms"] > 0 and p["top_ops"] and p["top_kinds"]
        for ops in (p["top_ops"], p["top_kinds"]):
            times = [o["self_ms"] for o in ops]
            assert times == sorted(times, reverse=True) and times[-1] >= 0 and sum(times) <= p["busy_ms"] + 1e-6
        assert not any("wait" in o["name"].lower() or o["name"].startswith("$") for o in p["top_ops"])
    assert f"profile {PROFILED[name][0]}:" in runs[name][1]


def test_profile_self_times_of_nested_spans():
    """Self time = duration minus the spans nested in it on the same thread; waits, Python frames
    and the python thread are left out on a CPU; on an accelerator only the device's tracks count."""
    def span(name, ts, dur, pid=1, tid=2):
        return {"ph": "X", "name": name, "ts": ts, "dur": dur, "pid": pid, "tid": tid}

    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "XLAEigen"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 3, "args": {"name": "python"}}]
    cpu = meta + [span("fusion.1", 0, 100), span("dot.2", 10, 30), span("dot.2", 20, 10), span("fusion.1", 50, 20),
                  span("fusion.1", 200, 5, tid=4), span("Pool::Await", 60, 5), span("$py_frame", 0, 500),
                  span("on_python_thread", 0, 500, tid=3)]
    times, counts = profiling.self_times(cpu)
    # fusion.1: 100 - 30 (dot) - 20 (nested fusion.1) + 20 (the nested one) + 5 (other thread)
    assert dict(times) == {"fusion.1": 75, "dot.2": 30} and dict(counts) == {"fusion.1": 3, "dot.2": 2}
    gpu = cpu + [{"ph": "M", "name": "process_name", "pid": 9, "args": {"name": "/device:GPU:0"}},
                 span("gemm_kernel", 0, 40, pid=9, tid=1), span("loop_fusion", 40, 7, pid=9, tid=1)]
    times, _ = profiling.self_times(gpu)
    assert dict(times) == {"gemm_kernel": 40, "loop_fusion": 7}


def test_nanochat_shapes_and_counts():
    config = bench_device.nanochat_config(20, "gen-2025-10", "bfloat16")
    assert (config.n_embd, config.n_head, config.n_kv_head, config.vocab_size) == (1280, 10, 10, 65536)
    total, matmul = bench_device.param_counts(config)
    assert matmul == 20 * 12 * 1280**2 + 65536 * 1280  # blocks (4 attn + 2 MLP of 4x) + lm_head
    assert total == matmul + 65536 * 1280  # + wte
    later = bench_device.nanochat_config(12, "gen-2026-07", "float32")
    assert (later.n_embd, later.n_head, later.vocab_size) == (768, 6, 32768)
    assert bench_device.train_flops_per_token(config, 1) == 6 * matmul + 12 * 20 * 1280
    # weights + 1 prompt of 10 positions + 2 rows x 3 generated positions, keys and values, bf16
    assert bench_device.decode_bytes_per_step(config, 1, 2, 10, 3) == 2 * matmul + 16 * 20 * 2 * 1280 * 2


def test_ceiling_table_every_entry_reachable():
    """First match wins, so a general pattern listed before a specific one ("h100" before "h100
    pcie") would shadow it: every entry must be what its own pattern, and the device kind JAX
    reports for it, resolve to. A CPU is never in the table (its ceilings are measured)."""
    for pattern, name, flops, bw in bench_device.CEILINGS:
        found = bench_device.table_ceilings(pattern.upper())
        assert found is not None and name in found["source"], f"{pattern!r} resolves to {found}"
        assert (found["flops_per_s"], found["bytes_per_s"]) == (flops, bw), pattern
    reported = {"NVIDIA H100 80GB HBM3": "NVIDIA H100 SXM", "NVIDIA H100 PCIe": "NVIDIA H100 PCIe",
                "NVIDIA H100 NVL": "NVIDIA H100 NVL", "NVIDIA A100-SXM4-40GB": "NVIDIA A100 40GB",
                "NVIDIA A100-SXM4-80GB": "NVIDIA A100 SXM 80GB", "TPU v5 lite": "TPU v5e", "TPU v5p": "TPU v5p"}
    for kind, name in reported.items():
        assert f"{name} data sheet" in bench_device.table_ceilings(kind)["source"], kind
    assert bench_device.table_ceilings("cpu") is None


def docs_ceilings() -> dict[str, tuple[float, float]]:
    """docs/benchmarks.md's device-ceilings table as {name: (FLOP/s, bytes/s)}: a row "H100 SXM /
    PCIe / NVL | a / b / c | x / y / z" names H100 SXM, H100 PCIe, H100 NVL; one value serves all."""
    text = (REPO / "docs" / "benchmarks.md").read_text(encoding="utf-8")
    table = text[text.index("| device kind | bf16 FLOP/s | bytes/s |"):].split("\n\n")[0].splitlines()[2:]
    out = {}
    for line in table:
        names, flops, bws = ([x.strip() for x in cell.split(" / ")] for cell in line.strip("| ").split(" | "))
        family = names[0].split()[0]
        names = [names[0]] + [f"{family} {n}" for n in names[1:]]
        flops, bws = (v * len(names) if len(v) == 1 else v for v in (flops, bws))
        out.update({n: (float(f), float(b)) for n, f, b in zip(names, flops, bws, strict=True)})
    return out


def test_ceiling_table_matches_the_docs():
    """The table the code uses and the one docs/benchmarks.md shows hold the same devices and numbers."""
    code = {name.removeprefix("NVIDIA "): (flops, bw) for _, name, flops, bw in bench_device.CEILINGS}
    assert docs_ceilings() == code


def test_floor_runs_every_weight_matmul_of_a_decode_step():
    """The floor step's carried output depends on every block matrix and lm_head (a gradient
    through two steps reaches each one), so XLA cannot drop a dot from the loop; the counts are
    6 dots per layer + lm_head. And the jitted loop runs."""
    import jax
    import numpy as np

    config = tiny_config()
    params = tiny_params(config, seed=3)
    weights = bench_floor.floor_weights(config, params)
    x = jax.random.normal(jax.random.key(5), (3, config.n_embd))
    grads = jax.grad(lambda w: bench_floor.floor_step(w, *bench_floor.floor_step(w, x, 0.0))[1])(weights)
    flat = jax.tree_util.tree_leaves_with_path(grads)
    assert len(flat) == 6 * config.n_layer + 1
    dead = [jax.tree_util.keystr(p) for p, g in flat if not np.any(np.asarray(g))]
    assert not dead, f"the floor's result does not depend on {dead}"
    counts = bench_floor.floor_counts(weights, rows=3)
    D, Dkv, V = config.n_embd, config.n_kv_head * config.head_dim, config.padded_vocab
    per_layer = 2 * D * D + 2 * Dkv * D + 2 * 4 * D * D
    assert counts["dots_per_step"] == 6 * config.n_layer + 1
    assert counts["matmul_flops_per_step"] == 2 * 3 * (config.n_layer * per_layer + V * D)
    assert counts["weight_bytes_per_step"] == 4 * (config.n_layer * per_layer + V * D)
    out, acc = bench_floor.floor_loop(weights, x, 2)
    assert out.shape == x.shape and np.isfinite(float(acc))



def library_names(tree) -> set[str]:
    """Names a module binds to jaxrl or convert modules (`from jaxrl import rl`, `import convert`)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("jaxrl", "convert"):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.asname or a.name for a in node.names if a.name.split(".")[0] in ("jaxrl", "convert")}
    return names


def test_scripts_and_benchmarks_use_the_library_as_installed():
    """No file in scripts/ or benchmarks/ edits sys.path or imports a bench module by its old path,
    and none calls a private (underscore) function of jaxrl or convert."""
    found = set()
    for path in sorted((REPO / "scripts").glob("*.py")) + sorted((REPO / "benchmarks").glob("*.py")):
        rel = str(path.relative_to(REPO))
        tree = ast.parse(path.read_text(encoding="utf-8"), rel)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                assert (node.value.id, node.attr) != ("sys", "path"), f"{rel}:{node.lineno} touches sys.path"
                if node.value.id in library_names(tree) and node.attr.startswith("_") and not node.attr.endswith("__"):
                    found.add((rel, f"{node.value.id}.{node.attr}"))
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("jaxrl", "convert"):
                found |= {(rel, f"{node.module}.{a.name}") for a in node.names if a.name.startswith("_")}
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(m.startswith("bench_") for m in modules), f"{rel}:{node.lineno} imports {modules}"
    assert not found, f"private library calls: {sorted(found)}"


def test_memory_figures_are_consistent_with_the_state_they_compile():
    """bench.py memory on a tiny model over 2 simulated devices: the train state is the fp32 params
    plus the optimizer state; the train step takes it as arguments and donates all of it (aliased);
    the sampler takes the params; every peak covers its arguments."""
    import argparse

    import jax
    import numpy as np

    from benchmarks import memory
    from jaxrl import sharding
    from jaxrl.model import param_table

    config = tiny_config("gen-2025-10", vocab_size=320)  # (gen-2025-10 does not pad 265): every matrix splits by 4
    args = argparse.Namespace(questions=2, num_samples=4, device_batch_size=2, prompt_len=8, max_new_tokens=8,
                              seed=int(np.random.default_rng().integers(1000)), remat=False)
    mesh = sharding.make_mesh(jax.devices()[:2])
    figures, _, table = memory.run(config, args, mesh)
    n_params = sum(int(np.prod(shape)) for _, shape, _ in param_table(config))
    assert figures["params_bytes_per_device"] == 4 * n_params  # fp32 masters, replicated
    state, train, sample = (figures["train_state_bytes_per_device"], figures["train_step"], figures["sampler"])
    assert 2 * figures["params_bytes_per_device"] < state < 4 * figures["params_bytes_per_device"]
    assert train["aliased"] == state and train["arguments"] > state and train["peak"] >= train["arguments"]
    assert sample["arguments"] >= figures["params_bytes_per_device"] and sample["peak"] >= sample["arguments"]
    assert figures["mesh"] == {"data": 2, "fsdp": 1} and len(table) == 3
    # fsdp 4 on 8 devices: the train state is split (within what stays whole: scalars, counts,
    # dimensions that do not divide), the sampler's copy is whole
    args.questions = 8
    sharded, _, _ = memory.run(config, args, sharding.make_mesh(jax.devices()[:8], data=2, fsdp=4))
    assert sharded["mesh"] == {"data": 2, "fsdp": 4}
    assert state / 4 <= sharded["train_state_bytes_per_device"] <= 1.15 * state / 4
    assert sharded["params_bytes_per_device"] <= 1.15 * figures["params_bytes_per_device"] / 4
    assert sharded["sampler"]["arguments"] >= figures["params_bytes_per_device"]
    with pytest.raises(SystemExit, match="--mesh-data 0"):
        memory.check_mesh(0, 2)
