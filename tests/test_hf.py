"""convert.export_hf / convert.import_hf: transformers' own NanoChatForCausalLM loads what we write.

Golden inputs come from ../shared/fixtures/nanochat (the gen-2025-10 checkpoint, golden_forward.npz
ids, golden_tokenizer.json conversations). Models: that checkpoint, and a d4-shaped random
gen-2025-10 model (nanochat's depth-4 widths: n_embd 256, head_dim 128; one kv head for MQA).
Needs torch and transformers (the `hf` extra, which CI installs); float32 on CPU, no network.

Run: python -m pytest -q tests/test_hf.py
"""
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import FIXTURES, REPO  # noqa: E402
from convert import export_hf, hf, import_hf, read_nanochat  # noqa: E402
from convert.export import export_params  # noqa: E402
from convert.hf_tokenizer import build_tokenizer_json  # noqa: E402
from jaxrl import model as jaxrl_model  # noqa: E402
from jaxrl import sampler  # noqa: E402
from jaxrl.run_state import CheckpointError, load_jaxrl_import, save_jaxrl_import  # noqa: E402
from jaxrl.model import GPTConfig, forward, param_table  # noqa: E402
from jaxrl.tokenizer import Tokenizer  # noqa: E402

GEN = FIXTURES / "gen-2025-10"
# float32 vs float32, the same math in another summation order; measured max |Δ| 7.1e-6 (fixture), 1.0e-5 (random).
ATOL = 1e-4
# transformers keeps rotary tables in float32 where gen-2025-10 rounds them to bf16 (hf.FP32_ROTARY_NOTE);
# measured max |Δlogit| 1.2e-2 (fixture) and 1.0e-2 (random d4) against jaxrl's own gen-2025-10 forward.
ROTARY_ATOL = 3e-2
NEW_TOKENS = 24
RANDOM_CONFIG = GPTConfig(sequence_len=256, vocab_size=2048, n_layer=4, n_head=2, n_kv_head=1, n_embd=256,
                          generation="gen-2025-10")


def random_state(config, seed):
    """Seeded weights with the fixture's scales, so greedy decoding does not collapse to one token."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape, _ in param_table(config):
        fan_in = shape[1]
        scale = {"transformer.wte.weight": 1.0, "lm_head.weight": 3.0 / fan_in**0.5}.get(key, 1.0 / fan_in**0.5)
        if key.endswith("mlp.c_proj.weight"):
            scale = 0.3 / fan_in**0.5
        state[key] = (scale * rng.standard_normal(shape)).astype(np.float32)
    return state


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """{name: (config, params, SRC given to export_hf, exported folder)}; SRC is a nanochat base dir
    for the fixture and a jaxrl import dir for the random model."""
    root = tmp_path_factory.mktemp("hf")
    random_params = hf.params_from_nanochat(random_state(RANDOM_CONFIG, 18))
    imp = save_jaxrl_import(root / "random-import", RANDOM_CONFIG, random_params,
                            {"generation": "gen-2025-10", "source": {"step": 7}}, tokenizer_dir=FIXTURES / "tokenizer")
    out = {}
    for name, src in (("fixture", GEN), ("random", imp)):
        assert export_hf.main([str(src), "--out", str(root / name)]) == 0
        config, params, _ = read_nanochat(src)
        out[name] = (config, params, src, root / name)
    return out


@pytest.fixture(scope="module")
def hf_models(cases):
    return {name: transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            for name, (_, _, _, folder) in cases.items()}


@pytest.fixture(scope="module")
def hf_tokenizer(cases):
    return transformers.AutoTokenizer.from_pretrained(cases["fixture"][3])


def conversations():
    return json.loads((FIXTURES / "golden_tokenizer.json").read_text())["conversations"]


def fp32_rotary(config, positions):
    """jaxrl.model.rotary with the tables left in float32 (the one thing transformers computes differently)."""
    hd = config.head_dim
    inv_freq = 1.0 / (np.float32(config.rotary_base) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    angle = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
    return jnp.cos(angle)[:, :, None, :], jnp.sin(angle)[:, :, None, :]


# ------------------------------------------------------------------------------------------
# The model: weights, logits, greedy generation


@pytest.mark.parametrize("name", ["fixture", "random"])
def test_transformers_loads_exactly_the_exported_weights(cases, hf_models, name):
    config, params, _, folder = cases[name]
    assert type(hf_models[name]).__name__ == "NanoChatForCausalLM"
    expected = hf.to_hf_state(hf.nanochat_state(params))
    loaded = {k: v.numpy() for k, v in hf_models[name].state_dict().items()}
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == np.float32 and np.array_equal(loaded[key], value), key
    tok = Tokenizer.from_directory(FIXTURES / "tokenizer")
    gen = transformers.GenerationConfig.from_pretrained(folder)  # where nanochat's Engine stops
    specials = tok.specials
    assert (gen.eos_token_id, gen.pad_token_id) == ([specials.assistant_end, specials.bos], specials.assistant_end)
    # a different eps moves these logits by less than the float32 noise, so pin nanochat's value here
    assert hf_models[name].config.rms_norm_eps == np.finfo(np.float32).eps
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json"]


@pytest.mark.parametrize("name", ["fixture", "random"])
def test_transformers_logits_match_jaxrl(cases, hf_models, name, monkeypatch):
    config, params, _, _ = cases[name]
    idx = np.load(GEN / "golden_forward.npz")["idx"]  # (3, 48) fixture token ids
    with torch.no_grad():
        logits = hf_models[name](torch.from_numpy(idx)).logits.numpy()
    ours = np.asarray(forward(config, params, idx))
    np.testing.assert_allclose(logits, ours, rtol=0, atol=ROTARY_ATOL)
    assert np.abs(logits - ours).max() > ATOL  # the bf16 rotary difference is real: keep the note honest
    monkeypatch.setattr(jaxrl_model, "rotary", fp32_rotary)
    np.testing.assert_allclose(logits, np.asarray(forward(config, params, idx)), rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["fixture", "random"])
def test_transformers_greedy_generate_matches_jaxrl_rollout(cases, hf_models, hf_tokenizer, name):
    config, params, _, _ = cases[name]
    tok = Tokenizer.from_directory(FIXTURES / "tokenizer")
    prompts = [hf_tokenizer.apply_chat_template(c["conversation"]["messages"][:1], add_generation_prompt=True,
                                                return_dict=False) for c in conversations()[:3]]
    specials = tok.specials
    rollout, _ = sampler.sample(config, params, prompts, num_samples=1, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                specials=specials)
    for r, prompt in enumerate(prompts):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            out = hf_models[name].generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                           do_sample=False)
        generated = out[0, len(prompt):].tolist()
        n = int(rollout.length[r])
        assert generated[:n] == rollout.tokens[r, :n].tolist(), (name, r)
        if n < NEW_TOKENS:  # jaxrl stopped at <|assistant_end|> / <|bos|>; transformers emits it, then stops
            assert len(generated) == n + 1 and generated[n] in (specials.assistant_end, specials.bos)
        else:
            assert len(generated) == NEW_TOKENS


# ------------------------------------------------------------------------------------------
# The tokenizer and chat template


def test_chat_template_renders_like_jaxrl(cases, hf_tokenizer):
    tok = Tokenizer.from_directory(FIXTURES / "tokenizer")
    config = json.loads((cases["fixture"][3] / "tokenizer_config.json").read_text())
    assert config["chat_template"] == hf_tokenizer.chat_template  # what tools that read the config see
    for case in conversations():
        messages = case["conversation"]["messages"]
        ids = hf_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_dict=False)
        assert ids == case["render_for_completion"] == tok.render_for_completion(case["conversation"])
        full = hf_tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
        assert list(full["input_ids"]) == case["render_conversation"]["ids"]
        assert list(full["assistant_masks"]) == case["render_conversation"]["mask"]
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
                         {"role": "assistant", "content": "6"}]}
    ids = hf_tokenizer.apply_chat_template(chat["messages"][:-1], add_generation_prompt=True, return_dict=False)
    assert ids == tok.render_for_completion(chat)
    with pytest.raises(Exception, match="message 0 is from assistant but should be from user"):
        hf_tokenizer.apply_chat_template([{"role": "assistant", "content": "hi"}], return_dict=False)


def test_tokenizer_encodes_and_decodes_like_nanochat(hf_tokenizer):
    golden = json.loads((FIXTURES / "golden_tokenizer.json").read_text())
    tok = Tokenizer.from_directory(FIXTURES / "tokenizer")
    rng = np.random.default_rng(18)
    texts = [s["text"] for s in golden["strings"] if "<|" not in s["text"]]  # special text: see hf_tokenizer
    texts += [m["content"] for c in golden["conversations"] for m in c["conversation"]["messages"][:1]]
    texts += ["".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, size=40)) for _ in range(20)]
    for text in texts:
        ids = hf_tokenizer.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text), text
        assert hf_tokenizer.decode(ids) == tok.decode(ids)
    for case in golden["partial_utf8_byte_tokens"]:
        assert hf_tokenizer.decode([case["id"]]) == tok.decode([case["id"]]) == "\ufffd"
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (tok.specials.bos, tok.specials.assistant_end)
    specials = sorted(golden["special_token_ids"].values())
    assert hf_tokenizer.decode(specials) == tok.decode(specials)


# ------------------------------------------------------------------------------------------
# Round trips and refusals


@pytest.mark.parametrize("name", ["fixture", "random"])
def test_import_of_the_export_is_bit_exact(cases, name, tmp_path):
    config, params, _, folder = cases[name]
    assert import_hf.main([str(folder), "--out", str(tmp_path / "imp")]) == 0
    config2, params2, info = load_jaxrl_import(tmp_path / "imp")
    assert config2 == config and info["generation"] == "gen-2025-10"
    a, b = hf.nanochat_state(params), hf.nanochat_state(params2)
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    enc = Tokenizer.from_directory(FIXTURES / "tokenizer").enc
    enc2 = Tokenizer.from_directory(tmp_path / "imp" / "tokenizer").enc
    assert enc2._mergeable_ranks == enc._mergeable_ranks and enc2._special_tokens == enc._special_tokens
    assert enc2._pat_str == enc._pat_str
    assert info["source"]["step"] == (0 if name == "fixture" else 7)  # the step export_hf recorded


def test_import_reads_bfloat16_and_sharded_weights(cases, tmp_path):
    """A hub-style folder: bf16 weights in two shards with an index; widened to float32 exactly."""
    import ml_dtypes
    from safetensors.numpy import load_file, save_file

    folder = cases["fixture"][3]
    copy = tmp_path / "hf"
    shutil.copytree(folder, copy)
    weights = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(copy / "model.safetensors").items()}
    (copy / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, copy / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    assert import_hf.main([str(copy), "--out", str(tmp_path / "imp")]) == 0
    _, params, _ = load_jaxrl_import(tmp_path / "imp")
    got = hf.to_hf_state(hf.nanochat_state(params))
    assert sorted(got) == names and all(np.array_equal(got[k], weights[k].astype(np.float32)) for k in names)


def test_import_unties_a_tied_head(cases, tmp_path):
    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "hf"
    shutil.copytree(cases["fixture"][3], copy)
    weights = load_file(copy / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    assert import_hf.main([str(copy), "--out", str(tmp_path / "imp")]) == 0
    _, params, info = load_jaxrl_import(tmp_path / "imp")
    state = hf.nanochat_state(params)
    assert np.array_equal(state["lm_head.weight"], weights["model.embed_tokens.weight"])
    assert any("tie_word_embeddings" in note for note in info["notes"])


def test_nanochat_checkpoint_survives_hf_and_back(cases, tmp_path):
    """nanochat .pt -> transformers folder -> jaxrl import -> nanochat .pt: the same tensors and dtypes."""
    config, params, _, folder = cases["fixture"]
    assert import_hf.main([str(folder), "--out", str(tmp_path / "imp")]) == 0
    config2, params2, _ = load_jaxrl_import(tmp_path / "imp")
    written = export_params(config2, params2, tmp_path / "pt", step=0)
    original = torch.load(GEN / "chatsft_checkpoints" / "d4" / "model_000000.pt", weights_only=True)
    back = torch.load(written, weights_only=True)
    assert list(back) == list(original)
    for key, t in original.items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key


def test_export_stores_strided_arrays_in_their_logical_order(tmp_path):
    """Params that are transposed or Fortran-ordered views must land in the file as their values."""
    from safetensors.numpy import load_file

    config, params, info = read_nanochat(GEN)
    state = hf.nanochat_state(params)
    strided = {k: np.asfortranarray(v) if i % 2 else v.T.copy().T for i, (k, v) in enumerate(state.items())}
    assert not any(v.flags.c_contiguous for v in strided.values() if v.ndim == 2)
    export_hf.export_hf(config, hf.params_from_nanochat(strided), info["tokenizer_dir"], tmp_path / "hf")
    stored = load_file(tmp_path / "hf" / "model.safetensors")
    expected = hf.to_hf_state(state)
    assert sorted(stored) == sorted(expected) and all(np.array_equal(stored[k], expected[k]) for k in expected)


@pytest.mark.parametrize("generation", ["gen-2026-01", "gen-2026-07"])
def test_later_generations_are_refused(generation, tmp_path):
    with pytest.raises(CheckpointError) as err:
        export_hf.main([str(FIXTURES / generation), "--out", str(tmp_path / "hf")])
    features = {
        "gen-2026-01": "value embeddings (value_embeds.*, attn.ve_gate); no per-layer resid_lambdas / x0_lambdas; "
                       "no sliding-window attention (window_pattern 'SSSL')",
        "gen-2026-07": "value embeddings (value_embeds.*, attn.ve_gate); no per-layer resid_lambdas / x0_lambdas; "
                       "no sliding-window attention (window_pattern 'SSSL'); no smear (smear_gate, smear_lambda); "
                       "no backout (backout_lambda); no rotary base 100000 (transformers' NanoChat is used with "
                       "10000); no q/k scale 1.2",
    }[generation]
    assert str(err.value) == (
        f"{FIXTURES / generation} is a nanochat {generation} model; transformers' NanoChatForCausalLM (model_type "
        f"'nanochat', checked with transformers 5.25.0) implements gen-2025-10's architecture and has no {features}. "
        f"A folder it loads would compute a different model, so nothing was written; export this model to nanochat "
        f"instead (python -m convert.export_nanochat)")
    assert os.listdir(tmp_path) == []


def test_failed_export_leaves_nothing(tmp_path):
    other = save_jaxrl_import(tmp_path / "imp", RANDOM_CONFIG.replace(vocab_size=300),
                              hf.params_from_nanochat(random_state(RANDOM_CONFIG.replace(vocab_size=300), 1)),
                              {"generation": "gen-2025-10"}, tokenizer_dir=FIXTURES / "tokenizer")
    with pytest.raises(CheckpointError, match="has vocab size 2048 but the model has vocab_size 300"):
        export_hf.main([str(other), "--out", str(tmp_path / "hf")])
    assert sorted(os.listdir(tmp_path)) == ["imp"]


@pytest.mark.parametrize("field,value", [("hidden_act", "gelu"), ("final_logit_softcapping", 30.0),
                                         ("rope_parameters", {"rope_type": "default", "rope_theta": 500000.0}),
                                         ("intermediate_size", 1024), ("model_type", "llama")])
def test_import_refuses_what_nanochat_cannot_compute(cases, tmp_path, field, value):
    folder = cases["fixture"][3]
    cfg = json.loads((folder / "config.json").read_text())
    cfg[field] = value
    copy = tmp_path / "hf"
    copy.mkdir()
    for p in folder.iterdir():
        (copy / p.name).symlink_to(p)
    (copy / "config.json").unlink()
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=field.split("_")[0]):
        import_hf.main([str(copy), "--out", str(tmp_path / "imp")])
    assert not (tmp_path / "imp").exists()


def test_tokenizer_json_is_rebuilt_from_ranks_alone():
    """build_tokenizer_json needs nothing but the Encoding: same ids for a fresh sample of text."""
    tok = Tokenizer.from_directory(FIXTURES / "tokenizer")
    fast = build_tokenizer_json(tok.enc)
    rng = np.random.default_rng(1018)
    words = ["calc", " 48/2", "\n\n", "  ", "#### 72", "don't", "1,080", "−3", "ÿé", "日本"]
    for _ in range(30):
        text = "".join(rng.choice(words, size=8))
        assert fast.encode(text, add_special_tokens=False).ids == tok.encode(text), text


@pytest.mark.cli
def test_jaxrl_never_imports_transformers():
    """Only convert/ may use transformers, and only when a conversion runs (its CLIs' --help need none)."""
    code = ("import importlib, pkgutil, sys, jaxrl\n"
            "for m in pkgutil.walk_packages(jaxrl.__path__, 'jaxrl.'): importlib.import_module(m.name)\n"
            "import convert.export_hf, convert.import_hf\n"
            "sys.exit(sorted({'transformers', 'safetensors', 'tokenizers'} & set(sys.modules)) != [])")
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env).returncode == 0
