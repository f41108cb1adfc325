"""Hugging Face model directories in and out: safetensors weights read straight into a
mesh's shards, and written back as bounded shards with their index.

A family that can be exchanged with Hugging Face gives an `HFFormat` (its registry entry's
`hf`): how its config maps to config.json and which safetensors key holds each parameter,
per layer for the stacked ones. Everything else is generic and lives here:

    directory = HFDirectory(path)                 # config.json + safetensors (+ index)
    params = load_params(directory, fmt, cfg_json, abstract_params, layer_order)
    export(params, cfg_json, fmt, out_dir, ...)   # canonical layer order in, HF files out

Reading is lazy: every device's shard is built from `safe_open(...).get_slice(key)` rows,
so a process reads only the rows its devices hold (plus, where a split axis is not the
tensor's first, that layer's whole rows), never the whole model at once.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"


class HFError(ValueError):
    """A Hugging Face directory that cannot be used (missing files, unknown keys, ...)."""


def require_fields(hf: dict, ints: tuple[str, ...], floats: tuple[str, ...] = ()) -> None:
    """config.json's shape fields, where present, are positive integers (and `floats`
    positive numbers). A missing one takes transformers' default, as transformers does
    (save_pretrained leaves default values out); if the weights then disagree, check_keys
    names the fields that were left out."""
    for name in ints:
        if name not in hf or hf[name] is None:
            continue
        value = hf[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise HFError(f"config.json: {name}={value!r} must be a positive integer")
    for name in floats:
        value = hf.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise HFError(f"config.json: {name}={value!r} must be a positive number")


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One safetensors tensor <-> one parameter (one layer's slice of a stacked one).

    The parameter is the tensor reshaped; its first axis may be longer (a padded
    vocabulary: zero rows) or shorter (positions cut to a shorter context)."""
    path: str                 # parameter path, e.g. "blocks/attn/qkv/kernel"
    key: str                  # safetensors key; "{i}" stands for the layer of a stacked one
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]    # the parameter's shape (per layer for a stacked one)
    stacked: bool = False
    # > 0: one tensor per expert ("{j}" in the key), stacked on the parameter's axis after
    # the layers' (a mixture of experts' (layers, experts, ...) weights)
    experts: int = 0

    def keys(self, num_layers: int) -> list[str]:
        return [key for key, _ in self.items(None, num_layers)]

    def items(self, value: Any, num_layers: int) -> list[tuple[str, Any]]:
        """(safetensors key, the parameter's slice it holds) for every key of this tensor
        (`value`: the whole parameter, or None for the keys alone)."""
        if not self.stacked:
            return [(self.key, value)]
        part = lambda i, j=None: None if value is None else value[i] if j is None else value[i][j]
        if not self.experts:
            return [(self.key.format(i=i), part(i)) for i in range(num_layers)]
        return [(self.key.format(i=i, j=j), part(i, j)) for i in range(num_layers)
                for j in range(self.experts)]

    def full_shape(self, num_layers: int) -> tuple[int, ...]:
        """The parameter's whole shape: (layers, [experts,] shape...)."""
        return (((num_layers,) if self.stacked else ()) + ((self.experts,) if self.experts
                                                         else ()) + tuple(self.shape))

    def lead(self) -> tuple[int, int]:
        """(k, rows per index of axis 0): the parameter's first k axes are the tensor's
        first axis (k=1 with padding or cutting when both first axes are the same axis)."""
        if self.shape[1:] == self.hf_shape[1:]:
            return 1, 1
        for k in range(1, len(self.shape) + 1):
            if (math.prod(self.shape[:k]) == self.hf_shape[0]
                    and math.prod(self.shape[k:]) == math.prod(self.hf_shape[1:])):
                return k, math.prod(self.shape[1:k])
        raise ValueError(f"{self.path}: shape {self.shape} is no reshape of {self.key}'s "
                         f"{self.hf_shape}")

    def to_hf(self, x: np.ndarray) -> np.ndarray:
        """A parameter (one layer) as the safetensors tensor."""
        k, lead = self.lead()
        rows = x.reshape(self.shape[0] * lead, -1)[:self.hf_shape[0]]
        if rows.shape[0] < self.hf_shape[0]:
            raise HFError(f"{self.path} has {rows.shape[0]} rows, {self.key} needs "
                          f"{self.hf_shape[0]}")
        return np.ascontiguousarray(rows.reshape(self.hf_shape))


@dataclasses.dataclass(frozen=True)
class HFFormat:
    """How a family's checkpoints look in Hugging Face's format."""
    model_type: str                              # config.json's model_type
    architecture: str                            # config.json's architectures[0]
    config_from_hf: Callable[[dict], dict]       # config.json -> the family's config JSON
    config_to_hf: Callable[[dict, dict], dict]   # (family config JSON, base) -> config.json
    tensors: Callable[[dict], list[Tensor]]      # family config JSON -> every tensor
    optional_prefix: str = ""      # files may leave it out of the keys (GPT-2 on the hub)
    ignored: tuple[str, ...] = ()  # regexes of keys that are not weights (buffers, tied)
    shape_keys: tuple[str, ...] = ()  # config.json fields that set the weights' shapes
    # export: None if the family config JSON fits this architecture, else why not (None:
    # every config fits)
    accepts: Callable[[dict], str | None] | None = None


class HFDirectory:
    """A local Hugging Face model directory: config.json and safetensors weights (one file
    or shards with model.safetensors.index.json)."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isdir(path):
            raise HFError(f"{path} is not a directory; give a Hugging Face model directory "
                          f"(with {CONFIG} and {WEIGHTS})")
        self.config = _read_json(os.path.join(path, CONFIG), CONFIG)
        self.files = self._weight_files()
        self._open: dict[str, Any] = {}

    def _weight_files(self) -> dict[str, str]:
        """key -> file name (of the single file, or of the index's shards)."""
        from safetensors import safe_open

        index, single = os.path.join(self.path, INDEX), os.path.join(self.path, WEIGHTS)
        if os.path.exists(index):
            weight_map = _read_json(index, INDEX).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFError(f"{index} has no weight_map; it is not a safetensors index")
            for name in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.path, name)):
                    raise HFError(f"{os.path.join(self.path, name)} is missing (listed in "
                                  f"{INDEX})")
            return dict(weight_map)
        if os.path.exists(single):
            try:
                with safe_open(single, framework="numpy") as f:
                    return {k: WEIGHTS for k in f.keys()}
            except Exception as e:
                raise HFError(f"{single} is not a readable safetensors file ({e})") from None
        other = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
                 if os.path.exists(os.path.join(self.path, n))]
        hint = (f" ({other[0]} is there: save it again with save_pretrained("
                "safe_serialization=True))" if other else "")
        raise HFError(f"{self.path} has neither {WEIGHTS} nor {INDEX}{hint}")

    def slice(self, key: str) -> Any:
        """The lazily read safetensors slice of `key`."""
        from safetensors import safe_open

        name = self.files[key]
        if name not in self._open:
            path = os.path.join(self.path, name)
            try:
                self._open[name] = safe_open(path, framework="numpy")
            except Exception as e:
                raise HFError(f"{path} is not a readable safetensors file ({e})") from None
        return self._open[name].get_slice(key)

    def tokenizer_file(self) -> str | None:
        path = os.path.join(self.path, TOKENIZER)
        return path if os.path.isfile(path) else None


def is_hf_directory(path: str | None) -> bool:
    """Whether `path` is a Hugging Face model directory (has config.json) rather than a
    jaxmp checkpoint directory."""
    return bool(path) and os.path.isfile(os.path.join(path, CONFIG))


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise HFError(f"{path} is missing; a Hugging Face model directory has a {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise HFError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


# ---------------------------------------------------------------- import
def check_keys(directory: HFDirectory, fmt: HFFormat, tensors: list[Tensor],
               num_layers: int) -> dict[str, str]:
    """Every expected key present with its shape, no unknown one. Returns the name each
    expected key has in the files (with or without the optional prefix)."""
    ignored = [re.compile(p) for p in fmt.ignored]
    expected = {k: t for t in tensors for k in t.keys(num_layers)}
    where, present = directory.path, {}
    for key in sorted(directory.files):
        names = (key, fmt.optional_prefix + key)  # the hub's GPT-2 leaves "transformer." out
        name = next((n for n in names if n in expected), None)
        if name is None and any(p.fullmatch(n) for p in ignored for n in names):
            continue  # not a weight of this config (a buffer, a tied copy)
        if name is None:
            raise HFError(f"{where}: unexpected weight '{key}' for a {fmt.model_type} model "
                          "of this config; is config.json the one these weights were saved "
                          "with?")
        present[name] = key
    for name, t in expected.items():
        if name not in present:
            raise HFError(f"{where}: weight '{name}' is missing")
        shape = tuple(directory.slice(present[name]).get_shape())
        if shape != t.hf_shape:
            left_out = [k for k in fmt.shape_keys if directory.config.get(k) is None]
            raise HFError(f"{where}: weight '{present[name]}' has shape {shape}; config.json "
                          f"implies {t.hf_shape}" + (
                              f" (it leaves out {', '.join(left_out)}, so transformers' "
                              "defaults were assumed; is it the config these weights were "
                              "saved with?)" if left_out else ""))
    return {name: present[name] for name in expected}


def load_params(directory: HFDirectory, fmt: HFFormat, cfg_json: dict, abstract: Any,
                layer_order: Sequence[int]) -> Any:
    """The parameters of `directory` as global arrays laid out like `abstract` (a pure dict
    of ShapeDtypeStructs with shardings), stacked layers in `layer_order` (storage order:
    position q holds layer layer_order[q])."""
    tensors = fmt.tensors(cfg_json)
    names = check_keys(directory, fmt, tensors, len(layer_order))
    out: dict = {}
    for t in tensors:
        leaf = _at(abstract, t.path)
        want = t.full_shape(len(layer_order))
        if tuple(leaf.shape) != want:
            raise HFError(f"parameter '{t.path}' has shape {tuple(leaf.shape)} in the model, "
                          f"but the mapping gives {want}")

        def shard(index: tuple[slice, ...], t: Tensor = t, dtype: Any = leaf.dtype) -> np.ndarray:
            if not t.stacked:
                return _read(directory.slice(names[t.key]), t, index).astype(dtype)
            layers = range(*index[0].indices(len(layer_order)))
            read = lambda key, rest: _read(directory.slice(names[key]), t, rest)
            if not t.experts:
                return np.stack([read(t.key.format(i=layer_order[q]), index[1:])
                                 for q in layers]).astype(dtype)
            experts = range(*index[1].indices(t.experts))  # only this shard's experts
            return np.stack([np.stack([read(t.key.format(i=layer_order[q], j=j), index[2:])
                                       for j in experts]) for q in layers]).astype(dtype)
        _put(out, t.path, jax.make_array_from_callback(leaf.shape, leaf.sharding, shard))
    return out


def _read(sl: Any, t: Tensor, index: tuple[slice, ...]) -> np.ndarray:
    """The block `index` of parameter `t` (one layer), reading only the tensor rows it
    needs: rows [a, b) of the first axis when the parameter's leading axes other than the
    first are whole in `index`, else every row."""
    k, lead = t.lead()
    ranges = [range(*s.indices(n)) for s, n in zip(index, t.shape)]
    inner_whole = all(len(r) == n and r.step == 1 for r, n in zip(ranges[1:k], t.shape[1:k]))
    first = ranges[0]
    if inner_whole and first.step == 1:
        r0, r1 = first.start * lead, first.stop * lead
        rest = (slice(None),) * k + tuple(index[k:])
    else:
        r0, r1 = 0, t.shape[0] * lead
        rest = tuple(index)
    hf_rows = t.hf_shape[0]
    block = np.asarray(sl[r0:min(r1, hf_rows)]) if r0 < hf_rows else np.zeros(
        (0, *t.hf_shape[1:]), np.float32)
    if block.shape[0] < r1 - r0:  # rows past the tensor's: the padded vocabulary
        block = np.concatenate([block, np.zeros((r1 - r0 - block.shape[0], *block.shape[1:]),
                                                block.dtype)])
    block = block.reshape(((r1 - r0) // lead, *t.shape[1:]))
    return block[rest]


def _at(tree: dict, path: str) -> Any:
    node = tree
    for key in path.split("/"):
        if not isinstance(node, dict) or key not in node:
            raise HFError(f"the model has no parameter '{path}'")
        node = node[key]
    return node


def _put(tree: dict, path: str, value: Any) -> None:
    *parents, leaf = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


# ---------------------------------------------------------------- export
def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '1000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)B?\s*", text.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"max_shard_size={text!r}: give a size like 2GB or 500MB")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2) or " ")
    size = int(float(m.group(1)) * base ** power)
    if size < 1:
        raise ValueError(f"max_shard_size={text!r} must be positive")
    return size


def export(params: Any, cfg_json: dict, fmt: HFFormat, out_dir: str, *,
           base_config: dict | None = None, tokenizer: dict | None = None,
           chat: dict | None = None, max_shard_bytes: int = 2 * 10**9, dtype: str | None = None) -> list[str]:
    """Write `params` (a pure dict in canonical layer order: host arrays or arrays a
    process can read whole) as a Hugging Face directory. The files are written into a
    temporary sibling directory, moved into place when complete. Returns the file names."""
    from safetensors.numpy import save_file

    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise HFError(f"{out_dir} exists and is not empty; choose a new output directory")
    tensors = fmt.tensors(cfg_json)
    num_layers = cfg_json["num_layers"]
    tmp = out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for t in tensors:
        value = np.asarray(jax.device_get(_at(params, t.path)))
        for key, part in t.items(value, num_layers):
            x = t.to_hf(part)
            if dtype:
                x = x.astype(dtype)
            if size and size + x.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = x
            size += x.nbytes
    names = ([WEIGHTS] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(x.nbytes for s in shards for x in s.values())},
                 "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        _write_json(os.path.join(tmp, INDEX), index)
        names.append(INDEX)
    config = fmt.config_to_hf(cfg_json, dict(base_config or {}))
    config.update(model_type=fmt.model_type, architectures=[fmt.architecture],
                  torch_dtype=str(np.dtype(dtype or "float32")))
    _write_json(os.path.join(tmp, CONFIG), config)
    names.append(CONFIG)
    if tokenizer:
        _write_json(os.path.join(tmp, TOKENIZER), tokenizer)
        names.append(TOKENIZER)
    if chat:  # the chat template and special tokens, where transformers reads them
        _write_json(os.path.join(tmp, "tokenizer_config.json"), chat)
        names.append("tokenizer_config.json")
    if os.path.exists(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
    return names


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")
