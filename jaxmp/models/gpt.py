"""GPT-2 family (pre-LayerNorm, tanh-GELU, learned positions, tied embedding, biases).

Decoder blocks form a LayerStack (jaxmp.stack): stacked on a leading `layers` axis, applied
by the pipeline on a `pipe` mesh, else by a scan (compile time independent of depth) or an
unrolled loop. The family's registry entry is at the end of this module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp import context, data
from jaxmp.layers import (
    RESIDUAL,
    Dense,
    Embed,
    KVCache,
    LayerNorm,
    gather_sequence,
    gathered,
    param,
    scale_std,
    write_cache,
)
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


# ---------------------------------------------------------------- GPT-2's blocks
class Attention(nnx.Module):
    """Causal multi-head self-attention: column-parallel QKV, row-parallel output."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, out_std: float = 0.02,
                 dtype: Any = jnp.float32, implementation: str | None = None):
        if dim % heads:
            raise ValueError(f"d_model={dim} is not divisible by num_heads={heads}")
        hd = dim // heads
        self.qkv = Dense((dim,), (3, heads, hd), ("embed",), (None, "heads", "kv"), rngs=rngs,
                         dtype=dtype)
        self.out = Dense((heads, hd), (dim,), ("heads", "kv"), ("embed",), rngs=rngs,
                         std=out_std, dtype=dtype)
        self.implementation = implementation  # causal_attention's: xla / cudnn / chunked

    def __call__(self, x: jax.Array, cache: KVCache | None = None,
                 index: jax.Array | None = None, layer: int | None = None,
                 order: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """x: (B, T, D), its tokens' positions `order` (T,) (None: 0..T-1). With a cache
        (B, S, N, H) the T new positions start at `index` (B,). With `layer`, the cache is
        the whole stack (L, B, S, N, H) and only this layer's new positions are written
        (no copy of the layer's slab)."""
        names = ("batch", "length", "heads", "kv")
        qkv = gathered(self.qkv, x)  # (B, T, 3, N, H)
        q, k, v = (constrain(qkv[:, :, i], names) for i in range(3))
        if cache is None:
            y = context.causal(q, k, v, order, self.implementation)
        else:
            t = x.shape[1]
            cache = tuple(write_cache(c, new, index, layer) for c, new in zip(cache, (k, v)))
            k_all, v_all = (c if layer is None else c[layer] for c in cache)  # (B, S, N, H)
            q_pos = index[:, None] + jnp.arange(t)[None, :]  # (B, T)
            y = context.cached_attention(q, k_all, v_all, q_pos)
        y = constrain(y, names)
        return self.out(y), cache


class MLP(nnx.Module):
    """Column-parallel expansion, tanh-GELU, row-parallel projection."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, out_std: float = 0.02,
                 dtype: Any = jnp.float32):
        self.fc = Dense((dim,), (hidden,), ("embed",), ("mlp",), rngs=rngs, dtype=dtype)
        self.proj = Dense((hidden,), (dim,), ("mlp",), ("embed",), rngs=rngs, std=out_std,
                          dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(gathered(self.fc, x), ("batch", "length", "mlp"))
        return self.proj(_gelu(h))


# Recomputed in the backward pass, like _layer_norm: autodiff of tanh-GELU keeps several
# (B, T, mlp) intermediates, recomputing keeps only its input.
_gelu = jax.checkpoint(functools.partial(jax.nn.gelu, approximate=True))


class DecoderBlock(nnx.Module):
    """Pre-LayerNorm GPT-2 block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs,
                 out_std: float = 0.02, dtype: Any = jnp.float32, attention: str | None = None):
        self.ln1 = LayerNorm(dim, dtype=dtype)
        self.attn = Attention(dim, heads, rngs=rngs, out_std=out_std, dtype=dtype,
                              implementation=attention)
        self.ln2 = LayerNorm(dim, dtype=dtype)
        self.mlp = MLP(dim, mlp_dim, rngs=rngs, out_std=out_std, dtype=dtype)

    def __call__(self, x: jax.Array, cache: KVCache | None = None,
                 index: jax.Array | None = None, layer: int | None = None,
                 order: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        x = constrain(x, RESIDUAL)
        a, cache = self.attn(self.ln1(x), cache, index, layer, order)
        x = constrain(x + a, RESIDUAL)  # with sequence parallelism: a reduce-scatter
        x = x + self.mlp(self.ln2(x))
        return constrain(x, RESIDUAL), cache


# ---------------------------------------------------------------- the model
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
    # The head and the loss fused and chunked (jaxmp.fused_loss: no (B, T, V) logits
    # stored); loss_chunk: tokens per device per chunk (0: about 32 MiB of logits each)
    fused_loss: bool = True
    loss_chunk: int = 0
    matmul_precision: str = "default"  # the weight GEMMs: default | fp8 (jaxmp.fp8)

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
        # model.eval() sets it: the loss then runs forward only (no schedule-driven
        # backward pass, jaxmp.scheduled)
        self.deterministic = False
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

    def head_input(self, x: jax.Array) -> tuple[jax.Array, Embed]:
        """The head's input (final norm, whole sequence) and its (tied) output embedding."""
        return gather_sequence(self.ln_f(x)), self.wte

    def head(self, x: jax.Array) -> jax.Array:
        """Final norm and tied LM head; padded vocabulary entries get -inf-like logits."""
        h, table = self.head_input(x)
        logits = table.attend(h).astype(jnp.float32)
        return mask_padding(constrain(logits, ("batch", "length", "vocab")), self.cfg.vocab_size)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens (B, T) int -> logits (B, T, padded_vocab) float32. `positions` (T,): the
        tokens' positions where they are stored out of order (context parallelism's
        load-balanced layout, `context.sequence_order`); default 0..T-1."""
        stem, layer = self.trunk(tokens.shape[1], positions)
        return self.head(self.stack.apply(self.blocks, stem(self, tokens), X_NAMES, layer))

    def trunk(self, T: int, positions: Any = None) -> tuple[Callable, Callable]:
        """The forward pass up to the head for sequences of T tokens at `positions`:
        (stem(model, tokens) -> x, layer(block, x) -> x) (the pipeline schedules that
        run their own backward pass call them micro-batch by micro-batch)."""
        if T > self.cfg.seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the context of {self.cfg.seq_len}")
        pos = jnp.arange(T) if positions is None else positions
        return (lambda model, tokens: model.embed(tokens, pos),
                lambda block, h: block(h, order=positions)[0])

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
