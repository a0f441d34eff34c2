"""GSM8K task tests: every golden_gsm8k_reward.json case, row -> conversation and the seed-42
order against golden_tokenizer.json, loading the shared GSM8K jsonl files, malformed rows,
missing sources and the start/stop/step view.

Golden checks read nanochat's own outputs from ../shared/fixtures/nanochat (never edited).
Run: `python -m pytest tests/test_gsm8k.py -q`
"""
import json
import subprocess
import sys

import pytest

from conftest import FIXTURES, REPO, SHARED
from jaxrl.tasks import GSM8K, Task, evaluate, extract_answer, load_task, reward, row_to_conversation

REWARD = json.loads((FIXTURES / "golden_gsm8k_reward.json").read_text())
CONVERSATIONS = json.loads((FIXTURES / "golden_tokenizer.json").read_text())["conversations"]
GSM8K_DIR = SHARED / "data" / "gsm8k"
GOOD_ROW = {"question": "What is 2+3?", "answer": "2+3 = <<2+3=5>>5\n#### 5"}


@pytest.fixture(scope="module")
def tasks(shared_dir):
    return {split: GSM8K(split, data_dir=GSM8K_DIR) for split in ("train", "test")}


@pytest.mark.parametrize("case", REWARD["cases"], ids=lambda c: f"{c['id']}-{c['category']}")
def test_reward_golden(case):
    """Every case scores as nanochat's, except a reference without a `#### <number>` answer: nanochat
    pays 1 when the completion has none either (None == None); jaxrl never rewards a missing answer
    (deliberate, see gsm8k.evaluate), and its loaders refuse such rows as malformed."""
    conversation, completion = case["conversation"], case["completion"]
    assert conversation["messages"][-1]["content"][-1]["text"] == case["reference_last_text_part"]
    assert extract_answer(case["reference_last_text_part"]) == case["extract_answer_ref"]
    assert extract_answer(completion) == case["extract_answer_completion"]
    expected = case["evaluate"]
    if case["extract_answer_ref"] is None:  # the synthetic None == None case: nanochat 1, jaxrl 0
        assert (case["extract_answer_completion"], expected) == (None, 1)
        expected = 0
    score = evaluate(conversation, completion)
    assert type(score) is int and score == expected
    value = reward(conversation, completion)
    assert type(value) is float and value == float(expected)
    assert GSM8K.reward(conversation, completion) == float(expected)


@pytest.mark.parametrize("case", CONVERSATIONS, ids=lambda c: f"{c['split']}-line{c['jsonl_line']}")
def test_row_to_conversation_golden(case):
    assert row_to_conversation(case["raw_row"]) == case["conversation"]


@pytest.mark.parametrize("case", CONVERSATIONS, ids=lambda c: f"{c['split']}-line{c['jsonl_line']}")
def test_shuffled_order_golden(tasks, case):
    task = tasks[case["split"]]
    assert task.order[case["task_index"]] == case["jsonl_line"]
    assert task[case["task_index"]] == case["conversation"]


def test_shared_gsm8k_sizes_and_first_shuffled_rows(tasks):
    train, test = tasks["train"], tasks["test"]
    assert (len(train), train.num_examples(), len(test), test.num_examples()) == (7473, 7473, 1319, 1319)
    # docs/nanochat.md#gsm8k-task-and-reward: the first shuffled indices, computed from these jsonl files.
    assert train.order[:16].tolist() == [3082, 2184, 5897, 2437, 6330, 819, 3812, 5878,
                                         5302, 5876, 5308, 1534, 2663, 4247, 4632, 1727]
    assert test.order[:8].tolist() == [30, 754, 429, 1010, 1284, 953, 751, 954]
    assert train[0]["messages"][0]["content"].startswith("Mimi picked up 2 dozen seashells")
    assert test[0]["messages"][0]["content"].startswith("Darrell and Allen's ages are in the ratio of 7:11")
    assert isinstance(train, Task)


def test_view_start_stop_step(tasks):
    full = tasks["train"]
    view = GSM8K("train", data_dir=GSM8K_DIR, start=5, stop=20, step=4)
    assert len(view) == 4  # ceil((20 - 5) / 4)
    assert [view[i] for i in range(4)] == [full[i] for i in (5, 9, 13, 17)]
    assert len(GSM8K("train", data_dir=GSM8K_DIR, start=7470)) == 3
    with pytest.raises(TypeError):
        view[1.0]


def test_view_rejects_bad_arguments():
    for kwargs in ({"start": -1}, {"start": 5, "stop": 4}, {"step": 0}):
        with pytest.raises(ValueError, match="start"):
            GSM8K("train", data_dir=GSM8K_DIR, **kwargs)
    with pytest.raises(ValueError, match="split"):
        GSM8K("validation", data_dir=GSM8K_DIR)


def _write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))


def test_local_directory_in_gsm8k_format(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"a <<{i}+1={i + 1}>>\n#### {i + 1}"} for i in range(10)]
    rows[3]["question"] = "raw U+2028 \u2028 is not a line break in JSONL"
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    _write_jsonl(tmp_path / "test.jsonl", lines[:5] + [""] + lines[5:])  # blank line ignored
    task = load_task(tmp_path, "test")
    assert len(task) == 10
    assert sorted(task[i]["messages"][0]["content"] for i in range(10)) == sorted(r["question"] for r in rows)
    assert task.reward(task[0], task[0]["messages"][1]["content"][-1]["text"]) == 1.0


MALFORMED = {
    "not_json": "{not json",
    "no_answer": json.dumps({"question": "q"}),
    "answer_not_str": json.dumps({"question": "q", "answer": 5}),
    "no_hashes": json.dumps({"question": "q", "answer": "just 5"}),
    "not_object": json.dumps(["q", "a #### 1"]),
}


@pytest.mark.parametrize("kind", MALFORMED)
def test_few_malformed_rows_are_skipped_and_counted(tmp_path, capsys, kind):
    good = [json.dumps(GOOD_ROW)] * 150
    _write_jsonl(tmp_path / "train.jsonl", good[:100] + [MALFORMED[kind]] + good[100:])
    task = GSM8K("train", data_dir=tmp_path)
    assert len(task) == 150
    out = capsys.readouterr().out
    assert "skipped 1 malformed of 151 rows" in out and "line 101" in out and str(tmp_path) in out


def test_many_malformed_rows_raise_naming_file_and_line(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [json.dumps(GOOD_ROW)] * 50 + [MALFORMED["no_hashes"]])
    with pytest.raises(ValueError, match=r"1 of 51 rows are malformed.*line 51: answer has no '####"):
        GSM8K("train", data_dir=tmp_path)


def test_missing_local_source_names_path_and_both_ways(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        GSM8K("test", data_dir=tmp_path / "absent")
    message = str(info.value)
    assert str(tmp_path / "absent" / "test.jsonl") in message
    assert "openai/gsm8k" in message and "test.jsonl" in message and "data_dir" in message


def test_local_rows_without_datasets_installed(tmp_path, monkeypatch, capsys):
    """An image without datasets (a lent accelerator machine, say) still reads a local folder."""
    rows = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(3)]
    _write_jsonl(tmp_path / "test.jsonl", [json.dumps(row) for row in rows])
    with_datasets = [GSM8K("test", data_dir=tmp_path)[i] for i in range(3)]
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    task = GSM8K("test", data_dir=tmp_path)
    assert "datasets is not installed" in capsys.readouterr().out
    assert [task[i] for i in range(3)] == with_datasets


def test_unreachable_hub_names_both_ways(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match=r"openai/gsm8k.*no network.*train\.jsonl"):
        load_task("gsm8k", "train")


def test_load_task_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="'arith'.*'gsm8k'.*directory"):
        load_task("arith", "train")


def test_evaluate_rejects_non_string_completion():
    conversation = row_to_conversation(GOOD_ROW)
    with pytest.raises(TypeError, match="completion must be a str"):
        evaluate(conversation, [5])
    with pytest.raises(ValueError, match="last message must be the assistant's"):
        evaluate({"messages": [{"role": "user", "content": "q"}]}, "#### 5")


def test_empty_text_pieces_are_kept_like_nanochat():
    conversation = row_to_conversation({"question": "q", "answer": "<<1+1=2>>\n#### 2"})
    assert conversation["messages"][1]["content"] == [
        {"type": "text", "text": ""}, {"type": "python", "text": "1+1"},
        {"type": "python_output", "text": "2"}, {"type": "text", "text": "\n#### 2"},
    ]
    spans = row_to_conversation({"question": "q", "answer": "<<a=b=c>> <<noeq>>"})["messages"][1]["content"]
    assert [p["text"] for p in spans if p["type"] != "text"] == ["a=b", "c", "noeq", ""]


@pytest.mark.cli
def test_module_imports_neither_jax_nor_torch():
    code = "import sys, jaxrl.tasks; sys.exit(bool({'jax', 'torch', 'datasets'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
