"""Sharded Flax NNX building blocks. Every parameter carries logical axis names.

Tensor parallelism follows Megatron-LM: the QKV projection and the MLP's first projection
are column-parallel (heads / mlp split over `tensor`), the attention output and the MLP's
second projection row-parallel, so each block needs one all-reduce after attention and one
after the MLP in the forward pass. Norms are replicated; the embedding is vocab-parallel.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp import wgrad
from jaxmp.sharding import constrain

Names = tuple[str | None, ...]


def param(rngs: nnx.Rngs | None, shape: Sequence[int], names: Names, std: float | None,
          value: float = 0.0, *, float32: bool = False) -> nnx.Param:
    """A parameter with logical names: normal(0, std) if std is given (a weight matrix,
    weight-decayed), else constant `value` (a bias or norm parameter: weight_decay=False,
    whatever its number of dimensions, e.g. the (3, heads, kv) QKV bias). `float32`: the
    layer computes with it in float32 whatever the compute dtype (a norm's scale), so a
    server keeps it in float32 (metadata keep_float32, read by `keeps_float32`)."""
    if std is None:
        init = jnp.full(tuple(shape), value, jnp.float32)
    else:
        init = std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32)
    return nnx.Param(init, logical_axes=tuple(names), weight_decay=std is not None,
                     keep_float32=float32)


def keeps_float32(params: nnx.State) -> dict:
    """Pure dict of booleans: which parameters are used in float32 (`param(float32=True)`;
    user models may set the keep_float32 metadata too)."""
    flat = jax.tree_util.tree_map(lambda v: bool(v.get_metadata().get("keep_float32", False)),
                                  params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return nnx.to_pure_dict(flat) if isinstance(flat, nnx.State) else flat


class Dense(nnx.Module):
    """y = x @ W + b over several input and output dimensions (einsum-style)."""

    def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int], in_names: Names,
                 out_names: Names, *, rngs: nnx.Rngs, std: float = 0.02, use_bias: bool = True,
                 dtype: Any = jnp.float32):
        self.n_in = len(in_shape)
        self.kernel = param(rngs, (*in_shape, *out_shape), (*in_names, *out_names), std)
        self.bias = param(None, out_shape, out_names, None) if use_bias else None
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = (tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in)))
        y = wgrad.dot(x, self.kernel[...], (axes, ((), ())), self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm over the last dimension, computed in float32, parameters replicated."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype: Any = jnp.float32):
        self.scale = param(None, (dim,), ("embed",), None, 1.0, float32=True)
        self.bias = param(None, (dim,), ("embed",), None, 0.0, float32=True)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return _layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


# Recomputed in the backward pass: autodiff of the float32 arithmetic would otherwise keep
# three float32 copies of x per norm for the backward pass; recomputing keeps only x in the
# compute dtype. Measured on an H100 (GPT-2 small, batch 32, bf16): see BUILD_NOTES.
@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float,
                dtype: Any) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)


class Embed(nnx.Module):
    """Vocab-parallel token embedding; `attend` is the tied output projection."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, std: float = 0.02,
                 dtype: Any = jnp.float32):
        self.embedding = param(rngs, (vocab, dim), ("vocab", "embed"), std)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather from the table split over vocab only (under FSDP this all-gathers the
        # embed dimension first, as every FSDP weight use does).
        table = constrain(self.embedding[...], ("vocab", None), kind="params")
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        return jnp.einsum("...d,vd->...v", x.astype(self.dtype),
                          self.embedding[...].astype(self.dtype))


KVCache = tuple[jax.Array, jax.Array]  # (B, S, N, H) keys and values
CHUNK = 512  # query positions per block of chunked attention


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                     implementation: str | None = None) -> jax.Array:
    """Causal attention of q (B, T, N, H) over k, v (B, T, K, H), K dividing N (grouped
    queries). `implementation`: None (JAX picks), "xla", "cudnn" (jax.nn's), or "chunked":
    query blocks of CHUNK positions, each recomputed in the backward pass, so no (T, T)
    scores are kept for it (flash attention's memory, in plain XLA: any backend, any
    dtype; the backward pass pays one more forward of the scores)."""
    if implementation != "chunked":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                            implementation=implementation)
    b, t, n, h = q.shape
    kv = k.shape[2]
    c = min(CHUNK, t)
    if t % c:
        raise ValueError(f"chunked attention: seq_len={t} is not a multiple of {c}; use "
                         f"a multiple of {c} or attention=xla")
    scale = 1.0 / math.sqrt(h)

    @jax.checkpoint
    def block(start: jax.Array, qb: jax.Array) -> jax.Array:
        qg = qb.reshape(b, c, kv, n // kv, h)                               # (B, C, K, G, H)
        s = jnp.einsum("bckgh,bskh->bkgcs", qg, k, preferred_element_type=jnp.float32)
        pos = start + jnp.arange(c)
        s = jnp.where(jnp.arange(t)[None, :] <= pos[:, None], s * scale, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)                      # (B, K, G, C, S)
        y = jnp.einsum("bkgcs,bskh->bckgh", p, v)
        return y.reshape(b, c, n, h)

    starts = jnp.arange(0, t, c)
    blocks = q.reshape(b, t // c, c, n, h).swapaxes(0, 1)                  # (T/C, B, C, N, H)
    y = jax.lax.map(lambda xs: block(*xs), (starts, blocks))
    return y.swapaxes(0, 1).reshape(b, t, n, h)


def write_cache(cache: jax.Array, new: jax.Array, index: jax.Array, layer: int | None,
                 names: Names = ("batch", "length", "heads", "kv")) -> jax.Array:
    """Write new (B, T, N, H) at positions index[b] + [0, T) of cache (B, S, N, H), or of
    layer `layer` of a stacked cache (L, B, S, N, H); positions past the cache's end are
    dropped. A scatter of just those rows, in place: a vmapped dynamic-update-slice over
    the batch axis of the stacked cache made XLA transpose and rewrite the whole cache at
    every layer of every token."""
    new = new.astype(cache.dtype)
    b, t = new.shape[:2]
    rows = jnp.arange(b)[:, None]
    pos = index[:, None] + jnp.arange(t)[None, :]  # (B, T)
    if layer is None:
        return constrain(cache.at[rows, pos].set(new, mode="drop"), names)
    return constrain(cache.at[layer, rows, pos].set(new, mode="drop"), ("layers", *names))


# The residual stream between the tensor-parallel regions: (batch, sequence, embed).
RESIDUAL: Names = ("batch", "sequence", "embed")


def gather_sequence(x: jax.Array) -> jax.Array:
    """The whole sequence of a residual-stream activation, as a column-parallel projection
    takes it: with sequence parallelism (sequence=tensor) an all-gather over `tensor`,
    else a no-op."""
    return constrain(x, ("batch", "length", "embed"))


def gathered(dense: Dense, x: jax.Array) -> jax.Array:
    """A column-parallel projection of a residual-stream activation: the whole sequence
    gathered, then projected. Rematerialized, so the backward pass keeps x as it is split
    (and gathers it again) rather than the gathered copy: sequence parallelism's memory
    saving (Korthikanti et al. 2022, section 4.2.2). Without it, nothing is recomputed
    (the projection's gradients need only its inputs)."""
    return jax.checkpoint(lambda h: dense(gather_sequence(h)))(constrain(x, RESIDUAL))


def scale_std(num_layers: int) -> float:
    """GPT-2's residual-projection init: 0.02 / sqrt(2 * layers)."""
    return 0.02 / math.sqrt(2 * num_layers)
