"""scripts/eval_rl.py on the nanochat-sft-arith fixture (a real nanochat SFT checkpoint, read
through convert/, so torch is needed): the JSON it writes, and (slow) the paired criterion
against nanochat's own Engine on all 500 test questions (../shared/fixtures/nanochat-sft-arith/
engine_passk.json: per-question correct counts of 8 samples at T=1, top_k 50, 256 new tokens).

Run: `python -m pytest tests/test_eval.py -q` (the 500-question check: `-m slow`, a few minutes)
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ARITH, REPO, SHARED

ARITH_DATA = SHARED / "data" / "arith"


def _eval_rl(tmp_path, *args):
    pytest.importorskip("torch")
    if not ARITH.is_dir():
        pytest.fail(f"fixture {ARITH} not found; set JAXRL_SHARED to the shared folder")
    out = tmp_path / "eval.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "scripts/eval_rl.py", "--checkpoint", str(ARITH), "--task", str(ARITH_DATA),
           "--json", str(out), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_json_agrees_with_its_per_question_counts(tmp_path):
    """The summary figures are the estimators applied to the per-question results the JSON lists:
    pass@1 is the share of questions whose FIRST sample is right, pass@n the share with any right,
    and the unbiased pass@k (with its interval) is recomputed here from the counts with math.comb.
    The stdout lines print the same figures."""
    n = 4
    result, stdout = _eval_rl(tmp_path, "--max-examples", "6", "--num-samples", str(n), "--max-new-tokens", "48")
    assert result["num_examples"] == 6 and result["num_samples"] == n
    per_q = result["per_question"]
    assert [q["index"] for q in per_q] == list(range(6))
    counts = np.array([q["correct"] for q in per_q])
    first = np.array([q["first_correct"] for q in per_q])
    assert all(type(q["correct"]) is int for q in per_q)
    assert 0 < counts.sum() < n * len(counts), f"counts {counts.tolist()}: the checks below need mixed outcomes"
    assert result["pass@1"] == pytest.approx(first.mean()) and result["pass@4"] == pytest.approx((counts > 0).mean())
    assert result["mean_sample_accuracy"] == pytest.approx(counts.sum() / (n * len(counts)))
    for k in range(1, n + 1):
        per = [1 - math.comb(n - c, k) / math.comb(n, k) for c in counts]
        half = 1.96 * np.std(per, ddof=1) / np.sqrt(len(per))
        want = {"mean": np.mean(per), "lo": max(0.0, np.mean(per) - half), "hi": min(1.0, np.mean(per) + half)}
        assert result["unbiased"][f"pass@{k}"] == pytest.approx(want, abs=1e-12), k
        assert f"Pass@{k}: {result[f'pass@{k}']:.4f} | unbiased {want['mean']:.4f}" in stdout


@pytest.mark.slow
def test_paired_against_nanochat_engine(tmp_path):
    """Mean per-question accuracy within +-0.035 and pass@8 within +-0.06 of nanochat's, paired."""
    ref = json.loads((ARITH / "engine_passk.json").read_text())
    result, _ = _eval_rl(tmp_path, "--num-samples", "8", "--max-new-tokens", "256", "--temperature", "1.0")
    assert result["num_examples"] == ref["num_examples"] == 500
    ours = np.array([q["correct"] for q in result["per_question"]]) / 8
    theirs = np.array([q["correct"] for q in sorted(ref["per_question"], key=lambda q: q["index"])]) / 8
    diff = ours - theirs
    print(f"mean accuracy ours {ours.mean():.4f} nanochat {theirs.mean():.4f}: paired diff {diff.mean():+.4f} "
          f"(se {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}); pass@8 ours {result['pass@8']:.4f} "
          f"nanochat {ref['pass@k']['8']:.4f}")
    assert abs(diff.mean()) <= 0.035
    assert abs(result["pass@8"] - ref["pass@k"]["8"]) <= 0.06
