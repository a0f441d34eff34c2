"""RL tasks: a conversation source plus a reward. All are GSM8K-format: GSM8K itself, any folder of
GSM8K-format jsonl, and the built-in generated arithmetic problems (`arith.ArithTask`).

A task is anything with `len(task)`, `task[i] -> conversation` (nanochat's chat dict) and
`task.reward(conversation, completion) -> float` (also `evaluate -> int`, `num_examples()`).
Test: `python -m pytest tests/test_gsm8k.py -q`.
"""
from pathlib import Path
from typing import Protocol, runtime_checkable

from jaxrl.tasks.gsm8k import GSM8K, evaluate, extract_answer, reward, row_to_conversation

__all__ = ["GSM8K", "Task", "evaluate", "extract_answer", "load_task", "open_task", "reward", "row_to_conversation"]


@runtime_checkable
class Task(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> dict: ...
    def num_examples(self) -> int: ...
    def evaluate(self, conversation: dict, completion: str) -> int: ...
    def reward(self, conversation: dict, completion: str) -> float: ...


def load_task(name_or_dir: str | Path, split: str) -> GSM8K:
    """"gsm8k" -> GSM8K from the Hugging Face hub; an existing directory -> GSM8K-format
    `<dir>/<split>.jsonl` (e.g. the shared gsm8k or arith data folders)."""
    if str(name_or_dir) == "gsm8k":
        return GSM8K(split)
    if Path(name_or_dir).is_dir():
        return GSM8K(split, data_dir=name_or_dir)
    if any(sep in str(name_or_dir) for sep in ("/", "\\")):  # meant as a folder
        raise FileNotFoundError(f"task directory {str(name_or_dir)!r} does not exist: pass an existing folder "
                                f"holding {split}.jsonl in GSM8K format, or 'gsm8k' or 'arith'")
    raise ValueError(f"unknown task {str(name_or_dir)!r}: pass 'gsm8k' (Hugging Face hub openai/gsm8k) "
                     f"or a directory holding {split}.jsonl in GSM8K format")


def open_task(name: str, data_dir, split: str, *, difficulty: int = 2):
    """A task by config name: "arith" without data_dir is the built-in generator
    (`ArithTask(split, difficulty)`); with data_dir, or "gsm8k", or a directory: `load_task`."""
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            state = "is a file, not a directory" if Path(data_dir).exists() else "does not exist"
            raise FileNotFoundError(f"data_dir {str(data_dir)!r} {state}: pass a folder holding train.jsonl and "
                                    f"test.jsonl in GSM8K's format, or leave data_dir unset for task {name!r}'s "
                                    "default source")
        return load_task(data_dir, split)
    if name == "arith":
        from jaxrl.tasks.arith import ArithTask

        return ArithTask(split, difficulty=difficulty)
    return load_task(name, split)
