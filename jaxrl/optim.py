"""nanochat's RL optimizer: parameter groups, per-group AdamW / Muon, and chat_rl's lr schedule.

Owns the param-path → group labels (with a coverage check), the AdamW transform, the lr tables and
`build_optimizer`, an `optax.multi_transform` (alias of `optax.partition`) over the labels. The
Muon math lives in `jaxrl/muon.py`. Test: `python -m pytest -q tests/test_optim.py`.

Groups (docs/nanochat.md#optimizer-groups), labelled from parameter paths only:
  gen-2025-10  unembedding (lm_head), embedding (wte): AdamW; matrix (every transformer.h weight): Muon.
  gen-2026-01  + value_embeds, resid (resid_lambdas), x0 (x0_lambdas): AdamW; Muon groups per
               shape, `matrix_<rows>x<cols>` (incl. the ve_gate matrices).
  gen-2026-07  + smear (smear_gate, smear_lambda, backout_lambda): AdamW; per-group betas and a
               hard-coded AdamW weight decay that chat_rl's `weight_decay` does not reach.
lr of a group at update k (0-based) = setup lr × init_lr_frac × (1 − k/num_steps), where the setup
lr carries dscale = (n_embd/768)^-0.5 for unembedding/embedding/value_embeds; Muon multiplies by
sqrt(max(1, rows/cols)) per matrix. All scalars are computed on the host in float64 (torch's
fused AdamW) or float32 (nanochat's compiled kernels) exactly as nanochat does, one table entry
per step; updates after the num_steps-th reuse the last entry.

AdamW computes in fp32 and stores m, v in the PARAMETER dtype (bf16 embeddings keep bf16 state,
rounded on store, as on a GPU). Updates are nanochat's fp32 increment (not new − old), so
`new = optax.apply_updates(params, updates)` reproduces nanochat's own double rounding: for a bf16
leaf, bf16 + fp32 promotes to fp32 and is cast back, exactly as nanochat adds in fp32 and writes
back to bf16 (bit-exact on the gen-2025-10 and gen-2026-07 bf16 goldens). Remaining differences
are fp32 last bits (gen-2026-07's compiled kernel fuses some multiply-adds; weight decay is folded
into the update). Gradients may be fp32; an AdamW leaf reads them in its parameter dtype, as torch
keeps a bf16 parameter's grad in bf16.

Differences from optax's muon (docs/nanochat.md#optax-muon-differences): only transformer.h matrices use Muon (wte,
lm_head, value_embeds get per-group AdamW, not one shared NAdam-style fallback); momentum is an EMA
without bias correction, Nesterov `lerp(g, buf, 0.95)`; per-generation orthogonalisation
(coefficients, 1.02/1.01 safety factor, MuonEq, Muon+, bf16 iteration); NorMuon variance
reduction; cautious weight decay on the shape-scaled lr; shape scale from the torch (out, in) layout.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxrl.model import GPTConfig, param_table, unflatten_params
from jaxrl.muon import muon

f32 = jnp.float32
ADAM_EPS = 1e-10
SCALAR_LR = 0.5  # nanochat setup_optimizer's scalar_lr (resid ×0.01, x0 ×1); not a chat_rl flag


@dataclasses.dataclass(frozen=True)
class Group:
    """One nanochat param group: kind, setup lr (before init_lr_frac), betas, weight decay."""

    kind: str  # "adamw" | "muon"
    lr: float
    betas: tuple[float, float] = (0.8, 0.95)  # Muon: unused (momentum 0.95, β2 per generation)
    weight_decay: float = 0.0


# ------------------------------------------------------------------------------------------
# Labels


def _rules(config: GPTConfig) -> list[tuple[str, Any]]:
    """(group, path predicate) pairs of this generation; Muon groups are named later per shape."""
    rules = [
        ("unembedding", lambda p: p == "lm_head.weight"),
        ("embedding", lambda p: p == "transformer.wte.weight"),
        ("matrix", lambda p: p.startswith("transformer.h.")),
    ]
    if config.generation != "gen-2025-10":
        rules += [
            ("value_embeds", lambda p: re.fullmatch(r"value_embeds(\.\d+)?\.weight", p) is not None),
            ("resid", lambda p: p == "resid_lambdas"),
            ("x0", lambda p: p == "x0_lambdas"),
        ]
    if config.generation == "gen-2026-07":
        rules.append(("smear", lambda p: p in ("smear_gate.weight", "smear_lambda", "backout_lambda")))
    return rules


def param_labels(config: GPTConfig, params) -> dict:
    """Nested dict of group names with the structure of `params`, from the paths (and, for the
    per-shape Muon groups of gen-2026-*, the matrix shape). Raises ValueError naming every path
    in no group or in several."""
    rules = _rules(config)
    bad = []

    def label(path, leaf):
        name = ".".join(str(getattr(k, "key", k)) for k in path)
        groups = [g for g, match in rules if match(name)]
        if len(groups) != 1:
            bad.append(f"{name} -> {groups or 'no group'}")
            return None
        if groups[0] == "matrix":
            if len(np.shape(leaf)) < 2:
                bad.append(f"{name} -> matrix, but shape {np.shape(leaf)} is not a matrix")
            elif config.generation != "gen-2025-10":
                return "matrix_{}x{}".format(*np.shape(leaf)[-2:])
        return groups[0]

    labels = jax.tree_util.tree_map_with_path(label, params)
    if bad:
        raise ValueError(f"{config.generation}: every parameter must be in exactly one optimizer "
                         "group; fix the param tree or the generation:\n  " + "\n  ".join(bad))
    return labels


def _config_labels(config: GPTConfig) -> list[str]:
    """The groups of a nanochat model of this config (nanochat's order; Muon shapes sorted)."""
    abstract = unflatten_params({k: jax.ShapeDtypeStruct(s, f32) for k, s, _ in param_table(config)})
    found = set(jax.tree.leaves(param_labels(config, abstract)))
    return [g for g, _ in _rules(config) if g in found] + sorted(
        (g for g in found if g.startswith("matrix_")), key=lambda g: tuple(map(int, g[7:].split("x"))))


def group_specs(config: GPTConfig, *, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02,
                weight_decay=0.0) -> dict[str, Group]:
    """Every group of `config` with nanochat's setup hyperparameters (docs/nanochat.md#optimizer-groups)."""
    dscale = (config.n_embd / 768) ** -0.5
    gen = config.generation
    if gen == "gen-2025-10":
        adam = {"unembedding": Group("adamw", unembedding_lr * dscale, weight_decay=weight_decay),
                "embedding": Group("adamw", embedding_lr * dscale, weight_decay=weight_decay)}
    elif gen == "gen-2026-01":  # AdamW weight decay hard-coded to 0; chat_rl's reaches Muon only
        adam = {"unembedding": Group("adamw", unembedding_lr * dscale),
                "embedding": Group("adamw", embedding_lr * dscale),
                "value_embeds": Group("adamw", embedding_lr * dscale),
                "resid": Group("adamw", SCALAR_LR * 0.01),
                "x0": Group("adamw", SCALAR_LR, betas=(0.96, 0.95))}
    else:  # gen-2026-07: per-group betas and hard-coded weight decay (docs/nanochat.md#optimizer-groups)
        adam = {"unembedding": Group("adamw", unembedding_lr * dscale, (0.8, 0.96), 0.01),
                "embedding": Group("adamw", embedding_lr * dscale, (0.8, 0.995), 0.001),
                "value_embeds": Group("adamw", embedding_lr * dscale * 0.5, (0.8, 0.995), 0.01),
                "resid": Group("adamw", SCALAR_LR * 0.01, (0.8, 0.95), 0.05),
                "x0": Group("adamw", SCALAR_LR, (0.96, 0.95), 0.0),
                "smear": Group("adamw", 0.2, (0.8, 0.95), 0.0)}
    matrix = Group("muon", matrix_lr, weight_decay=0.0 if gen == "gen-2025-10" else weight_decay)
    return {g: adam.get(g, matrix) for g in _config_labels(config)}


# ------------------------------------------------------------------------------------------
# Schedule


def lr_multiplier(step: int, num_steps: int) -> float:
    """chat_rl's linear ramp-down: 1.0 at step 0, 1/num_steps at the last step (never 0)."""
    return 1.0 - step / num_steps


def _lr_schedule(setup_lr: float, init_lr_frac: float, num_steps: int) -> np.ndarray:
    """float64 lr of each update k < num_steps, multiplied in nanochat's order."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    initial = setup_lr * init_lr_frac
    return np.array([initial * lr_multiplier(k, num_steps) for k in range(num_steps)], np.float64)


def group_lrs(config: GPTConfig, step: int, *, num_steps: int, unembedding_lr=0.004, embedding_lr=0.2,
              matrix_lr=0.02, init_lr_frac=0.05) -> dict[str, float]:
    """{group: lr} used by update `step` (0-based), for logging `lr/<group>`. Muon groups report
    the group lr, before each matrix's sqrt(max(1, rows/cols)) (as nanochat's group["lr"])."""
    specs = group_specs(config, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr, matrix_lr=matrix_lr)
    return {g: spec.lr * init_lr_frac * lr_multiplier(step, num_steps) for g, spec in specs.items()}


def default_muon_dtype(config: GPTConfig) -> str:
    """bf16 orthogonalisation as nanochat on a GPU (gen-2025-10/2026-01 always cast to bf16);
    gen-2026-07 casts only when COMPUTE_DTYPE is bf16, i.e. follows `config.compute_dtype`."""
    return config.compute_dtype if config.generation == "gen-2026-07" else "bfloat16"


# ------------------------------------------------------------------------------------------
# AdamW


class AdamWState(NamedTuple):
    """`count` updates done (int32 scalar); mu, nu: first and second moments in the param dtype."""

    count: jax.Array
    mu: Any
    nu: Any


def _torch_adamw_scalars(lrs, b1, b2, wd) -> dict[str, np.ndarray]:
    """torch's fused AdamW (gen-2025-10/2026-01): scalars in float64, then fp32 in the kernel."""
    t = np.arange(1, len(lrs) + 1, dtype=np.float64)
    return {"decay": 1 - lrs * wd, "w1": np.full_like(lrs, 1 - b1), "b2": np.full_like(lrs, b2),
            "w2": np.full_like(lrs, 1 - b2), "neg_step": -(lrs / (1 - b1**t)),
            "bc2": np.sqrt(1 - b2**t)}


def _nanochat_adamw_scalars(lrs, b1, b2, wd) -> dict[str, np.ndarray]:
    """nanochat's compiled adamw_step_fused (gen-2026-07): 0-d fp32 tensors, fp32 arithmetic."""
    one = np.float32(1)
    lr, t = lrs.astype(np.float32), np.arange(1, len(lrs) + 1, dtype=np.float32)
    b1, b2 = np.float32(b1), np.float32(b2)
    return {"decay": one - lr * np.float32(wd), "w1": np.full_like(lr, one - b1),
            "w2": np.full_like(lr, one - b2), "neg_step": -(lr / (one - b1**t)), "bias2": one - b2**t}


def _torch_adamw_leaf(g, m, v, s):
    """torch fused AdamW in fp32 (opmath) registers. Returns (step without decay, m, v)."""
    m = m + s["w1"] * (g - m)
    v = v * s["b2"] + s["w2"] * g * g
    return (s["neg_step"] * m) / (jnp.sqrt(v) / s["bc2"] + np.float32(ADAM_EPS)), m, v


def _nanochat_adamw_leaf(g, m, v, s):
    """nanochat's lerp form: m, v lerped; sqrt(v / bias2) + eps. Returns (step, m, v)."""
    m = m + s["w1"] * (g - m)
    v = v + s["w2"] * (g * g - v)
    return s["neg_step"] * (m / (jnp.sqrt(v / s["bias2"]) + np.float32(ADAM_EPS))), m, v


def adamw(lrs, *, betas: tuple[float, float], weight_decay: float,
          generation: str) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay `p *= 1 - lr·wd` on the scheduled lr and bias correction;
    eps 1e-10 outside the sqrt. `lrs[k]` is the lr of the k-th update (float64 table)."""
    lrs = np.asarray(lrs, np.float64)
    torch_kernel = generation != "gen-2026-07"
    build = _torch_adamw_scalars if torch_kernel else _nanochat_adamw_scalars
    leaf = _torch_adamw_leaf if torch_kernel else _nanochat_adamw_leaf
    tables = {k: np.asarray(v, np.float32) for k, v in build(lrs, *betas, weight_decay).items()}

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, p.dtype)
        return AdamWState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def one(g, p, m, v, s):
        g = g.astype(p.dtype).astype(f32)  # torch keeps a bf16 param's grad in bf16
        step, m32, v32 = leaf(g, m.astype(f32), v.astype(f32), s)
        if weight_decay:  # exact p·decay − p (Sterbenz), so p + update ≈ nanochat's (p·decay) + step
            pf = p.astype(f32)
            step = (pf * s["decay"] - pf) + step
        return step, m32.astype(m.dtype), v32.astype(v.dtype)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("AdamW needs params (weight decay, dtypes); call update(grads, state, params)")
        idx = jnp.minimum(state.count, len(lrs) - 1)
        s = {k: jnp.asarray(v)[idx] for k, v in tables.items()}
        g_leaves, treedef = jax.tree.flatten(grads)
        leaves = zip(g_leaves, *(treedef.flatten_up_to(t) for t in (params, state.mu, state.nu)))
        out = [one(*leaf_args, s) for leaf_args in leaves]
        updates, mu, nu = (treedef.unflatten([o[i] for o in out]) for i in range(3))
        return updates, AdamWState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------
# The optimizer


def build_optimizer(config: GPTConfig, *, num_steps: int, unembedding_lr=0.004, embedding_lr=0.2,
                    matrix_lr=0.02, weight_decay=0.0, init_lr_frac=0.05,
                    muon_dtype: str | None = None) -> optax.GradientTransformation:
    """nanochat chat_rl's optimizer for `config.generation` as one optax transformation.

    Apply with `optax.apply_updates(params, updates)` (exact, see the module docstring); the
    k-th update uses lr = setup lr × init_lr_frac × (1 − k/num_steps). `muon_dtype` is the
    orthogonalisation dtype, "bfloat16" or "float32"; None = `default_muon_dtype(config)`.
    `weight_decay` is chat_rl's: AdamW's in gen-2025-10, Muon's (cautious) later.
    """
    muon_dtype = default_muon_dtype(config) if muon_dtype is None else muon_dtype
    specs = group_specs(config, unembedding_lr=unembedding_lr, embedding_lr=embedding_lr,
                        matrix_lr=matrix_lr, weight_decay=weight_decay)
    transforms = {}
    for name, spec in specs.items():
        lrs = _lr_schedule(spec.lr, init_lr_frac, num_steps)
        if spec.kind == "muon":
            transforms[name] = muon(lrs, generation=config.generation, dtype=muon_dtype,
                                    weight_decay=spec.weight_decay)
        else:
            transforms[name] = adamw(lrs, betas=spec.betas, weight_decay=spec.weight_decay,
                                     generation=config.generation)

    def labels(tree):
        found = param_labels(config, tree)
        unknown = sorted(set(jax.tree.leaves(found)) - set(transforms))
        if unknown:
            raise ValueError(f"groups {unknown} are not groups of this config ({sorted(transforms)}); "
                             "the params do not match the GPTConfig the optimizer was built for")
        return found

    return optax.multi_transform(transforms, labels)
