"""The laptop demo in one command: nothing downloaded, no checkpoint needed.

    python scripts/demo.py [--warmstart_steps N ...] [RL overrides --key=value ...] [--resume]

1. Tokenizer: nanochat's own BPE trainer (rustbpe) learns VOCAB_SIZE - 9 ranks with nanochat's
   split pattern from TOKENIZER_ROWS rows of the built-in arith task; nanochat's nine special
   tokens follow, and tiktoken serves it, exactly as nanochat builds its tokenizer.
2. Model: a gen-2026-07 nanochat GPT (2 layers, n_embd 128, float32), random init from `seed`.
3. Warm start: supervised training on the task's worked answers. It is the RL train step with
   advantage 1 on every demonstrated token (the mean NLL of the tokens `render_conversation` marks
   as the assistant's), with nanochat's optimizer at nanochat's base lrs (WARMSTART_LRS, at full
   strength as nanochat's base and SFT training use them) decaying linearly over
   WARMSTART_LR_STEPS. Every --warmstart_eval_every steps, once the loss is below EVAL_BELOW_LOSS,
   pass@k runs as train_rl's eval; the warm start stops at the first eval whose pass@1 estimate
   (`unbiased_pass@1`, the mean accuracy of all its samples) reaches --warmstart_pass1_min, or
   after --warmstart_steps. Its rows (phase "warmstart") go to <run>/warmstart/metrics.jsonl and
   <run>/warmstart/tensorboard/.
4. The warm-started model is written as an ordinary jaxrl import directory, <run>/warmstart/policy
   (the layout `python -m convert.import_nanochat` writes), and the ordinary RL job runs on it:
   `train_rl.py --config scripts/configs/demo.toml --checkpoint <run>/warmstart/policy [overrides]`.
5. Report: the warm start's rows are put in front of the RL rows in <run>/metrics.jsonl and
   report.png is redrawn with both phases.

Arguments other than the ones below are RLConfig overrides for both the warm start (seed, eval
and sampling keys) and the RL job (`python scripts/train_rl.py --help` lists them). --resume
continues an interrupted demo: a finished warm start is kept and the RL job resumes from its
newest checkpoint; an unfinished warm start starts again. Exit status: train_rl.py's (docs/errors.md);
1 for a bad input found here. Single process only.
Test: `python -m pytest tests/test_demo.py -q` (a shortened demo end to end).
"""
import argparse
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from jaxrl.config import ConfigError, check_writable_dir
from jaxrl.config_io import load_config

# ------------------------------------------------------------------------------------------
# Settings: the demo's own, then the RL config (scripts/configs/demo.toml plus overrides)

VOCAB_SIZE = 512  # 256 bytes + 247 merges (every word of the task) + 9 specials
TOKENIZER_ROWS = 2000  # train rows the BPE is trained on: covers every template word and name
WARMSTART_OFFSET = 50_000  # warm-start demonstrations come from train rows from here on, RL from row 0
# nanochat's base lrs (chat_rl's defaults, before init_lr_frac), at full strength as nanochat's base
# and SFT training use them; RL then runs at the config's own lrs (scripts/configs/demo.toml).
WARMSTART_LRS = {"unembedding_lr": 0.004, "embedding_lr": 0.2, "matrix_lr": 0.02}
# nanochat's linear lr decay, over this fixed horizon rather than --warmstart_steps (a cap: where the
# warm start stops is not known in advance, and the cap must not change the trajectory). The band
# is reached after 30-50 steps, at ~95% of the peak lr; steps past the horizon keep its last lr.
WARMSTART_LR_STEPS = 600
# No pass@k eval while the demonstration loss (nats per token) is above this: such a model cannot
# write an answer yet (pass@1 ~ 0 on the arith task until the loss is near 0.3) and its samples run
# to max_new_tokens, the most expensive eval there is.
EVAL_BELOW_LOSS = 0.5
SCRIPTS = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(
    description="The demo: train a tokenizer and a small nanochat GPT on the built-in arith task, warm-start it "
    "by supervised training, write it as a jaxrl import directory, then run train_rl.py on it.",
    epilog="Any other --key=value is an RLConfig override, used by the warm start's eval and passed to "
    "train_rl.py (python scripts/train_rl.py --help lists them), e.g. --seed 1 --run demo-seed1 --resume.",
    allow_abbrev=False)
parser.add_argument("--config", default=str(SCRIPTS / "configs" / "demo.toml"), help="the RL config (TOML)")
parser.add_argument("--warmstart_steps", "--warmstart-steps", type=int, default=600,
                    help="most supervised warm-start steps before RL (default %(default)s)")
parser.add_argument("--warmstart_batch_size", "--warmstart-batch-size", type=int, default=32,
                    help="demonstrations per warm-start step, a multiple of device_batch_size x devices")
parser.add_argument("--warmstart_eval_every", "--warmstart-eval-every", type=int, default=5,
                    help="run pass@k (as the RL eval) every this many warm-start steps (default %(default)s)")
parser.add_argument("--warmstart_pass1_min", "--warmstart-pass1-min", type=float, default=0.3,
                    help="stop at the first eval whose pass@1 estimate reaches this (default %(default)s)")
parser.add_argument("--warmstart_pass1_max", "--warmstart-pass1-max", type=float, default=0.5,
                    help="top of the pass@1 band RL should start from; overshooting it is reported")
args, rl_args = parser.parse_known_args()
for name in ("warmstart_steps", "warmstart_batch_size", "warmstart_eval_every"):
    if getattr(args, name) < 1:
        parser.error(f"--{name} must be a positive integer, found {getattr(args, name)}")
if not 0 < args.warmstart_pass1_min <= args.warmstart_pass1_max <= 1:
    parser.error(f"need 0 < --warmstart_pass1_min <= --warmstart_pass1_max <= 1, found {args.warmstart_pass1_min} "
                 f"and {args.warmstart_pass1_max}")
try:
    cfg = load_config(["--config", args.config, *rl_args])
    check_writable_dir(Path(cfg.out_dir) / cfg.run, "out_dir")
except ConfigError as e:
    raise SystemExit(f"error: {e}") from None
if given := [k for k in ("checkpoint", "generation", "model_tag", "model_step", "tokenizer_dir")
             if getattr(cfg, k) is not None]:
    raise SystemExit(f"error: the demo trains its own model and tokenizer, so {', '.join(given)} would be ignored: "
                     "remove them, or run scripts/train_rl.py to start from a checkpoint")
if cfg.coordinator_address is not None or (cfg.num_processes or 1) > 1:
    raise SystemExit("error: the demo runs on one process; remove coordinator_address and num_processes")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import rustbpe  # noqa: E402
import tiktoken  # noqa: E402
from tqdm import tqdm  # noqa: E402

from jaxrl import optim, rl, rollout, run_state, sampler, sharding  # noqa: E402
from jaxrl.metrics import MetricsWriter, print0, read_metrics, write_metrics  # noqa: E402
from jaxrl.report import plot_run  # noqa: E402
from jaxrl.model import GPTConfig, init_params, param_table  # noqa: E402
from jaxrl.tasks import open_task  # noqa: E402
from jaxrl.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer  # noqa: E402

# ------------------------------------------------------------------------------------------
# Run directory: <run>/warmstart/ holds the warm start's log and, once it is done, its policy/

run_dir = Path(cfg.out_dir) / cfg.run
paths = run_state.RunPaths(run_dir)
ws_dir = run_dir / "warmstart"
policy_dir = ws_dir / "policy"
if not cfg.resume and (ws_dir.exists() or any(p.name.isdigit() for p in paths.checkpoints.glob("*"))):
    raise SystemExit(f"error: {run_dir} already holds a demo run: pass --resume to continue it, or choose another "
                     "run name (--run NAME) or out_dir")
try:  # released before train_rl.py takes it; a run dir made here goes if the warm start fails
    claim = run_state.claim_run_dir(run_dir)
except (run_state.RunStateError, OSError) as e:
    raise SystemExit(f"error: {e}") from None
mesh = sharding.make_mesh()
train_task = open_task(cfg.task, cfg.data_dir, "train", difficulty=cfg.arith_difficulty)
test_task = open_task(cfg.task, cfg.data_dir, "test", difficulty=cfg.arith_difficulty)
warm_start_row = WARMSTART_OFFSET if len(train_task) > WARMSTART_OFFSET else 0  # its k-th row: (this + k) % len

# ------------------------------------------------------------------------------------------
# Tokenizer and model


def train_tokenizer(task, out_dir: Path) -> Tokenizer:
    """nanochat's tokenizer training: rustbpe learns the merges of the task's questions and answers with
    nanochat's split pattern, the nine specials follow the ranks, and tokenizer.pkl is the pickled
    tiktoken Encoding, as nanochat keeps it."""
    texts = []
    for i in range(min(TOKENIZER_ROWS, len(task))):
        conversation = task[(warm_start_row + i) % len(task)]
        texts.append(conversation["messages"][0]["content"])
        texts += [part["text"] for part in conversation["messages"][-1]["content"]]
    bpe = rustbpe.Tokenizer()
    bpe.train_from_iterator(iter(texts), VOCAB_SIZE - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
    ranks = {bytes(token): rank for token, rank in bpe.get_mergeable_ranks()}
    specials = {token: len(ranks) + i for i, token in enumerate(SPECIAL_TOKENS)}
    enc = tiktoken.Encoding(name="rustbpe", pat_str=bpe.get_pattern(), mergeable_ranks=ranks, special_tokens=specials)
    (out_dir / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    return Tokenizer(enc)


def demo_model_config(vocab_size: int) -> GPTConfig:
    """About 0.6M parameters: a few minutes of training on two CPU cores learns the task."""
    return GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=128,
                     window_pattern="L", generation="gen-2026-07", compute_dtype="float32")


# ------------------------------------------------------------------------------------------
# Warm start: supervised steps until pass@1 is in the band RL starts from


def demonstration_batch(tokenizer: Tokenizer, indices, max_tokens: int) -> tuple[rl.Batch, float]:
    """Rendered conversations with advantage 1 per row (the RL loss becomes the SFT loss), and
    their mean length in tokens."""
    seqs, masks = [], []
    for i in indices:
        ids, mask = tokenizer.render_conversation(train_task[int(i)], max_tokens=max_tokens)
        seqs.append(ids)
        masks.append(mask)
    batch = rl.build_batch(seqs, masks, np.ones(len(seqs), np.float32), tokenizer.specials.assistant_end)
    return batch, float(np.mean([len(s) for s in seqs]))


def sft_step(config: GPTConfig):
    """The RL train step compiled for demonstrations: advantage 1, one token normalisation over the batch."""
    rows, dbs, n_dev = args.warmstart_batch_size, cfg.device_batch_size, sharding.row_shards(mesh)
    if rows % (dbs * n_dev):
        raise SystemExit(f"error: --warmstart_batch_size ({rows}) must be a multiple of device_batch_size ({dbs}) x "
                         f"{n_dev} devices; pass --warmstart_batch_size {max(1, rows // (dbs * n_dev)) * dbs * n_dev}")
    optimizer = optim.build_optimizer(config, num_steps=WARMSTART_LR_STEPS, init_lr_frac=1.0, **WARMSTART_LRS)
    spec = rl.LossSpec(device_batch_size=dbs, num_passes=1, examples_per_step=rows // dbs, token_norm="global")
    return rl.compiled_train_step(config, spec, optimizer, mesh), optimizer


def warm_start(config: GPTConfig, params, tokenizer: Tokenizer, writer: MetricsWriter):
    """Supervised steps until the eval's pass@1 estimate reaches --warmstart_pass1_min.

    The estimate is `unbiased_pass@1` (the mean accuracy of all the eval's samples): the first
    sample's pass@1 alone is too noisy to stop on. Returns (params, summary dict).
    """
    train_step, optimizer = sft_step(config)
    opt_state = jax.jit(optimizer.init, out_shardings=sharding.replicated(mesh))(params)
    tool = sampler.tool_for(tokenizer, cfg.max_new_tokens + 2, config.generation)
    n = cfg.eval_num_samples or cfg.device_batch_size
    eval_args = rollout.SamplingArgs(n, cfg.max_new_tokens, 1.0, cfg.top_k, cfg.eval_seed)
    rows, steps = args.warmstart_batch_size, args.warmstart_steps
    bar = tqdm(range(steps), desc="warm start", dynamic_ncols=True)
    last, t0 = None, time.perf_counter()
    for step in bar:
        idx = (warm_start_row + step * rows + np.arange(rows)) % len(train_task)
        batch, seq_len = demonstration_batch(tokenizer, idx, config.sequence_len)
        t = time.perf_counter()
        packed = rl.global_batch(batch, mesh, pad_id=tokenizer.specials.assistant_end, chunk=cfg.device_batch_size)
        params, opt_state, m = train_step(params, opt_state, packed)
        m = jax.device_get(m)
        if m.skipped:
            raise FloatingPointError(f"warm-start step {step}: non-finite loss {m.loss} or grad norm {m.grad_norm}; "
                                     "lower WARMSTART_LRS in scripts/demo.py")
        row = {"step": step, "event": "step", "phase": "warmstart", "loss": float(m.loss), "seq_len": seq_len,
               "grad_norm": float(m.grad_norm), "tokens": int(m.tokens), "train_s": time.perf_counter() - t,
               "lrm": optim.lr_multiplier(min(step, WARMSTART_LR_STEPS - 1), WARMSTART_LR_STEPS)}
        writer.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", pass1=f"{last['unbiased_pass@1']:.3f}" if last else "-")
        done = step + 1
        if (done % args.warmstart_eval_every == 0 and row["loss"] < EVAL_BELOW_LOSS) or done == steps:
            last = rollout.eval_row(config, params, tokenizer, test_task, num_examples=cfg.eval_examples,
                                    args=eval_args, tool=tool, mesh=mesh, step=done, phase="warmstart",
                                    shared_keys=cfg.eval_shared_keys)
            writer.log(last)
            passes = ", ".join(f"Pass@{k}: {last[f'pass@{k}']:.4f}" for k in range(1, n + 1))
            print0(f"\nwarm start step {done} | loss {row['loss']:.4f} | pass@1 estimate "
                   f"{last['unbiased_pass@1']:.4f} | {passes}")
            if last["unbiased_pass@1"] >= args.warmstart_pass1_min:
                break
    bar.close()
    return params, summary(done, time.perf_counter() - t0, last)


def summary(steps: int, seconds: float, last: dict) -> dict:
    p1, band = last["unbiased_pass@1"], [args.warmstart_pass1_min, args.warmstart_pass1_max]
    if p1 < band[0]:
        print0(f"warm start: pass@1 {p1:.3f} is below the band {band} after the cap of {steps} steps "
               "(raise --warmstart_steps); going on to RL")
    elif p1 > band[1]:
        print0(f"warm start: pass@1 {p1:.3f} overshot the band {band} (lower --warmstart_eval_every); going on to RL")
    print0(f"warm start: {steps} steps in {seconds:.1f}s, pass@1 {p1:.3f} (first sample: {last['pass@1']:.3f})")
    return {"steps": steps, "seconds": round(seconds, 1), "pass@1": p1, "band": band}


if run_state.is_jaxrl_import(policy_dir):
    print0(f"demo: resuming; the warm start is done, its policy is {policy_dir}")
else:
    if ws_dir.exists():  # an unfinished warm start: its log goes, it starts again
        shutil.rmtree(ws_dir)
        print0(f"demo: the warm start in {ws_dir} did not finish; starting it again")
    with tempfile.TemporaryDirectory() as tok_dir:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(train_task, Path(tok_dir))
        print0(f"demo: trained a {tokenizer.get_vocab_size()}-token BPE in {time.perf_counter() - t0:.1f}s")
        model_config = demo_model_config(tokenizer.get_vocab_size())
        params = jax.device_put(init_params(model_config, jax.random.key(cfg.seed)), sharding.replicated(mesh))
        n_params = sum(int(np.prod(shape)) for _, shape, _ in param_table(model_config))
        print0(f"demo: {model_config.generation} model, {model_config.n_layer} layers, n_embd {model_config.n_embd}, "
               f"{n_params:,} params")
        writer = MetricsWriter(ws_dir)
        params, ws_summary = warm_start(model_config, params, tokenizer, writer)
        writer.close()
        info = {"generation": model_config.generation, "generation_reason": "trained by scripts/demo.py",
                "source": {"kind": "demo", "dtypes": {k: "float32" for k, _, _ in param_table(model_config)}},
                "warmstart": ws_summary}
        run_state.save_jaxrl_import(policy_dir, model_config, jax.device_get(params), info, tokenizer_dir=tok_dir)
    print0(f"demo: warm-started policy written to {policy_dir}")

# ------------------------------------------------------------------------------------------
# RL: the ordinary job on the import dir, into the same run directory

claim.training_started = True  # keep the run dir: it holds the warm start
claim.release()
cmd = [sys.executable, str(SCRIPTS / "train_rl.py"), "--config", args.config, f"--checkpoint={policy_dir}", *rl_args]
print0(f"demo: {shlex.join(cmd)}")
job = subprocess.Popen(cmd)
signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the job too: it saves, exits 5, and so do we
signal.signal(signal.SIGTERM, lambda signum, frame: job.send_signal(signum))
status = job.wait()
if status:
    raise SystemExit(status if status > 0 else 128 - status)

# ------------------------------------------------------------------------------------------
# Report: the warm start's rows in front of the RL rows, report.png with both phases

rows = read_metrics(ws_dir) + [r for r in read_metrics(run_dir) if r.get("phase") != "warmstart"]
write_metrics(run_dir, rows)
print0(f"report: {plot_run(run_dir)}")
print0(f"demo done: {run_dir.resolve()} (tensorboard --logdir {run_dir} shows both phases)")
