"""Multi-process training: 2 processes x 2 CPU devices on 127.0.0.1 (gloo collectives) end with params
and optimizer state bit-identical to 1 process x 4 devices on the same seed.

Run: python -m pytest -q tests/test_multihost.py   (slow: about 2 minutes on 2 CPU cores with the reference run)

Each process samples its half of every step's questions on its own 2 devices; the update runs on
the 4-device mesh of both processes and sums gradients with rl.py's fixed pairwise tree (ppermute
over gloo), so per-device work and summation order equal the 1-process run. Bit equality also needs
equal XLA CPU thread pools: conftest's trainer_env sets PJRT_NPROC=4 (see its docstring).
Only process 0 writes run files (metrics, config, report), checked here too. With mesh_fsdp=2 the
fsdp pairs lie inside each process and the result equals 1 process on the same mesh, bit for bit.
"""
import socket
import subprocess

import pytest
from conftest import TINY_STEPS, differing_leaves, load_state, trainer_cmd, trainer_env, REPO

from jaxrl.metrics import read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.cli]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(out, *extra):
    env = trainer_env(out / "unused_cache", local_devices=2)
    env.pop("JAX_COMPILATION_CACHE_DIR")  # two processes writing one cache entry would race
    address = f"--coordinator_address=127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(trainer_cmd(out, "mh", address, "--num_processes=2", f"--process_id={i}", *extra),
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    results = [p.communicate(timeout=900) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    return out / "mh", results


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, shared_dir):
    return _two_processes(tmp_path_factory.mktemp("multihost"))


def test_two_processes_equal_one_process_bit_for_bit(two_process_run, reference_run):
    run_dir, _ = two_process_run
    step, state = load_state(run_dir)
    ref_step, ref_state = load_state(reference_run)
    assert step == ref_step == TINY_STEPS - 1
    assert differing_leaves(state, ref_state) == []


def test_metrics_and_pass_at_k_are_global_and_written_once(two_process_run, reference_run):
    run_dir, ((out0, _), (out1, _)) = two_process_run
    rows, ref_rows = read_metrics(run_dir), read_metrics(reference_run)
    assert [(r["event"], r["step"]) for r in rows] == [(r["event"], r["step"]) for r in ref_rows]
    same = ("reward", "seq_len", "loss", "grad_norm", "tokens", "pass@1", "pass@2", "eval_examples")
    for r, ref in zip(rows, ref_rows):
        assert {k: r[k] for k in same if k in r} == {k: ref[k] for k in same if k in ref}
    assert "Step 0/" in out0 and "Step" not in out1  # only process 0 prints and logs
    assert (run_dir / "config.toml").is_file() and (run_dir / "model.json").is_file()


def test_two_processes_with_fsdp_inside_each_equal_one_process_bit_for_bit(tmp_path, fsdp_reference_run):
    """mesh_fsdp=2 on 2 processes x 2 devices: each process's devices split the params (the fsdp
    pair inside a process), the data axis spans the processes; the same bits as 1 process with
    the same (data 2, fsdp 2) mesh."""
    run_dir, ((out0, _), _) = _two_processes(tmp_path, "--mesh_fsdp=2")
    assert "mesh data 2 x fsdp 2" in out0
    step, state = load_state(run_dir)
    ref_step, ref_state = load_state(fsdp_reference_run)
    assert step == ref_step == TINY_STEPS - 1
    assert differing_leaves(state, ref_state) == []
