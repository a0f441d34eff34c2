"""nanochat's tokenizer as a Hugging Face tokenizer folder, and back.

nanochat's tokenizer is a tiktoken byte-level BPE (`tokenizer.pkl`) with nanochat's split regex
and nine special tokens after the ordinary ranks. The Hugging Face form is `tokenizer.json`
(the `tokenizers` library: the same regex split, GPT-2's byte-to-unicode alphabet, BPE merges
with whole-piece lookups first as tiktoken does) plus `tokenizer_config.json` with the special
tokens and a chat template (in tokenizer_config.json) that renders nanochat conversations to the ids of jaxrl's
`render_conversation` / `render_for_completion` (user/assistant turns, an optional leading
system message merged into the first user turn, assistant parts of type text, python and
python_output). `{% generation %}` marks what nanochat trains on, so
`return_assistant_tokens_mask=True` gives render_conversation's mask.

Known differences, both outside what nanochat's chat data holds: special-token text typed inside a
message (say "<|bos|>") becomes that special token here while nanochat encodes it as plain text,
and two adjacent text parts are encoded as one string here but separately in nanochat.

Test: `pytest tests/test_hf.py -k tokenizer` (needs transformers).
"""
from __future__ import annotations

import functools
import json
import pickle
from pathlib import Path

import tiktoken

from jaxrl.run_state import CheckpointError
from jaxrl.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, load_encoding

ENCODING_NAME = "rustbpe"  # the name nanochat gives its Encoding
CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}"
    "{{- raise_exception('message ' ~ loop.index0 ~ ' is from ' ~ message['role'] ~ ' but should be from ' ~ "
    "['user', 'assistant'][loop.index0 % 2] ~ ' (nanochat alternates user and assistant turns)') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|user_start|>' + (system if loop.first else '') + message['content'] + '<|user_end|>' -}}"
    "{%- else -%}"
    "{{- '<|assistant_start|>' -}}"
    "{%- if message['content'] is string -%}{% generation %}{{- message['content'] -}}{% endgeneration %}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{% generation %}{{- part['text'] -}}{% endgeneration %}"
    "{%- elif part['type'] == 'python' -%}"
    "{% generation %}{{- '<|python_start|>' + part['text'] + '<|python_end|>' -}}{% endgeneration %}"
    "{%- elif part['type'] == 'python_output' -%}{{- '<|output_start|>' + part['text'] + '<|output_end|>' -}}"
    "{%- else -%}{{- raise_exception('unknown part type ' ~ part['type'] ~ '; expected text, python or "
    "python_output') -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{% generation %}{{- '<|assistant_end|>' -}}{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)


@functools.cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, the alphabet of byte-level BPE vocabularies."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_str(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def _check_layout(enc: tiktoken.Encoding) -> None:
    """Ranks 0..N-1 and the nine specials at N..N+8 in nanochat's order (how nanochat builds it)."""
    n = len(enc._mergeable_ranks)
    if sorted(enc._mergeable_ranks.values()) != list(range(n)):
        raise CheckpointError(f"tokenizer {enc.name!r}: its {n} BPE ranks are not 0..{n - 1}; nanochat's are")
    expected = {t: n + i for i, t in enumerate(SPECIAL_TOKENS)}
    if enc._special_tokens != expected:
        raise CheckpointError(f"tokenizer {enc.name!r}: special tokens {enc._special_tokens} are not nanochat's "
                              f"nine at ids {n}..{n + 8} in the order {list(SPECIAL_TOKENS)}")


def build_tokenizer_json(enc: tiktoken.Encoding):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly as `enc` (ordinary text and specials)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    _check_layout(enc)
    ranks = enc._mergeable_ranks
    vocab = {_to_str(tok): rank for tok, rank in ranks.items()}
    merges = []  # every split of every token into two tokens, ordered by the merged token's rank
    for tok, rank in ranks.items():
        pairs = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        pairs.sort(key=lambda p: (ranks[p[0]], ranks[p[1]]))
        merges += [(rank, _to_str(a), _to_str(b)) for a, b in pairs]
    merges.sort(key=lambda m: m[0])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def save_hf_tokenizer(enc: tiktoken.Encoding, out_dir: Path) -> None:
    """Write tokenizer.json + tokenizer_config.json (chat template, bos/eos/pad) into out_dir.

    The chat template goes into tokenizer_config.json (not transformers 5's separate
    chat_template.jinja) and the class is named PreTrainedTokenizerFast (transformers 5 writes
    TokenizersBackend), so tools that read the config and older transformers releases find both.
    """
    from transformers import PreTrainedTokenizerFast

    if enc._pat_str != SPLIT_PATTERN:
        raise CheckpointError(f"tokenizer {enc.name!r} splits with {enc._pat_str!r}, not nanochat's pattern; "
                              f"only nanochat's tokenizer is supported")
    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer_json(enc), bos_token="<|bos|>",
                                   eos_token="<|assistant_end|>", pad_token="<|assistant_end|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=None)
    fast.save_pretrained(out_dir, save_jinja_files=False)
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def encoding_from_hf(hf_dir: Path) -> tiktoken.Encoding:
    """The tiktoken Encoding back from a folder's tokenizer.json, when it is nanochat's tokenizer."""
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(f"{hf_dir} has no tokenizer.json; jaxrl needs nanochat's tokenizer with the model")
    spec = json.loads(path.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    splits = [p for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    pattern = splits[0]["pattern"].get("Regex") if len(splits) == 1 else None
    if model.get("type") != "BPE" or pattern != SPLIT_PATTERN:
        raise CheckpointError(f"{path}: not nanochat's tokenizer (a byte-level BPE split with nanochat's regex); "
                              f"found model {model.get('type')!r} and split pattern {pattern!r}")
    from_unicode = {c: b for b, c in byte_to_unicode().items()}
    try:
        ranks = {bytes(from_unicode[c] for c in s): rank for s, rank in model["vocab"].items()}
    except KeyError as e:
        raise CheckpointError(f"{path}: vocab entry with character {e} outside the byte-level alphabet") from e
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    enc = tiktoken.Encoding(name=ENCODING_NAME, pat_str=pattern, mergeable_ranks=ranks, special_tokens=specials)
    _check_layout(enc)
    return enc


def write_tokenizer_pkl(enc: tiktoken.Encoding, out_dir: Path) -> Path:
    """nanochat's tokenizer.pkl (a pickled Encoding), checked by loading it back with jaxrl's safe loader."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(enc))
    back = load_encoding(path)
    assert back._mergeable_ranks == enc._mergeable_ranks and back._special_tokens == enc._special_tokens, path
    return path
