"""Export a jaxrl import, trainer checkpoint or train_rl run directory as a nanochat checkpoint.

Run: `python -m convert.export_nanochat runs/d20-rl --out ~/.cache/nanochat --base-dir`
     `python -m convert.export_nanochat runs/d20-import --out out/d20 --phase sft --step 650`
See `--help` and docs/checkpoints.md. Test: `pytest tests/test_convert.py -k round_trip`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from convert.export import PHASES, export_params, export_tokenizer
from convert.layout import SOURCE_DIRS
from jaxrl.run_state import CheckpointError, RunPaths, is_run_dir, load_jaxrl_import, load_run_dir
from jaxrl.config import check_writable_dir

DESCRIPTION = """\
Write the params of a jaxrl import directory (or of a trainer checkpoint directory holding the
same model.json + params/, or of a train_rl run directory: its latest checkpoint) as nanochat's model_<step:06d>.pt + meta_<step:06d>.json: the source
generation's key names and order, each tensor in the dtype it had in the imported checkpoint
(default: what nanochat saves on GPU: bf16 embeddings, fp32 otherwise), and the meta fields that
generation's chat_rl (--phase rl: only model_config) or chat_sft (--phase sft) writes.

Layout conventions:
  default      --out DIR is the checkpoint directory itself: DIR/model_<step>.pt, DIR/meta_<step>.json
               (point nanochat at it by placing DIR at <base>/chatrl_checkpoints/<tag>/).
  --base-dir   --out DIR is a nanochat base dir (NANOCHAT_BASE_DIR): files go to
               DIR/chatrl_checkpoints/<tag>/ (--phase rl) or DIR/chatsft_checkpoints/<tag>/ (--phase sft),
               and the tokenizer is copied to DIR/tokenizer/, so nanochat's load_model finds everything.
Files are written to temporary names and renamed; an existing model_<step>.pt is kept unless --force."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert.export_nanochat", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="a jaxrl import dir or trainer checkpoint dir (holding model.json "
                   "and params/), or a train_rl run dir (model.json and checkpoints/)")
    p.add_argument("--out", required=True, metavar="DIR", help="the checkpoint directory to write into, or with "
                   "--base-dir the nanochat base dir (created if missing)")
    p.add_argument("--step", type=int, default=None, help="step number in the file names and meta (default: the "
                   "'step' recorded in SRC/model.json by the trainer, else the imported checkpoint's step); for a "
                   "run dir, the checkpoint to export (default: its latest)")
    p.add_argument("--phase", choices=PHASES, default="rl", help="rl (default): meta is {'model_config': ...} as "
                   "chat_rl writes; sft: chat_sft's meta fields, keeping the imported meta's values")
    p.add_argument("--model-tag", default=None, metavar="TAG", help="with --base-dir: the model tag subdirectory "
                   "(default: d<n_layer>, as chat_rl names its output)")
    p.add_argument("--base-dir", action="store_true", help="treat --out as a nanochat base dir (see above)")
    p.add_argument("--force", action="store_true", help="replace an existing model/meta of the same step and a "
                   "differing tokenizer in the base dir")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the export; errors propagate as CheckpointError/ValueError (the __main__ guard prints them)."""
    args = build_parser().parse_args(argv)
    if is_run_dir(args.src):  # a train_rl run: its latest checkpoint, or checkpoint --step
        config, params, info = load_run_dir(args.src, args.step)
    else:
        config, params, info = load_jaxrl_import(args.src)
    source = info.get("source") or {}
    step = args.step if args.step is not None else info.get("step", source.get("step"))
    if step is None:
        raise CheckpointError(f"{RunPaths(args.src).model_json} records no step; pass --step")
    out = Path(args.out)
    if args.base_dir:
        tag = args.model_tag or f"d{config.n_layer}"
        ckpt_dir = out / SOURCE_DIRS[args.phase] / tag
    elif args.model_tag is not None:
        raise CheckpointError("--model-tag only applies with --base-dir (otherwise --out is the tag's directory)")
    else:
        ckpt_dir = out
    model_file = ckpt_dir / f"model_{step:06d}.pt"
    check_writable_dir(ckpt_dir, "--out")
    if model_file.exists() and not args.force:
        raise CheckpointError(f"{model_file} already exists; pass --force to replace it")
    if args.base_dir:
        if info.get("tokenizer_dir") is None:
            raise CheckpointError(f"{args.src} has no tokenizer/tokenizer.pkl to copy into {out / 'tokenizer'}; "
                                  f"a base dir needs one (export without --base-dir, or re-import with "
                                  f"--tokenizer-dir)")
        export_tokenizer(info["tokenizer_dir"], out, force=args.force)
    written = export_params(config, params, ckpt_dir, step, args.phase, source)
    print(f"export_nanochat: {config.generation} step {step} ({args.phase}) -> {written} "
          f"and {written.with_name(f'meta_{step:06d}.json').name}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CheckpointError, ValueError) as e:
        print(f"export_nanochat: error: {e}", file=sys.stderr)
        sys.exit(1)
    except OSError as e:  # read-only filesystem, disk full, permissions: the path and the OS's reason
        print(f"export_nanochat: error: cannot write {e.filename or 'the output'}: {e.strerror or e}; free space or choose "
              "a writable --out", file=sys.stderr)
        sys.exit(1)
