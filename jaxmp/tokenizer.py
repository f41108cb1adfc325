"""Text <-> token ids: Hugging Face `tokenizers` (a tokenizer.json), bytes for byte-level
models, or ids given as 'ids:464,2068'.

A tokenizer travels with a model as the parsed JSON of its tokenizer.json (checkpoints
keep it in their record, Hugging Face directories next to the weights), so a checkpoint
serves text wherever it is restored.
"""

from __future__ import annotations

import json
import os
from typing import Any

BYTE_VOCAB = 256  # text read as bytes: one token per byte
IDS_PREFIX = "ids:"
END_OF_TEXT = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


def read_tokenizer(path: str, name: str = "tokenizer") -> dict:
    """The JSON of a tokenizer.json file, or of the tokenizer.json in a directory."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{name}={path}: no such file (give a tokenizer.json or a directory "
                         "holding one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}={path}: not a tokenizer.json ({e})") from None
    _build(data, f"{name}={path}")
    return data


def _build(data: dict, where: str) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(json.dumps(data))
    except Exception as e:  # the Rust library's own message
        raise ValueError(f"{where}: not a Hugging Face tokenizer ({e})") from None


class TextCodec:
    """Text <-> ids for a model with `vocab_size` tokens: through a tokenizer (the JSON of
    a tokenizer.json) if there is one, else bytes for a 256-token vocabulary; 'ids:1,2,3'
    is read as ids either way."""

    def __init__(self, vocab_size: int | None = None, tokenizer: dict | None = None):
        self.tokenizer = None if tokenizer is None else _build(tokenizer, "tokenizer")
        if vocab_size is None:  # the tokenizer's own (or bytes)
            vocab_size = self.tokenizer.get_vocab_size() if self.tokenizer else BYTE_VOCAB
        self.vocab_size = vocab_size
        if self.tokenizer is not None and self.tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.get_vocab_size()} tokens, more "
                             f"than the model's vocabulary of {vocab_size}")
        self.bytes = self.tokenizer is None and vocab_size == BYTE_VOCAB

    @property
    def text(self) -> bool:
        """Whether text (not only ids) can be encoded."""
        return self.tokenizer is not None or self.bytes

    def encode(self, text: str) -> list[int]:
        """Text as ids; 'ids:1,2,3' (the command line's way to give ids) as those ids."""
        if text.startswith(IDS_PREFIX):
            try:
                return [int(t) for t in text[len(IDS_PREFIX):].split(",") if t.strip()]
            except ValueError:
                raise ValueError(f"{text[:40]!r}: after 'ids:' give integers separated by "
                                 "commas") from None
        return self.encode_text(text)

    def encode_text(self, text: str) -> list[int]:
        """Text as ids, whatever it says (an API's text prompt: 'ids:1' is text)."""
        if self.tokenizer is not None:
            return self.tokenizer.encode(text, add_special_tokens=False).ids
        if not self.bytes:
            raise ValueError(f"this model has a {self.vocab_size}-token vocabulary and no "
                             "tokenizer; pass one (tokenizer=...) or give prompts as token ids, "
                             "'ids:464,2068'")
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts at once (the tokenizer's own threads do the work)."""
        if self.tokenizer is not None:
            return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is not None:
            return self.tokenizer.decode([int(t) for t in tokens], skip_special_tokens=False)
        if not self.bytes:
            return " ".join(map(str, tokens))
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")

    def end_of_text(self) -> int | None:
        """The id that separates documents, if the tokenizer has one."""
        if self.tokenizer is None:
            return None
        for token in END_OF_TEXT:
            if (i := self.tokenizer.token_to_id(token)) is not None:
                return i
        return None
