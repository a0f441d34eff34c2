"""Run state: everything jaxrl keeps on disk, with one error class (RunStateError, also named
CheckpointError) and one way to name paths (RunPaths). Use it as `from jaxrl import run_state`.

A train_rl run directory <out_dir>/<run> (each path is a RunPaths attribute):

    run.lock                  .lock         pid, host, start time of the run using the directory
    config.toml               .config       the resolved config of the latest start
    model.json, tokenizer/    .model_json, .tokenizer   the policy record: the run dir is loadable
    metrics.jsonl, tensorboard/   .metrics, .tensorboard
    checkpoints/<step>/       .checkpoints, .step(n)    state/ meta/ config.toml checksums.json
    damaged_checkpoints/      .damaged      steps a resume found damaged, moved aside, never deleted
    chatrl_checkpoints/d<n>/  .export       the nanochat export of each saved step

A jaxrl import directory holds model.json, params/ (.params) and tokenizer/.

Modules, leaf first:
- paths.py: the names, RunPaths, the error class, `is_jaxrl_import`, `is_run_dir`, `replace_dir`.
- integrity.py: checksums, finite values, the one key/shape/dtype check, the data fingerprint.
- train_state.py: CheckpointManager (orbax's `args=` CheckpointManager) for the train state, and
  which config changes a resume accepts.
- import_dir.py: the import directory and a run directory's params (orbax's `args=` Checkpointer).
- policy.py: `load_policy` from any checkpoint kind; `write_run_record`.
- guard.py: the run-directory lock, a fresh start's old logs, preemption signals, watchdogs.

Test: `python -m pytest -q tests/test_run_state.py tests/test_checkpoint.py tests/test_run_safety.py -m "not slow"`.
"""
from jaxrl.run_state.paths import (
    CHECKSUMS, CONFIG_TOML, META, MODEL_JSON, PARAMS_DIR, STATE, TOKENIZER_DIR, TOKENIZER_FILES, CheckpointError,
    RunPaths, RunStateError, is_jaxrl_import, is_run_dir, replace_dir)
from jaxrl.run_state.integrity import (
    GENERATED_ROWS, Leaf, check_data, check_finite, check_param_shapes, check_tree, checksum_problem,
    data_fingerprint, nonfinite_leaves, tree_problems, write_checksums)
from jaxrl.run_state.train_state import (
    ADDED_KEYS, PATH_KEYS, RESUME_BREAKING, RESUME_SAFE, CheckpointManager, check_resume_compatible)
from jaxrl.run_state.import_dir import (
    copy_tokenizer, load_jaxrl_import, load_run_dir, read_model_json, read_tree, save_jaxrl_import, write_tree)
from jaxrl.run_state.policy import load_policy, write_run_record
from jaxrl.run_state.guard import (
    EXIT_PREEMPTED, RunClaim, StopSignal, claim_run_dir, exit_on_bad_input, resume_command, set_aside_logs,
    stop_for_nonfinite, zero_reward_warning)
