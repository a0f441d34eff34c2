"""RLConfig: shipped files parse, overrides, every error kind names the key and the fix, round trip, docs.

Run: python -m pytest -q tests/test_config.py
"""
import importlib.util
import random
import re
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import ARITH, SHARED

from jaxrl.config import (
    FIELDS, ConfigError, ConfigTypeError, ConfigValueError, RLConfig, UnknownKeyError, describe_fields, field_type,
)
from jaxrl.config_io import format_config, load_config, save_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "scripts" / "configs"
SHIPPED = sorted(CONFIGS.glob("*.toml"))

def write(tmp_path, text: str, name: str = "c.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---- shipped files and defaults ----

def test_defaults_are_nanochats():
    c = RLConfig()
    assert (c.run, c.source, c.dtype) == ("dummy", "sft", "bfloat16")
    assert (c.device_batch_size, c.examples_per_step, c.num_samples, c.max_new_tokens) == (8, 16, 16, 256)
    assert (c.temperature, c.top_k) == (1.0, 50)
    assert (c.unembedding_lr, c.embedding_lr, c.matrix_lr, c.weight_decay, c.init_lr_frac) == (
        0.004, 0.2, 0.02, 0.0, 0.05)
    assert (c.num_epochs, c.save_every, c.eval_every, c.eval_examples) == (1, 60, 60, 400)
    assert c.resolve_num_steps(7473) == 467  # docs/nanochat.md#steps-and-schedule


def seed_config_block(text: str) -> dict:
    """The `key = value` lines of the post's "Create rl_config.txt:" block, parsed as TOML (the
    post's text runs the next heading into the block's last line: a line's value ends at its match)."""
    lines = text[text.index("Create rl_config.txt:"):].splitlines()[1:]
    block = []
    for line in lines:
        m = re.match(r'\s*(\w+) = ("[^"]*"|[-+0-9.eE]+)', line)
        if not m:
            break
        block.append(f"{m[1]} = {m[2]}")
        if m.end() < len(line.rstrip()):  # the heading glued to the last value
            break
    return tomllib.loads("\n".join(block))


def test_seed_example_file_is_the_seeds_and_parses(shared_dir):
    """scripts/configs/seed_example.toml holds exactly the keys and values of the rl_config.txt of
    the seed's post (read from the post, not pasted here), and loads to those values."""
    seed = seed_config_block((shared_dir / "SEED-rlhf-post.txt").read_text(encoding="utf-8"))
    assert len(seed) >= 10 and seed["run"] == "gsm8k_rl_run1", f"the post's config block parsed as {seed}"
    path = CONFIGS / "seed_example.toml"
    assert tomllib.loads(path.read_text()) == seed
    c = load_config(["--config", str(path)])
    assert {k: getattr(c, k) for k in seed} == seed
    assert c.max_new_tokens == RLConfig().max_new_tokens == 256  # keys the post leaves out keep nanochat's defaults


def test_shipped_configs_exist():
    assert {p.name for p in SHIPPED} >= {"gsm8k_d20.toml", "arith_tiny.toml", "seed_example.toml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_parses(path):
    cfg = load_config(["--config", str(path)])
    assert isinstance(cfg, RLConfig) and cfg.validate(world_size=1) is cfg


def test_arith_tiny_values():
    c = load_config(["--config", str(CONFIGS / "arith_tiny.toml")])
    assert (c.dtype, c.examples_per_step, c.num_samples, c.device_batch_size) == ("float32", 8, 8, 8)
    assert (c.max_new_tokens, c.eval_examples) == (96, 200)
    # nanochat's reference run: the first 30 steps of its full schedule (num_steps derived from the
    # train set, as chat_rl does), evaluated at steps 0 and 30 only
    assert (c.num_steps, c.stop_after_steps, c.eval_every, c.num_epochs) == (None, 30, 30, 1)
    assert (c.task, c.generation) == ("arith", "gen-2026-07")  # the fixture was made at 92d63d4
    if SHARED != (REPO.parent / "shared").resolve():
        pytest.skip("JAXRL_SHARED moves ../shared; the config's relative paths assume the default")
    # relative paths are resolved against the cwd, which is the repo root for users
    assert (REPO / c.checkpoint).resolve() == ARITH
    assert (REPO / c.data_dir / "train.jsonl").is_file() and (REPO / c.data_dir / "test.jsonl").is_file()
    train_lines = (REPO / c.data_dir / "train.jsonl").read_text().splitlines()
    assert c.resolve_num_steps(len(train_lines)) == 2500  # 20000 // 8: lr multiplier 1 - 29/2500 at the 30th update


# ---- overrides ----

@pytest.mark.parametrize("argv", [
    ["--num_samples=32"], ["--num-samples=32"], ["--num_samples", "32"], ["--num-samples", "32"],
])
def test_override_forms(argv):
    assert load_config(argv).num_samples == 32


def test_overrides_beat_the_file_wherever_they_appear(tmp_path):
    path = write(tmp_path, "temperature = 0.5\ntop_k = 5\n")
    c = load_config(["--top-k", "7", "--config", path, "--temperature=0.25", "--top_k=9"])
    assert (c.temperature, c.top_k) == (0.25, 9)
    assert load_config(["--", f"--config={path}"]).top_k == 5  # torchrun-style `--` is skipped


def test_help_prints_every_key_and_exits(capsys):
    with pytest.raises(SystemExit) as e:
        load_config(["--config", "whatever.toml", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f"--{name}=" in out for name in FIELDS)


def test_cli_values_parse_by_field_type():
    c = load_config(["--temperature=1", "--resume", "--export-nanochat", "false", "--num-steps=12",
                     "--model_step", "100", "--checkpoint=runs/x", "--run", "r1"])
    assert c.temperature == 1.0 and isinstance(c.temperature, float)
    assert (c.resume, c.export_nanochat, c.num_steps, c.model_step) == (True, False, 12, 100)
    assert (c.checkpoint, c.run) == ("runs/x", "r1")
    c = load_config(["--num_steps=12", "--num_steps=none", "--model-tag", "null"])
    assert c.num_steps is None and c.model_tag is None


def test_file_keys_accept_dashes_and_ints_for_floats(tmp_path):
    c = load_config(["--config", write(tmp_path, "device-batch-size = 4\ntemperature = 1\n")])
    assert c.device_batch_size == 4 and c.temperature == 1.0 and isinstance(c.temperature, float)


# ---- unknown keys ----

def test_unknown_key_in_file_names_key_file_and_closest(tmp_path):
    path = write(tmp_path, "temprature = 0.5\n")
    with pytest.raises(UnknownKeyError, match="temprature") as e:
        load_config(["--config", path])
    assert path in str(e.value) and "temperature" in str(e.value)


def test_unknown_key_on_command_line_names_closest():
    with pytest.raises(UnknownKeyError) as e:
        load_config(["--num-sample=4"])
    msg = str(e.value)
    assert "num-sample" in msg and "command line" in msg and "num_samples" in msg


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(UnknownKeyError, match="valid keys: run, source"):
        load_config(["--zzzz=1"])


def test_tables_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="rl"):
        load_config(["--config", write(tmp_path, "[rl]\ntemperature = 0.5\n")])


# ---- wrong types ----

@pytest.mark.parametrize("line, key, expected, found", [
    ('num_samples = "16"', "num_samples", "expected int", "'16'"),
    ("num_samples = true", "num_samples", "expected int", "True"),
    ("num_samples = 16.0", "num_samples", "expected int", "16.0"),
    ("temperature = false", "temperature", "expected float", "False"),
    ("run = 3", "run", "expected str", "3"),
    ('resume = "yes"', "resume", "expected bool", "'yes'"),
    ("model_step = 1.5", "model_step", "expected int | None", "1.5"),
])
def test_wrong_type_in_file(tmp_path, line, key, expected, found):
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigTypeError) as e:
        load_config(["--config", path])
    msg = str(e.value)
    assert key in msg and expected in msg and found in msg and path in msg


@pytest.mark.parametrize("arg, key, expected", [
    ("--num_samples=abc", "num_samples", "expected int"), ("--num-samples=1.5", "num_samples", "expected int"),
    ("--temperature=hot", "temperature", "expected float"), ("--resume=maybe", "resume", "expected bool"),
    ("--top_k=none", "top_k", "expected int"),  # not Optional: cannot be unset
])
def test_wrong_type_on_command_line(arg, key, expected):
    with pytest.raises(ConfigTypeError) as e:
        load_config([arg])
    msg = str(e.value)
    assert key in msg and expected in msg and repr(arg.split("=", 1)[1]) in msg and "command line" in msg


def test_wrong_type_in_from_dict_and_constructor():
    with pytest.raises(ConfigTypeError, match="num_samples.*expected int.*str '16'"):
        RLConfig.from_dict({"num_samples": "16"})
    with pytest.raises(ConfigTypeError, match="top_k.*expected int.*bool"):
        RLConfig(top_k=True)


# ---- cross-field and range checks ----

def test_num_samples_not_multiple_of_device_batch_size_says_what_to_change():
    with pytest.raises(ConfigValueError) as e:
        load_config(["--num_samples=12"])
    msg = str(e.value)
    assert "num_samples (12)" in msg and "device_batch_size (8)" in msg
    assert "8 or 16" in msg and "1, 2, 3, 4, 6, 12" in msg and "command line" in msg


def test_examples_per_step_must_divide_over_data_parallel_size():
    RLConfig(examples_per_step=16).validate(world_size=8)
    with pytest.raises(ConfigValueError) as e:
        RLConfig(examples_per_step=12).validate(world_size=8)
    assert "examples_per_step (12)" in str(e.value) and "(8)" in str(e.value) and "8 or 16" in str(e.value)


@pytest.mark.parametrize("kw, words", [
    ({"device_batch_size": 0, "num_samples": 16}, "device_batch_size must be a positive integer, found 0"),
    ({"max_new_tokens": -1}, "max_new_tokens must be a positive integer, found -1"),
    ({"num_steps": 0}, "num_steps must be a positive integer, found 0"),
    ({"temperature": -0.5}, "temperature must be a finite number >= 0, found -0.5"),
    ({"matrix_lr": float("nan")}, "matrix_lr must be a finite number >= 0, found nan"),
    ({"top_k": -1}, "top_k must be >= 0, found -1"),
    ({"rollout_slots": -1}, "rollout_slots must be >= 0, found -1"),
    ({"init_lr_frac": 0.0}, "init_lr_frac must be in (0, 1], found 0.0"),
    ({"init_lr_frac": 1.5}, "init_lr_frac must be in (0, 1], found 1.5"),
    ({"dtype": "float16"}, "dtype must be one of 'bfloat16', 'float32', found 'float16'"),
    ({"generation": "gen-2025"}, "generation must be one of 'gen-2025-10'"),
    ({"advantage": "std"}, "advantage must be one of 'mean', 'zscore'"),
    ({"token_norm": "batch"}, "token_norm must be one of 'pass', 'global'"),
    ({"source": "base"}, "source must be one of 'sft', 'mid'"),
    ({"task": "some/dir", "data_dir": "other"}, "set only one"),
    ({"num_processes": 2, "process_id": 2}, "process_id (2) must be < num_processes (2)"),
    ({"coordinator_address": "localhost"}, "coordinator_address must be host:port"),
    ({"attention": "flash"}, "attention must be one of 'einsum', 'xla', 'cudnn', found 'flash'"),
    ({"task": " "}, "task must be \"gsm8k\", \"arith\" or a directory, found ' '"),
])
def test_range_checks_name_key_and_value(kw, words):
    with pytest.raises(ConfigValueError) as e:
        RLConfig(**kw)
    assert words in str(e.value)


def test_all_problems_reported_at_once(tmp_path):
    path = write(tmp_path, "top_k = -1\ntemperature = -1.0\n")
    with pytest.raises(ConfigValueError) as e:
        load_config(["--config", path])
    assert "top_k" in str(e.value) and "temperature" in str(e.value) and path in str(e.value)


def test_argv_errors(tmp_path):
    with pytest.raises(ConfigError, match="--config FILE"):
        load_config(["rl_config.txt"])  # nanochat's positional config file
    with pytest.raises(ConfigError, match="not found"):
        load_config(["--config", str(tmp_path / "missing.toml")])
    with pytest.raises(ConfigError, match="needs a value"):
        load_config(["--temperature"])
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(["--config", write(tmp_path, "num_steps = None\n")])
    with pytest.raises(ConfigError, match="given twice"):
        load_config(["--config", write(tmp_path, "top_k = 1\ntop-k = 2\n")])


def test_resolve_num_steps():
    assert RLConfig(num_epochs=2).resolve_num_steps(100) == 12
    assert RLConfig(num_steps=5).resolve_num_steps(100) == 5
    with pytest.raises(ConfigValueError, match="examples_per_step"):
        RLConfig().resolve_num_steps(10)


# ---- round trips ----

ODD = RLConfig(run='a "quoted" \\ run ü', temperature=0.7, matrix_lr=1e-05, checkpoint="x/y.pt",
               model_step=3, generation="gen-2026-01", num_steps=7, resume=True, export_nanochat=False,
               attention="xla")


@pytest.mark.parametrize("cfg", [RLConfig(), ODD], ids=["defaults", "odd"])
def test_format_config_round_trip(tmp_path, cfg):
    text = format_config(cfg)
    assert len(text.splitlines()) == len(FIELDS)
    assert load_config(["--config", write(tmp_path, text)]) == cfg
    save_config(cfg, tmp_path / "sub" / "config.toml")
    assert load_config(["--config", str(tmp_path / "sub" / "config.toml")]) == cfg
    assert RLConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.cli
def test_import_does_not_pull_in_jax_and_config_imports_no_jaxrl_module():
    """Scripts load the config before jax; config.py is the leaf every module may import (no cycle)."""
    import subprocess
    code = ("import sys, jaxrl.config; assert [m for m in sys.modules if m.startswith('jaxrl.')] == ['jaxrl.config'], "
            "'jaxrl.config imported another jaxrl module'; import jaxrl.config_io, jaxrl.faults; "
            "assert 'jax' not in sys.modules, 'the config modules or faults imported jax'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_every_range_check_sits_on_its_field():
    """Each field's check is in its own definition: a value that breaks it is reported under that key."""
    checked = {n: f.metadata["check"] for n, f in FIELDS.items() if f.metadata["check"]}
    assert {"device_batch_size", "seed", "run", "temperature", "coordinator_address"} <= set(checked)
    strings = {"run": "a/b", "task": "", "coordinator_address": "localhost", "mesh_data": -2, "mesh_fsdp": 0}
    for name, (_ok, what, *_) in checked.items():
        bad = strings.get(name, -1 if field_type(name)[0] is int else float("nan"))
        with pytest.raises(ConfigValueError, match=re.escape(f"{name} must be {what}, found")):
            RLConfig(**{name: bad})


# ---- docs ----

def _docs_module():
    spec = importlib.util.spec_from_file_location("gen_config_docs", REPO / "scripts" / "gen_config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_are_up_to_date():
    doc = REPO / "docs" / "configs.md"
    assert doc.read_text(encoding="utf-8") == _docs_module().render(), \
        "docs/configs.md is out of date: run python scripts/gen_config_docs.py"


def test_docs_mention_every_key_and_every_key_has_help():
    text = (REPO / "docs" / "configs.md").read_text(encoding="utf-8")
    for name, _default, type_, help_ in describe_fields():
        assert f"| `{name}` |" in text, f"docs/configs.md lacks the key {name}"
        assert help_.strip() and type_, f"{name} has no help or type"


def test_keys_of_the_removed_built_in_demo_say_where_they_went():
    """The warm start's keys and source = "demo" left RLConfig for scripts/demo.py; an old config
    naming them gets that answer, not a bare 'unknown key'."""
    from jaxrl.config import REMOVED_KEYS

    key = random.choice(sorted(REMOVED_KEYS))
    with pytest.raises(ConfigError, match=f"config key '{key}' in test was removed: .*--{key} to scripts/demo.py"):
        RLConfig.from_dict({key: 10}, "in test")
    with pytest.raises(ConfigValueError, match="source must be one of 'sft', 'mid', found 'demo': the demo is "
                                               "scripts/demo.py"):
        RLConfig(source="demo")
