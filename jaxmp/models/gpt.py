"""GPT-2 family (pre-LayerNorm, tanh-GELU, learned positions, tied embedding, biases).

Decoder blocks form a LayerStack (jaxmp.stack): stacked on a leading `layers` axis, applied
by the pipeline on a `pipe` mesh, else by a scan (compile time independent of depth) or an
unrolled loop. The family's registry entry is at the end of this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp import data
from jaxmp.layers import RESIDUAL, DecoderBlock, Embed, LayerNorm, gather_sequence, param, scale_std
from jaxmp.models.decoder import (  # noqa: F401  (lm_loss: re-exported)
    DecoderShape,
    from_preset,
    lm_loss,
    mask_padding,
    token_batches,
    zero_padding_rows,
)
from jaxmp.models.gpt_hf import GPT2
from jaxmp.models.registry import Family, register
from jaxmp.pipeline import PipelineSpec
from jaxmp.sharding import constrain
from jaxmp.stack import LayerStack
from jaxmp.tokenizer import BYTE_VOCAB

X_NAMES = RESIDUAL
CACHE_NAMES = ("layers", "batch", "length", "heads", "kv")  # (L, B, S, N, H)


@dataclasses.dataclass(frozen=True)
class GPTConfig(DecoderShape):
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 8
    seq_len: int = 128
    vocab_size: int = 256
    mlp_ratio: int = 4
    dtype: str = "float32"  # compute dtype; parameters are always float32
    remat: str = "none"
    attention: str = "auto"  # training attention: auto (JAX picks) | xla | cudnn (GPU) | chunked
    # Apply the stacked layers with lax.scan (compile time independent of depth) or as an
    # unrolled loop (no per-layer loop overhead, no stacked activations for the backward
    # pass: faster on GPUs, see BUILD_NOTES). The pipeline always scans.
    scan_layers: bool = True

    def validate(self) -> None:
        self.check(("num_layers", "d_model", "num_heads", "seq_len", "vocab_size"))
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by "
                             f"num_heads={self.num_heads}; pick a head count that divides it")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# GPT-2 shapes (Radford et al. 2019); `tiny` is for tests and the CPU default run.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=8, seq_len=128),
    "small": dict(num_layers=12, d_model=768, num_heads=12, seq_len=1024),
    "medium": dict(num_layers=24, d_model=1024, num_heads=16, seq_len=1024),
    "large": dict(num_layers=36, d_model=1280, num_heads=20, seq_len=1024),
    "xl": dict(num_layers=48, d_model=1600, num_heads=25, seq_len=1024),
}


def preset(name: str, **overrides: Any) -> GPTConfig:
    return from_preset(GPTConfig, PRESETS, "gpt", name, overrides)


def num_params(cfg: GPTConfig, *, real: bool = True, embeddings: bool = True) -> int:
    """Parameter count; real=True leaves out the vocabulary padding rows,
    embeddings=False leaves out the position embedding (the 6N of MFU)."""
    d, L = cfg.d_model, cfg.num_layers
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (cfg.mlp_ratio * d * d) \
        + cfg.mlp_ratio * d + d
    vocab = cfg.vocab_size if real else cfg.padded_vocab
    pos = cfg.seq_len * d if embeddings else 0
    return vocab * d + pos + L * block + 2 * d


class GPT(nnx.Module):
    """GPT-2. `pipeline` says how the stacked layers are laid out and applied."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs,
                 pipeline: PipelineSpec = PipelineSpec()):
        cfg.validate()
        self.cfg = cfg
        self.stack = LayerStack(cfg.num_layers, pipeline, cfg.remat, cfg.scan_layers,
                                "decoder layers")
        dtype = jnp.dtype(cfg.dtype)
        self.wte = Embed(cfg.padded_vocab, cfg.d_model, rngs=rngs, dtype=dtype)
        self.wte.embedding[...] = zero_padding_rows(self.wte.embedding[...], cfg.vocab_size)
        self.wpe = param(rngs, (cfg.seq_len, cfg.d_model), ("length", "embed"), 0.01)
        out_std = scale_std(cfg.num_layers)
        make = lambda r: DecoderBlock(cfg.d_model, cfg.num_heads, cfg.mlp_ratio * cfg.d_model,
                                      rngs=r, out_std=out_std, dtype=dtype,
                                      attention=None if cfg.attention == "auto" else cfg.attention)
        self.blocks = self.stack.build(make, rngs.params())
        self.ln_f = LayerNorm(cfg.d_model, dtype=dtype)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens (B, T) and positions (T,) or (B, T) -> (B, T, D)."""
        x = self.wte(tokens) + jnp.take(self.wpe[...], positions, axis=0).astype(self.wte.dtype)
        # the lookups on the whole sequence (split tables: partial rows summed), then split
        # along it with sequence parallelism; else the tables themselves would be gathered
        return constrain(gather_sequence(x), X_NAMES)

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and tied LM head; padded vocabulary entries get -inf-like logits."""
        logits = self.wte.attend(gather_sequence(self.ln_f(x))).astype(jnp.float32)
        return mask_padding(constrain(logits, ("batch", "length", "vocab")), self.cfg.vocab_size)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens (B, T) int -> logits (B, T, padded_vocab) float32."""
        T = tokens.shape[1]
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.cfg.seq_len}")
        x = self.embed(tokens, jnp.arange(T))
        x = self.stack.apply(self.blocks, x, X_NAMES, lambda block, h: block(h)[0])
        return self.head(x)

    def decode(self, tokens: jax.Array, cache: tuple[jax.Array, jax.Array],
               index: jax.Array, layers: list[Any] | None = None,
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """KV-cached forward. tokens (B, t) at positions index[b] + [0, t); cache
        (L, B, S, N, H) keys and values in storage order; `layers`: the blocks' weights
        split once by `self.stack.split` (for a loop of decode calls). Returns logits
        (B, t, V)."""
        positions = jnp.minimum(index[:, None] + jnp.arange(tokens.shape[1]), self.cfg.seq_len - 1)
        x = self.embed(tokens, positions)
        call = lambda block, h, kv, layer: block(h, kv, index, layer)
        x, cache = self.stack.apply_with_state(self.blocks, x, X_NAMES, call, cache,
                                               (CACHE_NAMES, CACHE_NAMES), layers)
        return self.head(x), cache

    def init_cache(self, batch: int, length: int | None = None,
                   dtype: Any = None) -> tuple[jax.Array, jax.Array]:
        c = self.cfg
        shape = (c.num_layers, batch, length or c.seq_len, c.num_heads, c.head_dim)
        z = jnp.zeros(shape, dtype or jnp.dtype(c.dtype))
        return constrain(z, CACHE_NAMES), constrain(z, CACHE_NAMES)


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs per token, PaLM appendix B: 6N + 12 L d T (N without positions)."""
    n = num_params(cfg, real=True, embeddings=False)
    return 6 * n + 12 * cfg.num_layers * cfg.d_model * cfg.seq_len


def _config(spec: Any, source: str) -> GPTConfig:
    """The GPT config of the command line: a preset and its overrides."""
    if spec.num_kv_heads is not None:
        raise ValueError("num_kv_heads is a llama setting; GPT-2 attention has one KV head per "
                         "query head (use --model=llama for grouped-query attention)")
    vocab = spec.vocab_size or (BYTE_VOCAB if data.is_byte_source(source) else GPT2_VOCAB)
    over = spec.family_overrides("gpt", GPTConfig)
    over.pop("vocab_size", None)
    return preset(spec.preset, vocab_size=vocab, **over)


def _config_from_json(d: dict) -> GPTConfig:
    return GPTConfig(**d)


GPT2_VOCAB = 50257
FAMILY = register(Family(
    name="gpt", make_config=_config, config_from_json=_config_from_json,
    build=lambda cfg, pipeline, rngs: GPT(cfg, rngs=rngs, pipeline=pipeline), loss=lm_loss,
    batches=token_batches, eval_batches=token_batches, stack="blocks",
    flops_per_token=flops_per_token,
    generates=True, layers_name="decoder layers", hf=GPT2))
