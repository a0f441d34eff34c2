"""Which nanochat generation wrote a state dict, from its key names and shapes (docs/nanochat.md#generation-detection).

Keys identify the *family*; softcap (15 vs 20) and the rope base are not stored, so every
reason string says what the detection assumes. See docs/checkpoints.md for the rules.

Test: `pytest tests/test_convert.py -k detect`.
"""
from __future__ import annotations

from jaxrl.config import GENERATIONS
from jaxrl.run_state import CheckpointError

# Appended to each reason: what the keys cannot tell apart.
CAVEATS = {
    "gen-2025-10": "nanochat commits 3a5e0bc..aa530cd^ share these keys; jaxrl runs 3a5e0bc's forward "
                   "(softcap 15 in the compute dtype, rope base 10000)",
    "gen-2026-01": "softcap and rope base are not stored in checkpoints; jaxrl assumes softcap 15 and rope "
                   "base 10000 (nanochat e85db6b..ad55575); a checkpoint from the softcap-20 variant "
                   "aba30cb..1076f97 has the same keys and no --generation value reproduces it",
    "gen-2026-07": "softcap and rope base are not stored in checkpoints; jaxrl assumes softcap 15, rope base "
                   "100000, q/k x1.2 (nanochat a825e63 and later)",
}


def check_generation_name(generation: str) -> str:
    if generation not in GENERATIONS:
        raise ValueError(f"unknown generation {generation!r}; expected one of {', '.join(GENERATIONS)}")
    return generation


def detect_generation(shapes: dict[str, tuple[int, ...]], where: str) -> tuple[str, str]:
    """(generation, human-readable reason) from {key: shape}; raise for unsupported variants."""
    keys = set(shapes)
    engram = sorted(k for k in keys if k.startswith("bigram"))
    if engram:
        raise CheckpointError(f"{where}: keys {engram[:3]} come from nanochat's reverted 'engram' experiment "
                              f"(59e36cc, c8d93be); no jaxrl generation loads it")
    gate_widths = sorted({shapes[k][-1] for k in keys if k.endswith(".attn.ve_gate.weight")})
    has_ve = bool(gate_widths) or any(k.startswith("value_embeds.") for k in keys)
    has_lambdas = "resid_lambdas" in keys or "x0_lambdas" in keys
    has_smear = "smear_lambda" in keys
    if not has_ve:
        if has_lambdas or has_smear:
            raise CheckpointError(f"{where}: has resid/x0 lambdas{' and smear' if has_smear else ''} but no value "
                                  f"embeddings: an intermediate nanochat (aa530cd..e85db6b^) that no jaxrl "
                                  f"generation matches")
        return _found("gen-2025-10", "no value_embeds/ve_gate and no resid_lambdas/x0_lambdas")
    if len(gate_widths) != 1:
        raise CheckpointError(f"{where}: value embeddings present but ve_gate widths are {gate_widths}; "
                              f"expected one width, 32 (gen-2026-01) or 12 (gen-2026-07)")
    width = gate_widths[0]
    if width == 32 and not has_smear:
        return _found("gen-2026-01", "ve_gate width 32, no smear_lambda")
    if width == 12 and has_smear:
        return _found("gen-2026-07", "smear_lambda present, ve_gate width 12")
    if width == 12:
        raise CheckpointError(f"{where}: ve_gate width 12 without smear_lambda is nanochat's 'gen-2026-03' variant "
                              f"(6ed7d1d..a825e63^: q,k x1.15, window seq/3); jaxrl does not support it")
    raise CheckpointError(f"{where}: ve_gate width {width}{' with' if has_smear else ' without'} smear_lambda "
                          f"matches no nanochat generation (expected 32 without smear, or 12 with smear)")


def _found(generation: str, evidence: str) -> tuple[str, str]:
    return generation, f"detected {generation} from keys: {evidence}; {CAVEATS[generation]}"


def reconcile(detected: str, reason: str, requested: str | None, where: str) -> str:
    """Final reason string; raise if an explicitly requested generation contradicts the keys."""
    if requested is None:
        return reason
    check_generation_name(requested)
    if requested != detected:
        evidence = reason.split("from keys: ", 1)[1].split(";", 1)[0]
        raise CheckpointError(f"{where}: generation {requested!r} was requested but the checkpoint's keys say "
                              f"{detected} ({evidence}); nanochat cannot load one generation's checkpoint "
                              f"in another's code")
    return reason + f" (matches the requested generation {requested})"
