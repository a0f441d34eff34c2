"""scripts/device_check.sh rehearsed on this machine at toy sizes (DEVICE_CHECK_SMOKE=1), so the
script a short GPU loan depends on is known to run end to end before a GPU is ever lent:

    python -m pytest -q tests/test_device_check.py

The rehearsal runs as on the lent GPU image: packages that image lacks (datasets, tensorboardX,
rustbpe) cannot be imported, and the script finds its interpreter itself (PYTHON names this one).
"""
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, SHARED

pytestmark = [pytest.mark.cli]

SCRIPT = REPO / "scripts" / "device_check.sh"


MISSING_ON_GPU_IMAGE = ("datasets", "tensorboardX", "rustbpe")


def run_check(out, **env):
    hidden = out / "hidden-packages"  # importing any of them raises ImportError, as there
    for name in MISSING_ON_GPU_IMAGE:
        (hidden / name).mkdir(parents=True, exist_ok=True)
        (hidden / name / "__init__.py").write_text(f"raise ImportError('{name} is not on the GPU image')\n")
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_", "JAXRL_"))}
    environ.update(DEVICE_CHECK_SMOKE="1", JAXRL_SHARED=str(SHARED), PYTHON=sys.executable,
                   PYTHONPATH=str(hidden), **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=900)


@pytest.mark.slow
def test_every_step_runs_and_lands_in_the_table(tmp_path):
    proc = run_check(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == ["gpu_tests", "sampler", "train", "rl_step", "floor", "sampler_arith",
                                          "eval_slots", "eval_all_rows"]
    assert all(s["rc"] == 0 for s in steps), steps
    assert "datasets is not installed" in (tmp_path / "sampler_arith.log").read_text()  # the fixture's task still loads
    assert "2 skipped" in (tmp_path / "gpu_tests.log").read_text()  # on a CPU: reported, not passed
    records = [json.loads(line) for line in (tmp_path / "device_check.jsonl").read_text().splitlines()]
    assert [r["bench"] for r in records] == ["sampler", "train", "rl-step", "floor", "sampler", "sampler", "sampler"]
    slots, all_rows = records[-2:]  # 2 prompts x 2 samples: in 1 slot, then all 4 rows at once
    assert slots["row_steps"] == slots["decode_steps"] and all_rows["row_steps"] == 4 * all_rows["decode_steps"]
    assert (slots["slots"], all_rows["slots"]) == (1, 0)
    assert all(r.get("profile") for r in records[:3]), "sampler, train and rl-step ran with --profile"
    summary = json.loads(proc.stdout.strip().splitlines()[-2])  # the last line is the script's own
    assert [r["bench"] for r in summary["rows"]] == [r["bench"] for r in records]
    assert summary["failed_steps"] == [] and summary["commit"]
    assert all(r["tokens/s"] > 0 and r["seconds"] > 0 for r in summary["rows"])
    assert summary["rows"][1]["shape"] == "8 rows x 32" and summary["rows"][-2]["shape"].endswith(", 1 slots")


def test_a_spent_budget_is_reported_not_silent(tmp_path):
    """With no time left every step is listed as not run, and the check exits non-zero."""
    proc = run_check(tmp_path, DEVICE_CHECK_BUDGET="5")
    assert proc.returncode == 1, proc.stdout[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 8 and all(s["rc"] is None for s in steps)
    summary = json.loads(proc.stdout.strip().splitlines()[-2])
    assert summary["rows"] == [] and len(summary["failed_steps"]) == 8
    assert proc.stdout.count("not run (budget spent)") == 8
