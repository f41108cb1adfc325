"""Text -> token files that training reads: train.bin and val.bin (llm.c's format, which
nanoGPT's uint16 files also load as), and the tokenizer.json beside them.

    prepare(["corpus/"], "gpt2/tokenizer.json", "data/mine")

A document is a file (.txt, .md, any UTF-8 text) or one line of a .jsonl file (its
"text" field). Documents are separated by the tokenizer's end-of-text token. Every k-th
document goes to validation (k = 1 / val_fraction); a single document is split at the
end instead. Tokenizing runs in the tokenizer's own threads (every core), in chunks, with
a progress bar; nothing is left half-written if it stops.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import numpy as np

from jaxmp.data import DataError, TokenWriter
from jaxmp.tokenizer import TextCodec, read_tokenizer

CHUNK = 256  # documents per encode_batch call


@dataclasses.dataclass
class Prepared:
    train: str
    val: str
    train_tokens: int
    val_tokens: int
    documents: int


def input_files(path: str) -> list[str]:
    """A file, or every visible regular file under a directory (sorted)."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"input={path}: no such file or directory")
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    if not out:
        raise DataError(f"input={path}: the directory holds no files")
    return out


def documents(path: str) -> Iterator[str]:
    """The documents of one file: the whole text, or each .jsonl line's "text"."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line} is not UTF-8 (byte {e.start}: "
                        f"{raw[e.start:e.start + 1]!r}); convert it to UTF-8 or leave it out") from None
    if not path.endswith(".jsonl"):
        if text.strip():
            yield text
        return
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{path} line {n}: expected a JSON object with a \"text\" "
                            "field") from None
        if not isinstance(doc, str):
            raise DataError(f"{path} line {n}: \"text\" is a {type(doc).__name__}, not a string")
        yield doc


OUTPUTS = ("train.bin", "val.bin", "tokenizer.json")


def prepare(inputs: list[str], tokenizer: str | None, output: str, *,
            val_fraction: float = 0.01, progress: bool = True, overwrite: bool = False
            ) -> Prepared:
    """Tokenize `inputs` (files or directories) into output/train.bin and output/val.bin.
    Without a tokenizer, text is bytes (vocabulary 256). An output directory that already
    holds token files is refused unless `overwrite`; then all three files are rewritten
    together (a byte-level run removes an old tokenizer.json, which training would
    otherwise pick up as the data's)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    there = [f for f in OUTPUTS if os.path.exists(os.path.join(output, f))]
    if there and not overwrite:
        raise DataError(f"output={output} already holds {', '.join(there)}; use another "
                        "output directory, or overwrite=True (--overwrite) to replace them")
    files = [f for path in inputs for f in input_files(path)]
    tok = read_tokenizer(tokenizer) if tokenizer else None
    codec = TextCodec(None, tok)
    vocab = codec.vocab_size
    eot = codec.end_of_text()
    docs = [d for f in files for d in documents(f)]
    if not docs:
        raise DataError(f"input={', '.join(inputs)}: no text (every file is empty)")
    created = not os.path.exists(output)
    os.makedirs(output, exist_ok=True)
    paths = os.path.join(output, "train.bin"), os.path.join(output, "val.bin")
    writers = [TokenWriter(p, vocab) for p in paths]
    try:
        _write_split(docs, codec, eot, writers, val_fraction, progress)
    except BaseException:
        for w in writers:
            w.abort()
        _remove_if_empty(output, created)
        raise
    if not writers[0].count or not writers[1].count:
        for w in writers:
            w.abort()
        _remove_if_empty(output, created)
        raise DataError(f"input={', '.join(inputs)}: {writers[0].count + writers[1].count} "
                        "token(s) are too few to split into training and validation data; "
                        "give more text")
    for w in writers:
        w.close()
    _write_tokenizer(output, tok)
    return Prepared(paths[0], paths[1], writers[0].count, writers[1].count, len(docs))


def _write_split(docs: list[str], codec: TextCodec, eot: int | None, writers: list[TokenWriter],
                 val_fraction: float, progress: bool) -> None:
    """Every k-th document (k = 1 / val_fraction) to the validation writer, the rest to
    the training one; a single document's tail is the validation split."""
    every = max(2, round(1 / val_fraction))
    bar = _bar(len(docs), progress)
    for start in range(0, len(docs), CHUNK):
        chunk = docs[start:start + CHUNK]
        for i, ids in enumerate(codec.encode_batch(chunk), start):
            ids = ids + ([eot] if eot is not None else [])
            if len(docs) == 1:
                cut = max(1, int(len(ids) * (1 - val_fraction)))
                writers[0].write(np.asarray(ids[:cut]))
                writers[1].write(np.asarray(ids[cut:]))
            else:
                writers[int(i % every == every - 1 or i == len(docs) - 1 and
                            writers[1].count == 0)].write(np.asarray(ids))
        bar.update(len(chunk))
    bar.close()


def _write_tokenizer(output: str, tok: dict | None) -> None:
    """tokenizer.json beside the token files (atomically); a byte-level run removes an old
    one, which training would otherwise take as the data's."""
    tok_path = os.path.join(output, "tokenizer.json")
    if tok is not None:
        tmp = tok_path + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(tok, f, ensure_ascii=False)
        os.replace(tmp, tok_path)
    elif os.path.exists(tok_path):
        os.remove(tok_path)


def _remove_if_empty(directory: str, created: bool) -> None:
    if created and os.path.isdir(directory) and not os.listdir(directory):
        os.rmdir(directory)


def _bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="doc", desc="tokenizing", disable=not enabled)
