"""convert/ on bad inputs: each failure is a CheckpointError naming the file, the key and expected vs found.

Builds broken copies of the gen-2026-07 fixture in ../shared/fixtures/nanochat (read only).
Skipped without torch.

Run: python -m pytest -q tests/test_convert_errors.py
"""
import json
import os
import pickle
import re

import pytest

torch = pytest.importorskip("torch")

from conftest import FIXTURES  # noqa: E402
from convert import CheckpointError, read_nanochat  # noqa: E402
from convert import export_nanochat, import_nanochat  # noqa: E402
from jaxrl.run_state import import_dir  # noqa: E402

SRC = FIXTURES / "gen-2026-07" / "chatsft_checkpoints" / "d4"
PADDED = FIXTURES / "gen-2026-07" / "padded_vocab"


def fixture_state():
    return torch.load(SRC / "model_000000.pt", weights_only=True)


def fixture_meta():
    return json.loads((SRC / "meta_000000.json").read_text())


def write_checkpoint(base, state=None, meta=None):
    """base/chatsft_checkpoints/d4/{model,meta}_000000.*; returns the model file."""
    d = base / "chatsft_checkpoints" / "d4"
    d.mkdir(parents=True, exist_ok=True)
    torch.save(fixture_state() if state is None else state, d / "model_000000.pt")
    if meta is not False:
        (d / "meta_000000.json").write_text(json.dumps(fixture_meta() if meta is None else meta))
    return d / "model_000000.pt"


def raises_naming(path, pattern):
    return pytest.raises(CheckpointError, match="(?s)" + re.escape(str(path)) + ".*" + pattern)


def test_truncated_pt(tmp_path):
    model = write_checkpoint(tmp_path)
    model.write_bytes((SRC / "model_000000.pt").read_bytes()[:1_000_000])
    with raises_naming(model, r"not a readable torch checkpoint \(truncated"):
        read_nanochat(tmp_path)


@pytest.mark.parametrize("content,found", [([1, 2, 3], "found a list"), ({"a": 1}, "entry 'a' is a int")])
def test_pt_that_is_not_a_state_dict(tmp_path, content, found):
    model = write_checkpoint(tmp_path, state=content)
    with raises_naming(model, found):
        read_nanochat(model)


def test_plain_pickle_pt(tmp_path):
    model = write_checkpoint(tmp_path)
    model.write_bytes(pickle.dumps({"transformer.wte.weight": [1.0]}))
    with raises_naming(model, "not a readable torch checkpoint"):
        read_nanochat(model)


def test_missing_meta_json(tmp_path):
    model = write_checkpoint(tmp_path, meta=False)
    with raises_naming(model.with_name("meta_000000.json"), "next to the model file"):
        read_nanochat(model.parent)


def test_unreadable_meta_json(tmp_path):
    model = write_checkpoint(tmp_path)
    model.with_name("meta_000000.json").write_text("{not json")
    with raises_naming(model.with_name("meta_000000.json"), "cannot read JSON"):
        read_nanochat(tmp_path)


def test_meta_with_unknown_config_field(tmp_path):
    meta = fixture_meta()
    meta["model_config"]["n_experts"] = 8
    model = write_checkpoint(tmp_path, meta=meta)
    with raises_naming(model.with_name("meta_000000.json"), r"unknown \['n_experts'\]"):
        read_nanochat(tmp_path)


def test_missing_key(tmp_path):
    state = fixture_state()
    del state["transformer.h.0.mlp.c_fc.weight"]
    model = write_checkpoint(tmp_path, state)
    with raises_naming(model, r"missing key 'transformer.h.0.mlp.c_fc.weight' \(expected shape \(512, 128\)\)"):
        read_nanochat(tmp_path)


def test_extra_key(tmp_path):
    state = fixture_state()
    state["transformer.h.0.attn.c_x.weight"] = torch.zeros(4, 4)
    model = write_checkpoint(tmp_path, state)
    with raises_naming(model, r"unexpected key 'transformer.h.0.attn.c_x.weight' with shape \(4, 4\)"):
        read_nanochat(tmp_path)


def test_misshapen_key(tmp_path):
    state = fixture_state()
    state["transformer.h.2.attn.c_q.weight"] = torch.zeros(128, 127)
    model = write_checkpoint(tmp_path, state)
    pattern = r"key 'transformer.h.2.attn.c_q.weight': expected shape \(128, 128\), found \(128, 127\)"
    with raises_naming(model, pattern):
        read_nanochat(tmp_path)


def test_non_float_tensor(tmp_path):
    state = fixture_state()
    state["smear_lambda"] = torch.ones(1, dtype=torch.int64)
    model = write_checkpoint(tmp_path, state)
    with raises_naming(model, "key 'smear_lambda' has dtype torch.int64"):
        read_nanochat(tmp_path)


def test_tokenizer_vocab_must_match_the_model(tmp_path):
    """padded_vocab has vocab 2000; the fixtures' tokenizer has 2048 (explicit dir and nanochat's ../../tokenizer)."""
    meta = PADDED / "chatsft_checkpoints" / "d2" / "meta_000000.json"
    tok = FIXTURES / "tokenizer" / "tokenizer.pkl"
    pattern = (f"tokenizer {re.escape(str(tok))} has vocab size 2048 but {re.escape(str(meta))} says "
               f"model_config.vocab_size = 2000")
    with pytest.raises(CheckpointError, match=pattern):
        read_nanochat(PADDED, tokenizer_dir=FIXTURES / "tokenizer")
    d = tmp_path / "chatsft_checkpoints" / "d2"
    d.mkdir(parents=True)
    for name in ("model_000000.pt", "meta_000000.json"):
        (d / name).write_bytes((meta.parent / name).read_bytes())
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "tokenizer.pkl").write_bytes(tok.read_bytes())
    with pytest.raises(CheckpointError, match="has vocab size 2048 but .* model_config.vocab_size = 2000"):
        read_nanochat(d)
    import_nanochat.main([str(PADDED), "--out", str(tmp_path / "imp")])  # no tokenizer found: check skipped
    with pytest.raises(CheckpointError, match="vocab size 2048 but .*model.json says model_config.vocab_size = 2000"):
        read_nanochat(tmp_path / "imp", tokenizer_dir=FIXTURES / "tokenizer")


def test_unknown_generation_name_is_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        import_nanochat.main([str(SRC), "--out", str(tmp_path / "x"), "--generation", "gen-2026-03"])
    assert "invalid choice: 'gen-2026-03'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown generation 'gen-2026-3'"):
        read_nanochat(SRC, generation="gen-2026-3")


def test_path_mistakes(tmp_path):
    with pytest.raises(CheckpointError, match="--step 5 given but .*model_000000.pt is step 0"):
        read_nanochat(SRC / "model_000000.pt", step=5)
    with pytest.raises(CheckpointError, match="model_000007.pt does not exist"):
        read_nanochat(SRC, step=7)
    (tmp_path / "chatrl_checkpoints").mkdir()
    with pytest.raises(CheckpointError, match=r"has no chatsft_checkpoints/ .*sources \['rl'\]: pass --source"):
        read_nanochat(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_nanochat(tmp_path / "nope")


def test_existing_output_is_refused_unless_forced(tmp_path):
    out = tmp_path / "imp"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=f"output {re.escape(str(out))} already exists.*--force"):
        import_nanochat.main([str(SRC), "--out", str(out)])
    assert (out / "keep.txt").read_text() == "mine"
    assert import_nanochat.main([str(SRC), "--out", str(out), "--force"]) == 0
    assert sorted(os.listdir(out)) == ["model.json", "params", "tokenizer"]
    assert sorted(os.listdir(tmp_path)) == ["imp"]


def test_output_is_not_half_written_when_conversion_fails(tmp_path, monkeypatch):
    """A failure after params/ is on disk leaves no DST and no temporary directory; --force keeps the old DST."""
    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(import_dir, "copy_tokenizer", fail)
    with pytest.raises(OSError, match="simulated"):
        import_nanochat.main([str(SRC), "--out", str(tmp_path / "imp")])
    assert os.listdir(tmp_path) == []
    (tmp_path / "imp").mkdir()
    (tmp_path / "imp" / "old.txt").write_text("old")
    with pytest.raises(OSError, match="simulated"):
        import_nanochat.main([str(SRC), "--out", str(tmp_path / "imp"), "--force"])
    assert os.listdir(tmp_path) == ["imp"] and os.listdir(tmp_path / "imp") == ["old.txt"]


def test_export_errors(tmp_path):
    pattern = f"{re.escape(str(tmp_path))}: not a jaxrl import directory, .*model.json is missing"
    with pytest.raises(CheckpointError, match=pattern):
        export_nanochat.main([str(tmp_path), "--out", str(tmp_path / "out")])
    imp = tmp_path / "imp"
    import_nanochat.main([str(SRC), "--out", str(imp)])
    export_nanochat.main([str(imp), "--out", str(tmp_path / "out")])
    with pytest.raises(CheckpointError, match="model_000000.pt already exists; pass --force"):
        export_nanochat.main([str(imp), "--out", str(tmp_path / "out")])
    with pytest.raises(CheckpointError, match="--model-tag only applies with --base-dir"):
        export_nanochat.main([str(imp), "--out", str(tmp_path / "out2"), "--model-tag", "d4"])
    (tmp_path / "base" / "tokenizer").mkdir(parents=True)
    (tmp_path / "base" / "tokenizer" / "tokenizer.pkl").write_bytes(b"another tokenizer")
    with pytest.raises(CheckpointError, match="tokenizer.pkl exists and differs from .*pass --force"):
        export_nanochat.main([str(imp), "--out", str(tmp_path / "base"), "--base-dir"])
