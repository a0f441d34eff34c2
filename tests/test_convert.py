"""convert/: nanochat checkpoints of every generation -> jaxrl -> nanochat, against nanochat's own outputs.

Golden checks read ../shared/fixtures/nanochat (the three generations' checkpoints as their
chat_sft writes them, and golden_forward*.npz made by nanochat's forward) and
../shared/fixtures/nanochat-sft-arith (an all-float32 checkpoint with token_bytes.pt).
Bad inputs are in tests/test_convert_errors.py. Skipped without torch.

Run: python -m pytest -q tests/test_convert.py -m "not slow"   (the d20 memory check is `slow`)
"""
import json
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from conftest import ARITH, FIXTURES, GENERATIONS, REPO  # noqa: E402
from convert import CheckpointError, detect_generation, export_params, load_nanochat, read_nanochat  # noqa: E402
from convert import export_nanochat, import_nanochat  # noqa: E402
from convert.export import SFT_META_FIELDS  # noqa: E402
from convert.layout import find_last_step, find_model_tag  # noqa: E402
from jaxrl.run_state import load_jaxrl_import  # noqa: E402
from jaxrl.model import GPTConfig, flatten_params, forward, param_table, token_nll, unflatten_params  # noqa: E402

# case -> (nanochat base dir, model tag, generation)
CASES = {
    "gen-2025-10": (FIXTURES / "gen-2025-10", "d4", "gen-2025-10"),
    "gen-2026-01": (FIXTURES / "gen-2026-01", "d4", "gen-2026-01"),
    "gen-2026-07": (FIXTURES / "gen-2026-07", "d4", "gen-2026-07"),
    "gen-2026-07/padded_vocab": (FIXTURES / "gen-2026-07" / "padded_vocab", "d2", "gen-2026-07"),
}
ROUND_TRIP = {**CASES, "arith": (ARITH, "d4", "gen-2026-07")}
GOLDENS = [(case, name) for case, (base, _, _) in CASES.items()
           for name in ("golden_forward.npz", "golden_forward_long.npz") if (base / name).is_file()]
# fp32 on CPU vs nanochat's fp32 CPU goldens; measured max |Δ| 8.6e-6 (logits), 5.7e-6 (nll).
GOLDEN_ATOL = 1e-4


def ckpt_dir(case, cases=CASES):
    base, tag, _ = cases[case]
    return base / "chatsft_checkpoints" / tag


def assert_same_state_dict(a_path, b_path):
    """Same keys in the same order, same dtypes and shapes, identical bytes."""
    a = torch.load(a_path, map_location="cpu", weights_only=True)
    b = torch.load(b_path, map_location="cpu", weights_only=True)
    assert list(a) == list(b)
    for key in a:
        assert (a[key].dtype, a[key].shape) == (b[key].dtype, b[key].shape), key
        assert torch.equal(a[key].flatten().view(torch.uint8), b[key].flatten().view(torch.uint8)), key


def assert_same_params(p, q):
    fp, fq = flatten_params(p), flatten_params(q)
    assert sorted(fp) == sorted(fq)
    for key in fp:
        assert np.asarray(fp[key]).dtype == np.float32 and np.array_equal(fp[key], fq[key]), key


# ------------------------------------------------------------------------------------------
# Loading: three ways to name a checkpoint, and the goldens


@pytest.mark.parametrize("case", CASES)
def test_base_dir_checkpoints_dir_checkpoint_dir_and_file_load_the_same(case):
    base, tag, generation = CASES[case]
    paths = (base, base / "chatsft_checkpoints", ckpt_dir(case), ckpt_dir(case) / "model_000000.pt")
    loaded = [read_nanochat(p) for p in paths]
    for config, params, info in loaded:
        assert config == loaded[0][0] and config.generation == generation
        assert info["generation_reason"].startswith(f"detected {generation} from keys: ")
        assert (info["source"]["model_tag"], info["source"]["step"]) == (tag, 0)
        assert_same_params(params, loaded[0][1])
    meta = json.loads((ckpt_dir(case) / "meta_000000.json").read_text())
    assert loaded[0][0].model_config() == meta["model_config"]


@pytest.mark.parametrize("case,name", GOLDENS)
def test_forward_matches_nanochat_goldens(case, name):
    base = CASES[case][0]
    config, params = load_nanochat(base)
    golden = np.load(base / name)
    logits = np.asarray(forward(config, params, golden["idx"]))
    np.testing.assert_allclose(logits, golden["logits"], rtol=0, atol=GOLDEN_ATOL)
    nll = np.asarray(token_nll(config, params, golden["idx"], golden["targets"]))
    np.testing.assert_allclose(nll, golden["nll"], rtol=0, atol=GOLDEN_ATOL)


def test_import_dir_loads_like_the_checkpoint(tmp_path):
    base = CASES["gen-2026-01"][0]
    assert import_nanochat.main([str(base), "--out", str(tmp_path / "imp")]) == 0
    config, params, info = load_jaxrl_import(tmp_path / "imp")
    ref_config, ref_params = load_nanochat(base)
    assert config == ref_config and info["generation"] == "gen-2026-01"
    assert_same_params(params, ref_params)
    assert_same_params(load_nanochat(tmp_path / "imp")[1], ref_params)  # convert delegates to run_state
    record = json.loads((tmp_path / "imp" / "model.json").read_text())
    assert record["generation_reason"] == info["generation_reason"] and "softcap" in record["generation_reason"]
    assert record["source"]["dtypes"]["transformer.wte.weight"] == "bfloat16"
    copied = tmp_path / "imp" / "tokenizer" / "tokenizer.pkl"
    assert copied.read_bytes() == (base / "tokenizer" / "tokenizer.pkl").read_bytes()


def test_loader_patches_like_nanochat(tmp_path):
    """`_orig_mod.` stripped, missing window_pattern -> "L", missing lambdas -> ones / zeros."""
    src = ckpt_dir("gen-2026-01")
    state = torch.load(src / "model_000000.pt", weights_only=True)
    state = {"_orig_mod." + k: v for k, v in state.items() if k not in ("resid_lambdas", "x0_lambdas")}
    meta = json.loads((src / "meta_000000.json").read_text())
    del meta["model_config"]["window_pattern"]
    d = tmp_path / "chatsft_checkpoints" / "d4"
    d.mkdir(parents=True)
    torch.save(state, d / "model_000000.pt")
    (d / "meta_000000.json").write_text(json.dumps(meta))
    config, params, info = read_nanochat(tmp_path)
    assert config.window_pattern == "L" and info["source"]["stripped_orig_mod"]
    assert np.array_equal(params["resid_lambdas"], np.ones(4)) and np.array_equal(params["x0_lambdas"], np.zeros(4))
    notes = " ".join(info["notes"])
    assert "window_pattern" in notes and "resid_lambdas" in notes and "x0_lambdas" in notes
    ref = flatten_params(load_nanochat(src)[1])
    for key, value in flatten_params(params).items():
        if "lambdas" not in key:
            assert np.array_equal(value, ref[key]), key


# ------------------------------------------------------------------------------------------
# Round trip: import then export gives back the original tensors, keys, order and dtypes


@pytest.mark.parametrize("case", ROUND_TRIP)
def test_import_export_round_trip_is_bit_exact(case, tmp_path):
    base, tag, _ = ROUND_TRIP[case]
    src = ckpt_dir(case, ROUND_TRIP)
    step = find_last_step(src)
    model, meta = f"model_{step:06d}.pt", f"meta_{step:06d}.json"
    imp = tmp_path / "imp"
    assert import_nanochat.main([str(base), "--out", str(imp)]) == 0
    # --phase sft at the source step: chat_sft's files again, meta byte for byte
    assert export_nanochat.main([str(imp), "--out", str(tmp_path / "sft"), "--phase", "sft"]) == 0
    assert_same_state_dict(src / model, tmp_path / "sft" / model)
    assert (tmp_path / "sft" / meta).read_bytes() == (src / meta).read_bytes()
    # --phase rl into a base dir: chatrl_checkpoints/d<n_layer>/ with chat_rl's meta, plus the tokenizer
    out = tmp_path / "base"
    args = [str(imp), "--out", str(out), "--base-dir", "--step", "7"]
    if not (base / "tokenizer").is_dir():
        with pytest.raises(CheckpointError, match="has no tokenizer/tokenizer.pkl"):
            export_nanochat.main(args)
        return
    assert export_nanochat.main(args) == 0
    rl = out / "chatrl_checkpoints" / tag
    assert_same_state_dict(src / model, rl / "model_000007.pt")
    src_meta = json.loads((src / meta).read_text())
    assert json.loads((rl / "meta_000007.json").read_text()) == {"model_config": src_meta["model_config"]}
    for f in os.listdir(base / "tokenizer"):
        assert (out / "tokenizer" / f).read_bytes() == (base / "tokenizer" / f).read_bytes()
    config, params = load_nanochat(out, source="rl")  # nanochat's tag/step search finds it
    assert_same_params(params, load_nanochat(base)[1])


@pytest.mark.parametrize("generation", GENERATIONS)
def test_export_params_without_source_uses_nanochat_defaults(generation, tmp_path):
    """Trainer-style call with jax arrays and no source record: GPU dtypes, nanochat order, rl/sft meta."""
    base = CASES[generation][0]
    config, params = load_nanochat(base)
    jax_params = unflatten_params({k: jnp.asarray(v) for k, v in flatten_params(params).items()})
    path = export_params(config, jax_params, tmp_path, 12)
    state = torch.load(path, weights_only=True)
    table = param_table(config)
    assert [(k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()] == table
    meta = json.loads((tmp_path / "meta_000012.json").read_text())
    assert meta == {"model_config": config.model_config()}
    assert len(meta["model_config"]) == (6 if generation == "gen-2025-10" else 7)
    export_params(config, jax_params, tmp_path, 13, phase="sft")
    sft = json.loads((tmp_path / "meta_000013.json").read_text())
    assert tuple(sft) == SFT_META_FIELDS[generation] and sft["step"] == 13
    assert_same_state_dict(path, ckpt_dir(generation) / "model_000000.pt")  # fixtures use the GPU dtypes


# ------------------------------------------------------------------------------------------
# Generation detection


@pytest.mark.parametrize("generation", GENERATIONS)
def test_detect_generation_from_keys_and_shapes(generation):
    config = GPTConfig(n_layer=3, n_embd=64, n_head=2, n_kv_head=1, vocab_size=100, generation=generation)
    found, reason = detect_generation({k: s for k, s, _ in param_table(config)}, "x.pt")
    assert found == generation and reason.startswith(f"detected {generation} from keys: ")
    assert "softcap" in reason or generation == "gen-2025-10"


def test_detection_reasons_name_evidence_and_limits():
    shapes = lambda gen: {k: s for k, s, _ in param_table(GPTConfig(n_layer=2, generation=gen))}  # noqa: E731
    _, r07 = detect_generation(shapes("gen-2026-07"), "x.pt")
    assert "smear_lambda present, ve_gate width 12" in r07 and "rope base" in r07
    _, r01 = detect_generation(shapes("gen-2026-01"), "x.pt")
    assert "ve_gate width 32" in r01 and "aba30cb..1076f97" in r01
    no_smear = {k: s for k, s in shapes("gen-2026-07").items() if "smear" not in k and k != "backout_lambda"}
    with pytest.raises(CheckpointError, match=r"x\.pt: ve_gate width 12 without smear_lambda is .*'gen-2026-03'"):
        detect_generation(no_smear, "x.pt")
    with pytest.raises(CheckpointError, match="engram"):
        detect_generation({**shapes("gen-2026-01"), "bigram_embed.weight": (8, 8)}, "x.pt")
    with pytest.raises(CheckpointError, match="lambdas but no value embeddings"):
        detect_generation({**shapes("gen-2025-10"), "resid_lambdas": (2,)}, "x.pt")
    odd = {k: ((1, 16) if k.endswith("ve_gate.weight") else s) for k, s in shapes("gen-2026-01").items()}
    with pytest.raises(CheckpointError, match="ve_gate width 16 without smear_lambda matches no nanochat generation"):
        detect_generation(odd, "x.pt")


def test_explicit_generation_is_checked_against_the_keys(tmp_path):
    base = CASES["gen-2026-07"][0]
    *_, info = read_nanochat(base, generation="gen-2026-07")
    assert "matches the requested generation gen-2026-07" in info["generation_reason"]
    pattern = (r"model_000000\.pt: generation 'gen-2026-01' was requested but the checkpoint's keys say "
               r"gen-2026-07 \(smear_lambda present, ve_gate width 12\)")
    with pytest.raises(CheckpointError, match=pattern):
        load_nanochat(base, generation="gen-2026-01")
    with pytest.raises(ValueError, match="unknown generation 'gen-2026-03'; expected one of gen-2025-10, "):
        load_nanochat(base, generation="gen-2026-03")
    import_nanochat.main([str(base), "--out", str(tmp_path / "imp")])
    with pytest.raises(CheckpointError, match="'gen-2025-10' was requested but this import is gen-2026-07"):
        load_nanochat(tmp_path / "imp", generation="gen-2025-10")
    *_, info = read_nanochat(tmp_path / "imp", tokenizer_dir=FIXTURES / "tokenizer")  # vocab 2048 = the model's
    assert info["tokenizer_dir"] == str((FIXTURES / "tokenizer").resolve())


# ------------------------------------------------------------------------------------------
# nanochat's model_tag and step choice (docs/nanochat.md#model-tag-and-step)


def test_model_tag_is_the_largest_d_number(tmp_path):
    for name in ("d4", "d12", "d12_x", "d9", "x20", "md50"):
        (tmp_path / name).mkdir()
    (tmp_path / "d99.txt").write_text("not a directory")
    tied = [n for n in os.listdir(tmp_path) if n in ("d12", "d12_x")]
    assert find_model_tag(tmp_path) == tied[0]  # 12 > 9 > 4 as integers; ties keep listing order


def test_model_tag_without_d_dirs_is_the_newest(tmp_path):
    for age, name in enumerate(("new", "old", "older")):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1e9 - age * 1000, 1e9 - age * 1000))
    assert find_model_tag(tmp_path) == "new"
    with pytest.raises(CheckpointError, match="no model directories"):
        find_model_tag(tmp_path / "new")


def test_last_step_is_the_largest_integer(tmp_path):
    for name in ("model_000099.pt", "model_000100.pt", "model_000050.pt.bak", "optim_000300_rank0.pt",
                 "meta_000200.json", "model_99.pt"):
        (tmp_path / name).write_bytes(b"")
    assert find_last_step(tmp_path) == 100


def test_tag_and_step_selection_end_to_end(tmp_path):
    """d12 (a gen-2025-10 checkpoint) beats d4; within d4, step 100 beats 99; flags override both."""
    d4, d12 = tmp_path / "chatsft_checkpoints" / "d4", tmp_path / "chatsft_checkpoints" / "d12"
    for dst, case, step in ((d4, "gen-2026-07", 99), (d4, "gen-2026-07", 100), (d12, "gen-2025-10", 3)):
        dst.mkdir(parents=True, exist_ok=True)
        for kind, ext in (("model", "pt"), ("meta", "json")):
            (dst / f"{kind}_{step:06d}.{ext}").write_bytes((ckpt_dir(case) / f"{kind}_000000.{ext}").read_bytes())
    pick = lambda **kw: (lambda i: (i["source"]["model_tag"], i["source"]["step"], i["generation"]))(  # noqa: E731
        read_nanochat(tmp_path, **kw)[2])
    assert pick() == ("d12", 3, "gen-2025-10")
    assert pick(model_tag="d4") == ("d4", 100, "gen-2026-07")
    assert pick(model_tag="d4", step=99) == ("d4", 99, "gen-2026-07")


# ------------------------------------------------------------------------------------------
# Memory: a d20-shaped checkpoint converts with peak RSS < 2.5x its file size


@pytest.mark.cli
@pytest.mark.slow
def test_d20_conversion_peak_memory(tmp_path):
    config = GPTConfig(sequence_len=2048, vocab_size=65536, n_layer=20, n_head=10, n_kv_head=10, n_embd=1280,
                       generation="gen-2025-10")  # nanochat's gen-2025-10 speedrun model, 561M params
    d = tmp_path / "base" / "chatsft_checkpoints" / "d20"
    d.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s, dtype=getattr(torch, dt)).uniform_(-0.05, 0.05, generator=gen)
             for k, s, dt in param_table(config)}
    torch.save(state, d / "model_000650.pt")
    del state
    (d / "meta_000650.json").write_text(json.dumps({"step": 650, "model_config": config.model_config()}))
    size = (d / "model_000650.pt").stat().st_size
    # A wrapper process whose only child is the converter, so RUSAGE_CHILDREN is the converter's peak.
    wrapper = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    cmd = [sys.executable, "-c", wrapper, sys.executable, "-m", "convert.import_nanochat", str(tmp_path / "base"),
           "--out", str(tmp_path / "imp")]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    assert run.returncode == 0, run.stderr[-3000:]
    peak = int(run.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    print(f"\nd20 import: file {size / 1e9:.2f} GB, peak RSS {peak / 1e9:.2f} GB = {peak / size:.2f}x, {seconds:.1f} s")
    assert peak < 2.5 * size, f"peak RSS {peak / 1e9:.2f} GB is {peak / size:.2f}x the {size / 1e9:.2f} GB file"
    record = json.loads((tmp_path / "imp" / "model.json").read_text())
    assert record["generation"] == "gen-2025-10" and record["source"]["step"] == 650
    assert record["model_config"]["n_layer"] == 20
