"""The bad-input catalogue: every kind listed in docs/errors.md, tried once each.

Each test feeds one bad input and checks that the error names where the problem is (file, key,
line or path), what was expected against what was found where that applies, and that nothing
half-written is left behind. `test_catalogue_matches_this_file` keeps docs/errors.md and this file
in step: each row of the table names its test here.

Run: python -m pytest -q tests/test_bad_inputs.py -m "not slow"   (the CLI runs that load a model are `slow`)
"""
import contextlib
import json
import os
import pickle
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ARITH, REPO, SHARED, tiny_config, tiny_params

from jaxrl import distributed
from jaxrl.calculator import use_calculator
from jaxrl.run_state import CheckpointError, CheckpointManager, check_resume_compatible, load_jaxrl_import, load_policy, \
    save_jaxrl_import
from jaxrl.config import ConfigError, RLConfig
from jaxrl.config_io import load_config
from jaxrl.model import GPTConfig
from jaxrl.sampler import check_request
from jaxrl.tasks import load_task
from jaxrl.tasks.gsm8k import GSM8K
from jaxrl.tokenizer import Tokenizer

ARITH_DATA = SHARED / "data" / "arith"
GOOD_ROW = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5.\n#### 5"}


@contextlib.contextmanager
def raises(exc, *fragments):
    """pytest.raises that also checks each fragment occurs in the message."""
    with pytest.raises(exc) as info:
        yield info
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, f"{fragment!r} not in: {message}"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------
# Config (jaxrl/config.py)


def test_config_file_not_found(tmp_path):
    with raises(ConfigError, f"config file '{tmp_path / 'nope.toml'}' not found", os.getcwd()):
        load_config(["--config", str(tmp_path / "nope.toml")])


def test_config_toml_syntax_error(tmp_path):
    f = write(tmp_path / "c.toml", 'run = "x"\nnum_samples = \n')
    with raises(ConfigError, f"config file '{f}' is not valid TOML", "line 2", "key = value"):
        load_config(["--config", str(f)])


def test_config_unknown_key_in_file(tmp_path):
    f = write(tmp_path / "c.toml", "num_sample = 4\n")
    with raises(ConfigError, "unknown config key 'num_sample'", f"in {f}", "closest valid keys: num_samples"):
        load_config(["--config", str(f)])


def test_config_unknown_key_on_command_line():
    with raises(ConfigError, "unknown config key 'lr' on the command line", "valid keys"):
        load_config(["--lr=0.1"])


def test_config_wrong_type_in_file(tmp_path):
    f = write(tmp_path / "c.toml", 'num_samples = "16"\n')
    with raises(ConfigError, f"config key 'num_samples' in {f}", "expected int, found str '16'", "without quotes"):
        load_config(["--config", str(f)])


def test_config_wrong_type_on_command_line():
    with raises(ConfigError, "config key 'device_batch_size' on the command line", "expected int, found 'eight'"):
        load_config(["--device_batch_size=eight"])


def test_config_sections_are_not_allowed(tmp_path):
    f = write(tmp_path / "c.toml", "[optim]\nmatrix_lr = 0.02\n")
    with raises(ConfigError, "unknown config key 'optim'", f"in {f}"):
        load_config(["--config", str(f)])


def test_config_key_given_twice(tmp_path):
    f = write(tmp_path / "c.toml", "num_samples = 4\nnum-samples = 8\n")
    with raises(ConfigError, "config key 'num_samples' given twice", f"in {f}"):
        load_config(["--config", str(f)])


def test_config_value_out_of_range():
    with raises(ConfigError, "temperature must be a finite number >= 0, found -1.0", "the command line"):
        load_config(["--temperature=-1"])


def test_config_value_not_among_choices():
    with raises(ConfigError, "dtype must be one of 'bfloat16', 'float32', found 'fp16'"):
        load_config(["--dtype=fp16"])


def test_config_num_samples_not_a_multiple_of_device_batch_size():
    with raises(ConfigError, "num_samples (10) must be a multiple of device_batch_size (4)", "set num_samples to 8 or 12"):
        load_config(["--num_samples=10", "--device_batch_size=4"])


def test_config_examples_per_step_not_divisible_by_processes():
    with raises(ConfigError, "examples_per_step (16) must be divisible by the data-parallel size (3)", "15 or 18"):
        RLConfig().validate(world_size=3)


def test_config_too_few_training_examples():
    with raises(ConfigError, "5 training examples < examples_per_step=16", "set num_steps"):
        RLConfig().resolve_num_steps(5)


def test_config_multihost_keys():
    with raises(ConfigError, "coordinator_address must be host:port, found 'localhost'"):
        load_config(["--coordinator_address=localhost"])
    with raises(ConfigError, "process_id (2) must be < num_processes (2)"):
        load_config(["--num_processes=2", "--process_id=2"])
    with raises(ValueError, "num_processes=2 needs coordinator_address"):
        distributed.initialize(RLConfig(num_processes=2))


def test_config_mesh_keys():
    with raises(ConfigError, "mesh_fsdp must be a positive integer or -1 (inferred from the other mesh key), found 0"):
        load_config(["--mesh_fsdp=0"])
    with raises(ConfigError, "mesh_data and mesh_fsdp cannot both be -1"):
        load_config(["--mesh_data=-1", "--mesh_fsdp=-1"])


def test_config_command_line_syntax():
    with raises(ConfigError, "unexpected command-line argument 'scripts/configs/x.toml'", "--config FILE"):
        load_config(["scripts/configs/x.toml"])
    with raises(ConfigError, "command-line option --seed needs a value"):
        load_config(["--seed"])


# ------------------------------------------------------------------------------------------
# Trainer checkpoints (jaxrl/run_state/train_state.py)


def _state():
    return {"params": {"w": jnp.ones((4, 3), jnp.float32)}, "step": np.int32(1)}


def test_checkpoint_resume_with_a_breaking_change():
    saved, now = RLConfig().to_dict(), RLConfig(examples_per_step=8, eval_every=5).to_dict()
    with raises(CheckpointError, "cannot resume", "examples_per_step: saved 16, now 8", "config.toml"):
        check_resume_compatible(saved, now)
    assert check_resume_compatible(saved, RLConfig(eval_every=5).to_dict()) == ["eval_every"]  # safe


def test_checkpoint_structure_mismatch(tmp_path):
    with CheckpointManager(tmp_path / "ck") as mgr:
        mgr.save(0, _state(), {})
        wrong = {"params": {"w": jnp.ones((4, 5), jnp.float32)}, "step": np.int32(0)}
        with raises(CheckpointError, str(tmp_path / "ck" / "0" / "state"), "key 'params/w': expected shape (4, 5), found (4, 3)"):
            mgr.restore(abstract_state=wrong)


def test_checkpoint_missing(tmp_path):
    with CheckpointManager(tmp_path / "ck") as mgr:
        with raises(CheckpointError, f"no checkpoint in {tmp_path / 'ck'}", "orbax-checkpoint-tmp"):
            mgr.restore(abstract_state=_state())
        mgr.save(0, _state(), {})
        with raises(CheckpointError, f"no checkpoint step 7 in {tmp_path / 'ck'}; saved steps: [0]"):
            mgr.restore(7, abstract_state=_state())


def test_checkpoint_step_saved_twice(tmp_path):
    with CheckpointManager(tmp_path / "ck") as mgr:
        mgr.save(3, _state(), {})
        with raises(CheckpointError, f"checkpoint step 3 already exists at {tmp_path / 'ck' / '3'}"):
            mgr.save(3, _state(), {})


def test_checkpoint_write_fails(tmp_path, monkeypatch):
    """A failing write (here: every rename into the folder, as on a full disk) names the path and
    the OS error; the previous checkpoint stays the latest and restores."""
    ck = tmp_path / "ck"
    with CheckpointManager(ck) as mgr:
        mgr.save(1, _state(), {})
        real = os.rename

        def full_disk(src, dst, *args, **kwargs):
            if str(dst).startswith(str(ck)):
                raise OSError(28, os.strerror(28), str(dst))
            return real(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "rename", full_disk)
        monkeypatch.setattr(os, "replace", full_disk)
        with raises(CheckpointError, f"saving checkpoint step 2 to {ck / '2'} failed (step 1 is intact)",
                    os.strerror(28)):
            mgr.save(2, _state(), {})
        monkeypatch.undo()
        assert mgr.all_steps() == [1]
        np.testing.assert_array_equal(mgr.restore(abstract_state=_state())[0]["params"]["w"], 1.0)


def test_checkpoint_folder_is_a_file(tmp_path):
    write(tmp_path / "run", "a file where the run folder should be")
    with raises(CheckpointError, f"cannot open checkpoint directory {tmp_path / 'run' / 'checkpoints'}", "writable out_dir"):
        CheckpointManager(tmp_path / "run" / "checkpoints")


def test_checkpoint_meta_not_json(tmp_path):
    with CheckpointManager(tmp_path / "ck") as mgr:
        with raises(TypeError, "meta is not JSON-serializable", ".tolist()"):
            mgr.save(0, _state(), {"cursor": np.arange(3)})
        assert mgr.all_steps() == []


# ------------------------------------------------------------------------------------------
# nanochat and import checkpoints (convert/, jaxrl/run_state/)


def _nanochat_dir(tmp_path, mutate):
    """A copy of the arith fixture's model_000100.pt with `mutate(state dict)` applied."""
    torch = pytest.importorskip("torch")
    src = ARITH / "chatsft_checkpoints" / "d4"
    dst = tmp_path / "chatsft_checkpoints" / "d4"
    dst.mkdir(parents=True)
    state = torch.load(src / "model_000100.pt", weights_only=True)
    mutate(state)
    torch.save(state, dst / "model_000100.pt")
    (dst / "meta_000100.json").write_text((src / "meta_000100.json").read_text())
    return dst / "model_000100.pt"


def test_nanochat_truncated_pt(tmp_path):
    from convert import CheckpointError as ConvertError, read_nanochat

    model = _nanochat_dir(tmp_path, lambda s: None)
    model.write_bytes(model.read_bytes()[:100_000])
    with raises(ConvertError, f"{model}: not a readable torch checkpoint (truncated"):
        read_nanochat(model, tokenizer_dir=ARITH / "tokenizer")


def test_nanochat_missing_key(tmp_path):
    from convert import CheckpointError as ConvertError, read_nanochat

    model = _nanochat_dir(tmp_path, lambda s: s.pop("lm_head.weight"))
    with raises(ConvertError, f"{model}: state dict does not match", "missing key 'lm_head.weight' (expected shape (2048, 256))"):
        read_nanochat(model, tokenizer_dir=ARITH / "tokenizer")


def test_nanochat_misshapen_key(tmp_path):
    from convert import CheckpointError as ConvertError, read_nanochat

    def narrow(s):
        s["transformer.h.0.mlp.c_fc.weight"] = s["transformer.h.0.mlp.c_fc.weight"][:512]

    model = _nanochat_dir(tmp_path, narrow)
    with raises(ConvertError, f"{model}: state dict does not match",
                "key 'transformer.h.0.mlp.c_fc.weight': expected shape (1024, 256), found (512, 256)"):
        read_nanochat(model, tokenizer_dir=ARITH / "tokenizer")


def test_import_dir_without_model_json(tmp_path):
    (tmp_path / "params").mkdir()
    with raises(CheckpointError, f"{tmp_path}: not a jaxrl import directory", "model.json is missing"):
        load_jaxrl_import(tmp_path)


def test_import_dir_with_broken_model_json(tmp_path):
    write(tmp_path / "model.json", '{"model_config": ')
    (tmp_path / "params").mkdir()
    with raises(CheckpointError, str(tmp_path / "model.json"), "cannot read JSON", "line 1"):
        load_jaxrl_import(tmp_path)


def test_import_output_exists_or_fails_half_way(tmp_path, monkeypatch):
    from jaxrl.run_state import import_dir

    config = tiny_config()
    params = jax.tree.map(np.asarray, tiny_params(config))
    write(tmp_path / "out" / "keep.txt", "mine")
    with raises(CheckpointError, f"output {tmp_path / 'out'} already exists", "--force"):
        save_jaxrl_import(tmp_path / "out", config, params, {})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(import_dir, "_write_json", disk_full)
    with raises(OSError, "No space left on device"):
        save_jaxrl_import(tmp_path / "new", config, params, {})
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written output, no temporary folder


def test_policy_path_does_not_exist(tmp_path):
    with raises(CheckpointError, f"checkpoint {tmp_path / 'nope'} does not exist", os.getcwd()):
        load_policy(tmp_path / "nope")


def test_policy_tokenizer_vocab_does_not_match_model(tmp_path):
    pytest.importorskip("torch")
    import tiktoken

    enc = tiktoken.Encoding(name="small", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                            special_tokens={t: 256 + i for i, t in enumerate(
                                ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>",
                                 "<|assistant_end|>", "<|python_start|>", "<|python_end|>", "<|output_start|>",
                                 "<|output_end|>"])})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    with raises(CheckpointError, f"tokenizer {tmp_path / 'tokenizer.pkl'} has vocab size 265", "meta_000100.json",
                "model_config.vocab_size = 2048"):
        load_policy(ARITH, tokenizer_dir=tmp_path)


def test_policy_generation_does_not_match():
    pytest.importorskip("torch")
    with raises(CheckpointError, str(ARITH / "chatsft_checkpoints" / "d4" / "model_000100.pt"),
                "generation 'gen-2025-10' was requested but the checkpoint's keys say gen-2026-07"):
        load_policy(ARITH, generation="gen-2025-10")


# ------------------------------------------------------------------------------------------
# Tokenizer (jaxrl/tokenizer.py)


def test_tokenizer_directory_missing(tmp_path):
    with raises(FileNotFoundError, str(tmp_path / "nope")):
        Tokenizer.from_directory(tmp_path / "nope")
    with raises(FileNotFoundError, "tokenizer.pkl"):
        Tokenizer.from_directory(tmp_path)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.getcwd, ())


def test_tokenizer_unsafe_pickle(tmp_path):
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled()))
    with raises(ValueError, str(tmp_path / "tokenizer.pkl"), "getcwd is not allowed"):
        Tokenizer.from_directory(tmp_path)


def test_tokenizer_without_nanochat_special_tokens(tmp_path):
    import tiktoken

    enc = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", special_tokens={},
                            mergeable_ranks={bytes([i]): i for i in range(256)})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    with raises(ValueError, "special tokens ['<|bos|>'"):
        Tokenizer.from_directory(tmp_path)


def test_tokenizer_bad_encode_input():
    tok = Tokenizer.from_directory(ARITH / "tokenizer")
    with raises(ValueError, "not a special token"):
        tok.encode("x", prepend="<|nope|>")
    with raises(ValueError, "Invalid input type"):
        tok.encode(b"bytes")


# ------------------------------------------------------------------------------------------
# Data (jaxrl/tasks/)


def test_data_dir_without_test_jsonl(tmp_path):
    write(tmp_path / "train.jsonl", json.dumps(GOOD_ROW) + "\n")
    with raises(FileNotFoundError, f"GSM8K file {tmp_path / 'test.jsonl'} not found", "data_dir"):
        load_task(tmp_path, "test")


def test_data_malformed_rows(tmp_path):
    rows = [json.dumps(GOOD_ROW)] * 50 + [json.dumps({"question": "q", "answer": "just 5"})]
    write(tmp_path / "train.jsonl", "\n".join(rows) + "\n")
    with raises(ValueError, str(tmp_path / "train.jsonl"), "1 of 51 rows are malformed", "line 51", "'####"):
        GSM8K("train", data_dir=tmp_path)


def test_data_not_utf8(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b'{"question": "\xff\xfe", "answer": "#### 1"}\n')
    with raises(ValueError, f"GSM8K file {tmp_path / 'train.jsonl'} is not UTF-8"):
        GSM8K("train", data_dir=tmp_path)


def test_data_unknown_task_name():
    with raises(ValueError, "unknown task 'gsm9k'"):
        load_task("gsm9k", "train")


# ------------------------------------------------------------------------------------------
# Calculator and sampler requests (jaxrl/calculator.py, jaxrl/sampler.py)


@pytest.mark.parametrize("expr", ["2**10", "__import__('os').getcwd()", "1/0", "1+" * 5000, "٣+٤", None])
def test_calculator_rejects_without_raising(expr):
    """The calculator never raises: a rejected or failing expression gives None, and the sampler
    forces no tool output for it (nanochat's behaviour). Power, code, division by zero, a dangling
    10 000-character expression, non-ASCII digits, a non-string."""
    assert use_calculator(expr) is None


def test_sampler_request_out_of_bounds():
    config = GPTConfig(sequence_len=8)
    with raises(ValueError, "prompt 1 has 70 tokens", "max_new_tokens 16", "context of 80 positions"):
        check_request(config, [[1], [1] * 70], 1, 16, 1.0)
    with raises(ValueError, "prompt 0 is empty"):
        check_request(config, [[]], 1, 16, 1.0)
    with raises(ValueError, "num_samples must be >= 1, found 0"):
        check_request(config, [[1]], 0, 16, 1.0)


# ------------------------------------------------------------------------------------------
# Command line (scripts/train_rl.py, scripts/eval_rl.py)


def run_script(name, *args, cwd=REPO, timeout=300, platforms="cpu"):
    env = dict(os.environ, JAX_PLATFORMS=platforms, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(tmp_path, *extra):
    return ["--config", REPO / "scripts" / "configs" / "arith_tiny.toml", f"--checkpoint={ARITH}",
            f"--data_dir={ARITH_DATA}", f"--out_dir={tmp_path / 'runs'}", *extra]


@pytest.mark.cli
def test_cli_missing_config_file(tmp_path):
    proc = run_script("train_rl.py", "--config", tmp_path / "nope.toml", f"--out_dir={tmp_path}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: config file '{tmp_path / 'nope.toml'}' not found" in proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.cli
def test_cli_toml_syntax_error(tmp_path):
    f = write(tmp_path / "bad.toml", 'run = "x"\ndtype = float32\n')
    proc = run_script("train_rl.py", "--config", f, f"--out_dir={tmp_path / 'runs'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"config file '{f}' is not valid TOML" in proc.stderr and "line 2" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli
def test_cli_checkpoint_does_not_exist(tmp_path):
    proc = run_script("train_rl.py", *tiny_args(tmp_path, f"--checkpoint={tmp_path / 'no_such_ckpt'}"))
    assert proc.returncode == 1
    assert f"checkpoint {tmp_path / 'no_such_ckpt'} does not exist" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli
def test_cli_rows_do_not_split_over_devices(tmp_path):
    """examples_per_step x num_samples rows must split into whole device_batch_size passes per device."""
    proc = run_script("train_rl.py", *tiny_args(tmp_path, "--examples_per_step=2", "--num_samples=4",
                                                 "--device_batch_size=4"))
    assert proc.returncode == 1
    assert "examples_per_step x num_samples = 8 rows do not split into whole passes of 4 rows on each of 4 devices" \
        in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli
def test_cli_mesh_does_not_match_the_devices(tmp_path):
    """mesh_data x mesh_fsdp must be the device count (4 here); nothing is written."""
    proc = run_script("train_rl.py", *tiny_args(tmp_path, "--mesh_data=3"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "mesh_data x mesh_fsdp = 3 x 1 = 3, but there are 4 devices" in proc.stderr
    proc = run_script("train_rl.py", *tiny_args(tmp_path, "--mesh_fsdp=3"))
    assert proc.returncode == 1 and "mesh_fsdp = 3 does not divide the 4 devices" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli
@pytest.mark.slow
def test_cli_data_dir_without_test_jsonl(tmp_path):
    data = tmp_path / "data"
    write(data / "train.jsonl", (ARITH_DATA / "train.jsonl").read_text().split("\n", 1)[0] + "\n")
    proc = run_script("train_rl.py", *tiny_args(tmp_path, f"--data_dir={data}"))
    assert proc.returncode == 1
    assert f"GSM8K file {data / 'test.jsonl'} not found" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli
@pytest.mark.slow
def test_cli_fresh_run_over_existing_checkpoints(tmp_path):
    run_dir = tmp_path / "runs" / "arith_tiny"
    with CheckpointManager(run_dir / "checkpoints") as mgr:
        mgr.save(0, _state(), {})
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    proc = run_script("train_rl.py", *tiny_args(tmp_path))
    assert proc.returncode == 1
    assert f"error: {run_dir.resolve() / 'checkpoints'} already holds checkpoints (latest step 0): pass --resume" \
        in proc.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.cli
def test_cli_eval_checkpoint_missing(tmp_path):
    proc = run_script("eval_rl.py", "--checkpoint", tmp_path / "nope", "--json", tmp_path / "out.json")
    assert proc.returncode == 1
    assert f"checkpoint {tmp_path / 'nope'} does not exist" in proc.stderr
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------------------------
# The catalogue itself


def test_catalogue_matches_this_file():
    """docs/errors.md has one row per kind, each naming a test under tests/, and it names every test of
    the catalogue files (this one and test_bad_inputs_more.py); rows may also name tests elsewhere."""
    doc = (REPO / "docs" / "errors.md").read_text(encoding="utf-8")
    named = re.findall(r"\| `(test_[a-z0-9_]+)` \|$", doc, flags=re.MULTILINE)  # the last cell of each row
    defined = r"^def (test_[a-z0-9_]+)\("
    catalogue = {n for f in ("test_bad_inputs.py", "test_bad_inputs_more.py")
                 for n in re.findall(defined, (REPO / "tests" / f).read_text(encoding="utf-8"), flags=re.MULTILINE)}
    catalogue.discard("test_catalogue_matches_this_file")
    anywhere = {n for f in (REPO / "tests").glob("test_*.py")
                for n in re.findall(defined, f.read_text(encoding="utf-8"), flags=re.MULTILINE)}
    assert len(named) == len(set(named)), "a test is named twice in docs/errors.md"
    assert catalogue <= set(named), f"not in the docs: {catalogue - set(named)}"
    assert set(named) <= anywhere, f"in the docs only: {set(named) - anywhere}"
    assert len(named) >= 25
