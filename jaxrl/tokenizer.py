"""nanochat's BPE tokenizer (nanochat/tokenizer.py `RustBPETokenizer`), served by tiktoken.

Owns: loading `tokenizer.pkl` safely, ordinary encode/decode, the nine special tokens and their
ids, and chat rendering (`render_conversation`, `render_for_completion`) exactly as nanochat
(docs/nanochat.md#tokenizer-and-rendering). Imports neither jax nor torch.

`tokenizer.pkl` is a pickle of a `tiktoken.core.Encoding`. Unpickling arbitrary files can run
arbitrary code, so a restricted unpickler admits only that class, maps it to a stub that just
captures the pickled state dict, checks the dict, and then builds the Encoding itself.

Conversations are nanochat dicts: `{"messages": [{"role": "user", "content": str},
{"role": "assistant", "content": str | [{"type": "text"|"python"|"python_output", "text": str}]}]}`,
optionally preceded by one system message that is merged into the first user message.

Test: `python -m pytest tests/test_tokenizer.py -q` (golden ids from ../shared/fixtures).
"""
import copy
import dataclasses
import io
import operator
import pickle
from pathlib import Path

import tiktoken

SPECIAL_TOKENS = (  # nanochat's order; ids are N..N+8 after the N mergeable ranks
    "<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
    "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>",
)
# nanochat's split pattern (GPT-4's, with numbers in groups of 1-2 digits), docs/nanochat.md#tokenizer-and-rendering
SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"
                 r"\s*[\r\n]|\s+(?!\S)|\s+")
_STATE_KEYS = {"name", "pat_str", "mergeable_ranks", "special_tokens"}
_OPTIONAL_STATE_KEYS = {"explicit_n_vocab"}


class ConversationError(ValueError, AssertionError):
    """A malformed conversation. nanochat raises AssertionError (or ValueError) at these points;
    this error is both, so either `except` clause keeps working."""


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids of nanochat's nine special tokens (read from the tokenizer, never hard-coded).

    The one record of them: plain ints, hashable, so the sampler keeps it in its static spec."""

    bos: int
    user_start: int
    user_end: int
    assistant_start: int
    assistant_end: int
    python_start: int
    python_end: int
    output_start: int
    output_end: int

    @classmethod
    def from_tokenizer(cls, tok) -> "SpecialIds":
        """From anything with nanochat's `encode_special(text) -> id` (a Tokenizer, a test double)."""
        return cls(**{t[2:-2]: tok.encode_special(t) for t in SPECIAL_TOKENS})


class _EncodingState:
    """Stands in for tiktoken.core.Encoding while unpickling; keeps the state dict only."""

    def __setstate__(self, state):
        self.state = state


class _RestrictedUnpickler(pickle.Unpickler):
    _ALLOWED = {
        ("tiktoken.core", "Encoding"): _EncodingState,
        ("copyreg", "_reconstructor"): None,  # protocol 0/1 pickles of new-style classes
        ("builtins", "object"): None,
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(
                f"global {module}.{name} is not allowed; tokenizer.pkl may only contain a "
                "tiktoken.core.Encoding"
            )
        stub = self._ALLOWED[(module, name)]
        return stub if stub is not None else super().find_class(module, name)


def load_encoding(pickle_path: str | Path) -> tiktoken.Encoding:
    """Loads nanochat's pickled tiktoken Encoding without executing pickled code."""
    path = Path(pickle_path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"tokenizer file {path} not found; expected nanochat's tokenizer.pkl "
                                "(e.g. $NANOCHAT_BASE_DIR/tokenizer/tokenizer.pkl)") from None
    except OSError as e:
        raise OSError(f"cannot read tokenizer file {path}: {e}") from e
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # any malformed or disallowed pickle: name the file
        raise ValueError(f"{path} is not a readable tiktoken Encoding pickle: "
                         f"{type(e).__name__}: {e}") from e
    if not isinstance(obj, _EncodingState) or not hasattr(obj, "state"):
        raise ValueError(f"{path} unpickles to {type(obj).__name__}, expected a tiktoken "
                         "Encoding with its state")
    return tiktoken.Encoding(**_checked_state(obj.state, path))


def _checked_state(state, path):
    if not isinstance(state, dict):  # a str state would make tiktoken fetch a named encoding
        raise ValueError(f"{path}: Encoding state is {type(state).__name__}, expected a dict")
    keys = set(state)
    if not _STATE_KEYS <= keys <= _STATE_KEYS | _OPTIONAL_STATE_KEYS:
        raise ValueError(f"{path}: Encoding state keys {sorted(keys)}, expected {sorted(_STATE_KEYS)}")
    ranks, specials = state["mergeable_ranks"], state["special_tokens"]
    if not (isinstance(ranks, dict) and all(type(k) is bytes and type(v) is int for k, v in ranks.items())):
        raise ValueError(f"{path}: mergeable_ranks must be a dict of bytes -> int")
    if not (isinstance(specials, dict) and all(type(k) is str and type(v) is int for k, v in specials.items())):
        raise ValueError(f"{path}: special_tokens must be a dict of str -> int")
    if not (isinstance(state["name"], str) and isinstance(state["pat_str"], str)):
        raise ValueError(f"{path}: name and pat_str must be strings")
    missing = [t for t in SPECIAL_TOKENS if t not in specials]
    if missing:
        raise ValueError(f"{path}: special tokens {missing} missing; found {sorted(specials)}")
    return state


class Tokenizer:
    """nanochat's tokenizer API (`RustBPETokenizer`) over a tiktoken Encoding."""

    def __init__(self, enc: tiktoken.Encoding, bos_token: str = "<|bos|>"):
        self.enc = enc
        self.specials = SpecialIds.from_tokenizer(self)
        self.bos_token_id = self.encode_special(bos_token)

    @classmethod
    def from_directory(cls, tokenizer_dir: str | Path) -> "Tokenizer":
        """Loads `<tokenizer_dir>/tokenizer.pkl`."""
        tokenizer_dir = Path(tokenizer_dir)
        if not tokenizer_dir.is_dir():
            raise FileNotFoundError(f"tokenizer directory {tokenizer_dir} does not exist or is not "
                                    "a directory; pass the folder that holds tokenizer.pkl")
        return cls(load_encoding(tokenizer_dir / "tokenizer.pkl"))

    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_special_tokens(self) -> set[str]:
        return self.enc.special_tokens_set

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def special_ids(self) -> dict[str, int]:
        """{"bos": id, "user_start": id, ..., "output_end": id}."""
        return dataclasses.asdict(self.specials)

    def encode_special(self, text: str) -> int:
        """Id of one special token, e.g. "<|bos|>"."""
        specials = self.enc.special_tokens_set
        if not isinstance(text, str) or text not in specials:
            raise ValueError(f"{text!r} is not a special token; known: {sorted(specials)}")
        return self.enc.encode_single_token(text)

    def _special_or_id(self, token):
        return self.encode_special(token) if isinstance(token, str) else operator.index(token)

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """Ordinary encoding of a str (-> list[int]) or a list of str (-> list[list[int]]).

        Special-token text inside `text` is encoded as plain text. `prepend`/`append` are a
        special-token string or an int id added to every row.
        """
        prefix = [] if prepend is None else [self._special_or_id(prepend)]
        suffix = [] if append is None else [self._special_or_id(append)]
        if isinstance(text, str):
            return prefix + self.enc.encode_ordinary(text) + suffix
        if isinstance(text, list):
            rows = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
            return [prefix + row + suffix for row in rows]
        raise ValueError(f"Invalid input type: {type(text)}; expected str or list of str")

    def __call__(self, *args, **kwargs):
        return self.encode(*args, **kwargs)

    def decode(self, ids) -> str:
        """Text of `ids` (any iterable of ints, e.g. a numpy row); specials render literally and
        invalid UTF-8 becomes U+FFFD."""
        return self.enc.decode([int(i) for i in ids])

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        """(ids, mask) of a chat; mask 1 marks tokens the assistant is trained on."""
        messages = _merge_system_message(conversation)
        ids, mask = [], []

        def add(token_ids, mask_val):
            token_ids = [token_ids] if isinstance(token_ids, int) else token_ids
            ids.extend(token_ids)
            mask.extend([mask_val] * len(token_ids))

        s = self.specials
        add(s.bos, 0)
        for i, message in enumerate(messages):
            must_be_from = "user" if i % 2 == 0 else "assistant"
            if message["role"] != must_be_from:
                raise ConversationError(f"Message {i} is from {message['role']} but should be from {must_be_from}")
            content = message["content"]
            if must_be_from == "user":
                if not isinstance(content, str):
                    raise ConversationError(f"User messages are simply expected to be strings; message {i} "
                                            f"has content of type {type(content).__name__}")
                add(s.user_start, 0)
                add(self.encode(content), 0)
                add(s.user_end, 0)
            else:
                add(s.assistant_start, 0)
                self._add_assistant_content(content, add)
                add(s.assistant_end, 1)
        return ids[:max_tokens], mask[:max_tokens]

    def _add_assistant_content(self, content, add):
        s = self.specials
        if isinstance(content, str):
            add(self.encode(content), 1)
            return
        if not isinstance(content, list):
            raise ConversationError(f"Unknown content type: {type(content)}; expected str or list of parts")
        for part in content:
            value_ids = self.encode(part["text"])  # each part separately: token boundaries at parts
            if part["type"] == "text":
                add(value_ids, 1)
            elif part["type"] == "python":
                add(s.python_start, 1)
                add(value_ids, 1)
                add(s.python_end, 1)
            elif part["type"] == "python_output":  # produced by the tool, never supervised
                add(s.output_start, 0)
                add(value_ids, 0)
                add(s.output_end, 0)
            else:
                raise ConversationError(f"Unknown part type: {part['type']!r}; expected text, python or python_output")

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for RL: the conversation without its final assistant message, then
        `<|assistant_start|>`."""
        conversation = copy.deepcopy(conversation)
        messages = conversation["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ConversationError("Last message must be from the Assistant")
        messages.pop()
        ids, _ = self.render_conversation(conversation)
        ids.append(self.specials.assistant_start)
        return ids


def _merge_system_message(conversation):
    """nanochat's surgery: a leading system message is prepended to the first user message."""
    messages = conversation["messages"]
    if not messages:
        raise ConversationError(f"Conversation has less than 1 message: {messages}")
    if messages[0]["role"] != "system":
        return messages
    messages = copy.deepcopy(messages)  # never mutate the caller's conversation
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ConversationError("System message must be followed by a user message")
    messages[1]["content"] = messages[0]["content"] + "\n\n" + messages[1]["content"]
    return messages[1:]
