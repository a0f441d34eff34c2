"""jaxrl/rollout.py pass@k estimators against values worked out by hand (no sampling, no torch).

Run: `python -m pytest -q tests/test_rollout.py`.
"""
import math

import numpy as np
import pytest

from jaxrl import rollout

F, T = False, True
# 3 questions x 4 samples: 0, 1 and 3 correct. Question 1's correct sample is its third, question
# 2's first sample is correct: the first-k estimator sees only positions, the unbiased one counts.
CORRECT = np.array([[F, F, F, F], [F, F, T, F], [T, T, F, T]])


def test_unbiased_pass_at_k_hand_computed():
    """pass@k = mean over questions of 1 − C(n−c, k)/C(n, k), n = 4, c = (0, 1, 3):
    k=1: (0 + 1/4 + 3/4)/3 = 1/3; k=2: (0 + (1 − 3/6) + (1 − 0/6))/3 = 1/2;
    k=3: (0 + (1 − 1/4) + 1)/3 = 7/12; k=4: (0 + 1 + 1)/3 = 2/3.
    95% interval: mean ± 1.96·s/√3, s the sample std (ddof 1) of the per-question values, clipped to
    [0, 1]. k=1: values (0, 1/4, 3/4), s² = (16 + 1 + 25)/144/2 = 7/48; k=2: (0, 1/2, 1), s = 1/2."""
    got = rollout.pass_at_k_unbiased(CORRECT)
    assert list(got) == ["pass@1", "pass@2", "pass@3", "pass@4"]
    for k, mean in zip(got, (1 / 3, 1 / 2, 7 / 12, 2 / 3)):
        assert got[k][0] == pytest.approx(mean, rel=1e-12), k
    half1 = 1.96 * math.sqrt(7 / 48) / math.sqrt(3)  # 0.4321: reaches below 0
    assert got["pass@1"] == pytest.approx((1 / 3, 0.0, 1 / 3 + half1), rel=1e-12)
    half2 = 1.96 * 0.5 / math.sqrt(3)  # 0.5658: clipped on both sides
    assert got["pass@2"] == pytest.approx((0.5, 0.0, 1.0), rel=1e-12) and 0.5 - half2 < 0 < 1 < 0.5 + half2


def test_first_k_estimator_hand_computed():
    """nanochat's estimator: a question counts if one of its FIRST k samples is correct.
    Questions solved within the first 1, 2, 3, 4 samples: {2}, {2}, {1, 2}, {1, 2}."""
    got = rollout.pass_at_k_first(CORRECT)
    assert got == pytest.approx({"pass@1": 1 / 3, "pass@2": 1 / 3, "pass@3": 2 / 3, "pass@4": 2 / 3}, rel=1e-12)
    # where the correct samples sit changes the first-k estimate, never the unbiased one
    moved = CORRECT[:, ::-1]
    assert rollout.pass_at_k_first(moved)["pass@2"] == pytest.approx(2 / 3)
    assert rollout.pass_at_k_unbiased(moved) == rollout.pass_at_k_unbiased(CORRECT)


def test_unbiased_larger_n_and_edges():
    """n = 10, c = 3, k = 5: 1 − C(7,5)/C(10,5) = 1 − 21/252 = 11/12. c = 0 gives 0 and c > n − k
    gives exactly 1 (C(n−c, k) = 0). One question: no spread to estimate, the interval is the point."""
    row = np.zeros((1, 10), bool)
    row[0, [1, 4, 8]] = True
    got = rollout.pass_at_k_unbiased(row)
    assert got["pass@5"] == pytest.approx((11 / 12,) * 3, rel=1e-12)
    assert got["pass@8"][0] == 1.0 and got["pass@1"][0] == pytest.approx(0.3, rel=1e-12)
    assert rollout.pass_at_k_unbiased(np.zeros((2, 10), bool))["pass@10"] == (0.0, 0.0, 0.0)
    # many samples: the product form stays finite where C(200, 100) ≈ 9e58 would not fit a float32
    many = np.zeros((1, 200), bool)
    many[0, :100] = True
    assert rollout.pass_at_k_unbiased(many)["pass@100"][0] == 1.0
    assert rollout.pass_at_k_unbiased(many)["pass@2"][0] == pytest.approx(1 - (100 * 99) / (200 * 199), rel=1e-12)


def test_pass_at_k_row_keys():
    row = rollout.pass_at_k_row(CORRECT)
    assert row["pass@2"] == pytest.approx(1 / 3) and row["unbiased_pass@2"] == pytest.approx(1 / 2)
    assert (row["unbiased_pass@2_lo"], row["unbiased_pass@2_hi"]) == (0.0, 1.0)
    assert set(row) == {f"{p}pass@{k}{s}" for k in range(1, 5)
                        for p, s in (("", ""), ("unbiased_", ""), ("unbiased_", "_lo"), ("unbiased_", "_hi"))}
