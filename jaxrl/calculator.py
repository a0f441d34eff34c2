"""Calculator tool: nanochat's `use_calculator` (nanochat/engine.py), re-implemented without `eval`.

Owns the string-in, string-out seam between sampled text and forced tool output
(docs/nanochat.md#calculator). `use_calculator(expr)` returns exactly what nanochat's Engine forces,
`str(result)`, or None when nanochat's calculator gives None:

1. Commas are removed.
2. Math path: every character in `0123456789*+-/.() `; `**` anywhere -> None.
3. String path (not in gen-2025-10): every character in letters, digits and `'"()._ `, none of
   nanochat's forbidden substrings (lower-cased), and the substring `.count(` must appear.
4. Evaluation: nanochat calls `eval`. Here the expression is compiled by CPython (so syntax
   errors, `012`, too-deep nesting fail exactly as in nanochat; the code object is never run)
   and its AST is evaluated over a whitelist of node types with Python's own operators, so
   values and `str()` formatting (`24.0`, `1e+17`, `()`, `-0.0`, `inf`) are Python's.

Bounds instead of nanochat's 3-second SIGALRM: expressions longer than MAX_EXPR_CHARS (after
comma removal) and integer intermediates wider than MAX_INT_BITS are rejected. Without `**`,
variables or loops, every value is bounded by the expression's length, so a call finishes in
milliseconds by construction. Deliberate differences from nanochat (all return None where
nanochat returns something or crashes):
- integer results with more than 4300 digits (nanochat returns them, then `str()` raises
  ValueError in the Engine on Python >= 3.11);
- string-path constructs outside the whitelist below: `is`/`is not`, attribute reads such as
  `.real`, methods that can grow strings (`join`, `center`, `zfill`, ...), generator
  expressions (nanochat forces an address-dependent repr), nesting deeper than MAX_DEPTH.

Test: `python -m pytest tests/test_calculator.py -q`.
"""
import ast
import operator
import warnings

from jaxrl.config import GENERATIONS

DEFAULT_GENERATION = "gen-2026-07"

# Character sets and forbidden substrings are verbatim from nanochat (they *are* the behaviour).
MATH_CHARS = frozenset("0123456789*+-/.() ")
STRING_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'\"()._ ")
FORBIDDEN_SUBSTRINGS = (
    "__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
    "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr",
)

MAX_RAW_CHARS = 100_000  # before comma removal: keeps even the `replace` pass cheap
MAX_EXPR_CHARS = 10_000  # after comma removal; a rollout's python block is a few hundred chars
MAX_INT_BITS = 1 << 16  # ~19 700 digits; any product writable in MAX_EXPR_CHARS fits
MAX_RESULT_INT = 10**4300  # CPython's default int->str limit (sys.int_info.default_max_str_digits)
MAX_DEPTH = 100  # string path only (recursive); the math path is evaluated iteratively

_MATH_BINOPS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv,
}
_MATH_UNARYOPS = {ast.UAdd: operator.pos, ast.USub: operator.neg}

# Methods the string path may call: pure, at most one argument (commas are gone), output no
# larger than the receiver. The real method is called, so results and errors are Python's.
_SEQ_METHODS = ("count", "index")
_TEXT_METHODS = _SEQ_METHODS + (
    "find", "rfind", "rindex", "startswith", "endswith", "lower", "upper", "swapcase", "title",
    "capitalize", "strip", "lstrip", "rstrip", "split", "rsplit", "splitlines", "partition",
    "rpartition", "removeprefix", "removesuffix", "isalpha", "isdigit", "isalnum", "islower",
    "isupper", "isspace", "istitle", "isascii",
)
_STR_ONLY_METHODS = ("casefold", "isdecimal", "isnumeric", "isidentifier", "isprintable")
_METHODS = {
    str: frozenset(_TEXT_METHODS + _STR_ONLY_METHODS),
    bytes: frozenset(_TEXT_METHODS),
    tuple: frozenset(_SEQ_METHODS),
    list: frozenset(_SEQ_METHODS),
}


class _Rejected(Exception):
    """An expression this port does not evaluate; nanochat raised or it is out of bounds."""


def use_calculator(expr: str, generation: str = DEFAULT_GENERATION) -> str | None:
    """Returns the text nanochat's Engine forces for `expr` (`str(result)`), or None.

    Never raises for any `expr`; raises ValueError only for an unknown `generation`.
    """
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; expected one of {GENERATIONS}")
    try:
        return _format(_calculate(expr, generation))
    except Exception:  # noqa: BLE001 - the calculator is the one place that swallows errors
        return None  # includes RecursionError and MemoryError from CPython's parser/compiler


def _calculate(expr, generation):
    if not isinstance(expr, str) or len(expr) > MAX_RAW_CHARS:
        raise _Rejected("not a string or too long")
    expr = expr.replace(",", "")
    if len(expr) > MAX_EXPR_CHARS:
        raise _Rejected("too long")
    if all(ch in MATH_CHARS for ch in expr):
        if "**" in expr:
            raise _Rejected("power operator")
        return _eval_math(_parse(expr))
    if generation == "gen-2025-10":  # the string path arrived with nanochat 8892470
        raise _Rejected("no string path in this generation")
    if not all(ch in STRING_CHARS for ch in expr):
        raise _Rejected("character outside both allowed sets")
    lowered = expr.lower()
    if any(bad in lowered for bad in FORBIDDEN_SUBSTRINGS) or ".count(" not in expr:
        raise _Rejected("forbidden substring or no .count(")
    return _eval_string(_parse(expr), 0)


def _parse(expr):
    """AST body of `expr`; raises wherever CPython's eval() would fail before running."""
    source = expr.lstrip(" \t")  # eval() strips leading spaces and tabs, compile() does not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. SyntaxWarning for `2(3)`, as nanochat does
        compile(source, "<calculator>", "eval")  # compile-time errors; the code is never run
        return ast.parse(source, mode="eval").body


def _format(value):
    if value is None:  # nanochat's Engine forces nothing when the calculator returns None
        return None
    if isinstance(value, int) and not -MAX_RESULT_INT < value < MAX_RESULT_INT:
        raise _Rejected("integer result too long to print")
    return str(value)


def _eval_math(root):
    """Post-order evaluation with explicit stacks (no recursion limit on long chains)."""
    todo, values = [(root, False)], []
    while todo:
        node, ready = todo.pop()
        if isinstance(node, ast.Constant):
            values.append(node.value)
        elif isinstance(node, ast.Tuple) and not node.elts:
            values.append(())
        elif isinstance(node, ast.UnaryOp) and type(node.op) in _MATH_UNARYOPS:
            if ready:
                values.append(_MATH_UNARYOPS[type(node.op)](values.pop()))
            else:
                todo += [(node, True), (node.operand, False)]
        elif isinstance(node, ast.BinOp) and type(node.op) in _MATH_BINOPS:
            if ready:
                right, left = values.pop(), values.pop()
                values.append(_binop(node.op, left, right))
            else:
                todo += [(node, True), (node.right, False), (node.left, False)]
        else:  # e.g. a Call such as `2(3)`: nanochat gets a TypeError
            raise _Rejected(f"unsupported node {type(node).__name__}")
    return values.pop()


def _binop(op, left, right):
    if isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _Rejected("integer product too wide")
    value = _MATH_BINOPS[type(op)](left, right)
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise _Rejected("integer too wide")
    return value


def _eval_string(node, depth):
    """Recursive, short-circuiting evaluation of the string path's whitelisted nodes."""
    if depth > MAX_DEPTH:
        raise _Rejected("nested too deeply")
    depth += 1
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
        return "".join(v.value for v in node.values)  # f-string without fields, e.g. f'ab'
    if isinstance(node, ast.Tuple) and not node.elts:
        return ()
    if isinstance(node, ast.Call):
        return _eval_method_call(node, depth)
    if isinstance(node, ast.BoolOp):
        return _eval_boolop(node, depth)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return not _eval_string(node.operand, depth)
    if isinstance(node, ast.IfExp):
        branch = node.body if _eval_string(node.test, depth) else node.orelse
        return _eval_string(branch, depth)
    if isinstance(node, ast.Compare):
        return _eval_compare(node, depth)
    raise _Rejected(f"unsupported node {type(node).__name__}")  # Name -> NameError in nanochat


def _eval_method_call(node, depth):
    func = node.func
    if not isinstance(func, ast.Attribute) or node.keywords or len(node.args) > 1:
        raise _Rejected("only receiver.method(arg) calls")
    receiver = _eval_string(func.value, depth)
    if func.attr not in _METHODS.get(type(receiver), ()):
        raise _Rejected(f"method {func.attr!r} on {type(receiver).__name__}")
    args = [_eval_string(arg, depth) for arg in node.args]
    return getattr(receiver, func.attr)(*args)


def _eval_boolop(node, depth):
    is_and = isinstance(node.op, ast.And)
    for operand in node.values:
        value = _eval_string(operand, depth)
        if bool(value) != is_and:  # `and` stops at the first falsy, `or` at the first truthy
            return value
    return value


def _eval_compare(node, depth):
    left = _eval_string(node.left, depth)
    for op, comparator in zip(node.ops, node.comparators):
        if not isinstance(op, (ast.In, ast.NotIn)):
            raise _Rejected(f"comparison {type(op).__name__}")
        right = _eval_string(comparator, depth)
        result = (left in right) if isinstance(op, ast.In) else (left not in right)
        if not result:
            return result
        left = right
    return result
