"""The built-in arith task: deterministic rows in GSM8K's format, disjoint splits, a working
difficulty knob, reward 1 for the reference answer.

Run: `python -m pytest tests/test_arith_task.py -q`
"""
import re

import numpy as np
import pytest

from jaxrl.calculator import use_calculator
from jaxrl.tasks import Task, extract_answer, open_task
from jaxrl.tasks.arith import ArithTask, split_of

SPAN = re.compile(r"<<([^=>]+)=([^>]+)>>(\d+)")


def test_rows_are_deterministic_and_seeded():
    a, b = ArithTask("train", seed=3), ArithTask("train", seed=3)
    assert [a.row(i) for i in range(20)] == [b.row(i) for i in range(20)]
    assert a[7] == b[7]
    other = ArithTask("train", seed=4)
    assert [a.row(i) for i in range(20)] != [other.row(i) for i in range(20)]


def test_gsm8k_format_and_calculator_spans():
    task = ArithTask("test", difficulty=3)
    for i in range(50):
        row = task.row(i)
        assert row["answer"].splitlines()[-1] == f"#### {extract_answer(row['answer'])}"
        spans = SPAN.findall(row["answer"])
        assert spans, row
        for expr, out, written in spans:
            assert use_calculator(expr) == out  # the tool output the sampler will force
            assert float(out) == int(written)
        assert spans[-1][2] == extract_answer(row["answer"])


def test_reference_answer_gets_reward_one():
    task = ArithTask("train")
    assert isinstance(task, Task)
    for i in range(20):
        conversation = task[i]
        reference = "".join(p["text"] for p in conversation["messages"][-1]["content"] if p["type"] != "python")
        assert task.reward(conversation, reference) == 1.0
        assert task.evaluate(conversation, "#### -1") == 0


def test_train_and_test_are_disjoint():
    train, test = ArithTask("train", difficulty=1), ArithTask("test", difficulty=1)
    train_q = {train.row(i)["question"] for i in range(3000)}
    test_q = {test.row(i)["question"] for i in range(500)}
    assert not train_q & test_q
    assert all(split_of(q) == "test" for q in test_q) and all(split_of(q) == "train" for q in train_q)


def test_difficulty_changes_problem_size():
    def mean_steps(d):
        task = ArithTask("train", difficulty=d)
        return np.mean([task.row(i)["answer"].count("<<") for i in range(200)])

    steps = [mean_steps(d) for d in (1, 2, 3)]
    assert steps[0] == 1.0 and steps[0] < steps[1] < steps[2] <= 3


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="difficulty must be an int in 1..3"):
        ArithTask("train", difficulty=5)
    with pytest.raises(ValueError, match="split must be one of"):
        ArithTask("val")
    with pytest.raises(IndexError, match="out of range"):
        ArithTask("test", size=10).row(10)


def test_open_task_maps_names():
    assert isinstance(open_task("arith", None, "test", difficulty=1), ArithTask)
