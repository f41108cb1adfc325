"""Llama family: RMSNorm, rotary positions, SwiGLU, grouped-query attention, no biases,
untied LM head (tying optional).

Weights are stored as Hugging Face's LlamaForCausalLM stores them, (out, in) per
projection, so import and export are reshapes (jaxmp.models.llama_hf). Rotary embeddings
use HF's rotate-half layout (the first and second halves of each head's dimensions form
the pairs), the convention of HF's checkpoints. Blocks form a LayerStack like GPT's, so
every layout (data, fsdp, tensor, pipe with GPipe and circular schedules, sequence
parallelism) and KV-cache serving work unchanged; the family's registry entry is at the
end of this module.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp import context, data, wgrad
from jaxmp.layers import RESIDUAL, Embed, KVCache, gather_sequence, gathered, param, write_cache
from jaxmp.models.decoder import (
    DecoderShape,
    from_preset,
    lm_loss,
    mask_padding,
    token_batches,
    zero_padding_rows,
)
from jaxmp.models.llama_hf import LLAMA
from jaxmp.models.registry import Family, register
from jaxmp.pipeline import PipelineSpec
from jaxmp.sharding import constrain, current_spec
from jaxmp.stack import LayerStack
from jaxmp.tokenizer import BYTE_VOCAB

X_NAMES = RESIDUAL
CACHE_NAMES = ("layers", "batch", "length", "kv_heads", "kv")  # (L, B, S, K, H): KV heads only


@dataclasses.dataclass(frozen=True)
class LlamaConfig(DecoderShape):
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_dim: int = 352
    seq_len: int = 128
    vocab_size: int = 256
    rope_theta: float = 10000.0
    # Llama 3's long-context frequency scaling (HF rope_type "llama3"): None, or
    # (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
    rope_scaling: tuple[float, float, float, int] | None = None
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    scan_layers: bool = True
    # The head and the loss fused and chunked (jaxmp.fused_loss: no (B, T, V) logits
    # stored); loss_chunk: tokens per device per chunk (0: about 32 MiB of logits each)
    fused_loss: bool = True
    loss_chunk: int = 0
    matmul_precision: str = "default"  # the weight GEMMs: default | fp8 (jaxmp.fp8)

    def validate(self) -> None:
        self.check(("num_layers", "d_model", "num_heads", "num_kv_heads", "mlp_dim", "seq_len",
                    "vocab_size"))
        if self.d_model % self.num_heads or self.head_dim % 2:
            raise ValueError(f"d_model={self.d_model} / num_heads={self.num_heads} must be an "
                             "even head dimension (rotary pairs); pick a head count that gives one")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads="
                             f"{self.num_heads} (each KV head serves a group of query heads)")
        if not (self.rope_theta > 0 and self.rms_eps > 0):
            raise ValueError(f"rope_theta={self.rope_theta} and rms_eps={self.rms_eps} must be > 0")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = list(self.rope_scaling) if self.rope_scaling else None
        return d


# Published shapes: Llama 3.2 1B (tied embeddings, Llama 3 frequency scaling), TinyLlama
# 1.1B and Llama 2 7B (their config.json files); `tiny` for tests and the CPU default run.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=8, num_kv_heads=4, mlp_dim=352,
                 seq_len=128),
    "llama-3.2-1b": dict(num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8,
                         mlp_dim=8192, seq_len=131072, vocab_size=128256, rope_theta=500000.0,
                         rope_scaling=(32.0, 1.0, 4.0, 8192), tie_embeddings=True),
    "tinyllama-1.1b": dict(num_layers=22, d_model=2048, num_heads=32, num_kv_heads=4,
                           mlp_dim=5632, seq_len=2048, vocab_size=32000),
    "llama-2-7b": dict(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=32,
                       mlp_dim=11008, seq_len=4096, vocab_size=32000),
}


def preset(name: str, **overrides: Any) -> LlamaConfig:
    return from_preset(LlamaConfig, PRESETS, "llama", name, overrides)


def num_params(cfg: LlamaConfig, *, real: bool = True) -> int:
    """Parameter count (real=True: without the vocabulary padding rows)."""
    d, h, m = cfg.d_model, cfg.head_dim, cfg.mlp_dim
    attn = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2
    block = attn + 3 * d * m + 2 * d
    vocab = cfg.vocab_size if real else cfg.padded_vocab
    return vocab * d * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * block + d


# ---------------------------------------------------------------- layers
class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last dimension, in float32 (HF's LlamaRMSNorm)."""

    def __init__(self, dim: int, *, eps: float, dtype: Any, names: tuple = ("embed",)):
        self.scale = param(None, (dim,), names, None, 1.0, float32=True)
        self.eps, self.dtype = eps, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return _rms_norm(x, self.scale[...], self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(2, 3))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float, dtype: Any) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (scale.astype(jnp.float32) * y.astype(x.dtype).astype(jnp.float32)).astype(dtype)


class Linear(nnx.Module):
    """y = x @ W.T with W stored (out..., in...) as HF's nn.Linear stores it."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 in_names: tuple, out_names: tuple, *, rngs: nnx.Rngs, std: float, dtype: Any):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, (*out_shape, *in_shape), (*out_names, *in_names), std)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return _project(x, self.kernel[...], self.dtype, self.n_in)


def _project(x: jax.Array, w: jax.Array, dtype: Any, n_in: int = 1) -> jax.Array:
    """x (..., in...) against w stored (out..., in...) with n_in input dimensions:
    (..., out...), in `dtype`."""
    axes = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(w.ndim - n_in, w.ndim)))
    return wgrad.dot(x, w, (axes, ((), ())), dtype)


def rope_frequencies(cfg: LlamaConfig) -> jax.Array:
    """(head_dim / 2,) inverse frequencies, with Llama 3's scaling when configured."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    if cfg.rope_scaling is None:
        return inv
    factor, low, high, original = cfg.rope_scaling
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = original / low, original / high
    smooth = (original / wavelen - low) / (high - low)
    mid = (1 - smooth) * inv / factor + smooth * inv
    return jnp.where(wavelen > low_wavelen, inv / factor,
                     jnp.where(wavelen < high_wavelen, inv, mid))


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate x (B, T, N, H) by its positions ((B, T) or (1, T)): HF's rotate-half layout,
    in float32."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, H/2)
    cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None, :]
    sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    """Grouped-query attention: q (heads), k and v (kv_heads) column-parallel, o row-parallel."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, out_std: float, dtype: Any):
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = Linear((d,), (n, h), ("embed",), ("heads", "kv"), rngs=rngs, std=0.02, dtype=dtype)
        self.k = Linear((d,), (k, h), ("embed",), ("kv_heads", "kv"), rngs=rngs, std=0.02,
                        dtype=dtype)
        self.v = Linear((d,), (k, h), ("embed",), ("kv_heads", "kv"), rngs=rngs, std=0.02,
                        dtype=dtype)
        self.o = Linear((n, h), (d,), ("heads", "kv"), ("embed",), rngs=rngs, std=out_std,
                        dtype=dtype)
        self.implementation = None if cfg.attention == "auto" else cfg.attention
        # Qwen3's RMSNorm of each query and key head before the rotation (qk_norm configs)
        qk = getattr(cfg, "qk_norm", False)
        norm = lambda: RMSNorm(h, eps=cfg.rms_eps, dtype=dtype, names=("kv",))
        self.q_norm, self.k_norm = (norm(), norm()) if qk else (None, None)

    def _qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """q (B, T, N, H), k and v (B, T, K, H). Where KV heads are split like the query
        heads (or not split), q, k and v are one projection: the query heads grouped by
        their KV head, (K, N/K + 2, H, d), so each device stacks only its own heads; one
        matmul, and one all-reduce of the input gradient in the backward pass instead of
        three. Where the KV heads are replicated (tensor > their count), three."""
        n, h, d = self.q.kernel.shape
        kv = self.k.kernel.shape[0]
        heads = current_spec(("heads",), (n,), "params")
        if wgrad.tapped() or (heads is not None
                              and heads != current_spec(("kv_heads",), (kv,), "params")):
            # (each GEMM its own weight where the backward pass is split at them: a fused
            # weight would be a new array the split keeps per micro-batch)
            return gathered(self.q, x), gathered(self.k, x), gathered(self.v, x)
        g = n // kv
        w = jnp.concatenate([self.q.kernel[...].reshape(kv, g, h, d),
                             self.k.kernel[...][:, None], self.v.kernel[...][:, None]], axis=1)
        w = constrain(w, ("kv_heads", None, "kv", "embed"), kind="params")
        y = gathered(lambda t: _project(t, w, self.q.dtype), x)  # (B, T, K, G + 2, H)
        b, t = y.shape[:2]
        return y[:, :, :, :g].reshape(b, t, n, h), y[:, :, :, g], y[:, :, :, g + 1]

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 cache: KVCache | None = None, index: jax.Array | None = None,
                 layer: int | None = None,
                 order: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        """`positions` (B, T) or (1, T) rotate q and k; `order` (T,): the positions of a
        sequence stored out of order (context parallelism), None for 0..T-1."""
        q_names, kv_names = ("batch", "length", "heads", "kv"), ("batch", "length", "kv_heads", "kv")
        q, k, v = self._qkv(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(constrain(q, q_names), positions, inv_freq), q_names)
        k = constrain(apply_rope(constrain(k, kv_names), positions, inv_freq), kv_names)
        v = constrain(v, kv_names)
        if cache is None:
            y = context.causal(q, k, v, order, self.implementation)
        else:
            cache = tuple(write_cache(c, new, index, layer, kv_names)
                          for c, new in zip(cache, (k, v)))
            k_all, v_all = (c if layer is None else c[layer] for c in cache)
            y = context.cached_attention(q, k_all, v_all, positions)
        return self.o(constrain(y, q_names)), cache


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate and up column-parallel, down row-parallel."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, out_std: float, dtype: Any):
        d, m = cfg.d_model, cfg.mlp_dim
        self.gate = Linear((d,), (m,), ("embed",), ("mlp",), rngs=rngs, std=0.02, dtype=dtype)
        self.up = Linear((d,), (m,), ("embed",), ("mlp",), rngs=rngs, std=0.02, dtype=dtype)
        self.down = Linear((m,), (d,), ("mlp",), ("embed",), rngs=rngs, std=out_std, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        if wgrad.tapped():  # (as in Attention._qkv)
            gate, up = (constrain(gathered(f, x), ("batch", "length", "mlp"))
                        for f in (self.gate, self.up))
            return self.down(jax.nn.silu(gate) * up)
        # gate and up as one projection (m, 2, d), split like each of them: one matmul, and
        # in the backward pass one all-reduce of the input gradient instead of two
        w = jnp.stack([self.gate.kernel[...], self.up.kernel[...]], axis=1)
        w = constrain(w, ("mlp", None, "embed"), kind="params")
        gu = constrain(gathered(lambda h: _project(h, w, self.gate.dtype), x),
                       ("batch", "length", "mlp", None))
        return self.down(jax.nn.silu(gu[..., 0]) * gu[..., 1])


class Block(nnx.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    mlp_cls: type = MLP  # a family built on Llama's (models/moe.py) swaps the MLP

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, out_std: float, dtype: Any):
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, dtype=dtype)
        self.attn = Attention(cfg, rngs=rngs, out_std=out_std, dtype=dtype)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, dtype=dtype)
        self.mlp = self.mlp_cls(cfg, rngs=rngs, out_std=out_std, dtype=dtype)

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 cache: KVCache | None = None, index: jax.Array | None = None,
                 layer: int | None = None,
                 order: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        x = constrain(x, RESIDUAL)
        a, cache = self.attn(self.attn_norm(x), positions, inv_freq, cache, index, layer, order)
        x = constrain(x + a, RESIDUAL)
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, RESIDUAL), cache


# ---------------------------------------------------------------- the model
class Llama(nnx.Module):
    block_cls: type = Block  # a family built on Llama's (models/moe.py) swaps the block

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs,
                 pipeline: PipelineSpec = PipelineSpec()):
        cfg.validate()
        self.cfg = cfg
        self.stack = LayerStack(cfg.num_layers, pipeline, cfg.remat, cfg.scan_layers,
                                "decoder layers")
        # model.eval() sets it: the loss then runs forward only (no schedule-driven
        # backward pass, jaxmp.scheduled)
        self.deterministic = False
        dtype = jnp.dtype(cfg.dtype)
        self.embed = Embed(cfg.padded_vocab, cfg.d_model, rngs=rngs, dtype=dtype)
        self.embed.embedding[...] = zero_padding_rows(self.embed.embedding[...], cfg.vocab_size)
        out_std = 0.02 / math.sqrt(2 * cfg.num_layers)
        self.blocks = self.stack.build(lambda r: self.block_cls(cfg, rngs=r, out_std=out_std, dtype=dtype),
                                       rngs.params())
        self.norm = RMSNorm(cfg.d_model, eps=cfg.rms_eps, dtype=dtype)
        self.lm_head = None if cfg.tie_embeddings else Embed(cfg.padded_vocab, cfg.d_model,
                                                             rngs=rngs, dtype=dtype)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return constrain(gather_sequence(self.embed(tokens)), X_NAMES)

    def head_input(self, x: jax.Array) -> tuple[jax.Array, Embed]:
        """The head's input (final norm, whole sequence) and its output embedding."""
        return gather_sequence(self.norm(x)), self.embed if self.lm_head is None else self.lm_head

    def head(self, x: jax.Array) -> jax.Array:
        h, table = self.head_input(x)
        logits = table.attend(h).astype(jnp.float32)
        return mask_padding(constrain(logits, ("batch", "length", "vocab")), self.cfg.vocab_size)

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        """tokens (B, T) -> logits (B, T, V); `positions` (T,) as GPT's."""
        stem, layer = self.trunk(tokens.shape[1], positions)
        return self.head(self.stack.apply(self.blocks, stem(self, tokens), X_NAMES, layer))

    def trunk(self, t: int, positions: Any = None) -> tuple[Callable, Callable]:
        """(stem(model, tokens) -> x, layer(block, x) -> x) for sequences of t tokens at
        `positions` (as GPT's)."""
        order, rope_pos = self._positions(t, positions)
        inv_freq = rope_frequencies(self.cfg)
        return (lambda model, tokens: model._embed(tokens),
                lambda block, h: block(h, rope_pos, inv_freq, order=order)[0])

    def _positions(self, t: int, positions: jax.Array | None,
                   ) -> tuple[jax.Array | None, jax.Array]:
        """The sequence's order (None: natural) and the rotary positions (1, T) (any batch:
        micro-batches, replicas), after checking the length t."""
        if t > self.cfg.seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the context of {self.cfg.seq_len}")
        return positions, (jnp.arange(t) if positions is None else positions)[None, :]

    def decode(self, tokens: jax.Array, cache: KVCache, index: jax.Array,
               layers: list[Any] | None = None) -> tuple[jax.Array, KVCache]:
        """KV-cached forward (see GPT.decode): tokens (B, t) at positions index[b] + [0, t)."""
        positions = index[:, None] + jnp.arange(tokens.shape[1])[None, :]
        inv_freq = rope_frequencies(self.cfg)
        call = lambda block, h, kv, layer: block(h, positions, inv_freq, kv, index, layer)
        x, cache = self.stack.apply_with_state(self.blocks, self._embed(tokens), X_NAMES, call,
                                               cache, (CACHE_NAMES, CACHE_NAMES), layers)
        return self.head(x), cache

    def init_cache(self, batch: int, length: int | None = None, dtype: Any = None) -> KVCache:
        c = self.cfg
        shape = (c.num_layers, batch, length or c.seq_len, c.num_kv_heads, c.head_dim)
        z = jnp.zeros(shape, dtype or jnp.dtype(c.dtype))
        return constrain(z, CACHE_NAMES), constrain(z, CACHE_NAMES)


def flops_per_token(cfg: LlamaConfig) -> float:
    """Training FLOPs per token: 6N (N without the input embedding, which is a lookup)
    + 12 L d T attention (PaLM appendix B)."""
    n = num_params(cfg) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    return 6 * n + 12 * cfg.num_layers * cfg.d_model * cfg.seq_len


DEFAULT_TOKEN_VOCAB = 32000


def config_from_spec(spec: Any, source: str, *, family: str = "llama",
                     cls: type = LlamaConfig, presets: dict | None = None) -> Any:
    """The family's config from the flat model settings (a family built on Llama's passes
    its name, config class and presets). A published shape keeps its vocabulary (byte
    data fits in it); `tiny` takes the data's."""
    presets = PRESETS if presets is None else presets
    base = presets.get(spec.preset, {})
    vocab = spec.vocab_size or base.get("vocab_size") or (
        BYTE_VOCAB if data.is_byte_source(source) else DEFAULT_TOKEN_VOCAB)
    over = spec.family_overrides(family, cls)
    over.pop("vocab_size", None)
    return from_preset(cls, presets, family, spec.preset, {"vocab_size": vocab, **over})


def config_from_json(d: dict, cls: type = LlamaConfig) -> Any:
    """A checkpoint record's config (rope_scaling back to a tuple)."""
    d = dict(d)
    if d.get("rope_scaling") is not None:
        d["rope_scaling"] = tuple(d["rope_scaling"])
    return cls(**d)


FAMILY = register(Family(
    name="llama", make_config=config_from_spec, config_from_json=config_from_json,
    build=lambda cfg, pipeline, rngs: Llama(cfg, rngs=rngs, pipeline=pipeline), loss=lm_loss,
    batches=token_batches, eval_batches=token_batches, stack="blocks",
    flops_per_token=flops_per_token,
    generates=True, layers_name="decoder layers", hf=LLAMA))
