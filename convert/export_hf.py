"""Export a gen-2025-10 model as a Hugging Face transformers folder (NanoChatForCausalLM).

Run: `python -m convert.export_hf runs/d20-rl --out hf/d20-rl` (needs `pip install -e ".[hf]"`)
The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`.
See `--help`, README "Share on the Hugging Face hub" and docs/checkpoints.md.
Test: `pytest tests/test_hf.py`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from convert import hf
from convert.hf_tokenizer import save_hf_tokenizer
from convert.load import read_nanochat
from jaxrl.run_state import CheckpointError, is_run_dir, load_run_dir, replace_dir
from jaxrl.model import GPTConfig, Params
from jaxrl.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
DESCRIPTION = f"""\
Write a nanochat gen-2025-10 model as a folder that transformers loads with its own NanoChat
model (tested with transformers {hf.TRANSFORMERS_TESTED}):

  DIR/config.json             model_type "nanochat": sizes, relu2, softcap 15, rope theta 10000,
                              rms_norm_eps = float32 epsilon (nanochat's), untied head
  DIR/generation_config.json  bos <|bos|>, eos <|assistant_end|> and <|bos|> (where nanochat's
                              Engine stops), pad <|assistant_end|>
  DIR/model.safetensors       the float32 weights under transformers' names (no pickle)
  DIR/tokenizer.json, tokenizer_config.json
                              nanochat's BPE and specials; the chat template (in
                              tokenizer_config.json) renders conversations to the ids of
                              nanochat's render_for_completion
  DIR/README.md               a short model card

SRC is what `python -m convert.export_nanochat` reads (a jaxrl import or trainer checkpoint dir,
a train_rl run dir: its latest checkpoint) or a nanochat checkpoint (base dir, checkpoint dir,
model_<step>.pt). Later generations are refused: transformers' NanoChat has no value embeddings,
lambdas, windows or smear. One difference remains for gen-2025-10: nanochat rounds the rotary
cos/sin tables to bfloat16, transformers keeps them in the model's dtype, so loaded in float32
the logits differ by about 1e-2 (in bfloat16 the tables agree).
The folder is written under a temporary name and renamed; on any error nothing is left."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.export_hf", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="jaxrl import/trainer checkpoint dir, train_rl run dir, or nanochat "
                   "checkpoint (base dir, checkpoint dir, model_<step>.pt)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create; must not exist unless --force")
    p.add_argument("--step", type=int, default=None, help="for a run dir or nanochat checkpoint: the step to "
                   "export (default: the latest)")
    p.add_argument("--tokenizer-dir", default=None, metavar="DIR", help="folder holding nanochat's tokenizer.pkl "
                   "(default: SRC's tokenizer/)")
    p.add_argument("--force", action="store_true", help="replace DIR if it exists (after a successful export)")
    return p


def load_source(src: str, step: int | None, tokenizer_dir: str | None) -> tuple[GPTConfig, Params, dict]:
    """(config, params, info) of anything export_nanochat or import_nanochat reads."""
    if is_run_dir(src):
        config, params, info = load_run_dir(src, step)
        if tokenizer_dir is not None:
            info["tokenizer_dir"] = tokenizer_dir
        return config, params, info
    return read_nanochat(src, step=step, tokenizer_dir=tokenizer_dir)


def export_hf(config: GPTConfig, params: Params, tokenizer_dir: str | os.PathLike | None, out: str | os.PathLike,
              *, step: int | None = None, force: bool = False) -> Path:
    """Write the transformers folder `out` atomically; return its absolute path."""
    hf.check_exportable(config, f"the model to export ({config.generation})")
    dst = Path(out).resolve()
    if dst.exists() and not force:
        raise CheckpointError(f"output {dst} already exists; choose another --out or pass --force to replace it")
    if tokenizer_dir is None:
        raise CheckpointError("no tokenizer to export: the source has no tokenizer/tokenizer.pkl; pass "
                              "--tokenizer-dir DIR (the folder holding nanochat's tokenizer.pkl)")
    tok = Tokenizer.from_directory(tokenizer_dir)
    if tok.get_vocab_size() != config.vocab_size:
        raise CheckpointError(f"tokenizer {tokenizer_dir} has vocab size {tok.get_vocab_size()} but the model has "
                              f"vocab_size {config.vocab_size}; pass the model's own tokenizer")
    state = hf.to_hf_state(hf.nanochat_state(params))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        _write_folder(tmp, config, state, tok, step)
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write_folder(tmp: Path, config: GPTConfig, state: dict, tok: Tokenizer, step: int | None) -> None:
    from safetensors.numpy import save_file
    from transformers import GenerationConfig, NanoChatConfig

    s = tok.specials
    fields = hf.hf_config(config, s.bos, [s.assistant_end, s.bos], s.assistant_end)
    NanoChatConfig(**{k: v for k, v in fields.items() if k != "model_type"}).save_pretrained(tmp)
    GenerationConfig(bos_token_id=s.bos, eos_token_id=[s.assistant_end, s.bos],
                     pad_token_id=s.assistant_end).save_pretrained(tmp)
    metadata = {"format": "pt", "nanochat_generation": config.generation,
                "nanochat_model_config": json.dumps(config.model_config())}
    if step is not None:
        metadata["nanochat_step"] = str(step)
    # safetensors writes an array's raw buffer whatever its strides, so a transposed or sliced view
    # would be stored scrambled: hand it C-contiguous copies only
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp / WEIGHTS, metadata=metadata)
    save_hf_tokenizer(tok.enc, tmp)
    (tmp / "README.md").write_text(model_card(config, step), encoding="utf-8")


def model_card(config: GPTConfig, step: int | None) -> str:
    mc = config.model_config()
    return (f"---\nlibrary_name: transformers\ntags:\n- nanochat\n---\n\n# nanochat {config.generation} model\n\n"
            f"A nanochat GPT ({mc['n_layer']} layers, n_embd {mc['n_embd']}, {mc['n_head']} heads, "
            f"{mc['n_kv_head']} kv heads, vocab {mc['vocab_size']}, sequence length {mc['sequence_len']})"
            f"{'' if step is None else f' at step {step}'}, exported by jaxrl for transformers' "
            f"`NanoChatForCausalLM`.\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"tok = AutoTokenizer.from_pretrained(PATH)\nmodel = AutoModelForCausalLM.from_pretrained(PATH)\n"
            f"ids = tok.apply_chat_template([{{\"role\": \"user\", \"content\": \"What is 2+2?\"}}], "
            f"add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)\n"
            f"out = model.generate(**ids, max_new_tokens=64, do_sample=False)\n```\n\n"
            f"Precision: {hf.FP32_ROTARY_NOTE}.\n")


def main(argv: list[str] | None = None) -> int:
    """Run the export; errors propagate as CheckpointError/ValueError (the __main__ guard prints them)."""
    args = build_parser().parse_args(argv)
    if Path(args.out).exists() and not args.force:
        raise CheckpointError(f"output {args.out} already exists; choose another --out or pass --force to replace it")
    config, params, info = load_source(args.src, args.step, args.tokenizer_dir)
    hf.check_exportable(config, args.src)
    step = info.get("step", (info.get("source") or {}).get("step"))
    out = export_hf(config, params, info.get("tokenizer_dir"), args.out, step=step, force=args.force)
    print(f"export_hf: {config.generation} {config.model_config()} -> {out}")
    print(f"export_hf: note: {hf.FP32_ROTARY_NOTE}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CheckpointError, ValueError, OSError) as e:
        print(f"export_hf: error: {e}", file=sys.stderr)
        sys.exit(1)
