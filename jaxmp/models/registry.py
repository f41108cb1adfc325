"""Model families: what training, checkpoints and serving need to know about a model, in
one record per family. Nothing outside this registry compares family names.

    from jaxmp.models.registry import Family, register
    register(Family(name="mine", make_config=..., config_from_json=..., build=..., loss=...,
                    batches=...))

then `python -m experiments.train --family_module=my.module --model=mine` trains it (the
module is imported before the run, so its `register` call runs). GPT-2 (`gpt`), Llama
(`llama`), the mixture of experts (`moe`) and the book's layer-wise MLP (`mlp`) are the
built-in entries.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import numpy as np
from flax import nnx

from jaxmp.pipeline import PipelineSpec


class Batches(Protocol):
    """The global batches of a run: host examples for compiling, device batches per step."""

    tokens_per_step: int  # what throughput counts per step (tokens, or examples)
    unit: str             # its name in progress lines ("tok", "examples")

    def example(self) -> dict[str, np.ndarray]: ...

    def device(self, step: int, shardings: Mapping[str, Any]) -> dict[str, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the planner and the memory check read of a model config, typed: one place
    that knows which fields a family's config has (`model_shape`), instead of probes."""
    num_layers: int
    width: int = 0          # d_model (decoders), hidden width (the MLP)
    seq_len: int = 1        # tokens per example (1: not a sequence model)
    vocab: int = 0          # padded vocabulary of the logits (0: no vocabulary)
    dtype: str = "float32"  # compute dtype
    remat: str | None = None       # None: the family has no remat setting
    attention: str | None = None   # None: no attention
    scan_layers: bool = True
    experts: int = 1               # a mixture of experts' experts per layer (1: dense)
    experts_per_token: int = 1     # and its top-k


def model_shape(cfg: Any) -> ModelShape:
    """The ModelShape of a family config dataclass, from the fields it declares (a
    decoder's d_model / seq_len / padded_vocab, the MLP's hidden_dim, dtype, remat,
    attention, scan_layers)."""
    fields = {f.name for f in dataclasses.fields(cfg)}
    has = lambda name, default: getattr(cfg, name) if name in fields else default
    width = has("d_model", has("hidden_dim", 0))
    return ModelShape(cfg.num_layers, width, has("seq_len", 1),
                      cfg.padded_vocab if "vocab_size" in fields else 0, has("dtype", "float32"),
                      has("remat", None), has("attention", None), has("scan_layers", True),
                      has("num_experts", 1), has("experts_per_token", 1))


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    # (flat model settings from the config tree (config.ModelSpec), data source) -> config;
    # the config has `num_layers` and `to_json()`
    make_config: Callable[[Any, str], Any]
    config_from_json: Callable[[dict], Any]             # a checkpoint's record -> config
    build: Callable[[Any, PipelineSpec, nnx.Rngs], nnx.Module]  # model in a layout
    loss: Callable[[nnx.Module, Mapping[str, jax.Array]], Any]
    batches: Callable[[Any, str, int, int], Batches]    # (config, data, batch size, seed)
    stack: str = "blocks"           # the parameter subtree that is the model's LayerStack
    flops_per_token: Callable[[Any], float] | None = None  # None: no MFU in the logs
    generates: bool = False         # a token model with decode / init_cache (Server)
    layers_name: str = "layers"     # how errors call its stacked layers
    # jaxmp.hf.HFFormat (or a tuple of them: several HF architectures, e.g. the MoE's
    # Mixtral and Qwen3-MoE): Hugging Face import / export
    hf: Any = None
    # (config, validation source, batch size, seed) -> validation batches (None: no eval)
    eval_batches: Callable[[Any, str, int, int], Batches] | None = None


_FAMILIES: dict[str, Family] = {}
_BUILTIN = ("jaxmp.models.gpt", "jaxmp.models.llama", "jaxmp.models.moe", "jaxmp.models.mlp")


DEFAULT = "gpt"  # the family of a run that names none (and of checkpoints from before names)

def register(family: Family) -> Family:
    """Add a family (a second registration of a name replaces the first: re-imports)."""
    _FAMILIES[family.name] = family
    return family


def get(name: str) -> Family:
    """The family called `name`; an unknown name lists the registered ones."""
    _load_builtin()
    if name not in _FAMILIES:
        raise ValueError(f"model={name!r}: no such model family; registered: "
                         f"{', '.join(sorted(_FAMILIES))} (a module passed with "
                         "--family_module can register more)")
    return _FAMILIES[name]


def hf_formats(family: Family) -> tuple:
    """The Hugging Face formats a family reads and writes (none, one or several)."""
    if family.hf is None:
        return ()
    return tuple(family.hf) if isinstance(family.hf, (tuple, list)) else (family.hf,)


def hf_format(family: Family, model_type: str | None = None, config: dict | None = None) -> Any:
    """The family's HFFormat for a config.json's `model_type` (import), or the first that
    can represent the family config JSON `config` (export: a format's `accepts` says why
    not)."""
    formats = hf_formats(family)
    if not formats:
        raise ValueError(f"the {family.name} family has no Hugging Face format")
    if model_type is not None:
        return next(f for f in formats if f.model_type == model_type)
    reasons = []
    for fmt in formats:
        reason = fmt.accepts(config) if fmt.accepts and config is not None else None
        if reason is None:
            return fmt
        reasons.append(f"{fmt.architecture}: {reason}")
    raise ValueError("no Hugging Face architecture represents this model (" +
                     "; ".join(reasons) + ")")


def for_hf(model_type: str) -> Family:
    """The family that reads Hugging Face checkpoints of `model_type` (config.json's)."""
    _load_builtin()
    for family in _FAMILIES.values():
        if any(f.model_type == model_type for f in hf_formats(family)):
            return family
    known = sorted(f.model_type for fam in _FAMILIES.values() for f in hf_formats(fam))
    raise ValueError(f"model_type={model_type!r} (config.json): no jaxmp family reads it; "
                     f"supported: {', '.join(known)}")


def names() -> list[str]:
    _load_builtin()
    return sorted(_FAMILIES)


def import_modules(modules: list[str]) -> None:
    """Import modules that register families (--family_module)."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"family_module={module!r} cannot be imported ({e}); give an "
                             "importable module path, e.g. mypkg.families") from e


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(module)
