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
# The built-in corpus's validation split: the next MiB of the same sources, never trained on.
BUILTIN_VALIDATION = "builtin:validation"
VALIDATION_BYTES = 1024 * 1024
LLMC_MAGIC = 20240520  # llm.c token files start with a 256 x int32 header


def is_byte_source(source: str) -> bool:
    """Whether a data source is read as bytes (the built-in corpus, text files) rather than
    as token ids (.bin / .npy token files): the one place this is decided."""
    return source == "builtin" or not source.endswith((".bin", ".npy"))


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
    elif source == BUILTIN_VALIDATION:
        tokens = builtin_corpus(BUILTIN_MAX_BYTES + VALIDATION_BYTES)[BUILTIN_MAX_BYTES:]
    else:
        if not os.path.exists(source):
            raise DataError(f"data={source}: no such file; pass 'builtin' or a path to a "
                            ".txt, .bin or .npy file")
        if os.path.isdir(source):
            raise DataError(f"data={source} is a directory; pass a .txt, .bin or .npy file "
                            "(experiments.prepare turns a directory of text into train.bin "
                            "and val.bin)")
        if os.path.getsize(source) == 0:
            raise DataError(f"data={source}: the file is empty")
        ext = os.path.splitext(source)[1].lower()
        if ext == ".npy":
            try:
                tokens = np.load(source, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"data={source}: not a readable .npy array ("
                                f"{str(e).splitlines()[0][:120]}); write token files with "
                                "numpy.save or experiments.prepare") from None
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


def validation_source(source: str, eval_data: str | None) -> str:
    """The held-out split of a data source: `eval_data` if given, the built-in corpus's
    validation part, or the val.bin beside a train.bin (what experiments.prepare writes)."""
    if eval_data:
        return eval_data
    if source == "builtin":
        return BUILTIN_VALIDATION
    folder, name = os.path.split(source)
    if name.startswith("train") and name.endswith((".bin", ".npy")):
        candidate = os.path.join(folder, "val" + name[len("train"):])
        if os.path.exists(candidate):
            return candidate
    raise DataError(f"data={source} has no validation split; pass eval_data=FILE (a token or "
                    "text file never trained on; experiments.prepare writes val.bin)")


class TokenWriter:
    """An llm.c token file written as a stream: a 256 x int32 header (magic, version,
    count), then uint16 tokens (version 1), or uint32 (version 2) for vocabularies over
    65536. Written under a temporary name and renamed on close, so no reader ever sees
    half a file."""

    def __init__(self, path: str, vocab_size: int):
        self.path, self.tmp, self.count = path, path + ".partial", 0
        self.vocab_size = vocab_size
        self.dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        self.file = open(self.tmp, "wb")
        self.file.write(np.zeros(256, np.int32).tobytes())

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise DataError(f"{self.path}: token ids must be in [0, {self.vocab_size})")
        self.file.write(tokens.astype(self.dtype).tobytes())
        self.count += len(tokens)

    def close(self) -> None:
        header = np.zeros(256, np.int32)
        header[:3] = (LLMC_MAGIC, 1 if self.dtype == np.uint16 else 2, self.count)
        self.file.seek(0)
        self.file.write(header.tobytes())
        self.file.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)


def _read_bin(path: str) -> np.ndarray:
    head = np.fromfile(path, np.int32, count=256)
    if len(head) == 256 and head[0] == LLMC_MAGIC:  # llm.c: header then tokens
        n, dtype = int(head[2]), {1: np.uint16, 2: np.uint32}.get(int(head[1]))
        if dtype is None:
            raise DataError(f"data={path}: llm.c token file version {head[1]} is unknown "
                            "(1: uint16 tokens, 2: uint32)")
        if os.path.getsize(path) < 256 * 4 + n * np.dtype(dtype).itemsize:
            raise DataError(f"data={path}: the header says {n} tokens but the file is shorter "
                            "(a partial write?)")
        return np.memmap(path, dtype, mode="r", offset=256 * 4, shape=(n,))
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
