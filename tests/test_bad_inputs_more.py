"""The bad-input catalogue, continued (docs/errors.md names each test): paths that are files or
read-only, config files that are folders or not UTF-8, values that do not fit the model, poisoned
data and weights. Every message is checked for the bad value and the fix; the CLI cases also check
that there is no traceback and no run directory.

Run: python -m pytest -q tests/test_bad_inputs_more.py -m "not slow"   (the CLI run that loads a model is `slow`)
"""
import json
import os
import stat

import jax
import numpy as np
import pytest
import test_bad_inputs as base
from conftest import ARITH, tiny_config, tiny_params

from jaxrl import model, rollout
from jaxrl.config import ConfigError, check_writable_dir
from jaxrl.config_io import load_config
from jaxrl.model import GPTConfig
from jaxrl.run_state import CheckpointError, RunPaths, load_jaxrl_import, save_jaxrl_import
from jaxrl.tasks import open_task
from jaxrl.tasks.gsm8k import GSM8K, evaluate, reward, row_to_conversation
from jaxrl.tokenizer import Tokenizer

raises, write = base.raises, base.write
GOOD_LINE = json.dumps(base.GOOD_ROW)
TWELVE = json.dumps({"question": "How many eggs?", "answer": "6 + 6 = 12 eggs.\n#### twelve"})
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # chmod does not stop root from writing


def _tiny_import(path, poison=None):
    config = tiny_config()
    params = jax.tree.map(np.array, tiny_params(config))
    if poison:
        params["transformer"]["h"]["mlp"]["c_fc"]["weight"][0, 3, 5] = poison  # layer 0
    return save_jaxrl_import(path, config, params, {"generation": config.generation, "source": {"step": 0}})


def _read_only_dir(path):
    path.mkdir()
    path.chmod(0o555)
    return path


# ------------------------------------------------------------------------------------------
# Config and paths (jaxrl/config.py, jaxrl/config_io.py)


def test_config_file_is_a_directory(tmp_path):
    with raises(ConfigError, f"config file '{tmp_path}' is a directory", "pass a .toml file"):
        load_config(["--config", str(tmp_path)])


def test_config_file_with_bom_or_not_utf8(tmp_path):
    """A byte-order mark is skipped (the file is valid UTF-8); Latin-1 bytes are refused with their offset."""
    bom = tmp_path / "bom.toml"
    bom.write_bytes(b'\xef\xbb\xbfrun = "x"\nnum_samples = 8\n')
    assert load_config(["--config", str(bom)]).num_samples == 8
    latin = tmp_path / "latin.toml"
    latin.write_bytes(b'run = "caf\xe9"\n')
    with raises(ConfigError, f"config file '{latin}' is not UTF-8 text (byte 0xe9 at offset 10)", "save it as UTF-8"):
        load_config(["--config", str(latin)])


def test_config_seed_too_large():
    with raises(ConfigError, "seed must be in [0, 2**32)", "found 4294967296", "eval_seed must be in [0, 2**32)"):
        load_config([f"--seed={2**32}", "--eval_seed=-1"])
    assert load_config([f"--seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize("name", ["", " ", "..", "a/b"])
def test_config_run_name_not_a_folder_name(name):
    with raises(ConfigError, f"run must be a folder name (the run directory is <out_dir>/<run>), found {name!r}"):
        load_config([f"--run={name}"])


def test_config_out_dir_not_writable(tmp_path, monkeypatch):
    """A file in the path, or a folder this user (or a read-only filesystem) cannot write."""
    base.write(tmp_path / "f", "a file")
    with raises(ConfigError, f"out_dir '{tmp_path / 'f' / 'runs'}' cannot be created: {tmp_path / 'f'} is a file",
                "choose another out_dir"):
        check_writable_dir(tmp_path / "f" / "runs", "out_dir")
    ro = _read_only_dir(tmp_path / "ro")
    if IS_ROOT:  # root writes through 0555: the permission answer is simulated instead
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with raises(ConfigError, f"out_dir '{ro / 'runs'}' is not writable ({ro} is read-only",
                "choose a writable out_dir or fix its permissions"):
        check_writable_dir(ro / "runs", "out_dir")


# ------------------------------------------------------------------------------------------
# nanochat checkpoints and imports (convert/, jaxrl/run_state/)


def test_nanochat_extra_tensor(tmp_path):
    from convert import CheckpointError as ConvertError, read_nanochat

    torch = pytest.importorskip("torch")
    model_file = base._nanochat_dir(tmp_path, lambda s: s.update(extra=torch.zeros(3, 4)))
    with raises(ConvertError, f"{model_file}: state dict does not match", "unexpected key 'extra' with shape (3, 4)"):
        read_nanochat(model_file, tokenizer_dir=ARITH / "tokenizer")


def test_nanochat_non_finite_weights(tmp_path):
    """One NaN in a source weight: the .pt import and an import directory both refuse, naming the tensor."""
    from convert import CheckpointError as ConvertError, read_nanochat

    def poison(s):
        s["transformer.h.1.attn.c_q.weight"][7, 3] = float("nan")

    model_file = base._nanochat_dir(tmp_path, poison)
    with raises(ConvertError, f"{model_file}: non-finite weights (NaN or inf) in 1 tensor(s): "
                "'transformer.h.1.attn.c_q.weight' (1 of 65536 values)", "use an earlier checkpoint"):
        read_nanochat(model_file, tokenizer_dir=ARITH / "tokenizer")
    imported = _tiny_import(tmp_path / "imp", poison=np.inf)
    with raises(CheckpointError, f"{imported / 'params'}: non-finite weights",
                "'transformer.h.0.mlp.c_fc.weight' (1 of 16384 values)"):
        load_jaxrl_import(imported)


def test_nanochat_model_file_is_a_directory(tmp_path):
    from convert import CheckpointError as ConvertError, read_nanochat

    ckpt = tmp_path / "chatsft_checkpoints" / "d4"
    (ckpt / "model_000200.pt").mkdir(parents=True)
    with raises(ConvertError, f"{ckpt / 'model_000200.pt'} is a directory, not a torch file", "pass that file"):
        read_nanochat(ckpt / "model_000200.pt")
    with raises(ConvertError, f"step 200: {ckpt / 'model_000200.pt'} is a directory, not a torch file",
                "remove the directory model_000200.pt"):
        read_nanochat(ckpt)


def test_policy_empty_directory_or_missing_step(tmp_path):
    """eval_rl/train_rl --checkpoint of an empty folder, or a model step the folder does not hold."""
    from convert import CheckpointError as ConvertError, read_nanochat

    with raises(ConvertError, f"checkpoint directory {tmp_path} is empty", "a nanochat base dir"):
        read_nanochat(tmp_path)
    ckpt = ARITH / "chatsft_checkpoints" / "d4"
    with raises(ConvertError, f"step 7: {ckpt / 'model_000007.pt'} does not exist", "steps [100]: pass one of them"):
        read_nanochat(ARITH, step=7)


def test_import_export_to_read_only_destination(tmp_path, monkeypatch):
    """import_nanochat / export_nanochat refuse an --out they cannot write before converting anything."""
    pytest.importorskip("torch")
    from convert import export_nanochat, import_nanochat

    base.write(tmp_path / "f", "a file")
    with raises(ConfigError, f"--out '{tmp_path / 'f' / 'imp'}' cannot be created: {tmp_path / 'f'} is a file"):
        import_nanochat.main([str(ARITH), "--out", str(tmp_path / "f" / "imp")])
    src = _tiny_import(tmp_path / "src")
    ro = _read_only_dir(tmp_path / "ro")
    if IS_ROOT:
        monkeypatch.setattr(os, "access", lambda path, mode: False)
    with raises(ConfigError, f"--out '{ro / 'exp'}' is not writable ({ro} is read-only"):
        export_nanochat.main([str(src), "--out", str(ro / "exp")])
    assert sorted(os.listdir(tmp_path)) == ["f", "ro", "src"] and os.listdir(ro) == []


def test_import_directory_permissions(tmp_path):
    """An import is an ordinary folder: 0755 folders and 0644 files under umask 022 (mkdtemp makes 0700)."""
    old = os.umask(0o022)
    try:
        out = _tiny_import(tmp_path / "imp")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE(RunPaths(out).model_json.stat().st_mode) == 0o644
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_dir()} == {0o755}


# ------------------------------------------------------------------------------------------
# Data and prompts (jaxrl/tasks/, jaxrl/rollout.py)


def test_data_answer_not_a_number(tmp_path):
    """`#### twelve` is a malformed row (the 1 % rule applies), and a missing reference is never rewarded."""
    write(tmp_path / "train.jsonl", "\n".join([GOOD_LINE] * 199 + [TWELVE]) + "\n")
    assert len(GSM8K("train", data_dir=tmp_path)) == 199  # 1 of 200: skipped and counted
    write(tmp_path / "train.jsonl", "\n".join([GOOD_LINE] * 50 + [TWELVE]) + "\n")
    with raises(ValueError, "1 of 51 rows are malformed", "line 51: reference answer '#### twelve' is not '#### <number>'"):
        GSM8K("train", data_dir=tmp_path)
    conversation = row_to_conversation(json.loads(TWELVE))
    for completion in ("I do not know", "#### 12", "#### twelve"):  # nanochat pays 1.0 for the first
        assert evaluate(conversation, completion) == 0 and reward(conversation, completion) == 0.0


def test_data_empty_jsonl(tmp_path):
    write(tmp_path / "train.jsonl", GOOD_LINE + "\n")
    write(tmp_path / "test.jsonl", "\n")
    with raises(ValueError, f"GSM8K file {tmp_path / 'test.jsonl'} has no rows", "one JSON object per line"):
        GSM8K("test", data_dir=tmp_path)


def test_data_bom_is_not_a_malformed_row(tmp_path, capsys):
    (tmp_path / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join([GOOD_LINE] * 3).encode() + b"\n")
    task = GSM8K("train", data_dir=tmp_path)
    assert len(task) == 3 and "malformed" not in capsys.readouterr().out


def test_data_dir_missing_or_a_file(tmp_path):
    write(tmp_path / "f", "a file")
    with raises(FileNotFoundError, f"data_dir '{tmp_path / 'nope'}' does not exist", "holding train.jsonl and test.jsonl"):
        open_task("arith", tmp_path / "nope", "train")
    with raises(FileNotFoundError, f"data_dir '{tmp_path / 'f'}' is a file, not a directory"):
        open_task("gsm8k", tmp_path / "f", "test")
    with raises(FileNotFoundError, f"task directory '{tmp_path / 'nope'}' does not exist", "'gsm8k' or 'arith'"):
        open_task(str(tmp_path / "nope"), None, "train")


def test_prompt_longer_than_context(tmp_path):
    """Prompts are checked before sampling and never truncated; the error counts them and says what fits."""
    long = json.dumps({"question": "x " * 60, "answer": "#### 1"})
    write(tmp_path / "test.jsonl", "\n".join([GOOD_LINE] * 3 + [long]) + "\n")
    task, tok = GSM8K("test", data_dir=tmp_path), Tokenizer.from_directory(ARITH / "tokenizer")
    config = GPTConfig(sequence_len=8)  # a context of 80 positions
    lengths = [len(tok.render_for_completion(task[i])) for i in range(4)]
    i = int(np.argmax(lengths))
    with raises(ValueError, f"1 of 4 test questions do not fit the model's context of 80 positions with max_new_tokens "
                f"16: the longest, question {i}, has a {lengths[i]}-token prompt", f"Lower max_new_tokens to {80 - lengths[i]}"):
        rollout.check_prompt_lengths(config, tok, task, 4, 16, "test")
    rollout.check_prompt_lengths(config, tok, task, 4, 80 - max(lengths), "test")  # fits exactly
    with raises(ValueError, "max_new_tokens 80 leaves no room for a prompt in the model's context of 80 positions"):
        rollout.check_prompt_lengths(config, tok, task, 4, 80, "test")
    tiny = GPTConfig(sequence_len=2)  # a context of 20 positions: shorter than the longest prompt
    n = sum(length + 1 > 20 for length in lengths)
    with raises(ValueError, f"{n} of 4 test questions do not fit", "That prompt alone fills the context: remove"):
        rollout.check_prompt_lengths(tiny, tok, task, 4, 1, "test")


def test_env_attention_unknown_or_cudnn_on_cpu(monkeypatch):
    monkeypatch.setenv("JAXRL_ATTENTION", "flash")
    with raises(ValueError, "JAXRL_ATTENTION must be einsum, xla or cudnn, found 'flash'", "unset it"):
        model.attention_impl()
    monkeypatch.setenv("JAXRL_ATTENTION", "cudnn")
    if jax.default_backend() == "gpu":
        assert model.attention_impl() == "cudnn"
    else:
        with raises(ValueError, f"JAXRL_ATTENTION=cudnn needs an NVIDIA GPU, found '{jax.default_backend()}'", "xla"):
            model.attention_impl()


# ------------------------------------------------------------------------------------------
# Command line: the scripts turn these errors into one line, exit 1, nothing written


@pytest.mark.cli
def test_cli_train_bad_paths(tmp_path):
    """Checked before jax is imported: an out_dir under a file, a config path that is a folder."""
    write(tmp_path / "f", "a file")
    proc = base.run_script("train_rl.py", f"--out_dir={tmp_path / 'f' / 'runs'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: out_dir '{tmp_path / 'f' / 'runs' / 'dummy'}' cannot be created" in proc.stderr
    proc = base.run_script("train_rl.py", "--config", tmp_path, f"--out_dir={tmp_path / 'runs'}")
    assert proc.returncode == 1 and f"config file '{tmp_path}' is a directory" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["f"]


@pytest.mark.cli
def test_cli_eval_bad_arguments(tmp_path):
    """eval_rl's values are checked before jax is imported; an unwritable --json before the eval."""
    write(tmp_path / "f", "a file")
    cases = [(["--max-new-tokens", "0", "--temperature", "-1", "--seed", str(2**32), "--top-k", "-1", "--slots", "-2",
               "--cpu-devices", "0"],
              ["--max-new-tokens must be >= 1, found 0", "--temperature must be a finite number >= 0 (0 is greedy), "
               "found -1.0", f"--seed must be in [0, 2**32), found {2**32}", "--top-k must be >= 0",
               "--slots must be >= 0 (0: all rows at once), found -2", "--cpu-devices must be >= 1, found 0"]),
             (["--generation", "gen-9"], ["argument --generation: invalid choice: 'gen-9'"]),
             (["--json", tmp_path / "f" / "out.json"], [f"--json's folder '{tmp_path / 'f'}' cannot be created"]),
             (["--json", tmp_path], [f"--json {tmp_path} is a directory; pass a file path such as"])]
    for args, messages in cases:
        proc = base.run_script("eval_rl.py", "--checkpoint", ARITH, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        for message in messages:
            assert message in proc.stderr, proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["f"]


@pytest.mark.cli
def test_cli_scripts_refuse_jax_platforms_without_cpu(tmp_path):
    """JAX_PLATFORMS=cuda would leave the calculator no CPU device: train_rl and eval_rl say so and
    exit before jax starts a backend (here, with no GPU, jax itself would fail with a traceback)
    and before anything is written."""
    fix = "JAX_PLATFORMS='cuda' leaves out jax's CPU backend, which the calculator tool runs on (host callbacks); " \
          "add it: JAX_PLATFORMS=cuda,cpu"
    for proc in (base.run_script("train_rl.py", *base.tiny_args(tmp_path), platforms="cuda"),
                 base.run_script("eval_rl.py", "--checkpoint", ARITH, "--json", tmp_path / "eval.json",
                                 platforms="cuda")):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"error: {fix}" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.cli
def test_cli_train_data_errors(tmp_path):
    """Data is read before the model: an empty train.jsonl, a data_dir that is a file."""
    data = tmp_path / "data"
    write(data / "train.jsonl", "")
    write(data / "test.jsonl", GOOD_LINE + "\n")
    proc = base.run_script("train_rl.py", *base.tiny_args(tmp_path, f"--data_dir={data}"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"error: GSM8K file {data / 'train.jsonl'} has no rows" in proc.stderr
    proc = base.run_script("train_rl.py", *base.tiny_args(tmp_path, f"--data_dir={data / 'train.jsonl'}"))
    assert proc.returncode == 1 and f"error: data_dir '{data / 'train.jsonl'}' is a file" in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.cli
@pytest.mark.slow
def test_cli_train_max_new_tokens_above_context(tmp_path):
    proc = base.run_script("train_rl.py", *base.tiny_args(tmp_path, "--max_new_tokens=5000"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "error: max_new_tokens 5000 leaves no room for a prompt in the model's context of 2560 positions" \
        in proc.stderr
    assert not (tmp_path / "runs").exists()
