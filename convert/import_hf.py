"""Import a Hugging Face transformers NanoChat folder as a jaxrl import directory.

Run: `python -m convert.import_hf hf/d20-rl --out runs/d20-from-hf` (needs `pip install -e ".[hf]"`)
The result is what `python -m convert.import_nanochat` writes, so training, eval and
`python -m convert.export_nanochat` work on it as on any import. See `--help`.
Test: `pytest tests/test_hf.py -k import`.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from convert import hf
from convert.hf_tokenizer import encoding_from_hf, write_tokenizer_pkl
from jaxrl.run_state import CheckpointError, save_jaxrl_import
from jaxrl.model import GPTConfig

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # widened to float32 exactly
DESCRIPTION = f"""\
Convert a folder holding a transformers NanoChatForCausalLM (config.json with model_type
"nanochat", model.safetensors or sharded model-*.safetensors with {INDEX}, and nanochat's
tokenizer as tokenizer.json) into a jaxrl import directory: params/ (float32), model.json
(generation gen-2025-10, the architecture transformers' NanoChat implements) and
tokenizer/tokenizer.pkl rebuilt from tokenizer.json. Config values nanochat's GPT cannot compute
(another activation, softcap or rope theta, biases, an MLP width other than 4 x n_embd) are
refused. Weights in bfloat16 or float16 are widened to float32 exactly. Written to a temporary
sibling and renamed, so DST is never half-written. Tested with transformers {hf.TRANSFORMERS_TESTED}."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.import_hf", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="DIR", help="a transformers NanoChat folder (e.g. from `python -m convert.export_hf` "
                   "or downloaded from the hub)")
    p.add_argument("--out", required=True, metavar="DST", help="jaxrl import directory to create; must not exist "
                   "unless --force")
    p.add_argument("--step", type=int, default=None, help="step to record for later exports (default: the step "
                   "export_hf stored in the weights' metadata, if any)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists (after a successful conversion)")
    return p


def weight_files(src: Path) -> list[Path]:
    """model.safetensors, or the shards listed in model.safetensors.index.json."""
    if (src / "model.safetensors").is_file():
        return [src / "model.safetensors"]
    if (src / INDEX).is_file():
        weight_map = json.loads((src / INDEX).read_text(encoding="utf-8")).get("weight_map", {})
        return [src / name for name in sorted(set(weight_map.values()))]
    found = sorted(p.name for p in src.iterdir()) if src.is_dir() else []
    raise CheckpointError(f"{src}: no model.safetensors or {INDEX} (found {found}); transformers weights in "
                          f"pickle files (pytorch_model.bin) are not read, convert them to safetensors first")


def read_weights(src: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """({transformers key: float32 array}, the first file's metadata)."""
    from safetensors import safe_open

    state, metadata = {}, None
    for path in weight_files(src):
        with safe_open(path, framework="np") as f:
            if metadata is None:
                metadata = f.metadata() or {}
            for key in f.keys():
                arr = f.get_tensor(key)
                if arr.dtype.name not in FLOAT_DTYPES:
                    raise CheckpointError(f"{path}: tensor {key!r} has dtype {arr.dtype}; expected one of "
                                          f"{', '.join(FLOAT_DTYPES)}")
                state[key] = np.asarray(arr, np.float32)
    return state, metadata


def read_hf_folder(src: Path) -> tuple[GPTConfig, dict[str, np.ndarray], dict]:
    """(config, nanochat-named float32 state, info for model.json) of a transformers NanoChat folder."""
    cfg_file = src / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{src}: no config.json; expected a transformers model folder")
    hf_cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    config, notes = hf.config_from_hf(hf_cfg, str(cfg_file))
    hf_state, metadata = read_weights(src)
    state, tie_notes = hf.from_hf_state(hf_state, bool(hf_cfg.get("tie_word_embeddings", False)), str(src))
    step = metadata.get("nanochat_step")
    info = {"generation": config.generation,
            "generation_reason": f"transformers NanoChat folder (model_type 'nanochat'): gen-2025-10's architecture, "
                                 f"the only one transformers' NanoChat computes",
            "notes": notes + tie_notes,
            "source": {"path": str(src.resolve()), "format": "transformers", "step": int(step) if step else None,
                       "model_tag": None, "meta": None,
                       "transformers_version": hf_cfg.get("transformers_version")}}
    return config, state, info


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; errors propagate as CheckpointError/ValueError (the __main__ guard prints them)."""
    args = build_parser().parse_args(argv)
    src, dst = Path(args.src), Path(args.out)
    if dst.exists() and not args.force:
        raise CheckpointError(f"output {dst} already exists; choose another --out or pass --force to replace it")
    config, state, info = read_hf_folder(src)
    if args.step is not None:
        info["source"]["step"] = args.step
    enc = encoding_from_hf(src)
    if enc.n_vocab != config.vocab_size:
        raise CheckpointError(f"{src / 'tokenizer.json'} has {enc.n_vocab} tokens but config.json says vocab_size "
                              f"{config.vocab_size}; they must be equal")
    with tempfile.TemporaryDirectory() as tok_dir:
        write_tokenizer_pkl(enc, Path(tok_dir))
        info["tokenizer_source"] = str((src / "tokenizer.json").resolve())
        out = save_jaxrl_import(dst, config, hf.params_from_nanochat(state), info, tokenizer_dir=tok_dir,
                                overwrite=args.force)
    for note in info["notes"]:
        print(f"import_hf: note: {note}")
    print(f"import_hf: {src} -> {out} ({config.generation} {config.model_config()})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CheckpointError, ValueError, OSError) as e:
        print(f"import_hf: error: {e}", file=sys.stderr)
        sys.exit(1)
