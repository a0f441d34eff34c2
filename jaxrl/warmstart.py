"""The demo policy (`source = "demo"`): a small nanochat GPT taught the arith task from scratch.

`scripts/train_rl.py` calls `demo_policy(cfg, run_dir, mesh)` instead of loading a checkpoint,
then runs RL on the result exactly as on an imported nanochat model. Nothing is downloaded:

1. Tokenizer: a byte-level BPE of VOCAB_SIZE tokens with nanochat's split pattern and specials
   (`tokenizer.train_bpe`), trained on TOKENIZER_ROWS rows of the train split and written to
   <run_dir>/tokenizer/tokenizer.pkl as a plain pickle of a tiktoken Encoding, as nanochat keeps
   it, so the run dir (and its nanochat export) carries its tokenizer.
2. Model: `demo_model_config` (gen-2026-07, 2 layers, n_embd 128, float32), random init.
3. Warm start: supervised training on the task's worked answers. It is the RL train step
   (`rl.train_step`) with advantage 1 on every demonstrated token, i.e. the mean NLL of the
   tokens `render_conversation` marks as the assistant's (token_norm "global"), with nanochat's
   optimizer at nanochat's base lrs at full strength (WARMSTART_LRS, init_lr_frac 1, as nanochat's
   base and SFT training) decaying linearly over WARMSTART_LR_STEPS. Every `warmstart_eval_every`
   steps, once the loss is below EVAL_BELOW_LOSS, pass@k runs on the first `eval_examples` test
   questions exactly as train_rl's eval. The warm start stops at the first eval whose pass@1
   estimate (`unbiased_pass@1`, the mean accuracy of all its samples) reaches
   `warmstart_pass1_min`, or after `warmstart_steps`; landing above `warmstart_pass1_max`, the
   top of the band, is reported. Rows go to <run_dir>/metrics.jsonl with phase "warmstart".
On `--resume` with a checkpoint in the run dir the warm start is skipped (the RL checkpoint
holds the params); without it, a run dir holding checkpoints is refused before anything is
written. Single process only.

Test: `python -m pytest tests/test_demo.py -q` (a shortened demo run end to end).
"""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxrl import checkpoint_io, optim, rl, rollout, sampler, sharding
from jaxrl.checkpoint import CheckpointManager
from jaxrl.metrics import MetricsWriter, print0
from jaxrl.model import GPTConfig, init_params, param_table
from jaxrl.tasks import open_task
from jaxrl.tokenizer import Tokenizer, train_bpe

VOCAB_SIZE = 512  # 256 bytes + 247 merges (every word of the task) + 9 specials
TOKENIZER_ROWS = 2000  # train rows the BPE is trained on: covers every template word and name
WARMSTART_OFFSET = 50_000  # warm-start demonstrations come from train rows from here on, RL from row 0
# nanochat's base lrs (chat_rl's defaults, before init_lr_frac), at full strength as nanochat's base
# and SFT training use them; RL then runs at the config's own lrs (scripts/configs/demo.toml).
WARMSTART_LRS = {"unembedding_lr": 0.004, "embedding_lr": 0.2, "matrix_lr": 0.02}
# nanochat's linear lr decay, over this fixed horizon rather than warmstart_steps (a cap: where the
# warm start stops is not known in advance, and the cap must not change the trajectory). The band
# is reached after 30-50 steps, at ~95% of the peak lr; steps past the horizon keep its last lr.
WARMSTART_LR_STEPS = 600
# No pass@k eval while the demonstration loss (nats per token) is above this: such a model cannot
# write an answer yet (pass@1 ~ 0 on the arith task until the loss is near 0.3) and its samples run
# to max_new_tokens, the most expensive eval there is.
EVAL_BELOW_LOSS = 0.5


def demo_model_config(vocab_size: int) -> GPTConfig:
    """About 0.6M parameters: a few minutes of training on two CPU cores learns the task."""
    return GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                     window_pattern="L", generation="gen-2026-07", compute_dtype="float32")


def build_tokenizer(task, out_dir: Path, vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Train the BPE on questions and answers of `task` and pickle it to out_dir/tokenizer.pkl."""
    texts = []
    for i in range(min(TOKENIZER_ROWS, len(task))):
        conversation = task[WARMSTART_OFFSET % len(task) + i if len(task) > WARMSTART_OFFSET else i]
        texts.append(conversation["messages"][0]["content"])
        texts += [part["text"] for part in conversation["messages"][-1]["content"]]
    enc = train_bpe(texts, vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokenizer.pkl.tmp"
    tmp.write_bytes(pickle.dumps(enc))
    tmp.replace(out_dir / "tokenizer.pkl")
    return Tokenizer(enc)


def demonstration_batch(tokenizer: Tokenizer, task, indices, max_tokens: int) -> tuple[rl.Batch, float]:
    """Rendered conversations with advantage 1 per row (the RL loss becomes the SFT loss), and
    their mean length in tokens."""
    seqs, masks = [], []
    for i in indices:
        ids, mask = tokenizer.render_conversation(task[int(i)], max_tokens=max_tokens)
        seqs.append(ids)
        masks.append(mask)
    batch = rl.build_batch(seqs, masks, np.ones(len(seqs), np.float32), tokenizer.specials.assistant_end)
    return batch, float(np.mean([len(s) for s in seqs]))


def _sft_step(cfg, config: GPTConfig, mesh):
    """The RL train step compiled for demonstrations: advantage 1, one token normalisation over the batch."""
    rows, dbs, n_dev = cfg.warmstart_batch_size, cfg.device_batch_size, sharding.data_size(mesh)
    if rows % (dbs * n_dev):
        raise ValueError(f"warmstart_batch_size ({rows}) must be a multiple of device_batch_size ({dbs}) x "
                         f"{n_dev} devices; set warmstart_batch_size to {max(1, rows // (dbs * n_dev)) * dbs * n_dev}")
    optimizer = optim.build_optimizer(config, num_steps=WARMSTART_LR_STEPS, init_lr_frac=1.0, **WARMSTART_LRS)
    spec = rl.LossSpec(device_batch_size=dbs, num_passes=1, examples_per_step=rows // dbs, token_norm="global")
    return rl.compiled_train_step(config, spec, optimizer, mesh), optimizer


def warm_start(cfg, config: GPTConfig, params, tokenizer: Tokenizer, train_task, test_task, mesh,
               writer: MetricsWriter):
    """Supervised steps until the eval's pass@1 estimate reaches cfg.warmstart_pass1_min.

    The estimate is `unbiased_pass@1` (the mean accuracy of all the eval's samples): the first
    sample's pass@1 alone is too noisy to stop on. Returns (params, summary dict).
    """
    train_step, optimizer = _sft_step(cfg, config, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.replicated(mesh))(params)
    tool = sampler.tool_for(tokenizer, cfg.max_new_tokens + 2, config.generation)
    n = cfg.eval_num_samples or cfg.device_batch_size
    eval_args = rollout.SamplingArgs(n, cfg.max_new_tokens, 1.0, cfg.top_k, cfg.eval_seed)
    rows, steps = cfg.warmstart_batch_size, cfg.warmstart_steps
    start = WARMSTART_OFFSET % len(train_task) if len(train_task) > WARMSTART_OFFSET else 0
    bar = tqdm(range(steps), desc="warm start", dynamic_ncols=True)
    last, t0 = None, time.perf_counter()
    for step in bar:
        idx = (start + step * rows + np.arange(rows)) % len(train_task)
        batch, seq_len = demonstration_batch(tokenizer, train_task, idx, config.sequence_len)
        t = time.perf_counter()
        packed = rl.global_batch(batch, mesh, pad_id=tokenizer.specials.assistant_end, chunk=cfg.device_batch_size)
        params, opt_state, m = train_step(params, opt_state, packed)
        m = jax.device_get(m)
        if m.skipped:
            raise FloatingPointError(f"warm-start step {step}: non-finite loss {m.loss} or grad norm {m.grad_norm}; "
                                     "lower WARMSTART_LRS in jaxrl/warmstart.py")
        row = {"step": step, "event": "step", "phase": "warmstart", "loss": float(m.loss), "seq_len": seq_len,
               "grad_norm": float(m.grad_norm), "tokens": int(m.tokens), "train_s": time.perf_counter() - t,
               "lrm": optim.lr_multiplier(min(step, WARMSTART_LR_STEPS - 1), WARMSTART_LR_STEPS)}
        writer.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", pass1=f"{last['unbiased_pass@1']:.3f}" if last else "-")
        done = step + 1
        if (done % cfg.warmstart_eval_every == 0 and row["loss"] < EVAL_BELOW_LOSS) or done == steps:
            last = rollout.eval_row(config, params, tokenizer, test_task, num_examples=cfg.eval_examples,
                                    args=eval_args, tool=tool, mesh=mesh, step=done, phase="warmstart",
                                    shared_keys=cfg.eval_shared_keys)
            writer.log(last)
            passes = ", ".join(f"Pass@{k}: {last[f'pass@{k}']:.4f}" for k in range(1, n + 1))
            print0(f"\nwarm start step {done} | loss {row['loss']:.4f} | pass@1 estimate "
                   f"{last['unbiased_pass@1']:.4f} | {passes}")
            if last["unbiased_pass@1"] >= cfg.warmstart_pass1_min:
                break
    bar.close()
    return params, _summary(cfg, done, time.perf_counter() - t0, last)


def _summary(cfg, steps: int, seconds: float, last: dict) -> dict:
    p1, band = last["unbiased_pass@1"], [cfg.warmstart_pass1_min, cfg.warmstart_pass1_max]
    if p1 < band[0]:
        print0(f"warm start: pass@1 {p1:.3f} is below the band {band} after the cap of {steps} steps "
               "(raise warmstart_steps); going on to RL")
    elif p1 > band[1]:
        print0(f"warm start: pass@1 {p1:.3f} overshot the band {band} (lower warmstart_eval_every); going on to RL")
    print0(f"warm start: {steps} steps in {seconds:.1f}s, pass@1 {p1:.3f} (first sample: {last['pass@1']:.3f})")
    return {"steps": steps, "seconds": round(seconds, 1), "pass@1": p1, "band": band}


def demo_policy(cfg, run_dir, mesh):
    """-> (GPTConfig, replicated params, Tokenizer, info with "tokenizer_dir", "generation", "source")."""
    if jax.process_count() > 1:
        raise ValueError('source = "demo" runs on one process; start it without coordinator_address/num_processes')
    run_dir = Path(run_dir)
    tok_dir = run_dir / checkpoint_io.TOKENIZER_DIR
    latest = CheckpointManager(run_dir / "checkpoints").latest_step()
    if latest is not None and not cfg.resume:  # refuse before the tokenizer and metrics of that run are touched
        raise SystemExit(f"error: {run_dir / 'checkpoints'} already holds checkpoints (latest step {latest}): pass "
                         "--resume to continue that run, or choose another run name or out_dir")
    resuming = latest is not None
    train_task = open_task(cfg.task, cfg.data_dir, "train", difficulty=cfg.arith_difficulty)
    if resuming:
        tokenizer = Tokenizer.from_directory(tok_dir)
        print0(f"demo: resuming, warm start skipped (tokenizer from {tok_dir})")
    else:
        t0 = time.perf_counter()
        tokenizer = build_tokenizer(train_task, tok_dir)
        print0(f"demo: trained a {tokenizer.get_vocab_size()}-token BPE in {time.perf_counter() - t0:.1f}s")
    config = demo_model_config(tokenizer.get_vocab_size())
    params = jax.device_put(init_params(config, jax.random.key(cfg.seed)), sharding.replicated(mesh))
    n_params = sum(int(np.prod(shape)) for _, shape, _ in param_table(config))
    print0(f"demo: {config.generation} model, {config.n_layer} layers, n_embd {config.n_embd}, {n_params:,} params")
    info = {"generation": config.generation, "tokenizer_dir": str(tok_dir),
            "source": {"kind": "demo", "dtypes": {k: "float32" for k, _, _ in param_table(config)}}}
    if not resuming:
        test_task = open_task(cfg.task, cfg.data_dir, "test", difficulty=cfg.arith_difficulty)
        writer = MetricsWriter(run_dir)  # train_rl's writer appends the RL rows to the same files
        params, info["warmstart"] = warm_start(cfg, config, params, tokenizer, train_task, test_task, mesh, writer)
        writer.close()
    return config, params, tokenizer, info
