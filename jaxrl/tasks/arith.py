"""Built-in synthetic task: arithmetic word problems in GSM8K's format, generated, never downloaded.

Each problem is a GSM8K row, `{"question": ..., "answer": "... <<4*7=28>>28 ...\\n#### 22"}`, made
from a small set of templates (shopping and change, sharing equally, "more than", boxes of
items) and turned into a conversation by `gsm8k.row_to_conversation`, so the calculator spans
become python / python_output parts exactly as for GSM8K. The python_output text is what
`jaxrl.calculator` returns for the expression (`49/7` -> `7.0`), so a demonstration shows the
model the same tool output it will see while sampling.

- Deterministic: row i of a split depends only on (seed, difficulty, split, i).
- Train and test are disjoint by construction: a question belongs to the test split iff
  crc32(question) % TEST_SHARE == 0 (rows are drawn until they land in their split).
- `difficulty` (1..3) is the most calculator steps a problem takes (drawn uniformly from
  1..difficulty); the operands also grow with it (up to 10 * 2**difficulty).

    task = ArithTask("train", difficulty=2, seed=0)
    task[0]                              # nanochat conversation
    task.reward(task[0], completion)     # 1.0 iff the `#### N` answers match

No jax. Test: `python -m pytest tests/test_arith_task.py -q`.
"""
from __future__ import annotations

import operator
import zlib

import numpy as np

from jaxrl.calculator import use_calculator
from jaxrl.tasks.gsm8k import GSM8KFormat, row_to_conversation

SPLITS = ("train", "test")
DEFAULT_SIZE = {"train": 100_000, "test": 500}
MAX_DIFFICULTY = 3
TEST_SHARE = 8  # 1/8 of the question space is reserved for the test split

NAMES = (("Leo", "he"), ("Amelia", "she"), ("Nina", "she"), ("Carlos", "he"), ("Sophia", "she"),
         ("Daniel", "he"), ("Felix", "he"), ("Zoe", "she"), ("Lily", "she"), ("Ravi", "he"),
         ("Hannah", "she"), ("Samuel", "he"), ("Julia", "she"), ("Ben", "he"), ("Maya", "she"),
         ("Omar", "he"))
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "stamps", "beads",
         "eggs", "balloons", "cards", "crayons", "buttons", "oranges", "candies")
BOXES = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("pack", "packs"), ("basket", "baskets"),
         ("crate", "crates"))
BILLS = (10, 20, 50, 100, 200, 500, 1000)


class _Draw:
    """The random choices of one problem: names, items, boxes and operands."""

    def __init__(self, rng: np.random.Generator, hi: int):
        self.rng, self.hi = rng, hi
        people = rng.choice(len(NAMES), size=3, replace=False)
        (self.a, self.pa), (self.b, _), (self.c, _) = (NAMES[int(i)] for i in people)
        self.items, self.items2 = (ITEMS[int(i)] for i in rng.choice(len(ITEMS), size=2, replace=False))
        self.box, self.boxes = BOXES[int(rng.integers(len(BOXES)))]

    def num(self, lo: int = 2, hi: int | None = None) -> int:
        return int(self.rng.integers(lo, (hi or self.hi) + 1))

    def small(self) -> int:
        """A factor or divisor: products stay in a few digits."""
        return self.num(2, max(3, self.hi // 4))


def _step(lead: str, expr: str, tail: str, money: str = "") -> tuple[str, int]:
    """One answer line with its calculator span, and the step's (integral) value."""
    calc = use_calculator(expr)
    value = float(calc)
    assert value == int(value) and value >= 0, f"template made a non-integral or negative step {expr}={calc}"
    value = int(value)
    return f"{lead}{expr} = {money}<<{expr}={calc}>>{value}{tail}", value


def _one_step(d: _Draw):
    kind = int(d.rng.integers(4))
    x, y = d.num(), d.num()
    if kind == 0:
        q = (f"{d.a} picks {x} {d.items} in the morning and {y} {d.items} in the afternoon. "
             f"How many {d.items} did {d.a} pick in all?")
        return q, [("In all that is ", f"{x}+{y}", f" {d.items}.")]
    if kind == 1:
        x, y = max(x, y) + 1, min(x, y)
        q = f"{d.a} has {x} {d.items} and {d.b} has {y} {d.items}. How many more {d.items} does {d.a} have than {d.b}?"
        return q, [(f"{d.a} has ", f"{x}-{y}", f" more {d.items}.")]
    x, y = d.small(), d.small()
    if kind == 2:
        q = f"{d.a} has {x} {d.boxes} with {y} {d.items} in each {d.box}. How many {d.items} does {d.a} have?"
        return q, [(f"{d.a} has ", f"{x}*{y}", f" {d.items}.")]
    q = (f"{d.a} has {x * y} {d.items} and puts them equally into {y} {d.boxes}. "
         f"How many {d.items} are in each {d.box}?")
    return q, [(f"Each {d.box} has ", f"{x * y}/{y}", f" {d.items}.")]


def _two_steps(d: _Draw):
    kind = int(d.rng.integers(4))
    she = d.pa.capitalize()
    if kind == 0:
        x, y = d.small(), d.small()
        bill = next(b for b in BILLS if b > x * y)
        q = (f"{d.a} buys {x} {d.items} for ${y} each and pays with a ${bill} bill. "
             f"How much change does {d.pa} get?")
        return q, [(f"The {d.items} cost ", f"{x}*{y}", ".", "$"), (f"{she} gets ", f"{bill}-{{0}}", " in change.", "$")]
    if kind == 1:
        x, y = d.num(), d.num()
        q = (f"{d.a} has {x} {d.items}. {d.b} has {y} more {d.items} than {d.a}. "
             f"How many {d.items} do they have together?")
        return q, [(f"{d.b} has ", f"{x}+{y}", f" {d.items}."), ("Together they have ", f"{x}+{{0}}", f" {d.items}.")]
    if kind == 2:
        x, y = d.small(), d.small()
        z = d.num(1, x * y - 1)
        q = (f"{d.a} has {x} {d.boxes} with {y} {d.items} in each {d.box}. {she} gives away {z} {d.items}. "
             f"How many {d.items} does {d.a} have left?")
        return q, [(f"{d.a} had ", f"{x}*{y}", f" {d.items}."), (f"{she} has ", f"{{0}}-{z}", f" {d.items} left.")]
    k, each = d.small(), d.small()
    x = d.num(1, k * each - 1)
    q = (f"{d.a} has {x} {d.items} and {d.b} has {k * each - x} {d.items}. They put them together and split "
         f"them equally into {k} {d.boxes}. How many {d.items} are in each {d.box}?")
    return q, [("Together they have ", f"{x}+{k * each - x}", f" {d.items}."), (f"Each {d.box} has ", f"{{0}}/{k}", f" {d.items}.")]


def _three_steps(d: _Draw):
    kind = int(d.rng.integers(3))
    she = d.pa.capitalize()
    if kind == 0:
        x, y, z = d.small(), d.small(), d.num()
        w = d.num(1, x * y + z - 1)
        q = (f"{d.a} has {x} {d.boxes} with {y} {d.items} in each {d.box}. {d.b} gives {d.a} {z} more "
             f"{d.items}. Then {d.pa} gives away {w} {d.items}. How many {d.items} does {d.a} have now?")
        return q, [(f"{d.a} had ", f"{x}*{y}", f" {d.items}."), (f"Then {d.pa} had ", f"{{0}}+{z}", f" {d.items}."),
                   (f"{she} has ", f"{{1}}-{w}", f" {d.items} now.")]
    if kind == 1:
        x, y, u, v = d.small(), d.small(), d.small(), d.small()
        q = (f"{d.a} buys {x} {d.items} for ${y} each and {u} {d.items2} for ${v} each. "
             f"How much does {d.pa} spend in all?")
        return q, [(f"The {d.items} cost ", f"{x}*{y}", ".", "$"), (f"The {d.items2} cost ", f"{u}*{v}", ".", "$"),
                   (f"{she} spends ", "{0}+{1}", " in all.", "$")]
    k, each = d.small(), d.small()
    x = d.num(1, max(1, k * each // 2))
    y = d.num(1, k * each - x)
    z = k * each - x - y
    q = (f"{d.a} has {x} {d.items}, {d.b} has {y} {d.items} and {d.c} has {z} {d.items}. They put them "
         f"together and split them equally into {k} {d.boxes}. How many {d.items} are in each {d.box}?")
    return q, [(f"{d.a} and {d.b} have ", f"{x}+{y}", f" {d.items}."), ("All three have ", f"{{0}}+{z}", f" {d.items}."),
               (f"Each {d.box} has ", f"{{1}}/{k}", f" {d.items}.")]


TEMPLATES = (_one_step, _two_steps, _three_steps)  # index = calculator steps - 1


def make_row(rng: np.random.Generator, difficulty: int) -> dict:
    """One GSM8K row; `{i}` in a step's expression is the value of step i."""
    d = _Draw(rng, hi=10 * 2**difficulty)
    question, steps = TEMPLATES[int(rng.integers(difficulty))](d)
    lines, values = [], []
    for lead, expr, tail, *money in steps:
        line, value = _step(lead, expr.format(*values), tail, *money)
        lines.append(line)
        values.append(value)
    return {"question": question, "answer": "\n".join(lines) + f"\n#### {values[-1]}"}


def split_of(question: str) -> str:
    return "test" if zlib.crc32(question.encode("utf-8")) % TEST_SHARE == 0 else "train"


class ArithTask(GSM8KFormat):
    """`len(task)` rows of one split; `task[i]` is the conversation of row i (made on demand)."""

    def __init__(self, split: str, difficulty: int = 2, seed: int = 0, size: int | None = None):
        if split not in SPLITS:
            raise ValueError(f"ArithTask split must be one of {SPLITS}, got {split!r}")
        if not (isinstance(difficulty, int) and 1 <= difficulty <= MAX_DIFFICULTY):
            raise ValueError(f"difficulty must be an int in 1..{MAX_DIFFICULTY} (most calculator steps per "
                             f"problem), got {difficulty!r}")
        size = DEFAULT_SIZE[split] if size is None else size
        if not (isinstance(size, int) and size >= 1):
            raise ValueError(f"size must be a positive int, got {size!r}")
        self.split, self.difficulty, self.seed, self.size = split, difficulty, seed, size

    def row(self, index: int) -> dict:
        """The GSM8K row of `index`: drawn until its question lands in this split."""
        index = operator.index(index)
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for ArithTask({self.split!r}) of size {self.size}")
        rng = np.random.default_rng([self.seed, self.difficulty, SPLITS.index(self.split), index])
        while True:
            row = make_row(rng, self.difficulty)
            if split_of(row["question"]) == self.split:
                return row

    def num_examples(self) -> int:
        return self.size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return row_to_conversation(self.row(index))
