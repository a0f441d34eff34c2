"""RLConfig: every hyperparameter of nanochat's `scripts/chat_rl.py`, plus jaxrl's own options.

Owns the frozen dataclass and its checks: each field carries its help, its choices and its range
check; `validate` adds the checks that span fields. Also the strict reading of a dict (from_dict:
unknown keys and wrong types raise) and the one list of nanochat generations. Reading `--config
FILE` plus `--key=value` overrides and writing config.toml live in jaxrl/config_io.py. Imports no
jax and no other jaxrl module, so every module (and a script before it imports jax) may import it.
Test: `python -m pytest -q tests/test_config.py`.

    cfg = RLConfig(num_samples=8)           # type and range checks run here
    cfg.validate(world_size=n_data)         # data-parallel checks once the mesh is known

TOML has no null: a None-valued (Optional) key is unset by omitting it. Relative paths
(checkpoint, tokenizer_dir, task, data_dir, out_dir) are kept as written and resolved against the
CURRENT WORKING DIRECTORY when used; run from the repo root. The per-field help below is the
single source of `docs/configs.md` (scripts/gen_config_docs.py).
"""
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("bfloat16", "float32")
GENERATIONS = ("gen-2025-10", "gen-2026-01", "gen-2026-07")  # nanochat's, docs/nanochat.md#generations
SOURCES = ("sft", "mid")
ADVANTAGES = ("mean", "zscore")
TOKEN_NORMS = ("pass", "global")
BUILTIN_TASKS = ("gsm8k", "arith")
ATTENTIONS = ("einsum", "xla", "cudnn")  # full-sequence attention kernels (jaxrl.model.full_attention)


class ConfigError(ValueError):
    """Base class of every config problem; the message names the key and the fix."""


class UnknownKeyError(ConfigError):
    """A key that is not a field of RLConfig."""


class ConfigTypeError(ConfigError):
    """A value of the wrong type for its key."""


class ConfigValueError(ConfigError):
    """A value (or combination of values) outside its allowed range."""


# Range checks a field names in its definition: (ok(value), what the value must be[, the fix]).
# A None value (an unset Optional key) is never checked.
POSITIVE = (lambda v: v >= 1, "a positive integer")
NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
RATE = (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")
FRACTION = (lambda v: 0 < v <= 1, "in (0, 1]")
SEED = (lambda v: 0 <= v < 2**32, "in [0, 2**32) (sampling keys are 32-bit)")
MESH_SIZE = (lambda v: v >= 1 or v == -1, "a positive integer or -1 (inferred from the other mesh key)")
DIFFICULTY = (lambda v: 1 <= v <= 3, "1, 2 or 3")
RUN_NAME = (lambda v: v.strip() not in ("", ".", "..") and "/" not in v,
            "a folder name (the run directory is <out_dir>/<run>)", 'set run = "my-run"')
TASK = (lambda v: bool(v.strip()), ", ".join(f'"{t}"' for t in BUILTIN_TASKS) + " or a directory")
HOST_PORT = (lambda v: ":" in v, "host:port")


def _f(default, help: str, origin: str = "jaxrl", choices: tuple = (), check: tuple | None = None):
    if choices:
        help += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
    return field(default=default, metadata={"help": help, "origin": origin, "choices": choices, "check": check})


def _nc(default, help: str, choices: tuple = (), check: tuple | None = None):
    return _f(default, help, origin="nanochat", choices=choices, check=check)


@dataclass(frozen=True)
class RLConfig:
    """chat_rl hyperparameters (nanochat's names and defaults) followed by jaxrl's options."""

    # ---- nanochat scripts/chat_rl.py (docs/nanochat.md#hyperparameters) ----
    run: str = _nc("dummy", 'Run name for logging and the run folder <out_dir>/<run> (a folder name, no "/"); '
                   '"dummy" disables wandb (as nanochat).', check=RUN_NAME)
    source: str = _nc("sft", "Which nanochat checkpoint family to load from a base dir (chatsft_checkpoints or "
                      "mid_checkpoints).", SOURCES)
    dtype: str = _nc("bfloat16", "Compute dtype of sampling and the loss forward; CPU configs should "
                     "set float32 (bfloat16 is slow and lossy on CPU).", DTYPES)
    device_batch_size: int = _nc(8, "Rows per forward pass (sampling and training).", check=POSITIVE)
    examples_per_step: int = _nc(16, "Questions per optimizer step, summed over all data-parallel "
                                 "ranks; must be divisible by their number.", check=POSITIVE)
    num_samples: int = _nc(16, "Samples per question; a multiple of device_batch_size.", check=POSITIVE)
    max_new_tokens: int = _nc(256, "Generation budget in tokens per sample.", check=POSITIVE)
    temperature: float = _nc(1.0, "Sampling temperature for rollouts and pass@k; 0 is greedy.", check=RATE)
    top_k: int = _nc(50, "Top-k sampling for rollouts and pass@k; 0 disables the top-k filter.", check=NON_NEGATIVE)
    unembedding_lr: float = _nc(0.004, "Base learning rate of lm_head (AdamW).", check=RATE)
    embedding_lr: float = _nc(0.2, "Base learning rate of wte and value embeddings (AdamW).", check=RATE)
    matrix_lr: float = _nc(0.02, "Base learning rate of the transformer matrices (Muon).", check=RATE)
    weight_decay: float = _nc(0.0, "Weight decay passed to the optimizer setup (meaning per "
                              "generation, docs/nanochat.md#optimizer-groups).", check=RATE)
    init_lr_frac: float = _nc(0.05, "Every group's lr is multiplied by this once at the start; "
                              "then decays linearly as 1 - step/num_steps.", check=FRACTION)
    num_epochs: int = _nc(1, "Passes over the training set (used to derive num_steps).", check=POSITIVE)
    save_every: int = _nc(60, "Save a checkpoint every this many steps (and after the last one).", check=POSITIVE)
    eval_every: int = _nc(60, "Run pass@k on the test split every this many steps (from step 0).", check=POSITIVE)
    eval_examples: int = _nc(400, "Test questions used by pass@k (capped at the split size).", check=POSITIVE)

    # ---- jaxrl: what to load and where to write ----
    checkpoint: str | None = _f(None, "What to start from: a jaxrl import dir, a nanochat base dir "
                                "(NANOCHAT_BASE_DIR layout), a nanochat checkpoint dir, or a .pt file.")
    model_tag: str | None = _f(None, 'nanochat model tag ("d20"); None = largest d<N>, as nanochat.')
    model_step: int | None = _f(None, "nanochat checkpoint step; None picks the last one.", check=NON_NEGATIVE)
    generation: str | None = _f(None, "nanochat generation that wrote the checkpoint (the state "
                                "dict does not record it, docs/nanochat.md#generations).", choices=GENERATIONS)
    tokenizer_dir: str | None = _f(None, "Folder holding tokenizer.pkl; None = next to the "
                                   "checkpoint, where nanochat keeps it (<base>/tokenizer).")
    task: str = _f("gsm8k", 'Training/eval task: "gsm8k", "arith", or a directory holding '
                   "train.jsonl and test.jsonl in GSM8K's format.", check=TASK)
    data_dir: str | None = _f(None, "Local train.jsonl/test.jsonl for the named task; None = the hub.")
    out_dir: str = _f("runs", "Where checkpoints, logs and config.toml are written (<out_dir>/<run>).")
    seed: int = _f(0, "Seed of rollout sampling keys (folded with step, example and pass); below 2**32.", check=SEED)
    num_steps: int | None = _f(None, "Optimizer steps; None = nanochat's "
                               "(len(train) // examples_per_step) * num_epochs.", check=POSITIVE)
    stop_after_steps: int | None = _f(None, "Stop after this many steps (then save and evaluate) while "
                                      "the LR schedule still runs over num_steps: the first part of a "
                                      "longer run, as a nanochat run stopped early. None = run all "
                                      "num_steps; resume with a larger value to go on.", check=POSITIVE)
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
                               "device_batch_size pass, whatever this is.", check=NON_NEGATIVE)
    train_remat: bool = _f(False, "Recompute each transformer block in the backward pass instead of "
                           "keeping its activations (jax.checkpoint): less memory, about one more "
                           "forward of compute. Same update up to float rounding.")
    train_skip_zero_advantage: bool = _f(True, "Leave rows whose advantage is exactly 0 out of the "
                                         "forward/backward: their gradient is exactly 0 and their tokens "
                                         "still count in the normalisation, so the update is nanochat's; "
                                         "logp_mismatch then covers the rows trained on.")
    eval_num_samples: int | None = _f(None, "pass@k samples per question (k = 1..this); "
                                      "None = device_batch_size, as nanochat.", check=POSITIVE)
    eval_seed: int = _f(42, "Sampling seed of pass@k, the same for every question and every "
                        "evaluation (nanochat: 42).", check=SEED)
    eval_shared_keys: bool = _f(True, "pass@k samples every question with the same keys, as nanochat (seed 42 "
                                "per question); false: independent keys per question, a far less noisy pass@1.")
    max_nonfinite_skips: int = _f(3, "A step with a non-finite loss or gradient is skipped; stop "
                                  "with an error (exit 3, last good state saved) after this many "
                                  "consecutive ones; 0 = never stop, skip every such step.", check=NON_NEGATIVE)
    zero_reward_warn_steps: int = _f(10, "Warn when the reward was 0 on every sample for this many "
                                     "consecutive steps (nothing is learned: broken weights or a reward "
                                     "that never fires), and again every as many steps; 0 = never warn.",
                                     check=NON_NEGATIVE)
    allow_data_change: bool = _f(False, "Let --resume go on when the train or test data differs from the "
                                 "fingerprint (row count + sha256) saved with the checkpoint.")
    log_every: int = _f(1, "Print and log the step metrics every this many steps.", check=POSITIVE)
    export_nanochat: bool = _f(True, "Also write nanochat-format .pt checkpoints (needs torch).")

    # ---- jaxrl: the built-in task ----
    arith_difficulty: int = _f(2, 'Built-in "arith" task: the most calculator steps per problem (1-3).',
                               check=DIFFICULTY)

    # ---- jaxrl: kernels ----
    attention: str = _f("einsum", "Attention of training and prefill (decoding always uses the sampler's cache "
                        'einsums): "einsum" (jaxrl\'s own einsums, the measured path), "xla" '
                        "(jax.nn.dot_product_attention's reference path) or \"cudnn\" (the same call with cuDNN's "
                        "fused attention: NVIDIA GPUs only). The environment variable JAXRL_ATTENTION, when set, "
                        "overrides it; the value used is the one saved with the run.", choices=ATTENTIONS)

    rollout_slots: int | None = _f(None, "Rows each device decodes at once in rollouts and pass@k: when a row "
                                   "ends, the next (question, sample) takes its slot in the same decode step, so no "
                                   "step waits on the longest row. None = per device kind (256 on GPU/TPU; 128 per "
                                   "CPU host, split over its CPU devices); 0 = all rows at once. Every (question, "
                                   "sample) gets the same tokens whatever the value (docs/benchmarks.md#slot-refill).",
                                   check=NON_NEGATIVE)

    # ---- jaxrl: devices ----
    mesh_data: int = _f(-1, "Data-parallel size of the device mesh: devices (or groups of devices) that "
                        "sample and train on their own rows. mesh_data x mesh_fsdp = the device count of all "
                        "processes; -1 = inferred from the other (docs/scaling.md).", check=MESH_SIZE)
    mesh_fsdp: int = _f(1, "Devices the fp32 master params, Muon momenta and AdamW moments are split over "
                        "(fully sharded data parallel): each device holds 1/mesh_fsdp of them and gathers a "
                        "layer's weights when it runs; 1 = replicated on every device; -1 = inferred from "
                        "mesh_data. Rows are split over all devices either way (docs/scaling.md).",
                        check=MESH_SIZE)

    # ---- jaxrl: multi-host ----
    coordinator_address: str | None = _f(None, 'jax.distributed coordinator "host:port"; '
                                         "None = from the environment / auto-detected.", check=HOST_PORT)
    num_processes: int | None = _f(None, "Number of processes (hosts); None = auto.", check=POSITIVE)
    process_id: int | None = _f(None, "This process's index; None = auto.", check=NON_NEGATIVE)

    def __post_init__(self):
        for name in FIELDS:  # type-check direct construction too; ints become floats where due
            object.__setattr__(self, name, _check_type(name, getattr(self, name), "in RLConfig(...)"))
        self.validate(world_size=1)

    def validate(self, world_size: int = 1) -> "RLConfig":
        """Every field's own check, then the cross-field ones; world_size = the data-parallel size.

        Raises ConfigValueError listing every problem at once, each saying which numbers to change."""
        problems = [p for name in FIELDS if (p := _field_problem(name, getattr(self, name)))]
        problems += _cross_field_problems(self, world_size)
        if problems:
            raise ConfigValueError("invalid config:\n  - " + "\n  - ".join(problems))
        return self

    def replace(self, **changes) -> "RLConfig":
        """A copy with `changes`, checked like a new config."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Flat {key: value}, None included (JSON-safe); RLConfig.from_dict reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "in from_dict") -> "RLConfig":
        """Strict: unknown keys and wrong types raise, naming `source`. None unsets Optional keys."""
        return cls(**check_keys_and_types(d, source))

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


# ------------------------------------------------------------------------------------------
# Checks


def _field_problem(name: str, value) -> str | None:
    """What is wrong with one field's value on its own (its choices, its range check), or None."""
    choices, check = FIELDS[name].metadata["choices"], FIELDS[name].metadata["check"]
    if choices and value is not None and value not in choices:
        demo = name == "source" and value == "demo"  # an earlier release's built-in demo
        return (f"{name} must be one of {', '.join(map(repr, choices))}, found {value!r}"
                + (": the demo is scripts/demo.py now (it warm-starts a small model, then runs train_rl)" if demo else ""))
    return _range_problem(name, value, check) if check else None


def _range_problem(name: str, value, check: tuple) -> str | None:
    ok, what, *fix = check
    if value is None or ok(value):
        return None
    found = repr(value) if isinstance(value, str) else value
    return f"{name} must be {what}, found {found}" + "".join(f": {f}" for f in fix)


def _cross_field_problems(c: RLConfig, world_size: int) -> list[str]:
    """Problems of combinations of fields (each field is already valid on its own)."""
    p = []
    if c.device_batch_size >= 1 and c.num_samples >= 1 and c.num_samples % c.device_batch_size:
        d, n = c.device_batch_size, c.num_samples
        divisors = ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)
        p.append(f"num_samples ({n}) must be a multiple of device_batch_size ({d}): set num_samples "
                 f"to {_near_multiples(n, d)}, or device_batch_size to a divisor of {n} ({divisors})")
    if world_size < 1:
        p.append(f"world_size must be >= 1, found {world_size}")
    elif c.examples_per_step >= 1 and c.examples_per_step % world_size:
        e = c.examples_per_step
        p.append(f"examples_per_step ({e}) must be divisible by the data-parallel size ({world_size}): "
                 f"set examples_per_step to {_near_multiples(e, world_size)}, or run on a number of "
                 f"devices that divides {e}")
    if c.task.strip() and c.task not in BUILTIN_TASKS and c.data_dir is not None:
        p.append(f"task is a directory ({c.task!r}) and data_dir is also set ({c.data_dir!r}): "
                 f"set only one (data_dir is for the named tasks {', '.join(BUILTIN_TASKS)})")
    if c.mesh_data == -1 and c.mesh_fsdp == -1:
        p.append("mesh_data and mesh_fsdp cannot both be -1: set one of them (e.g. mesh_fsdp = 1)")
    if c.num_processes is not None and c.process_id is not None and c.process_id >= c.num_processes:
        p.append(f"process_id ({c.process_id}) must be < num_processes ({c.num_processes})")
    return p


def _near_multiples(n: int, d: int) -> str:
    """The multiples of d just below and above n, e.g. (10, 4) -> '8 or 12'."""
    return " or ".join(str(x) for x in ((n // d) * d, (n // d + 1) * d) if x > 0)


def check_writable_dir(path: str | os.PathLike, key: str) -> None:
    """Raise ConfigError unless `path` is, or can be created as, a folder this process may write into.

    Scripts run it on output paths (`out_dir`, `--out`) before any work, so a bad path fails at once."""
    p = Path(path).absolute()
    existing = next(q for q in (p, *p.parents) if q.exists())
    if not existing.is_dir():
        raise ConfigError(f"{key} '{path}' cannot be created: {existing} is a file, not a directory; "
                          f"choose another {key}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} '{path}' is not writable ({existing} is read-only for this user or "
                          f"filesystem); choose a writable {key} or fix its permissions")


# ------------------------------------------------------------------------------------------
# Keys and types (used by from_dict here and by jaxrl/config_io.py for files and the command line)


def field_type(key: str) -> tuple[type, bool]:
    """(underlying type, is Optional) of a field, e.g. int | None -> (int, True)."""
    tp = _HINTS[key]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        assert len(args) == 1, tp
        return args[0], True
    return tp, False


def type_name(key: str) -> str:
    base, opt = field_type(key)
    return base.__name__ + (" | None" if opt else "")


# TOML cannot write None, so config_io.format_config omits None values; that round-trips only if
# every Optional field defaults to None.
assert all(FIELDS[n].default is None for n in FIELDS if field_type(n)[1])


def _check_type(key: str, value, source: str):
    """Value from TOML/JSON/Python: exact types, except that an int is accepted for a float."""
    base, opt = field_type(key)
    if value is None and opt:
        return None
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, base) or (base is not bool and isinstance(value, bool)):
        raise ConfigTypeError(
            f"config key '{key}' {source}: expected {type_name(key)}, "
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


# Keys an earlier release had, and where their setting went.
REMOVED_KEYS = {k: f"the demo's warm start moved out of the library: pass --{k} to scripts/demo.py" for k in (
    "warmstart_steps", "warmstart_batch_size", "warmstart_eval_every", "warmstart_pass1_min", "warmstart_pass1_max")}


def config_key(raw: str, source: str) -> str:
    """The field named by `raw` (`-` and `_` alike); UnknownKeyError names the closest keys."""
    key = raw.strip().replace("-", "_")
    if key in REMOVED_KEYS:
        raise UnknownKeyError(f"config key '{raw}' {source} was removed: {REMOVED_KEYS[key]}")
    if key not in FIELDS:
        near = difflib.get_close_matches(key, list(FIELDS), n=3, cutoff=0.6)
        hint = f"; closest valid keys: {', '.join(near)}" if near else f"; valid keys: {', '.join(FIELDS)}"
        raise UnknownKeyError(f"unknown config key '{raw}' {source}{hint}")
    return key


def check_keys_and_types(d: dict, source: str) -> dict:
    """{field: value} from a raw dict: keys normalised, unknown or repeated keys and wrong types raise."""
    out = {}
    for raw, value in d.items():
        key = config_key(raw, source)
        if key in out:
            raise ConfigError(f"config key '{key}' given twice {source} ('-' equals '_')")
        out[key] = _check_type(key, value, source)
    return out


def describe_fields() -> list[tuple[str, object, str, str]]:
    """(name, default, type, help) per field, in declaration order; help includes the choices."""
    return [(n, f.default, type_name(n), f.metadata["help"]) for n, f in FIELDS.items()]
