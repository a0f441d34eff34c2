"""RLConfig: every hyperparameter of nanochat's `scripts/chat_rl.py`, plus jaxrl's own options.

Owns the frozen dataclass; loading it from `--config FILE` (TOML via tomllib; nanochat-style
`key = value` lines are valid TOML) plus `--key=value` / `--key value` overrides; type and
cross-field checks; rendering as TOML. Imports no jax and no other jaxrl module.
Test: `python -m pytest -q tests/test_config.py`.

    cfg = load_config(sys.argv[1:])       # file first, then every CLI override (CLI wins)
    cfg.validate(world_size=n_data)       # data-parallel checks once the mesh is known
    print(format_config(cfg)); save_config(cfg, out / "config.toml")

Keys accept `-` and `_` alike (`--device-batch-size 8` == `--device_batch_size=8`). TOML has no
null: a None-valued (Optional) key is unset by omitting it from the file, or with `--key=none` on
the command line. Relative paths (checkpoint, tokenizer_dir, task, data_dir, out_dir) are kept as
written and resolved against the CURRENT WORKING DIRECTORY when used; run from the repo root.
The per-field help below is the single source of `docs/configs.md` (scripts/gen_config_docs.py).
"""
import dataclasses
import difflib
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("bfloat16", "float32")
GENERATIONS = ("gen-2025-10", "gen-2026-01", "gen-2026-07")
SOURCES = ("sft", "mid")
ADVANTAGES = ("mean", "zscore")
TOKEN_NORMS = ("pass", "global")
BUILTIN_TASKS = ("gsm8k", "arith")


class ConfigError(ValueError):
    """Base class of every config problem; the message names the key and the fix."""


class UnknownKeyError(ConfigError):
    """A key that is not a field of RLConfig."""


class ConfigTypeError(ConfigError):
    """A value of the wrong type for its key."""


class ConfigValueError(ConfigError):
    """A value (or combination of values) outside its allowed range."""


def _f(default, help: str, origin: str = "jaxrl", choices: tuple = ()):
    if choices:
        help += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
    return field(default=default, metadata={"help": help, "origin": origin, "choices": choices})


def _nc(default, help: str, choices: tuple = ()):
    return _f(default, help, origin="nanochat", choices=choices)


@dataclass(frozen=True)
class RLConfig:
    """chat_rl hyperparameters (nanochat's names and defaults) followed by jaxrl's options."""

    # ---- nanochat scripts/chat_rl.py (docs/nanochat.md#hyperparameters) ----
    run: str = _nc("dummy", 'Run name for logging and the run folder <out_dir>/<run> (a folder name, no "/"); '
                   '"dummy" disables wandb (as nanochat).')
    source: str = _nc("sft", "Which nanochat checkpoint family to load from a base dir (chatsft_checkpoints or "
                      "mid_checkpoints).", SOURCES)
    dtype: str = _nc("bfloat16", "Compute dtype of sampling and the loss forward; CPU configs should "
                     "set float32 (bfloat16 is slow and lossy on CPU).", DTYPES)
    device_batch_size: int = _nc(8, "Rows per forward pass (sampling and training).")
    examples_per_step: int = _nc(16, "Questions per optimizer step, summed over all data-parallel "
                                 "ranks; must be divisible by their number.")
    num_samples: int = _nc(16, "Samples per question; a multiple of device_batch_size.")
    max_new_tokens: int = _nc(256, "Generation budget in tokens per sample.")
    temperature: float = _nc(1.0, "Sampling temperature for rollouts and pass@k; 0 is greedy.")
    top_k: int = _nc(50, "Top-k sampling for rollouts and pass@k; 0 disables the top-k filter.")
    unembedding_lr: float = _nc(0.004, "Base learning rate of lm_head (AdamW).")
    embedding_lr: float = _nc(0.2, "Base learning rate of wte and value embeddings (AdamW).")
    matrix_lr: float = _nc(0.02, "Base learning rate of the transformer matrices (Muon).")
    weight_decay: float = _nc(0.0, "Weight decay passed to the optimizer setup (meaning per "
                              "generation, docs/nanochat.md#optimizer-groups).")
    init_lr_frac: float = _nc(0.05, "Every group's lr is multiplied by this once at the start; "
                              "then decays linearly as 1 - step/num_steps.")
    num_epochs: int = _nc(1, "Passes over the training set (used to derive num_steps).")
    save_every: int = _nc(60, "Save a checkpoint every this many steps (and after the last one).")
    eval_every: int = _nc(60, "Run pass@k on the test split every this many steps (from step 0).")
    eval_examples: int = _nc(400, "Test questions used by pass@k (capped at the split size).")

    # ---- jaxrl: what to load and where to write ----
    checkpoint: str | None = _f(None, "What to start from: a jaxrl import dir, a nanochat base dir "
                                "(NANOCHAT_BASE_DIR layout), a nanochat checkpoint dir, or a .pt file.")
    model_tag: str | None = _f(None, 'nanochat model tag ("d20"); None = largest d<N>, as nanochat.')
    model_step: int | None = _f(None, "nanochat checkpoint step; None picks the last one.")
    generation: str | None = _f(None, "nanochat generation that wrote the checkpoint (the state "
                                "dict does not record it, docs/nanochat.md#generations).", choices=GENERATIONS)
    tokenizer_dir: str | None = _f(None, "Folder holding tokenizer.pkl; None = next to the "
                                   "checkpoint, where nanochat keeps it (<base>/tokenizer).")
    task: str = _f("gsm8k", 'Training/eval task: "gsm8k", "arith", or a directory holding '
                   "train.jsonl and test.jsonl in GSM8K's format.")
    data_dir: str | None = _f(None, "Local train.jsonl/test.jsonl for the named task; None = the hub.")
    out_dir: str = _f("runs", "Where checkpoints, logs and config.toml are written (<out_dir>/<run>).")
    seed: int = _f(0, "Seed of rollout sampling keys (folded with step, example and pass); below 2**32.")
    num_steps: int | None = _f(None, "Optimizer steps; None = nanochat's "
                               "(len(train) // examples_per_step) * num_epochs.")
    stop_after_steps: int | None = _f(None, "Stop after this many steps (then save and evaluate) while "
                                      "the LR schedule still runs over num_steps: the first part of a "
                                      "longer run, as a nanochat run stopped early. None = run all "
                                      "num_steps; resume with a larger value to go on.")
    resume: bool = _f(False, "Continue from the latest checkpoint in <out_dir>/<run>.")

    # ---- jaxrl: deliberate, documented departures from nanochat (defaults = nanochat) ----
    advantage: str = _f("mean", '"mean": reward - mean over the question\'s samples (nanochat); '
                        '"zscore": additionally divided by their std (GRPO-style).', choices=ADVANTAGES)
    token_norm: str = _f("pass", '"pass": divide by the valid tokens of each device_batch_size '
                         'pass (nanochat, docs/nanochat.md#loss-normalisation); "global": one division by all valid '
                         "tokens of the step.", choices=TOKEN_NORMS)
    train_on_end_token: bool = _f(False, "Also train on the final <|assistant_end|> token "
                                  "(nanochat never does, docs/nanochat.md#end-token-never-a-target).")
    train_chunk_rows: int = _f(0, "Packed rows (bins as long as the step's longest row, each holding one "
                               "or more rows) per forward/backward on each device; 0 = device_batch_size "
                               "(at most nanochat's memory use). Larger is faster on accelerators, smaller "
                               "wastes less of the last chunk; the loss is still normalised per "
                               "device_batch_size pass, whatever this is.")
    train_skip_zero_advantage: bool = _f(True, "Leave rows whose advantage is exactly 0 out of the "
                                         "forward/backward: their gradient is exactly 0 and their tokens "
                                         "still count in the normalisation, so the update is nanochat's; "
                                         "logp_mismatch then covers the rows trained on.")
    eval_num_samples: int | None = _f(None, "pass@k samples per question (k = 1..this); "
                                      "None = device_batch_size, as nanochat.")
    eval_seed: int = _f(42, "Sampling seed of pass@k, the same for every question and every "
                        "evaluation (nanochat: 42).")
    eval_shared_keys: bool = _f(True, "pass@k samples every question with the same keys, as nanochat (seed 42 "
                                "per question); false: independent keys per question, a far less noisy pass@1.")
    max_nonfinite_skips: int = _f(3, "A step with a non-finite loss or gradient is skipped; stop "
                                  "with an error (exit 3, last good state saved) after this many "
                                  "consecutive ones; 0 = never stop, skip every such step.")
    zero_reward_warn_steps: int = _f(10, "Warn when the reward was 0 on every sample for this many "
                                     "consecutive steps (nothing is learned: broken weights or a reward "
                                     "that never fires), and again every as many steps; 0 = never warn.")
    allow_data_change: bool = _f(False, "Let --resume go on when the train or test data differs from the "
                                 "fingerprint (row count + sha256) saved with the checkpoint.")
    log_every: int = _f(1, "Print and log the step metrics every this many steps.")
    export_nanochat: bool = _f(True, "Also write nanochat-format .pt checkpoints (needs torch).")

    # ---- jaxrl: the built-in task ----
    arith_difficulty: int = _f(2, 'Built-in "arith" task: the most calculator steps per problem (1-3).')

    # ---- jaxrl: multi-host ----
    coordinator_address: str | None = _f(None, 'jax.distributed coordinator "host:port"; '
                                         "None = from the environment / auto-detected.")
    num_processes: int | None = _f(None, "Number of processes (hosts); None = auto.")
    process_id: int | None = _f(None, "This process's index; None = auto.")

    def __post_init__(self):
        for name in FIELDS:  # type-check direct construction too; ints become floats where due
            object.__setattr__(self, name, _check_type(name, getattr(self, name), "in RLConfig(...)"))
        self.validate(world_size=1)

    def validate(self, world_size: int = 1) -> "RLConfig":
        """Cross-field checks; world_size = the data-parallel size. Raises ConfigValueError."""
        from jaxrl.config_checks import problems as _problems  # the checks need the finished class

        problems = _problems(self, world_size)
        if problems:
            raise ConfigValueError("invalid config:\n  - " + "\n  - ".join(problems))
        return self

    def to_dict(self) -> dict:
        """Flat {key: value}, None included (JSON-safe); RLConfig.from_dict reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "in from_dict") -> "RLConfig":
        """Strict: unknown keys and wrong types raise, naming `source`. None unsets Optional keys."""
        return cls(**_normalise(d, source))

    def resolve_num_steps(self, num_train: int) -> int:
        """num_steps, or nanochat's (num_train // examples_per_step) * num_epochs when unset."""
        if self.num_steps is not None:
            return self.num_steps
        n = (num_train // self.examples_per_step) * self.num_epochs
        if n < 1:
            raise ConfigValueError(f"{num_train} training examples < examples_per_step="
                                   f"{self.examples_per_step}: lower examples_per_step or set num_steps")
        return n


FIELDS = {f.name: f for f in dataclasses.fields(RLConfig)}
_HINTS = typing.get_type_hints(RLConfig)


def _base(tp) -> tuple[type, bool]:
    """(underlying type, is Optional) of an annotation like `int | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1, tp
        return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, opt = _base(tp)
    return base.__name__ + (" | None" if opt else "")


# TOML cannot write None, so format_config omits None values; that round-trips only if every
# Optional field defaults to None.
assert all(FIELDS[n].default is None for n, t in _HINTS.items() if _base(t)[1])


def _check_type(key: str, value, source: str):
    """Value from TOML/JSON/Python: exact types, except that an int is accepted for a float."""
    base, opt = _base(_HINTS[key])
    if value is None and opt:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise ConfigTypeError(
            f"config key '{key}' {source}: expected {_type_name(_HINTS[key])}, "
            f"found {type(value).__name__} {value!r}" + _type_hint(base, value))
    return value


def _type_hint(base, value) -> str:
    if isinstance(value, str) and base in (int, float, bool):
        return " (write it without quotes)"
    if isinstance(value, dict):
        return " (RLConfig is flat: no [sections])"
    if base is str and not isinstance(value, str):
        return f' (quote it: "{value}")'
    return ""


def _closest(key: str) -> str:
    near = difflib.get_close_matches(key, list(FIELDS), n=3, cutoff=0.6)
    return f"; closest valid keys: {', '.join(near)}" if near else f"; valid keys: {', '.join(FIELDS)}"


def _key(raw: str, source: str) -> str:
    key = raw.strip().replace("-", "_")
    if key not in FIELDS:
        raise UnknownKeyError(f"unknown config key '{raw}' {source}{_closest(key)}")
    return key


def _normalise(d: dict, source: str) -> dict:
    out = {}
    for raw, value in d.items():
        key = _key(raw, source)
        if key in out:
            raise ConfigError(f"config key '{key}' given twice {source} ('-' equals '_')")
        out[key] = _check_type(key, value, source)
    return out


_BOOLS = dict.fromkeys(("true", "1", "yes", "on"), True) | dict.fromkeys(("false", "0", "no", "off"), False)


def _parse_cli_value(key: str, text: str):
    """Parse a command-line string by the field's type; 'none'/'null' unsets Optional keys."""
    base, opt = _base(_HINTS[key])
    if opt and text.strip().lower() in ("none", "null"):
        return None
    try:
        if base is bool:
            return _BOOLS[text.strip().lower()]
        return base(text)  # int("1.5") and float("x") raise ValueError; str is as written
    except (KeyError, ValueError):
        expected = _type_name(_HINTS[key]) + (" (true/false)" if base is bool else "")
        unset = " or none" if opt else ""
        raise ConfigTypeError(f"config key '{key}' on the command line: expected {expected}"
                              f"{unset}, found {text!r}") from None


def _read_toml(path: str) -> dict:
    """The file's keys; a UTF-8 byte-order mark (as some Windows editors write) is skipped."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file '{path}' is a directory; pass a .toml file, e.g. "
                          "--config scripts/configs/arith_tiny.toml")
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found (relative paths are resolved against "
                          f"the current directory, {os.getcwd()})")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start}): save it as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file '{path}' is not valid TOML: {e}. Each line must be "
                          '`key = value` with strings quoted (run = "x"), true/false in lower case, '
                          "and None written by leaving the key out") from None


def _split_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """-> (config file or None, [(raw key, raw value)]); a bare bool flag (`--resume`) means true."""
    config_file, overrides, i = None, [], 0
    while i < len(argv):
        arg, i = argv[i], i + 1
        if arg == "--":  # as in `torchrun ... -m scripts.chat_rl -- --config FILE`
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected command-line argument {arg!r}: use --config FILE for a "
                              "config file and --key=value or --key value for overrides")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i < len(argv) and not argv[i].startswith("--"):
                value, i = argv[i], i + 1
            elif _HINTS.get(name.replace("-", "_")) is bool:
                value = "true"
            else:
                raise ConfigError(f"command-line option --{name} needs a value (--{name}=VALUE)")
        if name != "config":
            overrides.append((name, value))
        elif config_file is not None:
            raise ConfigError(f"--config given twice ({config_file!r} and {value!r}); "
                              "pass one file and put the rest in overrides")
        else:
            config_file = value
    return config_file, overrides


def check_writable_dir(path: str | os.PathLike, key: str) -> None:
    """Raise ConfigError unless `path` is, or can be created as, a folder this process may write into."""
    p = Path(path).absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key} '{path}' cannot be created: {existing} is a file, not a directory; "
                          f"choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} '{path}' is not writable ({existing} is read-only for this user or "
                          f"filesystem); choose a writable {key} or fix its permissions")


def load_config(argv: list[str]) -> RLConfig:
    """`--config FILE` (optional) then `--key=value` / `--key value` overrides, in that order.

    Overrides always win over the file, wherever they appear in argv; a later override of the
    same key wins over an earlier one. Cross-field checks run once on the final values.
    """
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        raise SystemExit(0)
    config_file, overrides = _split_argv(argv)
    values = {} if config_file is None else _normalise(_read_toml(config_file), f"in {config_file}")
    for raw, text in overrides:
        key = _key(raw, "on the command line")
        values[key] = _parse_cli_value(key, text)
    try:
        return RLConfig(**values)
    except ConfigValueError as e:  # say where the values came from
        where = [f"'{config_file}'"] if config_file else []
        where += ["the command line"] if overrides else []
        raise ConfigValueError(f"{e}\n(values from {' and '.join(where) or 'the defaults'})") from None


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON escapes are valid TOML basic-string escapes
    return repr(v)  # int, or float: repr gives the shortest round-tripping form (0.004, 1e-05)


def format_config(cfg: RLConfig) -> str:
    """The resolved config as TOML, one `key = value` line per field; None keys are comments."""
    lines = [(f"# {k} = None" if v is None else f"{k} = {_toml_value(v)}")
             for k, v in ((name, getattr(cfg, name)) for name in FIELDS)]
    return "\n".join(lines) + "\n"


def save_config(cfg: RLConfig, path: str | os.PathLike) -> None:
    """Write format_config(cfg) to path atomically (parent folders are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(format_config(cfg), encoding="utf-8")
    os.replace(tmp, path)


def describe_fields() -> list[tuple[str, object, str, str]]:
    """(name, default, type, help) per field, in declaration order; help includes the choices."""
    return [(n, f.default, _type_name(_HINTS[n]), f.metadata["help"]) for n, f in FIELDS.items()]


def usage() -> str:
    rows = [f"  --{n}={d!r}  ({t}) {h}" for n, d, t, h in describe_fields()]
    return ("usage: train_rl.py [--config FILE.toml] [--key=value | --key value ...]\n"
            "keys (- and _ are interchangeable; --key=none unsets an Optional key):\n"
            + "\n".join(rows))
