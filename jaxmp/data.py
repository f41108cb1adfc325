"""Token data: the built-in corpus, text files, uint16 token files; per-process batches.

A batch depends only on (seed, step): row b of step s starts at an offset drawn from
numpy's generator seeded with (seed, s, b), so every mesh and every process count sees
the same global batch, and each process reads only the rows its devices hold.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Callable, Mapping

import jax
import numpy as np
from jax.sharding import Sharding

BUILTIN_MAX_BYTES = 16 * 1024 * 1024
LLMC_MAGIC = 20240520  # llm.c token files start with a 256 x int32 header
BYTE_VOCAB = 256  # text read as bytes: one token per byte


def is_byte_source(source: str) -> bool:
    """Whether a data source is read as bytes (the built-in corpus, text files) rather than
    as token ids (.bin / .npy token files): the one place this is decided."""
    return source == "builtin" or not source.endswith((".bin", ".npy"))


class TextCodec:
    """Text <-> token ids of a model: bytes for a 256-token vocabulary (byte-level models);
    other vocabularies take and give ids ('ids:464,2068'), since no tokenizer is bundled."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.bytes = vocab_size == BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        if text.startswith("ids:"):
            return [int(t) for t in text[4:].split(",") if t.strip()]
        if not self.bytes:
            raise DataError(f"this model has a {self.vocab_size}-token vocabulary and no "
                            "tokenizer is bundled; give prompts as token ids, 'ids:464,2068'")
        return list(text.encode("utf-8"))

    def decode(self, tokens: list[int]) -> str:
        if not self.bytes:
            return " ".join(map(str, tokens))
        return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


class DataError(ValueError):
    """A data source that cannot be used."""


def builtin_corpus(max_bytes: int = BUILTIN_MAX_BYTES) -> np.ndarray:
    """The running interpreter's standard-library sources as bytes (vocab 256).

    Files are read in sorted path order, so the corpus is deterministic per Python.
    """
    root = sysconfig.get_paths()["stdlib"]
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    chunks, total = [], 0
    for path in sorted(paths):
        with open(path, "rb") as f:
            data = f.read()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise DataError(f"no Python sources under {root}; pass data=PATH to a .txt or token file")
    return np.frombuffer(b"".join(chunks)[:max_bytes], np.uint8)


def load_tokens(source: str, vocab_size: int) -> np.ndarray:
    """Tokens from 'builtin', a .txt file (bytes), or a .bin/.npy uint16 token file."""
    if source == "builtin":
        tokens = builtin_corpus()
    else:
        if not os.path.exists(source):
            raise DataError(f"data={source}: no such file; pass 'builtin' or a path to a "
                            ".txt, .bin or .npy file")
        if os.path.getsize(source) == 0:
            raise DataError(f"data={source}: the file is empty")
        ext = os.path.splitext(source)[1].lower()
        if ext == ".npy":
            tokens = np.load(source, mmap_mode="r")
            if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                raise DataError(f"data={source}: expected a 1-d integer token array, got "
                                f"{tokens.dtype} of shape {tokens.shape}")
        elif ext == ".bin":
            tokens = _read_bin(source)
        else:
            tokens = np.fromfile(source, np.uint8)
    if len(tokens) and (low := int(tokens.min())) < 0:
        raise DataError(f"data={source}: token id {low} is negative; token ids are >= 0")
    if len(tokens) and (top := int(tokens.max())) >= vocab_size:
        raise DataError(f"data={source}: token id {top} >= vocab size {vocab_size}; use a model "
                        f"with vocab_size > {top} or re-tokenize")
    return tokens


def _read_bin(path: str) -> np.ndarray:
    head = np.fromfile(path, np.int32, count=256)
    if len(head) == 256 and head[0] == LLMC_MAGIC:  # llm.c: header then uint16 tokens
        n = int(head[2])
        return np.memmap(path, np.uint16, mode="r", offset=256 * 4, shape=(n,))
    if os.path.getsize(path) % 2:
        raise DataError(f"data={path}: odd file size; a .bin token file holds uint16 tokens")
    return np.memmap(path, np.uint16, mode="r")  # nanoGPT: raw uint16


class TokenBatches:
    """Batches of (batch_size, seq_len + 1) tokens drawn from one token stream."""

    unit = "tok"

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int,
                 source: str = "data"):
        if len(tokens) < seq_len + 1:
            raise DataError(f"{source} holds {len(tokens)} tokens, fewer than one sequence of "
                            f"{seq_len + 1}; use more data or a shorter seq_len")
        self.tokens, self.batch_size, self.seq_len, self.seed = tokens, batch_size, seq_len, seed
        self.tokens_per_step = batch_size * seq_len

    @classmethod
    def from_source(cls, source: str, vocab_size: int, batch_size: int, seq_len: int,
                    seed: int) -> TokenBatches:
        where = "the built-in corpus" if source == "builtin" else f"data={source}"
        return cls(load_tokens(source, vocab_size), batch_size, seq_len, seed, where)

    def example(self) -> dict[str, np.ndarray]:
        """Host arrays with the batch's shapes and dtypes (for compiling)."""
        return {"tokens": np.zeros((self.batch_size, self.seq_len + 1), np.int32)}

    def device(self, step: int, shardings: Mapping[str, Sharding]) -> dict[str, jax.Array]:
        return self.global_batch(step, shardings["tokens"])

    def offset(self, step: int, row: int) -> int:
        high = len(self.tokens) - self.seq_len
        return int(np.random.default_rng([self.seed, step, row]).integers(0, high))

    def rows(self, step: int, rows: range) -> np.ndarray:
        out = np.empty((len(rows), self.seq_len + 1), np.int32)
        for i, row in enumerate(rows):
            o = self.offset(step, row)
            out[i] = self.tokens[o:o + self.seq_len + 1]
        return out

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """The whole global batch on the host (tests and single-process tools)."""
        return {"tokens": self.rows(step, range(self.batch_size))}

    def global_batch(self, step: int, sharding: Sharding) -> dict[str, jax.Array]:
        """The global batch as a sharded array; this process builds only its own rows."""
        shape = (self.batch_size, self.seq_len + 1)
        return {"tokens": make_global(shape, sharding, lambda rows: self.rows(step, rows))}


def make_global(shape: tuple[int, ...], sharding: Sharding,
                rows_fn: Callable[[range], np.ndarray]) -> jax.Array:
    """A global array whose local shards are built from `rows_fn(range of batch rows)`."""
    def shard(index: tuple[slice, ...]) -> np.ndarray:
        rows = range(*index[0].indices(shape[0]))
        return rows_fn(rows)[(slice(None), *index[1:])]
    return jax.make_array_from_callback(shape, sharding, shard)
