"""What `scripts/bench.py` runs on: the policy, tokenizer, task and calculator tool of one benchmark.

With `--checkpoint` they are real: the checkpoint (jaxrl.run_state.load_policy), its tokenizer, a
GSM8K-format task from `--data-dir` (default ../shared/data/arith) and the calculator. With
`--model d<N>` nothing needs a file: random params of nanochat's shapes, and tokenizer-free
stand-ins: a synthetic tokenizer whose nine specials are the last nine vocab ids (nanochat's
order), a task of random prompts with a random 0/1 reward, and a scripted tool that forces
`<|output_start|> 0 <|output_end|>` whenever a row closes a python block (random params almost
never open one, so it measures only the in-loop cost of the tool branch).

Test: `pytest tests/test_bench.py`.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import device as bench_device
from jaxrl import run_state, sampler, sharding, tasks
from jaxrl.calculator import use_calculator
from jaxrl.model import attention_impl, init_params
from jaxrl.tokenizer import SPECIAL_TOKENS, SpecialIds

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("JAXRL_SHARED", REPO.parent / "shared"))


@dataclasses.dataclass
class Context:
    model: str  # "d20" or the checkpoint path
    config: object  # GPTConfig with the benchmark's compute dtype
    params: dict  # on device, replicated over the mesh
    tokenizer: object  # jaxrl Tokenizer or SyntheticTokenizer
    task: object  # GSM8K-format task or SyntheticTask
    tool_kind: str  # "calculator" | "scripted"
    mesh: object


class SyntheticTokenizer:
    """Just enough of jaxrl.tokenizer.Tokenizer for the sampler and rollout: ids in, ids out."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._specials = {t: vocab_size - len(SPECIAL_TOKENS) + i for i, t in enumerate(SPECIAL_TOKENS)}

    def encode_special(self, text: str) -> int:
        return self._specials[text]

    def get_vocab_size(self) -> int:
        return self.vocab_size

    def render_for_completion(self, conversation: dict) -> list[int]:
        return list(conversation["prompt"])

    def decode(self, ids) -> str:
        return " ".join(str(int(i)) for i in ids)


class SyntheticTask:
    """Random prompts of `prompt_len` tokens (<|bos|> first, no specials); reward: a seeded coin flip."""

    def __init__(self, tokenizer: SyntheticTokenizer, prompt_len: int, seed: int, size: int = 100_000):
        self.tokenizer, self.prompt_len, self.seed, self.size = tokenizer, prompt_len, seed, size
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        ids = np.random.default_rng((self.seed, i)).integers(0, self.tokenizer.vocab_size - len(SPECIAL_TOKENS),
                                                              self.prompt_len - 1)
        return {"prompt": [self.tokenizer.encode_special("<|bos|>"), *ids.tolist()]}

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.rng.random() < 0.5)


class ScriptedTool:
    """Stands in for the calculator bridge when there is no tokenizer: forces three fixed tokens."""

    def __init__(self, specials: SpecialIds, queue_len: int):
        self.queue_len = queue_len
        self.forced = [specials.output_start, 0, specials.output_end][:queue_len]

    def __call__(self, tokens, expr_start, n, need):
        need = np.asarray(need)
        queue = np.zeros((need.shape[0], self.queue_len), np.int32)
        queue[:, : len(self.forced)] = self.forced
        return queue, np.where(need, len(self.forced), 0).astype(np.int32)


class TimedTool:
    """Wraps a tool bridge: counts host callbacks and the seconds spent inside them."""

    def __init__(self, bridge):
        self.bridge, self.queue_len = bridge, bridge.queue_len
        self.callbacks, self.expressions, self.seconds = 0, 0, 0.0

    def __call__(self, tokens, expr_start, n, need):
        t0 = time.perf_counter()
        out = self.bridge(tokens, expr_start, n, need)
        self.seconds += time.perf_counter() - t0
        self.callbacks += 1
        self.expressions += int(np.asarray(need).sum())
        return out

    def reset(self):
        self.callbacks, self.expressions, self.seconds = 0, 0, 0.0


def make_tool(ctx: Context, queue_len: int) -> TimedTool:
    specials = SpecialIds.from_tokenizer(ctx.tokenizer)
    if ctx.tool_kind == "calculator":
        calc = functools.partial(use_calculator, generation=ctx.config.generation)
        return TimedTool(sampler.ToolBridge(ctx.tokenizer, calc, queue_len))
    return TimedTool(ScriptedTool(specials, queue_len))


def load_context(args) -> Context:
    """The policy of `--checkpoint` or random params of `--model`, in `--dtype`, replicated on the mesh."""
    mesh = sharding.make_mesh()
    if args.checkpoint:
        with run_state.exit_on_bad_input():  # a bad checkpoint: its message and exit 1
            config, params, tokenizer, _ = run_state.load_policy(args.checkpoint)
        config = config.replace(compute_dtype=args.dtype)
        data_dir = Path(args.data_dir) if args.data_dir else SHARED / "data" / "arith"
        if not (data_dir / "train.jsonl").is_file():
            raise SystemExit(f"no GSM8K-format train.jsonl in {data_dir}: pass --data-dir DIR "
                             "(e.g. ../shared/data/arith)")
        task = tasks.open_task(str(data_dir), str(data_dir), "train")
        model, tool_kind = str(args.checkpoint), "calculator"
    else:
        config = bench_device.nanochat_config(int(args.model[1:]), args.generation, args.dtype)
        params = random_params(config, args.seed)
        tokenizer = SyntheticTokenizer(config.vocab_size)
        task = SyntheticTask(tokenizer, args.prompt_len, args.seed)
        model, tool_kind = args.model, "scripted"
    config = config.replace(attention=attention_impl())  # einsum, or the JAXRL_ATTENTION override
    params = jax.device_put(params, sharding.replicated(mesh))
    return Context(model, config, params, tokenizer, task, tool_kind, mesh)


def random_params(config, seed: int):
    """jaxrl.model.init_params under jit: one compiled program instead of one dispatch per tensor."""
    return jax.jit(init_params, static_argnums=0)(config, jax.random.key(seed))
