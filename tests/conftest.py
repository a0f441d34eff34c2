"""Shared test setup: 8 simulated CPU devices, strict numerics, paths to ../shared, the tiny model.

Run the quick tier with `pytest -m "not slow and not cli"`; CI runs everything on up to 4 workers
(`pytest -n auto --maxprocesses 4`, the README's command), so no test may depend on another's order.
Golden tests read nanochat's own outputs from ../shared/fixtures (never edited).
"""
import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

# Must happen before anything imports jax: simulate 8 devices so shard_map paths run on CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from jaxrl.config import GENERATIONS  # noqa: E402,F401  (the tests parametrize over it; imports no jax)
from jaxrl.model import GPTConfig, param_table, unflatten_params  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXRL_SHARED", REPO.parent / "shared")).resolve()
FIXTURES = SHARED / "fixtures" / "nanochat"
ARITH = SHARED / "fixtures" / "nanochat-sft-arith"


def pytest_configure(config):
    jax.config.update("jax_numpy_rank_promotion", "raise")
    jax.config.update("jax_enable_x64", False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with _subprocesses_need_cli_marker(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _subprocesses_need_cli_marker(item):
        return (yield)


@contextlib.contextmanager
def _subprocesses_need_cli_marker(item):
    """Keep the `cli` marker honest: a test (or a fixture it sets up) that starts a Python process
    without it fails, so `-m "not cli"` really leaves out every script, trainer and fresh interpreter.
    Other programs pass (libraries may run helpers such as `uname` or `fc-list`)."""
    if item.get_closest_marker("cli"):
        yield
        return
    popen_init = subprocess.Popen.__init__

    def refuse(self, args, *rest, **kwargs):
        program = str(args if isinstance(args, (str, os.PathLike)) else args[0])
        program = program.split()[0] if kwargs.get("shell") else program  # a shell command line
        if program == sys.executable or Path(program).name.startswith("python"):
            raise RuntimeError(f"{item.nodeid} starts a Python subprocess ({args!r:.120}) but is not marked "
                               "cli; add @pytest.mark.cli to the test")
        popen_init(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = refuse
    try:
        yield
    finally:
        subprocess.Popen.__init__ = popen_init


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run only where jax's default backend is an NVIDIA GPU; elsewhere they are reported
    as skipped with the backend found (scripts/device_check.sh runs them on a GPU machine)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    import jax

    if jax.default_backend() != "gpu":
        skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU; jax's backend here is {jax.default_backend()!r}")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED}; set JAXRL_SHARED to the shared folder")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir) -> Path:
    return FIXTURES


# ------------------------------------------------------------------------------------------
# The tiny model (tests/test_model.py, test_sampler.py, test_optim.py, test_rl.py, ...)

def tiny_config(generation: str = "gen-2026-07", **changes) -> GPTConfig:
    """The one tiny test model: 2 layers, n_embd 64, 4 heads with 2 kv heads (GQA, so c_k is
    narrower than c_q), a byte vocabulary plus nanochat's 9 specials (265; the 2026 generations
    pad it to 320), sequence_len 64, layer 0 windowed ("SL"). A test that needs another value
    passes it in `changes` and says why."""
    fields = dict(sequence_len=64, vocab_size=265, n_layer=2, n_head=4, n_kv_head=2, n_embd=64,
                  window_pattern="SL", generation=generation)
    return GPTConfig(**fields | changes)


def tiny_params(config: GPTConfig, seed: int = 0) -> dict:
    """Random float32 params from `seed`, every one away from the values that hide bugs: matrices
    N(0, 1/fan_in) (`init_params` zeroes c_proj and gates, so layers would drop out), embeddings
    N(0, 1), per-layer scalars 0.5 + 0.3 N(0, 1) (not 0 or 1)."""
    table = param_table(config)
    flat = {}
    for key, (name, shape, _) in zip(jax.random.split(jax.random.key(seed), len(table)), table):
        z = jax.random.normal(key, shape, jnp.float32)
        if len(shape) == 1:
            flat[name] = 0.5 + 0.3 * z
        elif name == "transformer.wte.weight" or name.startswith("value_embeds."):
            flat[name] = z
        else:
            flat[name] = z / math.sqrt(shape[1])
    return unflatten_params(flat)


# ------------------------------------------------------------------------------------------
# Trainer subprocesses (tests/test_resume.py, test_multihost.py, test_faults.py)

# A few seconds per step on 2 CPU cores; rewards are non-zero, so every update moves the params.
# pass@k has the rollouts' shapes (4 questions x 4 samples), so it reuses their compiled sampler.
TINY_RL = ["--examples_per_step=4", "--num_samples=4", "--device_batch_size=2", "--max_new_tokens=64",
           "--eval_every=1000", "--eval_examples=4", "--eval_num_samples=4", "--save_every=1",
           "--export_nanochat=false"]
TINY_STEPS = 5


def trainer_cmd(out_dir: Path, run: str, *extra: str) -> list[str]:
    """scripts/train_rl.py on the arith fixture with TINY_RL; `extra` overrides win."""
    return [sys.executable, str(REPO / "scripts" / "train_rl.py"), "--config",
            str(REPO / "scripts" / "configs" / "arith_tiny.toml"), f"--checkpoint={ARITH}",
            f"--data_dir={SHARED / 'data' / 'arith'}", f"--out_dir={out_dir}", f"--run={run}",
            f"--num_steps={TINY_STEPS}", *TINY_RL, *extra]


def trainer_env(cache_dir: Path, local_devices: int = 4, **extra: str) -> dict:
    """CPU with `local_devices` simulated devices and a compilation cache shared by every run.

    PJRT_NPROC=4 pins XLA's CPU intra-op thread pool (it is max(PJRT_NPROC or the core count,
    local devices)): Eigen splits long matmul contractions by that thread count, so without it a
    2-device process rounds Muon's matmuls differently from a 4-device one.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAXRL_", "XLA_", "JAX_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
               PJRT_NPROC="4", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_trainer(out_dir: Path, run: str, *extra: str, env: dict, timeout: float = 600,
                **popen) -> subprocess.CompletedProcess:
    return subprocess.run(trainer_cmd(out_dir, run, *extra), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, **popen)


def load_state(run_dir: Path, step: int | None = None) -> tuple[int, dict]:
    """(step, {leaf path: numpy array}) of a run's checkpoint `step` (default: the latest complete
    one), read on one device whatever device count saved it."""
    from jaxrl.run_state import CheckpointManager

    with CheckpointManager(Path(run_dir, "checkpoints")) as mgr:
        step = mgr.latest_step() if step is None else step
        state, _ = mgr.restore_saved(step)
    return step, {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def differing_leaves(a: dict, b: dict) -> list[str]:
    assert a.keys() == b.keys()
    return [k for k in a if not np.array_equal(a[k], b[k])]


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, compile_cache, shared_dir) -> Path:
    """One uninterrupted TINY_STEPS-step run, 1 process x 4 devices: what resumed and 2-process runs must equal."""
    out = tmp_path_factory.mktemp("reference")
    proc = run_trainer(out, "ref", env=trainer_env(compile_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "ref"


@pytest.fixture(scope="session")
def fsdp_reference_run(tmp_path_factory, compile_cache, shared_dir) -> Path:
    """The same run as reference_run on a (data 2, fsdp 2) mesh: params and optimizer state split over
    pairs of devices (what 2-process fsdp and cross-mesh resumes must equal)."""
    out = tmp_path_factory.mktemp("fsdp_reference")
    proc = run_trainer(out, "ref", "--mesh_fsdp=2", env=trainer_env(compile_cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh data 2 x fsdp 2" in proc.stdout
    return out / "ref"
