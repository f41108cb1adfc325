"""The language-model head and its cross-entropy, fused and chunked.

The plain head writes the whole (B, T, V) float32 logits, then the loss reads them, its
gradient writes another (B, T, V) array, and two GEMMs read that. Here the tokens go
through the head a chunk at a time (`--loss_chunk` tokens; by default as many as 32 MiB
of float32 logits per device hold on CPUs, 256 MiB elsewhere): each chunk's logits give
its losses and, in the same pass, their gradient, which goes at once into the input's
gradient (dl W) and the weight's (dl^T x, accumulated over the chunks). No (B, T, V)
array is ever stored, forward or backward, and the head's three GEMMs run once each, as
the plain head's do: nothing is recomputed.

The gradients are made in the forward pass, so they are the gradients of one scalar,
the sum of the rows' mean losses; the per-row losses the tail returns carry their exact
values, and their gradient is that scalar's spread evenly over the rows. Every loss
jaxmp builds from them weighs the rows equally (a mean, or a sum divided by the rows),
so it is the exact gradient there; a loss that weighted rows unequally would need the
unfused head (`--nofused_loss`).

Under a mesh the chunks run inside a shard_map over the logits' own layout (batch and
length as the activation rules split them, the vocabulary over its axes): the log-sum-exp
and the target's logit are reduced over the vocabulary's axes per chunk, the input's
gradient once per chunk (as the plain head's backward GEMM is), and the weight's
gradient once per step, over the batch and length axes, after the last chunk.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxmp.sharding import current_mesh, current_spec, shard_map

NEG_INF = -1e30
# float32 logits per device per chunk when the chunk size is automatic: on CPUs a chunk's
# logits stay near the caches (measured: 128-256 tokens of GPT-2's vocabulary are the
# fastest, BUILD_NOTES); elsewhere larger chunks keep the GEMMs large (not yet measured)
CHUNK_BYTES = {"cpu": 32 << 20}
CHUNK_BYTES_DEFAULT = 256 << 20


def chunk_count(rows: int, length: int, vocab: int, chunk_tokens: int = 0,
                backend: str | None = None) -> int:
    """How many chunks a device's (rows, length) tokens go through the head in: the fewest
    that divide `length` and hold at most `chunk_tokens` tokens each (0: as many tokens
    as the backend's CHUNK_BYTES of float32 logits over `vocab` entries hold)."""
    limit = chunk_tokens or max(1, chunk_budget(backend) // (4 * vocab))
    for n in range(1, length + 1):
        if length % n == 0 and rows * (length // n) <= limit:
            return n
    return length


def chunk_budget(backend: str | None = None) -> int:
    """Bytes of float32 logits per device per chunk when the chunk size is automatic."""
    return CHUNK_BYTES.get(backend or jax.default_backend(), CHUNK_BYTES_DEFAULT)


def row_losses(x: jax.Array, table: jax.Array, targets: jax.Array, vocab_size: int,
               dtype: Any, chunk_tokens: int = 0) -> jax.Array:
    """Each row's mean cross-entropy (B,) of the logits x @ table^T (entries from
    `vocab_size` on masked out) against `targets` (B, T), the logits never stored whole.
    x: (B, T, d) final hidden states, the whole sequence; table: (V_padded, d) the output
    embedding (float32 master weights); the GEMMs run in `dtype`, the loss in float32."""
    b, t, _ = x.shape
    names = ("batch", "length", "vocab")
    spec = current_spec(names, (b, t, table.shape[0])) if _on_mesh() else None
    axes = tuple(_axes(spec, i) for i in range(3)) if spec is not None else None
    static = (vocab_size, jnp.dtype(dtype).name, chunk_tokens, axes)
    total, rows = _fused(static, x, table, targets)
    return jax.lax.stop_gradient(rows) + (total - jax.lax.stop_gradient(total)) / b


def _on_mesh() -> bool:
    mesh = current_mesh()
    return mesh is not None and mesh.size > 1


def _axes(spec: P, i: int) -> tuple[str, ...]:
    entry = spec[i] if i < len(spec) else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(static: tuple, x: jax.Array, table: jax.Array, targets: jax.Array) -> tuple:
    return _run(static, x, table, targets, grads=False)


def _fused_fwd(static: tuple, x: jax.Array, table: jax.Array, targets: jax.Array) -> tuple:
    total, rows, dx, dw = _run(static, x, table, targets, grads=True)
    return (total, rows), (dx, dw)


def _fused_bwd(static: tuple, res: tuple, cotangents: tuple) -> tuple:
    dx, dw = res
    g = cotangents[0]  # the rows' own cotangent is zero: row_losses stops it
    return (dx * g.astype(dx.dtype), dw * g, None)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _run(static: tuple, x: jax.Array, table: jax.Array, targets: jax.Array,
         grads: bool) -> tuple:
    """(sum of the rows' mean losses, the rows' (B,)[, d total / dx, d total / d table])."""
    axes = static[3]
    length = x.shape[1]
    if axes is None:
        return _local(static, length, x, table, targets, grads)
    ba, la, va = axes
    row_spec, tok_spec = P(ba or None, la or None), P(ba or None)
    x_spec, w_spec = P(ba or None, la or None, None), P(va or None, None)
    out = (P(), tok_spec) + ((x_spec, w_spec) if grads else ())
    body = functools.partial(_local, static, length, grads=grads)
    return shard_map(body, current_mesh(), in_specs=(x_spec, w_spec, row_spec),
                     out_specs=out)(x, table, targets)


def _psum(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    return jax.lax.psum(x, axes) if axes else x


def _local(static: tuple, length: int, x: jax.Array, table: jax.Array, targets: jax.Array,
           grads: bool) -> tuple:
    """One device's share: its rows and positions, its slice of the vocabulary."""
    vocab_size, dtype, chunk_tokens, axes = static
    ba, la, va = axes if axes is not None else ((), (), ())
    b, t, d = x.shape
    v = table.shape[0]
    offset = jax.lax.axis_index(va) * v if va else 0
    ids = offset + jnp.arange(v)
    w = table.astype(dtype)
    n = chunk_count(b, t, v, chunk_tokens)
    c = t // n
    xs = jnp.moveaxis(x.astype(dtype).reshape(b, n, c, d), 1, 0)      # (n, b, c, d)
    ts = jnp.moveaxis(targets.reshape(b, n, c), 1, 0)                 # (n, b, c)

    def chunk(dw: Any, inputs: tuple) -> tuple:
        xc, tc = inputs
        logits = jnp.einsum("bcd,vd->bcv", xc, w).astype(jnp.float32)
        logits = jnp.where(ids < vocab_size, logits, NEG_INF)
        top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
        if va:
            top = jax.lax.pmax(top, va)
        lse = top + jnp.log(_psum(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1), va))
        hit = ids == tc[..., None]
        target = _psum(jnp.sum(jnp.where(hit, logits, 0.0), axis=-1), va)
        losses = lse - target                                          # (b, c)
        if not grads:
            return dw, (losses,)
        dl = ((jnp.exp(logits - lse[..., None]) - hit) / length).astype(dtype)
        dx = _psum(jnp.einsum("bcv,vd->bcd", dl, w), va)
        dw = dw + jnp.einsum("bcv,bcd->vd", dl, xc, preferred_element_type=jnp.float32)
        return dw, (losses, dx)

    dw0 = jnp.zeros((v, d), jnp.float32) if grads else None
    dw, out = jax.lax.scan(chunk, dw0, (xs, ts))
    rows = _psum(jnp.sum(out[0], axis=(0, 2)) / length, la)           # (b,)
    total = _psum(jnp.sum(rows), ba)
    if not grads:
        return total, rows
    dx = jnp.moveaxis(out[1], 0, 1).reshape(b, t, d).astype(x.dtype)
    return total, rows, dx, _psum(dw, ba + la)

