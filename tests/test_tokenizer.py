"""Tokenizer tests: every entry of nanochat's golden_tokenizer.json, plus rendering errors and
safe loading of tokenizer.pkl.

Golden checks read nanochat's own outputs from ../shared/fixtures/nanochat (never edited).
Run: `python -m pytest tests/test_tokenizer.py -q`
"""
import dataclasses
import json
import os
import pickle
import subprocess
import sys
import types

import pytest

from conftest import FIXTURES, GENERATIONS, REPO
from jaxrl.tokenizer import SPECIAL_TOKENS, ConversationError, SpecialIds, Tokenizer

GOLDEN = json.loads((FIXTURES / "golden_tokenizer.json").read_text())


@pytest.fixture(scope="module")
def tok(fixtures_dir):
    return Tokenizer.from_directory(fixtures_dir / "tokenizer")


def test_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == GOLDEN["vocab_size"]
    assert tok.get_bos_token_id() == GOLDEN["bos_token_id"]
    assert {f"<|{k}|>": v for k, v in tok.special_ids().items()} == GOLDEN["special_token_ids"]
    assert tok.specials == SpecialIds(**tok.special_ids())
    for text, token_id in GOLDEN["special_token_ids"].items():
        assert tok.encode_special(text) == token_id
    assert tok.decode(list(GOLDEN["special_token_ids"].values())) == GOLDEN["decode_of_all_special_ids"]
    assert tok.enc._pat_str == GOLDEN["split_pattern"]


def test_special_ids_from_anything_with_encode_special():
    """The one special-ids record reads its nine ids by name from any `encode_special` (the sampler and
    the benchmarks' synthetic tokenizer use it too): each field gets its own token's id."""
    ids = {t: 1000 + 7 * i for i, t in enumerate(reversed(SPECIAL_TOKENS))}  # not in declaration order
    specials = SpecialIds.from_tokenizer(types.SimpleNamespace(encode_special=ids.__getitem__))
    assert dataclasses.asdict(specials) == {t[2:-2]: i for t, i in ids.items()}
    assert hash(specials) == hash(SpecialIds.from_tokenizer(types.SimpleNamespace(encode_special=ids.__getitem__)))


@pytest.mark.parametrize("generation", GENERATIONS)
def test_every_generation_ships_the_same_tokenizer(tok, generation):
    other = Tokenizer.from_directory(FIXTURES / generation / "tokenizer")
    assert other.special_ids() == tok.special_ids()
    text = GOLDEN["strings"][0]["text"]
    assert other.encode(text) == tok.encode(text)


@pytest.mark.parametrize("case", GOLDEN["strings"], ids=lambda c: repr(c["text"])[:30])
def test_encode_decode_golden(tok, case):
    assert tok.encode(case["text"]) == case["encode"]
    expected = case["encode_prepend_bos_append_assistant_end"]
    assert tok.encode(case["text"], prepend="<|bos|>", append="<|assistant_end|>") == expected
    assert tok.encode(case["text"], prepend=tok.specials.bos, append=tok.specials.assistant_end) == expected
    assert tok.decode(case["encode"]) == case["decode_of_encode"]
    assert (tok.decode(case["encode"]) == case["text"]) == case["roundtrip_ok"]
    assert [tok.decode([i]) for i in case["encode"]] == case["per_token_decode"]


def test_encode_batch_golden(tok):
    batch = GOLDEN["encode_batch"]
    assert tok.encode(batch["texts"]) == batch["ids"]
    bos, end = tok.specials.bos, tok.specials.assistant_end
    with_specials = tok.encode(batch["texts"], prepend="<|bos|>", append=end)
    assert with_specials == [[bos, *row, end] for row in batch["ids"]]


@pytest.mark.parametrize("case", GOLDEN["partial_utf8_byte_tokens"], ids=lambda c: c["bytes_hex"])
def test_partial_utf8_tokens_decode_to_replacement_char(tok, case):
    assert tok.enc.decode_single_token_bytes(case["id"]).hex() == case["bytes_hex"]
    assert tok.decode([case["id"]]) == case["decode"] == "\ufffd"


@pytest.mark.parametrize("case", GOLDEN["conversations"], ids=lambda c: f"{c['split']}-line{c['jsonl_line']}")
def test_render_golden(tok, case):
    conversation = case["conversation"]
    snapshot = json.dumps(conversation)
    ids, mask = tok.render_conversation(conversation)
    assert ids == case["render_conversation"]["ids"]
    assert mask == case["render_conversation"]["mask"]
    assert tok.decode(ids) == case["decoded_render"]
    assert tok.render_for_completion(conversation) == case["render_for_completion"]
    assert json.dumps(conversation) == snapshot, "rendering must not mutate the conversation"


def test_decode_accepts_numpy_rows(tok):
    import numpy as np

    ids = GOLDEN["strings"][0]["encode"]
    assert tok.decode(np.asarray(ids, dtype=np.int32)) == tok.decode(ids)


def test_render_truncates_to_max_tokens(tok):
    case = GOLDEN["conversations"][0]
    ids, mask = tok.render_conversation(case["conversation"], max_tokens=10)
    assert ids == case["render_conversation"]["ids"][:10]
    assert mask == case["render_conversation"]["mask"][:10]


def test_system_message_is_merged_into_first_user_message(tok):
    plain = GOLDEN["conversations"][0]["conversation"]
    user, assistant = plain["messages"]
    with_system = {"messages": [{"role": "system", "content": "Be brief."}, user, assistant]}
    merged = {"messages": [{"role": "user", "content": "Be brief.\n\n" + user["content"]}, assistant]}
    assert tok.render_conversation(with_system) == tok.render_conversation(merged)
    assert tok.render_for_completion(with_system) == tok.render_for_completion(merged)
    assert with_system["messages"][1]["content"] == user["content"], "caller's dict must not change"


def test_assistant_string_content_is_supervised(tok):
    conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ids, mask = tok.render_conversation(conversation)
    s = tok.specials
    assert ids == [s.bos, s.user_start, *tok.encode("hi"), s.user_end, s.assistant_start, *tok.encode("yo"), s.assistant_end]
    assert mask == [0, 0, *[0] * len(tok.encode("hi")), 0, 0, *[1] * len(tok.encode("yo")), 1]


USER = {"role": "user", "content": "q"}
ASSISTANT = {"role": "assistant", "content": "a"}
BAD_CONVERSATIONS = {
    "empty": [],
    "system_then_assistant": [{"role": "system", "content": "s"}, ASSISTANT],
    "system_alone": [{"role": "system", "content": "s"}],
    "assistant_first": [ASSISTANT],
    "two_users": [USER, USER],
    "user_content_list": [{"role": "user", "content": [{"type": "text", "text": "q"}]}],
    "unknown_part_type": [USER, {"role": "assistant", "content": [{"type": "image", "text": "x"}]}],
    "unknown_content_type": [USER, {"role": "assistant", "content": 3}],
}


@pytest.mark.parametrize("name", BAD_CONVERSATIONS)
def test_render_rejects_malformed_conversations(tok, name):
    with pytest.raises(ConversationError):
        tok.render_conversation({"messages": BAD_CONVERSATIONS[name]})
    assert issubclass(ConversationError, AssertionError) and issubclass(ConversationError, ValueError)


def test_render_for_completion_needs_final_assistant_message(tok):
    with pytest.raises(ConversationError, match="Last message must be from the Assistant"):
        tok.render_for_completion({"messages": [USER]})


def test_encode_rejects_bad_input(tok):
    with pytest.raises(ValueError, match="not a special token"):
        tok.encode("x", prepend="<|nope|>")
    with pytest.raises(ValueError, match="Invalid input type"):
        tok.encode(b"bytes")


def test_from_directory_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        Tokenizer.from_directory(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="tokenizer.pkl"):
        Tokenizer.from_directory(tmp_path)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (os.getcwd, ())


# PROTO 4; GLOBAL tiktoken.core.Encoding; NEWOBJ(); BUILD with the *string* state "cl100k_base",
# which real unpickling would turn into a download of that named encoding.
_STR_STATE_PICKLE = (b"\x80\x04\x8c\x0dtiktoken.core\x8c\x08Encoding\x93)\x81"
                     b"\x8c\x0bcl100k_base" b"b.")


@pytest.mark.parametrize("payload, message", [
    (b"not a pickle", "is not a readable tiktoken Encoding pickle"),
    (pickle.dumps(_RunsCodeWhenUnpickled()), "getcwd is not allowed"),
    (pickle.dumps({"name": "x"}), "unpickles to dict"),
    (_STR_STATE_PICKLE, "Encoding state is str"),
], ids=["garbage", "code", "dict", "str-state"])
def test_from_directory_rejects_unsafe_or_wrong_pickles(tmp_path, payload, message):
    (tmp_path / "tokenizer.pkl").write_bytes(payload)
    with pytest.raises(ValueError, match=message) as info:
        Tokenizer.from_directory(tmp_path)
    assert str(tmp_path / "tokenizer.pkl") in str(info.value)


def test_from_directory_requires_nanochat_special_tokens(tmp_path):
    import tiktoken

    enc = tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", special_tokens={},
                            mergeable_ranks={bytes([i]): i for i in range(256)})
    (tmp_path / "tokenizer.pkl").write_bytes(pickle.dumps(enc))
    with pytest.raises(ValueError, match=r"special tokens \['<\|bos\|>'"):
        Tokenizer.from_directory(tmp_path)


@pytest.mark.cli
def test_module_imports_neither_jax_nor_torch():
    code = "import sys, jaxrl.tokenizer; sys.exit(bool({'jax', 'torch'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0
