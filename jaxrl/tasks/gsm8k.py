"""GSM8K as an RL task: nanochat's tasks/gsm8k.py and the Task view of tasks/common.py.

Owns: loading rows (Hugging Face hub `openai/gsm8k`, or any local folder holding
`train.jsonl`/`test.jsonl` in GSM8K's format, e.g. shared/data/gsm8k or shared/data/arith),
nanochat's seed-42 shuffle, row -> conversation (calculator spans become python /
python_output parts), answer extraction, evaluate and reward (docs/nanochat.md#gsm8k-task-and-reward).
No jax; `datasets` is imported only when rows are loaded.

Test: `python -m pytest tests/test_gsm8k.py -q` (golden cases from ../shared/fixtures).
"""
import json
import operator
import re
import tempfile
from pathlib import Path

import numpy as np

HUB_NAME = "openai/gsm8k"
SUBSETS = ("main", "socratic")
SPLITS = ("train", "test")
SHUFFLE_SEED = 42  # nanochat: ds.shuffle(seed=42) == np.random.default_rng(42).permutation(n)
MAX_BAD_FRACTION = 0.01  # more malformed rows than this is a broken file, not noise
BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, written by some Windows editors

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")  # verbatim from nanochat
_CALC_SPAN_RE = re.compile(r"(<<[^>]+>>)")  # capturing group: re.split keeps the spans


def extract_answer(text: str) -> str | None:
    """First `#### <number>` in `text`, commas removed (`#### 1,080` -> "1080"); None if absent."""
    match = ANSWER_RE.search(text)
    if match is None:
        return None
    return match.group(1).strip().replace(",", "")


def row_to_conversation(row: dict) -> dict:
    """nanochat's GSM8K.get_example: `<<expr=result>>` spans become python/python_output parts."""
    parts = []
    for piece in _CALC_SPAN_RE.split(row["answer"]):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})  # may be "" (kept, as nanochat does)
    messages = [
        {"role": "user", "content": row["question"]},
        {"role": "assistant", "content": parts},
    ]
    return {"messages": messages}


def evaluate(conversation: dict, completion: str) -> int:
    """1 if the completion's first `####` answer equals the reference's (string equality), else 0.

    Deliberate departure from nanochat: a reference without a `#### <number>` answer scores 0 for
    every completion (nanochat compares None == None and pays 1 to a completion without an answer).
    The loaders refuse such rows as malformed, so this only guards hand-made conversations.
    """
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str (decoded response), got {type(completion).__name__}")
    message = conversation["messages"][-1]
    if message["role"] != "assistant" or not isinstance(message["content"], list):
        raise ValueError("last message must be the assistant's, with a list of parts as content; "
                         f"got role {message['role']!r}, content {type(message['content']).__name__}")
    reference = extract_answer(message["content"][-1]["text"])
    return int(reference is not None and extract_answer(completion) == reference)


def reward(conversation: dict, completion: str) -> float:
    """float(evaluate(...)): 1.0 or 0.0."""
    return float(evaluate(conversation, completion))


class GSM8KFormat:
    """Scoring shared by every task in GSM8K's format (`#### N` answers): nanochat's evaluate/reward."""

    @staticmethod
    def evaluate(conversation: dict, completion: str) -> int:
        return evaluate(conversation, completion)

    @staticmethod
    def reward(conversation: dict, completion: str) -> float:
        return reward(conversation, completion)


class GSM8K(GSM8KFormat):
    """nanochat's GSM8K task: rows shuffled with seed 42, viewed through start/stop/step.

    `GSM8K("train")` loads `openai/gsm8k` from the hub; `GSM8K("train", data_dir=d)` reads
    `d/train.jsonl`. `len(task)` is ceil((stop_or_n - start) / step) and `task[i]` is the
    conversation of shuffled row `start + i * step` (no bounds check beyond Python's).
    """

    def __init__(self, split: str, data_dir: str | Path | None = None, *, subset: str = "main",
                 start: int = 0, stop: int | None = None, step: int = 1):
        if split not in SPLITS:
            raise ValueError(f"GSM8K split must be one of {SPLITS}, got {split!r}")
        if subset not in SUBSETS:
            raise ValueError(f"GSM8K subset must be one of {SUBSETS}, got {subset!r}")
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"need 0 <= start <= stop and step >= 1, got start={start} stop={stop} step={step}")
        self.split, self.start, self.stop, self.step = split, start, stop, step
        if data_dir is None:
            rows = _load_hub_rows(subset, split)
        else:
            rows = _load_local_rows(Path(data_dir), split)
        self.order = np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))  # shuffled i -> row
        self.rows = [rows[j] for j in self.order]

    def num_examples(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else self.stop
        num = -(-(stop - self.start) // self.step)  # ceil division
        if num < 0:
            raise ValueError(f"empty view: start={self.start} is past the {stop} rows")
        return num

    def __getitem__(self, index: int) -> dict:
        return self.get_example(self.start + operator.index(index) * self.step)

    def get_example(self, physical_index: int) -> dict:
        """Conversation of shuffled row `physical_index` (ignores the view)."""
        return row_to_conversation(self.rows[physical_index])


def _source_hint(split: str) -> str:
    return (f"GSM8K rows come either from the Hugging Face hub ({HUB_NAME!r}, data_dir=None) or from "
            f"a local folder passed as data_dir that holds {split}.jsonl (one JSON object per line "
            "with 'question' and 'answer' fields, the answer ending in '#### <number>')")


def _load_hub_rows(subset: str, split: str) -> list[dict]:
    import datasets  # heavy; only when rows are actually loaded

    try:
        ds = datasets.load_dataset(HUB_NAME, subset, split=split)
    except Exception as e:  # offline, unknown name, ...: say both ways to get the data
        raise FileNotFoundError(f"could not load {HUB_NAME!r} ({subset}, {split}) from the hub: "
                                f"{type(e).__name__}: {e}. {_source_hint(split)}") from e
    records = [(i, row) for i, row in enumerate(ds)]
    return _keep_valid_rows(f"{HUB_NAME} {split}", records, [], kind="row index")


def _load_local_rows(data_dir: Path, split: str) -> list[dict]:
    path = data_dir / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"GSM8K file {path} not found. {_source_hint(split)}")
    records, unparsable = _scan_jsonl(path)
    if not records and not unparsable:
        raise ValueError(f"GSM8K file {path} has no rows: it must hold one JSON object per line with "
                         "'question' and 'answer' fields")
    rows = _keep_valid_rows(str(path), records, unparsable, kind="line")
    if len(rows) == len(records) and not unparsable and not _starts_with_bom(path):
        return _read_with_datasets(path, expected=rows)
    return rows  # datasets' JSON loader cannot read files with malformed lines


def _starts_with_bom(path: Path) -> bool:
    """datasets' JSON loader is not asked to read files that start with a byte-order mark."""
    with open(path, "rb") as f:
        return f.read(len(BOM)) == BOM


def _scan_jsonl(path: Path):
    """[(line_number, object)] for non-blank JSON lines, and [(line_number, reason)] for the rest."""
    records, unparsable = [], []
    try:
        # utf-8-sig: a leading byte-order mark is not a row; not splitlines(): U+2028 may be in a string
        lines = path.read_text(encoding="utf-8-sig").split("\n")
    except OSError as e:
        raise OSError(f"cannot read GSM8K file {path}: {e}. {_source_hint(path.stem)}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"GSM8K file {path} is not UTF-8 text: {e}") from e
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines are skipped, as datasets' JSON loader does
        try:
            records.append((line_number, json.loads(line)))
        except json.JSONDecodeError as e:
            unparsable.append((line_number, f"not JSON ({e.msg})"))
    return records, unparsable


def reference_problem(answer: str) -> str | None:
    """Why the reference answer that `evaluate` would extract from `answer` is not a number, or None."""
    if "####" not in answer:
        return "answer has no '#### <number>' line"
    last_text = row_to_conversation({"question": "", "answer": answer})["messages"][-1]["content"][-1]["text"]
    reference = extract_answer(last_text)
    try:
        float(reference)
    except (TypeError, ValueError):
        tail = last_text[last_text.rfind("####"):][:30] if "####" in last_text else last_text[-30:]
        return f"reference answer {tail!r} is not '#### <number>'"
    return None


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, found {type(row).__name__}"
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str):
            return f"field {key!r} missing or not a string"
    return reference_problem(row["answer"])


def _keep_valid_rows(source: str, records, unparsable, kind: str) -> list[dict]:
    """Valid {question, answer} rows; prints how many were skipped, raises above 1 %."""
    bad = list(unparsable)
    rows = []
    for position, row in records:
        problem = _row_problem(row)
        if problem is None:
            rows.append({"question": row["question"], "answer": row["answer"]})
        else:
            bad.append((position, problem))
    total = len(records) + len(unparsable)
    if not bad:
        return rows
    bad.sort()
    listed = "; ".join(f"{kind} {pos}: {why}" for pos, why in bad[:5])
    if len(bad) > MAX_BAD_FRACTION * total:
        raise ValueError(f"{source}: {len(bad)} of {total} rows are malformed (more than "
                         f"{MAX_BAD_FRACTION:.0%}); first: {listed}")
    print(f"GSM8K: skipped {len(bad)} malformed of {total} rows in {source} ({listed})")
    return rows


def _read_with_datasets(path: Path, expected: list[dict]) -> list[dict]:
    """Rows through datasets' JSON loader (as nanochat reads its data), cache in a temp dir.

    Without datasets installed (a core dependency, but an accelerator image may lack it) the line
    scan's rows are used: they are what the loader is checked to return.
    """
    try:
        import datasets  # heavy; only when rows are actually loaded
    except ImportError:
        print(f"GSM8K: datasets is not installed; read {path} with a line scan")
        return expected

    with tempfile.TemporaryDirectory(prefix="jaxrl-gsm8k-") as cache_dir:
        try:
            ds = datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=cache_dir)
        except Exception as e:  # e.g. extra fields whose types differ between lines
            print(f"GSM8K: datasets could not read {path} ({type(e).__name__}: {e}); using a line scan")
            return expected
        rows = [{"question": q, "answer": a} for q, a in zip(ds["question"], ds["answer"])]
    assert rows == expected, f"{path}: datasets' JSON loader and a line scan disagree"
    return rows
