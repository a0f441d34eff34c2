"""Convert a nanochat checkpoint into a jaxrl import directory (orbax params + model.json + tokenizer).

Run: `python -m convert.import_nanochat ~/.cache/nanochat --out runs/d20-import`
     `python -m convert.import_nanochat path/to/chatsft_checkpoints/d20/model_000650.pt --out DST`
See `--help` and docs/checkpoints.md. Test: `pytest tests/test_convert.py -k import`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from convert.layout import SOURCE_DIRS
from convert.load import read_nanochat
from jaxrl.config import GENERATIONS, check_writable_dir
from jaxrl.model import flatten_params
from jaxrl.run_state import CheckpointError, save_jaxrl_import

DESCRIPTION = """\
Convert a nanochat checkpoint into a jaxrl import directory, loading it the way nanochat's
checkpoint_manager does: model tag = the subdirectory whose name starts with d<N> with the
largest N (else the most recently modified one), step = the largest N of model_<N>.pt,
`_orig_mod.` prefixes stripped, a missing window_pattern read as "L" and missing resid/x0
lambdas filled with ones/zeros, every key and shape checked strictly, and the tokenizer's vocab
size checked against model_config.vocab_size. The generation is detected from the key names and
shapes; the reason is printed and stored in model.json.

Output (written to a temporary sibling and renamed, so DST is never half-written):
  DST/params/               orbax checkpoint of the float32 params (torch (out, in) layout)
  DST/model.json            model_config, generation, generation_reason, source {path, step,
                            model_tag, meta, dtypes}, notes
  DST/tokenizer/            tokenizer.pkl (+ token_bytes.pt) copied from the source"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.import_nanochat", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="a nanochat base dir (NANOCHAT_BASE_DIR, holding chatsft_checkpoints/ "
                   "etc.), a <base>/chatsft_checkpoints dir, a checkpoint dir (<base>/chatsft_checkpoints/d20/ holding "
                   "model_*.pt), a model_<step>.pt "
                   "file, or an existing jaxrl import dir")
    p.add_argument("--out", required=True, metavar="DST", help="directory to create; must not exist unless --force")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to load (default: the largest model_<N>.pt)")
    p.add_argument("--model-tag", default=None, metavar="TAG", help="model tag subdirectory when SRC is a base dir "
                   "or a <source>_checkpoints dir "
                   "(default: nanochat's choice, the largest d<N>)")
    p.add_argument("--generation", choices=GENERATIONS, default=None, help="the nanochat generation that wrote the "
                   "checkpoint (default: detected from its keys); an explicit value that contradicts the keys "
                   "is an error")
    p.add_argument("--source", choices=tuple(SOURCE_DIRS), default="sft", help="which <source>_checkpoints/ of a base "
                   "dir to read: sft=chatsft (default, what chat_rl starts from), rl=chatrl, base=base, mid=mid")
    p.add_argument("--tokenizer-dir", default=None, metavar="DIR", help="directory holding tokenizer.pkl (default: "
                   "<base>/tokenizer, i.e. ../../tokenizer of the checkpoint dir); its vocab size must equal "
                   "the model's")
    p.add_argument("--force", action="store_true", help="replace DST if it exists (atomically, after a "
                   "successful conversion)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the conversion; errors propagate as CheckpointError/ValueError (the __main__ guard prints them)."""
    args = build_parser().parse_args(argv)
    dst = Path(args.out)
    if dst.exists() and not args.force:
        raise CheckpointError(f"output {dst} already exists; choose another --out or pass --force to replace it")
    check_writable_dir(dst, "--out")  # before a conversion that may take minutes
    t0 = time.perf_counter()
    config, params, info = read_nanochat(args.src, step=args.step, generation=args.generation, source=args.source,
                                         model_tag=args.model_tag, tokenizer_dir=args.tokenizer_dir)
    print(f"import_nanochat: {info['generation_reason']}")
    for note in info["notes"]:
        print(f"import_nanochat: note: {note}")
    tokenizer_dir = info.pop("tokenizer_dir")
    info["tokenizer_source"] = tokenizer_dir
    out = save_jaxrl_import(dst, config, params, info, tokenizer_dir=tokenizer_dir, overwrite=args.force)
    n = sum(v.size for v in flatten_params(params).values())
    src = info["source"]
    print(f"import_nanochat: {src['path']} (tag {src['model_tag']}, step {src['step']}, {n:,} params) -> {out} "
          f"in {time.perf_counter() - t0:.1f}s; tokenizer {'copied' if tokenizer_dir else 'NOT found, not copied'}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CheckpointError, ValueError) as e:
        print(f"import_nanochat: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # read-only filesystem, disk full, permissions: the path and the OS's reason
        print(f"import_nanochat: error: cannot write {e.filename or 'the output'}: {e.strerror or e}; free space or choose "
              "a writable --out", file=sys.stderr)
        sys.exit(1)
