"""nanochat <-> jaxrl checkpoint conversion: the only part of the project that imports torch or transformers.

Stable API (used by external checks and the trainer):
    load_nanochat(path, step=None, generation=None, *, source="sft", model_tag=None, tokenizer_dir=None)
        -> (GPTConfig, params)      # base dir, checkpoint dir, model_<step>.pt, or jaxrl import dir
    read_nanochat(path, *, step, generation, source, model_tag, tokenizer_dir)
        -> (GPTConfig, params, info)  # same, plus the record stored in an import's model.json
    detect_generation({key: shape}, where) -> (generation, reason)
    export_params(config, params, out_dir, step, phase="rl", source_info=None) -> Path of model_<step>.pt

CLIs: `python -m convert.import_nanochat --help`, `python -m convert.export_nanochat --help`;
Hugging Face transformers folders (gen-2025-10, the `hf` extra): `python -m convert.export_hf --help`,
`python -m convert.import_hf --help`.
Formats and rules: docs/checkpoints.md. Test: `pytest tests/test_convert.py tests/test_hf.py`.
"""
from convert.detect import detect_generation
from convert.export import export_params
from convert.load import load_nanochat, read_nanochat
from jaxrl.run_state import CheckpointError

__all__ = ["CheckpointError", "detect_generation", "export_params", "load_nanochat", "read_nanochat"]
