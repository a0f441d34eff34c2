"""nanochat gen-2025-10 <-> transformers' NanoChatForCausalLM (model_type "nanochat"): config and weights.

Everything goes through nanochat-named numpy dicts ({"transformer.wte.weight": array, ...}), so
this module never depends on how jaxrl lays out its params; `nanochat_state` and
`params_from_nanochat` are the two seams to jaxrl.

What transformers 5.25's NanoChat computes (modeling_nanochat.py), against nanochat gen-2025-10:
- norms: weightless RMSNorm after the embedding, before attention and MLP, on q and k per head
  after the rotary, and before lm_head; eps is a config field, set to nanochat's float32 epsilon;
- rotary: base from rope_parameters (10000), rotate_half with nanochat's sign, i.e. the same
  rotation of the two halves of each head; GQA with query head h on kv head h // (H / K);
- MLP relu(x W1ᵀ)² W2ᵀ (hidden_act "relu2"), no biases, untied lm_head, softcap 15 on the logits;
- weights keep torch's (out, in) layout, so the mapping is a rename with no transposes;
- one difference it cannot express: gen-2025-10 rounds the rotary cos/sin tables to bfloat16,
  transformers keeps them in the model's dtype. In bfloat16 the two agree; in float32 logits
  differ by about 1e-2 (FP32_ROTARY_NOTE).
Later generations (value embeddings, resid/x0 lambdas, windows, smear, backout, ...) have no
counterpart in transformers' NanoChat and are refused by `check_exportable`.

Test: `pytest tests/test_hf.py`.
"""
from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxrl.run_state import CheckpointError
from jaxrl.model import RMS_EPS, SOFTCAP, GPTConfig, Params, flatten_params, unflatten_params

TRANSFORMERS_TESTED = "5.25.0"  # the transformers version this mapping was read from and tested with
ROPE_THETA = 10000.0  # gen-2025-10's rotary base
FP32_ROTARY_NOTE = ("transformers computes the rotary cos/sin tables in the model's dtype, while nanochat "
                    "gen-2025-10 rounds them to bfloat16: loaded in bfloat16 the tables agree; in float32 the "
                    "logits differ from nanochat's float32 forward by about 1e-2 (greedy choices agree unless two "
                    "logits are that close)")
# nanochat key pattern -> transformers key pattern ({i} = layer)
LAYER_NAMES = {
    "attn.c_q": "self_attn.q_proj",
    "attn.c_k": "self_attn.k_proj",
    "attn.c_v": "self_attn.v_proj",
    "attn.c_proj": "self_attn.o_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
TOP_NAMES = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
_NANOCHAT_LAYER = re.compile(r"transformer\.h\.(\d+)\.(attn\.c_[qkv]|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight")
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.fc[12])\.weight")


def nanochat_state(params: Params) -> dict[str, np.ndarray]:
    """jaxrl params -> {nanochat state-dict key: float32 array}."""
    return {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}


def params_from_nanochat(state: dict[str, np.ndarray]) -> Params:
    """{nanochat state-dict key: array} -> jaxrl params."""
    return unflatten_params(state)


def missing_features(config: GPTConfig) -> list[str]:
    """What transformers' NanoChat cannot compute for this model (empty for gen-2025-10)."""
    if config.generation == "gen-2025-10":
        return []
    features = ["value embeddings (value_embeds.*, attn.ve_gate)", "per-layer resid_lambdas / x0_lambdas"]
    if any(w is not None and w < config.sequence_len for w in config.window_sizes()):
        features.append(f"sliding-window attention (window_pattern {config.window_pattern!r})")
    if config.padded_vocab != config.vocab_size:
        features.append(f"vocab padding ({config.vocab_size} -> {config.padded_vocab} rows)")
    if config.has_smear:
        features += ["smear (smear_gate, smear_lambda)", "backout (backout_lambda)",
                     f"rotary base {config.rotary_base:g} (transformers' NanoChat is used with 10000)",
                     f"q/k scale {config.qk_scale}"]
    return features


def check_exportable(config: GPTConfig, where: str) -> None:
    """Raise unless transformers' NanoChatForCausalLM computes this model."""
    features = missing_features(config)
    if features:
        raise CheckpointError(
            f"{where} is a nanochat {config.generation} model; transformers' NanoChatForCausalLM (model_type "
            f"'nanochat', checked with transformers {TRANSFORMERS_TESTED}) implements gen-2025-10's architecture "
            f"and has no {'; no '.join(features)}. A folder it loads would compute a different model, so nothing "
            f"was written; export this model to nanochat instead (python -m convert.export_nanochat)")


def hf_config(config: GPTConfig, bos_id: int, eos_ids: list[int], pad_id: int) -> dict[str, Any]:
    """The NanoChatConfig fields of a gen-2025-10 model (config.json without transformers' bookkeeping)."""
    return {
        "architectures": ["NanoChatForCausalLM"],
        "model_type": "nanochat",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": 4 * config.n_embd,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "max_position_embeddings": config.sequence_len,
        "hidden_act": "relu2",
        "rms_norm_eps": RMS_EPS,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "final_logit_softcapping": SOFTCAP,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "pad_token_id": None,  # no padding_idx row in the embedding; generation_config.json pads
        "dtype": "float32",
    }


def config_from_hf(hf: dict[str, Any], where: str) -> tuple[GPTConfig, list[str]]:
    """GPTConfig (gen-2025-10) from a NanoChat config.json; raise for what jaxrl cannot compute."""
    if hf.get("model_type") != "nanochat":
        raise CheckpointError(f"{where}: model_type is {hf.get('model_type')!r}; only transformers' 'nanochat' "
                              f"models map to jaxrl")
    C, H = hf.get("hidden_size"), hf.get("num_attention_heads")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", ROPE_THETA)}
    checks = {
        "hidden_act": (hf.get("hidden_act", "relu2"), "relu2"),
        "intermediate_size": (hf.get("intermediate_size"), 4 * C if isinstance(C, int) else None),
        "final_logit_softcapping": (hf.get("final_logit_softcapping", SOFTCAP), SOFTCAP),
        "rope_parameters.rope_type": (rope.get("rope_type"), "default"),
        "rope_parameters.rope_theta": (float(rope.get("rope_theta", ROPE_THETA)), ROPE_THETA),
        "attention_bias": (hf.get("attention_bias", False), False),
    }
    if hf.get("head_dim") is not None and isinstance(C, int) and isinstance(H, int) and H:
        checks["head_dim"] = (hf["head_dim"], C // H)
    bad = {k: found for k, (found, want) in checks.items() if found != want}
    if bad:
        wanted = {k: checks[k][1] for k in bad}
        raise CheckpointError(f"{where}: {bad} cannot be computed by nanochat's gen-2025-10 GPT, which has {wanted}")
    notes = []
    eps = hf.get("rms_norm_eps", RMS_EPS)
    if eps != RMS_EPS:
        notes.append(f"{where}: rms_norm_eps {eps:g} read as nanochat's {RMS_EPS:g} (float32 epsilon), the eps "
                     f"nanochat trains with; logits move by far less than 1e-4")
    try:
        config = GPTConfig(sequence_len=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                           n_layer=hf["num_hidden_layers"], n_head=H, n_kv_head=hf.get("num_key_value_heads") or H,
                           n_embd=C, generation="gen-2025-10")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: cannot build nanochat's model_config from it: {e!r}") from e
    return config, notes


def to_hf_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """nanochat keys -> transformers keys (same arrays, (out, in) layout kept)."""
    out = {}
    for key, value in state.items():
        m = _NANOCHAT_LAYER.fullmatch(key)
        if m:
            out[f"model.layers.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.weight"] = value
        elif key in TOP_NAMES:
            out[TOP_NAMES[key]] = value
        else:
            raise CheckpointError(f"nanochat key {key!r} has no transformers NanoChat counterpart")
    return out


def from_hf_state(hf_state: dict[str, np.ndarray], tied: bool, where: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """transformers keys -> nanochat keys; a tied lm_head is filled from the embedding (noted)."""
    back = {v: k for k, v in LAYER_NAMES.items()}
    top = {v: k for k, v in TOP_NAMES.items()}
    state, notes = {}, []
    for key, value in hf_state.items():
        m = _HF_LAYER.fullmatch(key)
        if m:
            state[f"transformer.h.{m.group(1)}.{back[m.group(2)]}.weight"] = value
        elif key in top:
            state[top[key]] = value
        elif key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some exports carry; recomputed from rope_theta
        else:
            raise CheckpointError(f"{where}: tensor {key!r} is not part of transformers' NanoChat")
    if tied and "lm_head.weight" not in state and "transformer.wte.weight" in state:
        state["lm_head.weight"] = state["transformer.wte.weight"].copy()
        notes.append(f"{where}: tie_word_embeddings is true: lm_head starts as a copy of the embedding "
                     f"(nanochat's head is untied, so RL trains them apart)")
    return state, notes
