"""Host orchestration of one RL round: questions → prompts → sampler → rewards → padded batch.

The sampler never sees strings; this module is where token ids, conversations, the task's reward
and the sampler meet. It also holds pass@k evaluation, which is the same round without training.

Test: `pytest tests/test_rl.py tests/test_eval.py`.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np

from jaxrl import distributed, rl, sampler
from jaxrl.tokenizer import SpecialIds


@dataclasses.dataclass
class RoundResult:
    """All rows of one round, question-major (row = question * num_samples + sample)."""

    sequences: list[list[int]]  # prompt + kept tokens
    masks: list[list[int]]
    rewards: np.ndarray  # (R,) f32
    correct: np.ndarray  # (Q, N) bool
    prompt_lens: list[int]  # per question
    sampler_logp: list[np.ndarray]  # per row, one value per generated token
    ended: np.ndarray  # (R,) bool: the row emitted <|assistant_end|>/<|bos|> before max_new_tokens
    gen_tokens: int
    seconds: float
    row_steps: int = 0  # decode steps x rows decoded in each, over every sampler call of the round

    def slot_utilization(self) -> float:
        """Kept tokens / decoded row-steps of the round over every process (a collective: every
        process calls it)."""
        return distributed.sum_scalar(self.gen_tokens) / max(distributed.sum_scalar(self.row_steps), 1)


@dataclasses.dataclass(frozen=True)
class SamplingArgs:
    num_samples: int
    max_new_tokens: int
    temperature: float
    top_k: int
    seed: int


def run_round(config, params, *, tokenizer, task, indices, args: SamplingArgs, tool, step: int, mesh=None,
              chunk: int | None = None, same_keys_per_question: bool = False, slots: int | None = None) -> RoundResult:
    """Sample `args.num_samples` completions for each of `task`'s questions `indices` and score them
    with the task's reward.

    `chunk` limits how many questions go into one sampler call (evaluation over hundreds of
    questions); training passes all questions of a step at once. `same_keys_per_question` gives
    every question the same sampling keys, as nanochat's pass@k seeds its generator with 42 for
    every question (docs/nanochat.md#evaluation); training keys always differ per question.
    `slots`: the sampler's slots per device (None: its default for the device kind).
    """
    t0 = time.perf_counter()
    specials = SpecialIds.from_tokenizer(tokenizer)
    conversations = [task[int(i)] for i in indices]
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    chunk = chunk or len(prompts)
    N = args.num_samples
    seqs, masks, logps, ended, gen_tokens, row_steps = [], [], [], [], 0, 0
    for a in range(0, len(prompts), chunk):
        part, stats = prompts[a: a + chunk], {}
        ro, _ = sampler.sample(config, params, part, num_samples=N, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed, tool=tool,
                               specials=specials, step=step,
                               example_ids=[0 if same_keys_per_question else int(i) for i in indices[a: a + chunk]],
                               mesh=mesh, slots=slots, stats=stats)
        row_steps += stats["row_steps"]
        s, m = sampler.assemble(part, ro, N)
        for q in range(len(part)):
            seqs += s[q]
            masks += m[q]
        for r in range(len(part) * N):
            n = int(ro.length[r])
            logps.append(ro.logp[r, :n])
            ended.append(n < args.max_new_tokens)  # every column holds a kept token until the terminal one
        gen_tokens += int(ro.length.sum())
    rewards = np.zeros(len(seqs), np.float32)
    for r, seq in enumerate(seqs):
        q = r // N
        rewards[r] = task.reward(conversations[q], tokenizer.decode(seq[len(prompts[q]):]))
    return RoundResult(seqs, masks, rewards, (rewards > 0).reshape(-1, N), [len(p) for p in prompts], logps,
                       np.asarray(ended, bool), gen_tokens, time.perf_counter() - t0, row_steps)


def check_prompt_lengths(config, tokenizer, task, num_questions: int, max_new_tokens: int, what: str) -> None:
    """Refuse, before anything is sampled, a max_new_tokens or a prompt among the first `num_questions`
    of `task` that would not fit the model's context (prompts are never truncated). Raises ValueError."""
    context = sampler.context_positions(config)  # the limit sampler.check_request enforces
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} positions (10 x sequence_len {config.sequence_len}): lower max_new_tokens")
    lengths = np.array([len(tokenizer.render_for_completion(task[i])) for i in range(num_questions)])
    too_long = np.flatnonzero(lengths + max_new_tokens > context)
    if too_long.size:
        i = int(too_long[np.argmax(lengths[too_long])])
        room = context - int(lengths[i])  # what the longest prompt leaves for the completion
        fix = f"Lower max_new_tokens to {room} or remove" if room >= 1 else "That prompt alone fills the context: remove"
        raise ValueError(f"{too_long.size} of {num_questions} {what} questions do not fit the model's context of "
                         f"{context} positions with max_new_tokens {max_new_tokens}: the longest, question {i}, has "
                         f"a {lengths[i]}-token prompt. {fix} those rows (questions {too_long[:5].tolist()}"
                         f"{' ...' if too_long.size > 5 else ''})")


def make_batch(result: RoundResult, num_samples: int, pad_id: int, *, advantage: str = "mean",
               train_on_end_token: bool = False, end_id: int | None = None) -> rl.Batch:
    adv = rl.advantages(result.rewards, num_samples, advantage)
    return rl.build_batch(result.sequences, result.masks, adv, pad_id, sampler_logp=result.sampler_logp,
                          end_rows=result.ended if train_on_end_token else None, end_id=end_id)


# ------------------------------------------------------------------------------------------
# pass@k


EVAL_ROWS = 4096  # (question, sample) rows per sampler call of an evaluation; the slots refill within a call


def eval_row(config, params, tokenizer, task, *, num_examples: int, args: SamplingArgs, tool, mesh, step: int,
             phase: str, shared_keys: bool, slots: int | None = None) -> dict:
    """One eval metrics row: nanochat's pass@k (first k) plus unbiased pass@k with 95% bounds on the
    first `num_examples` questions of `task`, each process sampling its share on `mesh` (its own
    devices) and every process getting the whole row."""
    n = min(num_examples, len(task))
    res = run_round(config, params, tokenizer=tokenizer, task=task, indices=distributed.process_share(np.arange(n)),
                    args=args, tool=tool, step=0, mesh=mesh, chunk=max(1, EVAL_ROWS // args.num_samples),
                    same_keys_per_question=shared_keys, slots=slots)
    correct = distributed.gather_rows(res.correct)
    row = {"step": step, "event": "eval", "phase": phase, "eval_examples": int(correct.shape[0]),
           "slot_utilization": res.slot_utilization()}
    row.update(pass_at_k_row(correct))
    return row


def pass_at_k_first(correct: np.ndarray) -> dict[str, float]:
    """nanochat's estimator: fraction of questions with a correct answer among the FIRST k samples."""
    correct = np.asarray(correct, bool)
    n = correct.shape[1]
    return {f"pass@{k}": float(np.mean(correct[:, :k].any(axis=1))) for k in range(1, n + 1)}


def pass_at_k_unbiased(correct: np.ndarray) -> dict[str, tuple[float, float, float]]:
    """Chen et al. (2021) unbiased pass@k = 1 − C(n−c, k)/C(n, k) per question, averaged,
    with a normal-approximation 95% interval over questions: {k: (mean, low, high)}."""
    correct = np.asarray(correct, bool)
    Q, n = correct.shape
    c = correct.sum(axis=1)
    out = {}
    for k in range(1, n + 1):
        per_q = np.array([1.0 - _comb_ratio(n - ci, n, k) for ci in c])
        mean = float(per_q.mean())
        half = 1.96 * float(per_q.std(ddof=1)) / np.sqrt(Q) if Q > 1 else 0.0
        out[f"pass@{k}"] = (mean, max(0.0, mean - half), min(1.0, mean + half))
    return out


def pass_at_k_row(correct: np.ndarray) -> dict[str, float]:
    """The pass@k keys of an eval metrics row: `pass@k` (first k) and `unbiased_pass@k` with its
    `_lo`/`_hi` 95% bounds, for k = 1..n."""
    row = pass_at_k_first(correct)
    for k, (mean, lo, hi) in pass_at_k_unbiased(correct).items():
        row.update({f"unbiased_{k}": mean, f"unbiased_{k}_lo": lo, f"unbiased_{k}_hi": hi})
    return row


def _comb_ratio(a: int, n: int, k: int) -> float:
    """C(a, k) / C(n, k), computed as a product to stay finite."""
    if a < k:
        return 0.0
    return float(np.prod([(a - i) / (n - i) for i in range(k)]))
