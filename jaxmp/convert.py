"""jaxmp checkpoint <-> Hugging Face directory (experiments.convert is the command).

    to_checkpoint("gpt2/", "ckpt/")           # a params-only jaxmp checkpoint, step 0
    to_hf("runs/x", "out/", step=None)         # config.json, safetensors shards, tokenizer

Both directions go through one device's memory on this host (the weights once, as float32
unless a dtype is asked for); the Hugging Face side is written by jaxmp.hf.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp import hf
from jaxmp.checkpoint import CheckpointRecord, save_params
from jaxmp.mesh import make_mesh
from jaxmp.models import registry
from jaxmp.pipeline import PipelineSpec
from jaxmp.pretrained import Source, open_source
from jaxmp.sharding import DEFAULT_RULES, logical_axes, named, param_specs


def _abstract(source: Source, model_cfg: Any, dtype: Any = jnp.float32) -> tuple[Any, Any]:
    """The model's parameters as ShapeDtypeStructs on one device, and the model."""
    mesh = make_mesh("", devices=jax.devices()[:1])
    model = nnx.eval_shape(lambda: source.family.build(model_cfg, PipelineSpec(), nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    shardings = named(mesh, param_specs(params, logical_axes(model), mesh, DEFAULT_RULES))
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, dtype, sharding=s), params, shardings)
    return target, model


def _check_output(path: str, name: str = "output") -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{name}={path} exists and is not an empty directory; choose a new "
                         "one (nothing is overwritten)")


def to_checkpoint(hf_dir: str, out: str, *, name: str = "input") -> int:
    """A Hugging Face directory as a params-only jaxmp checkpoint (step 0) that carries its
    tokenizer and config.json (so it converts back unchanged). Returns the parameter count."""
    _check_output(out)
    source = open_source(hf_dir, name=name)
    if source.directory is None:
        raise ValueError(f"{name}={hf_dir} is not a Hugging Face directory (no config.json)")
    model_cfg = source.family.config_from_json(source.config)
    target, model = _abstract(source, model_cfg)
    params = source.load(target, model.stack.order, model_cfg)
    mesh = make_mesh("", devices=jax.devices()[:1])
    record = CheckpointRecord.create(source.family.name, source.family.stack, model_cfg, mesh,
                                     DEFAULT_RULES, PipelineSpec(), {"source": hf_dir},
                                     tokenizer=source.tokenizer, hf_config=source.hf_config)
    save_params(out, 0, params, record)
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def to_hf(ckpt_dir: str, out: str, *, step: int | None = None, dtype: str | None = None,
          max_shard_bytes: int = 2 * 10**9, name: str = "input") -> list[str]:
    """A jaxmp checkpoint (training or params-only) as a Hugging Face directory."""
    _check_output(out)
    source = open_source(ckpt_dir, step=step, name=name)
    if source.directory is not None:
        raise ValueError(f"{name}={ckpt_dir} is a Hugging Face directory already")
    model_cfg = source.family.config_from_json(source.config)
    fmt = registry.hf_format(source.family, config=model_cfg.to_json())
    target, model = _abstract(source, model_cfg)
    params = source.load(target, list(range(model_cfg.num_layers)), model_cfg)  # canonical
    return hf.export(jax.device_get(params), model_cfg.to_json(), fmt, out,
                     base_config=source.hf_config, tokenizer=source.tokenizer,
                     chat=source.chat, max_shard_bytes=max_shard_bytes, dtype=dtype)
