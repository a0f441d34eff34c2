"""nanochat's RL stage (scripts/chat_rl.py) in JAX: REINFORCE on GSM8K-format tasks with the calculator.

    python scripts/train_rl.py --config scripts/configs/arith_tiny.toml [--key=value ...] [--resume]

Each step: pass@k eval when step % eval_every == 0 (and once after the last step), rollouts of
examples_per_step questions x num_samples samples in one sampler call, rewards, one jitted
REINFORCE update sharded over every device, logging, and a checkpoint every save_every steps.
Every key is documented in docs/configs.md; `--help` lists them; docs/errors.md lists the bad inputs.

Exit status: 0 done; 1 bad input (the message names the file/key and the fix); 3 stopped after
max_nonfinite_skips consecutive non-finite steps (last good state saved), or an update that left
NaN/inf in the state (nothing saved from it); 4 a checkpoint or export could not be written (path
and OS error printed; the previous checkpoint is intact); 5 stopped by SIGTERM/SIGINT after
finishing the step and saving it (the resume command is printed); 128 + signal number (130 for
Ctrl-C, 143 for SIGTERM) for a signal before the first step, or a second signal (exits at once).
`--resume` continues bit-identically from the newest intact checkpoint (tests/test_resume.py);
damaged newer ones are moved to <run>/damaged_checkpoints/. <run>/run.lock keeps a second run
out of the directory (docs/errors.md, "Run state, checkpoints and preemption").
"""
import shutil
import sys
import time
from pathlib import Path

from jaxrl.config import ConfigError, check_writable_dir  # (no jax import yet)
from jaxrl.config_io import format_config, load_config, save_config

try:
    cfg = load_config(sys.argv[1:])
    check_writable_dir(Path(cfg.out_dir) / cfg.run, "out_dir")
except ConfigError as e:  # a user error: its message, not a traceback
    raise SystemExit(f"error: {e}") from None

import jax  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxrl import distributed, faults, model, optim, rl, rollout, run_state, sampler, sharding, tasks  # noqa: E402
from jaxrl.metrics import MetricsWriter, print0, read_metrics, step_line, step_row, write_metrics  # noqa: E402
from jaxrl.report import plot_run  # noqa: E402
from jaxrl.run_state import CheckpointManager, RunStateError, check_resume_compatible, nonfinite_leaves  # noqa: E402

# ------------------------------------------------------------------------------------------
# Runtime: processes, devices, run directory

with run_state.exit_on_bad_input():  # JAX_PLATFORMS without cpu: no host for the calculator (before jax starts)
    sampler.check_host_backend()
distributed.initialize(cfg)
with run_state.exit_on_bad_input():
    mesh = sharding.make_mesh(data=cfg.mesh_data, fsdp=cfg.mesh_fsdp)  # training: rows over all, params over fsdp
local_mesh = sharding.make_mesh(jax.local_devices())  # rollouts: this process's devices, a replicated copy
world = sharding.row_shards(mesh)
cfg.validate(world_size=jax.process_count())
with run_state.exit_on_bad_input():  # JAXRL_ATTENTION overrides the key; the value used is saved with the run
    cfg = cfg.replace(attention=model.attention_impl(cfg.attention))
rows_per_device = cfg.examples_per_step * cfg.num_samples // world
if (cfg.examples_per_step * cfg.num_samples) % world or rows_per_device % cfg.device_batch_size:
    raise SystemExit(f"examples_per_step x num_samples = {cfg.examples_per_step * cfg.num_samples} rows do not split into "
                     f"whole passes of {cfg.device_batch_size} rows on each of {world} devices: "
                     f"make examples_per_step a multiple of {world}")
run_dir = Path(cfg.out_dir) / cfg.run
paths = run_state.RunPaths(run_dir)
stop = run_state.StopSignal()  # until stop.defer(), SIGTERM/SIGINT exit at once, without a traceback
claim = None  # process 0 locks the run dir (released at exit; a run dir this run made goes if it fails before step 1)
if jax.process_index() == 0:
    try:
        claim = run_state.claim_run_dir(run_dir)
    except (RunStateError, OSError) as e:
        raise SystemExit(f"error: {e}" if isinstance(e, RunStateError) else f"error: cannot create the run "
                         f"directory {run_dir}: {e.strerror}; choose a writable out_dir") from None
    if not any(p.name.isdigit() for p in paths.checkpoints.glob("*")):  # a start from step 0
        for moved in run_state.set_aside_logs(run_dir):
            print0(f"fresh start: the earlier log is kept as {moved}")
    stop.on_exit = claim.release
print0(f"run directory: {run_dir.resolve()}")
print0(f"devices: {world} x {jax.devices()[0].device_kind} over {jax.process_count()} process(es), mesh data "
       f"{sharding.data_size(mesh)} x fsdp {sharding.fsdp_size(mesh)}, jax {jax.__version__}")
print0(format_config(cfg))

# ------------------------------------------------------------------------------------------
# Policy, tokenizer, tasks

with run_state.exit_on_bad_input():  # every input is checked here, before anything is written
    train_task = tasks.open_task(cfg.task, cfg.data_dir, "train", difficulty=cfg.arith_difficulty)
    test_task = tasks.open_task(cfg.task, cfg.data_dir, "test", difficulty=cfg.arith_difficulty)
    num_steps = cfg.resolve_num_steps(len(train_task))
    data_fp = {"train": run_state.data_fingerprint(train_task), "test": run_state.data_fingerprint(test_task)}
    model_config, params, tokenizer, policy_info = run_state.load_policy(
        cfg.checkpoint, generation=cfg.generation, model_step=cfg.model_step, model_tag=cfg.model_tag,
        tokenizer_dir=cfg.tokenizer_dir, source=cfg.source)
    rollout.check_prompt_lengths(model_config, tokenizer, train_task, min(len(train_task), num_steps *
                                 cfg.examples_per_step), cfg.max_new_tokens, "training")
    rollout.check_prompt_lengths(model_config, tokenizer, test_task, min(len(test_task), cfg.eval_examples),
                                 cfg.max_new_tokens, "test")
model_config = model_config.replace(compute_dtype=cfg.dtype, attention=cfg.attention)
if cfg.dtype == "bfloat16" and jax.devices()[0].platform == "cpu":
    print0("note: dtype=bfloat16 on a CPU is slow and rounds like nanochat's GPU path; set dtype=float32 here")
print0(f"model: {model_config.generation}, {model_config.n_layer} layers, d_model {model_config.n_embd}, "
       f"vocab {model_config.vocab_size}; train {len(train_task)} / test {len(test_task)} questions; {num_steps} steps")
specials = tokenizer.specials
tool = sampler.tool_for(tokenizer, cfg.max_new_tokens + 2, model_config.generation)

# ------------------------------------------------------------------------------------------
# Optimizer, state, resume

lrs = dict(unembedding_lr=cfg.unembedding_lr, embedding_lr=cfg.embedding_lr, matrix_lr=cfg.matrix_lr,
           init_lr_frac=cfg.init_lr_frac)  # the optimizer's base learning rates, also logged per step
optimizer = optim.build_optimizer(model_config, weight_decay=cfg.weight_decay, num_steps=num_steps, **lrs)
params = sharding.place(params, mesh)  # the training layout (jaxrl/sharding.py): split over fsdp
opt_state = jax.jit(optimizer.init, out_shardings=sharding.tree_shardings(jax.eval_shape(optimizer.init, params),
                                                                          mesh))(params)
ckpt = CheckpointManager(paths.checkpoints)  # opening it deletes unfinished (killed) saves


gather_params = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))  # fsdp: one all-gather per step
# Rollouts read the params in the compute dtype (every use casts to it): a bf16 copy is the same
# tokens at half the bytes, cast on the shards before they are gathered.
rollout_copy = jax.jit(lambda p: jax.tree.map(lambda a: a.astype(model_config.dtype), p),
                       out_shardings=sharding.replicated(mesh))


def local_view(tree, *, rollout: bool = False):
    """A whole copy of the params on each of this process's devices (sampling runs on this
    process's devices only; decoding reads every weight at every token). `rollout`: in the compute
    dtype; else the fp32 masters (exports)."""
    if rollout and model_config.dtype != np.float32:
        tree = rollout_copy(tree)
    elif sharding.fsdp_size(mesh) > 1:
        tree = gather_params(tree)
    elif jax.process_count() == 1:  # already whole on every device of this (the only) process
        return tree
    if jax.process_count() > 1:
        tree = jax.tree.map(lambda a: a.addressable_data(0), tree)
    return jax.device_put(tree, sharding.replicated(local_mesh))


def export_nanochat_or_warn(model_config, params, run_dir, step, info):
    """nanochat-format export to <run_dir>/chatrl_checkpoints/d<n_layer>/model_<step:06d>.pt (+ meta)."""
    try:
        import convert
    except ImportError:
        print(f"warning: torch is not installed, skipping the nanochat export of step {step} "
              "(pip install -e '.[torch]' to enable it)", file=sys.stderr)
        return None
    host = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), params)
    out = run_state.RunPaths(run_dir).export / f"d{model_config.n_layer}"
    return convert.export_params(model_config, host, out, step, phase="rl", source_info=info.get("source"))


def forget_from(step: int):
    """Resuming at `step`: drop the RL log rows of steps >= step (they are redone; rows of an earlier phase,
    such as the warm start scripts/demo.py puts in front, stay) and killed exports' temp files."""
    if paths.metrics.is_file():
        write_metrics(run_dir, [r for r in read_metrics(run_dir) if r.get("phase") == "warmstart"
                                or r.get("step", 0) < step])
    for stale in paths.export.glob("d*/.*.tmp-*"):
        if stale.is_dir():
            shutil.rmtree(stale)
        else:
            stale.unlink()


start_step, consecutive_skips = 0, 0
train_len = 0  # packed training length: only grows, so the train step compiles once per new length
if cfg.resume and ckpt.latest_step() is not None:
    try:  # verify every file, then refuse config and data changes, before touching state
        resume_at, damaged = ckpt.resume_step()
        for note in damaged:
            print0(f"warning: {note}", file=sys.stderr)
        if damaged:
            print0(f"warning: resuming from step {resume_at}, the newest intact checkpoint", file=sys.stderr)
        saved_meta = ckpt.read_meta(resume_at)
        allowed = check_resume_compatible(saved_meta["config"], cfg.to_dict())
        if note := run_state.check_data(saved_meta.get("data"), data_fp, cfg.allow_data_change):
            print0(note, file=sys.stderr)
        state, meta = ckpt.restore(resume_at, {"params": params, "opt_state": opt_state})  # in this run's layout
    except RunStateError as e:
        raise SystemExit(f"error: {e}") from None
    params, opt_state = state["params"], state["opt_state"]
    start_step = meta["next_step"]
    train_len = int(meta.get("train_len", 0))  # the same bins as the uninterrupted run
    assert meta["cursor"] == start_step * cfg.examples_per_step, f"data cursor {meta['cursor']} != next step {start_step}"
    if jax.process_index() == 0:
        forget_from(start_step)
        if cfg.export_nanochat:  # a kill between the checkpoint and its export left no export of this step
            export_nanochat_or_warn(model_config, local_view(params), run_dir, meta["step"], policy_info)
    print0(f"resumed from {ckpt.directory} step {meta['step']} (next step {start_step}); safe changes: {allowed or 'none'}")
elif cfg.resume:
    print0(f"--resume: no complete checkpoint in {paths.checkpoints}, starting from step 0")
elif ckpt.latest_step() is not None:
    raise SystemExit(f"error: {ckpt.directory} already holds checkpoints (latest step {ckpt.latest_step()}): pass "
                     "--resume to continue that run, or choose another run name or out_dir")
if start_step == 0 and (bad := nonfinite_leaves(params)):  # a restored state was checked by the restore
    raise SystemExit(f"error: the policy from {cfg.checkpoint} holds NaN or inf in {len(bad)} tensors "
                     f"(first: {bad[0]}); training on it learns nothing: re-import or re-export a good checkpoint")
if jax.process_index() == 0:
    run_state.write_run_record(run_dir, model_config, policy_info)
    save_config(cfg, paths.config)
writer = MetricsWriter(run_dir, cfg.run, cfg.to_dict())
loss_spec = rl.LossSpec(device_batch_size=cfg.device_batch_size, num_passes=cfg.num_samples // cfg.device_batch_size,
                        examples_per_step=cfg.examples_per_step, token_norm=cfg.token_norm,
                        chunk_rows=cfg.train_chunk_rows, remat=cfg.train_remat)
train_step = rl.compiled_train_step(model_config, loss_spec, optimizer, mesh)
train_args = rollout.SamplingArgs(cfg.num_samples, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.seed)
eval_n = cfg.eval_num_samples or cfg.device_batch_size
eval_args = rollout.SamplingArgs(eval_n, cfg.max_new_tokens, 1.0, cfg.top_k, cfg.eval_seed)


def evaluate(step: int):
    """nanochat's pass@k (first k of n) on the first eval_examples test questions, plus unbiased pass@k."""
    row = rollout.eval_row(model_config, local_view(params, rollout=True), tokenizer, test_task,
                           num_examples=cfg.eval_examples, args=eval_args, tool=tool, mesh=local_mesh, step=step,
                           phase="rl", shared_keys=cfg.eval_shared_keys, slots=cfg.rollout_slots)
    writer.log(row)
    print0(f"Step {step} | " + ", ".join(f"Pass@{k}: {row[f'pass@{k}']:.4f}" for k in range(1, eval_n + 1)))
    return row


def save(step: int):
    """Checkpoint the state after step `step`'s update (resume continues at step + 1), then export."""
    meta = {"step": step, "next_step": step + 1, "config": cfg.to_dict(), "cursor": (step + 1) * cfg.examples_per_step,
            "model_config": model_config.to_dict(), "seed": cfg.seed, "train_len": train_len, "data": data_fp}
    try:
        ckpt.save(step, {"params": params, "opt_state": opt_state}, meta)
        if cfg.export_nanochat and jax.process_index() == 0:
            export_nanochat_or_warn(model_config, local_view(params), run_dir, step, policy_info)
    except (RunStateError, OSError) as e:  # disk full, read-only folder: say where and why, keep the rest
        print(f"error: {e}" if isinstance(e, RunStateError) else f"error: the nanochat export of step {step} "
              f"to {paths.export} failed ({type(e).__name__}: {e}); checkpoint step {step} is "
              "complete. Free disk space or fix permissions, then resume", file=sys.stderr, flush=True)
        sys.exit(4)


# ------------------------------------------------------------------------------------------
# Training loop

last_step = min(num_steps, cfg.stop_after_steps or num_steps)  # a prefix of the schedule, or all of it
bar = tqdm(range(start_step, last_step), initial=start_step, total=last_step, disable=jax.process_index() != 0,
           desc="rl", dynamic_ncols=True)
last_eval, zero_steps = None, []
stop.defer()  # from here a first SIGTERM/SIGINT finishes the step, saves and exits 5
if claim:
    claim.training_started = True
for step in bar:
    if step % cfg.eval_every == 0:
        last_eval = evaluate(step)
    # -- rollouts: this process's share of the step's questions, on its own devices
    first = step * cfg.examples_per_step
    questions = np.array([(first + j) % len(train_task) for j in range(cfg.examples_per_step)])
    mine = distributed.process_share(questions)
    res = rollout.run_round(model_config, local_view(params, rollout=True), tokenizer=tokenizer, task=train_task,
                            indices=mine, args=train_args, tool=tool, step=step, mesh=local_mesh,
                            slots=cfg.rollout_slots)
    t_reward = time.perf_counter()
    batch = rollout.make_batch(res, cfg.num_samples, specials.assistant_end, advantage=cfg.advantage,
                               train_on_end_token=cfg.train_on_end_token, end_id=specials.assistant_end)
    batch = faults.inject_nan_advantages(batch, step, writer)  # tests only (jaxrl/faults.py); inert otherwise
    batch = rl.global_batch(batch, mesh, pad_id=specials.assistant_end, chunk=loss_spec.chunk_rows, min_len=train_len,
                            skip_zero_advantage=cfg.train_skip_zero_advantage, group=cfg.num_samples)
    train_len = batch.inputs.shape[1]
    reward_s = time.perf_counter() - t_reward
    # -- update
    t0 = time.perf_counter()
    params, opt_state, m = train_step(params, opt_state, batch)
    m = jax.device_get(m)
    train_s = time.perf_counter() - t0
    if bad := nonfinite_leaves({"params": params, "opt_state": opt_state}):  # never train on or save them
        print(f"error: step {step}'s update left NaN or inf in {len(bad)} leaves (first: {bad[0]}) although its loss "
              f"and gradient were finite; nothing of it is saved, the last good state is checkpoint step "
              f"{ckpt.latest_step()}. Lower the learning rates, then resume", file=sys.stderr, flush=True)
        sys.exit(3)
    row = step_row(model_config, step, num_steps, res, m, reward_s=reward_s, train_s=train_s, lrs=lrs)
    if m.skipped:
        consecutive_skips += 1
        print0(f"Step {step}: non-finite loss {m.loss} or grad norm {m.grad_norm}: update skipped "
               f"(questions {questions.tolist()}); {consecutive_skips} in a row")
        row["skipped_questions"] = questions.tolist()
    else:
        consecutive_skips = 0
    writer.log(row)
    print0(step_line(row, num_steps))
    zero_steps = zero_steps + [step] if row["reward"] == 0 else []
    if warning := run_state.zero_reward_warning(zero_steps, cfg.zero_reward_warn_steps, last_eval):
        print0(warning, file=sys.stderr)
    bar.set_postfix(reward=f"{row['reward']:.3f}", pass1=f"{last_eval['pass@1']:.3f}" if last_eval else "-")
    if run_state.stop_for_nonfinite(consecutive_skips, cfg.max_nonfinite_skips):
        save(step)  # the skipped updates left params as the last good state
        print0(f"stopping: {consecutive_skips} consecutive non-finite steps (max_nonfinite_skips); "
               f"last good state saved as step {step} in {ckpt.directory}")
        sys.exit(3)
    if (saved := (step > 0 and step % cfg.save_every == 0) or step == last_step - 1):
        save(step)
    if distributed.sum_scalar(float(stop.signum is not None)) > 0:  # every process stops after the same step
        if not saved:
            save(step)
        writer.close()
        print0(f"stopped by a signal after step {step}, saved as checkpoint step {step} in {ckpt.directory}; "
               f"resume with:\n  {run_state.resume_command(sys.argv)}")
        sys.exit(run_state.EXIT_PREEMPTED)

# ------------------------------------------------------------------------------------------
# Final evaluation (nanochat skips it; users want the final number) and report

if start_step < last_step or last_eval is None:
    evaluate(last_step)
writer.close()
if jax.process_index() == 0:
    print0(f"report: {plot_run(run_dir)}")
print0(f"done: {run_dir.resolve()}")
