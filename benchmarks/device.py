"""What `scripts/bench.py` measures against: device ceilings, nanochat model shapes, FLOP and byte counts.

Owns the table of peak bf16 FLOP/s and memory bandwidth per device kind (overridden by
`--measure-ceilings`: one large matmul and one large copy), the nanochat d<N> shapes of each
generation, the FLOP count of a train step, the bytes one decode step reads, and the timing helper
(warm-up first, then `block_until_ready`, median of repeats). No jaxrl state; imported by the other benchmark modules.

Test: `pytest tests/test_bench.py`.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl.model import GPTConfig, param_table

# Dense (no sparsity) peak bf16 FLOP/s and HBM bytes/s from the vendors' data sheets, matched in
# order against the lowercased `jax.devices()[0].device_kind` (first match wins).
CEILINGS = (
    ("h200", "NVIDIA H200", 989e12, 4.8e12),
    ("h100 pcie", "NVIDIA H100 PCIe", 756e12, 2.0e12),
    ("h100 nvl", "NVIDIA H100 NVL", 835e12, 3.9e12),
    ("h100", "NVIDIA H100 SXM", 989e12, 3.35e12),
    ("a100-sxm4-40gb", "NVIDIA A100 40GB", 312e12, 1.555e12),
    ("a100 80gb pcie", "NVIDIA A100 80GB PCIe", 312e12, 1.935e12),
    ("a100", "NVIDIA A100 SXM 80GB", 312e12, 2.039e12),
    ("tpu v4", "TPU v4", 275e12, 1.228e12),
    ("tpu v5 lite", "TPU v5e", 197e12, 0.819e12),
    ("tpu v5e", "TPU v5e", 197e12, 0.819e12),
    ("tpu v5", "TPU v5p", 459e12, 2.765e12),
    ("tpu v6", "TPU v6e", 918e12, 1.64e12),
)
DEPTHS = (4, 12, 20, 32)
SEQUENCE_LEN = 2048  # nanochat's pretraining context
VOCAB = {"gen-2025-10": 65536, "gen-2026-01": 32768, "gen-2026-07": 32768}


def table_ceilings(device_kind: str) -> dict | None:
    kind = device_kind.lower()
    for pattern, name, flops, bw in CEILINGS:
        if pattern in kind:
            return {"flops_per_s": flops, "bytes_per_s": bw, "source": f"table: {name} data sheet (bf16 dense)"}
    return None


def measure_ceilings(dtype: str) -> dict:
    """Achieved FLOP/s of one large matmul and bytes/s (read + write) of one large elementwise copy."""
    platform = jax.devices()[0].platform
    n, copy_mb = (8192, 2048) if platform != "cpu" else (1024, 128)
    dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.key(0), (n, n), dt)
    b = jax.random.normal(jax.random.key(1), (n, n), dt)
    mm = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(mm(a, b))
    t_mm = min(median_time(lambda: mm(a, b), 5)[1])  # a ceiling: the best of the repeats
    # x+1 in place (donated): a fresh output would time page faults on a CPU, not bandwidth
    cp = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    buf = [jnp.zeros((copy_mb * 2**20 // 4,), jnp.float32)]

    def copy():
        buf[0] = cp(buf[0])
        return buf[0]

    jax.block_until_ready(copy())
    t_cp = min(median_time(copy, 5)[1])
    return {"flops_per_s": 2 * n**3 / t_mm, "bytes_per_s": 2 * buf[0].nbytes / t_cp,
            "source": f"measured: {n}^3 {dtype} matmul, {copy_mb} MiB float32 x+1 in place (read + write)"}


def ceilings(device_kind: str, dtype: str, measure: bool) -> dict:
    """The table's entry, or measured ceilings when asked or when the device kind is not in the table."""
    found = None if measure else table_ceilings(device_kind)
    return found or measure_ceilings(dtype)


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `fn()` (blocked until ready) over `repeats` calls; call once before to compile."""
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), times


# ------------------------------------------------------------------------------------------
# Shapes and counts


def nanochat_config(depth: int, generation: str, dtype: str) -> GPTConfig:
    """nanochat's d<depth> model: n_embd 64·depth, heads of 128 channels, MHA, context 2048.

    gen-2025-10: n_head = ceil(n_embd/128), vocab 65536. Later: n_embd rounded up to a multiple of
    128, n_head = n_embd/128, vocab 32768, windows "SSSL".
    """
    n_embd = 64 * depth
    if generation == "gen-2025-10":
        n_head = math.ceil(n_embd / 128)
    else:
        n_embd = 128 * math.ceil(n_embd / 128)
        n_head = n_embd // 128
    if n_embd % n_head:
        raise ValueError(f"d{depth} of {generation} has n_embd {n_embd} not divisible by n_head {n_head}; "
                         f"use one of {', '.join(f'd{d}' for d in DEPTHS)}")
    return GPTConfig(sequence_len=SEQUENCE_LEN, vocab_size=VOCAB[generation], n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, window_pattern="L" if generation == "gen-2025-10" else "SSSL",
                     generation=generation, compute_dtype=dtype)


def param_counts(config: GPTConfig) -> tuple[int, int]:
    """(all params, matmul params: transformer blocks + lm_head over the padded vocab)."""
    total = matmul = 0
    for name, shape, _ in param_table(config):
        n = math.prod(shape)
        total += n
        if name.startswith("transformer.h.") or name == "lm_head.weight":
            matmul += n
    return total, matmul


def shapes(config: GPTConfig) -> dict:
    total, matmul = param_counts(config)
    return {"generation": config.generation, "n_layer": config.n_layer, "n_embd": config.n_embd,
            "n_head": config.n_head, "n_kv_head": config.n_kv_head, "vocab_size": config.vocab_size,
            "sequence_len": config.sequence_len, "n_params": total, "n_matmul_params": matmul}


def train_flops_per_token(config: GPTConfig, seq_len: int) -> float:
    """6·N_matmul + 12·n_layer·n_embd·ctx, ctx = (T+1)/2: the mean context a causal row of T attends to."""
    _, n = param_counts(config)
    return 6 * n + 12 * config.n_layer * config.n_embd * (seq_len + 1) / 2


def decode_bytes_per_step(config: GPTConfig, prompts: int, rows: int, prompt_len: float, gen_ctx: float) -> float:
    """Bytes one decode step must read: weights in the compute dtype, the prompt keys/values once
    per prompt (shared by its samples), and `gen_ctx` generated keys/values of every row."""
    size = jnp.dtype(config.dtype).itemsize
    _, n = param_counts(config)
    per_position = config.n_layer * 2 * config.n_kv_head * config.head_dim * size
    return n * size + (prompts * prompt_len + rows * gen_ctx) * per_position
