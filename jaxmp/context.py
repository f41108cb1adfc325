"""Context parallelism: attention over a sequence split along the `context` mesh axis.

The activation rules map `length` (and the residual stream's `sequence`) to `context`, so
every per-token computation (embeddings, norms, projections, MLPs, the loss) runs on the
device's own slice of the sequence with no communication. Attention is the one place
tokens meet; it runs in a shard_map over the mesh in one of two ways (the rules'
`context_attention`):

- ring: each device keeps its queries and passes its key/value block around the ring of
  `context` devices (c-1 collective-permutes), accumulating the output with an online
  softmax (running max and sum, as flash attention does), so no device ever holds more
  than two blocks of keys. The backward pass is a ring too (a custom VJP): the key/value
  blocks travel again with their gradients accumulating beside them, and arrive home after
  c permutes. Nothing of size T x T or T x kv_dim is kept.
- allgather: keys and values are all-gathered over `context` (GQA-sized: the KV heads
  only), then each device attends its queries to them block by block with the same
  online softmax; the backward pass reduce-scatters their gradients (Llama 3's choice:
  one collective per layer, cheaper at moderate lengths, needs the whole KV in memory).

Causal load balance. Split plainly, the device holding the end of the sequence does c
times the attention work of the first. `zigzag_order` cuts the sequence into 2c chunks
and gives device i chunks i and 2c-1-i (Megatron-LM's and Llama 3's layout); the loss
applies that order to the tokens, targets and positions before the model sees them (the
loss is a mean over tokens, so neither it nor the data order changes). Masks are always
computed from positions, never from array indices, so any order is correct. Inside each
block a piece of at most CHUNK queries meets a piece of at most CHUNK keys at a time
(`piece_size`: pieces never straddle two zig-zag chunks), so the scores held are bounded
whatever the length, and a piece of keys entirely after a piece of queries is skipped
(`lax.cond`), which with the zig-zag order leaves every device the same work at every
ring step.

Serving keeps the KV cache split over `context` the same way: a cached step's queries
(all of them, gathered) attend each device's slice of the cache, and the partial results
are combined with one max and two sums over `context` (`cached_attention`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from jaxmp.layers import CHUNK, causal_attention
from jaxmp.sharding import CONTEXT_ATTENTION, current_mesh, current_rules, current_spec, shard_map

KINDS = CONTEXT_ATTENTION  # ring | allgather
NEG = -1e30  # the masked score (finite: a block with no visible key must not give NaN)
Q_NAMES = ("batch", "length", "heads", "kv")
KV_NAMES = ("batch", "length", "kv_heads", "kv")


# ---------------------------------------------------------------- the layout
def zigzag_order(t: int, c: int) -> np.ndarray:
    """The positions in storage order for a sequence of t split over c devices: 2c chunks,
    device i holding chunks i and 2c-1-i (identity for c == 1)."""
    if c <= 1:
        return np.arange(t)
    if t % (2 * c):
        raise ValueError(f"a sequence of {t} tokens does not split into 2*context = {2 * c} "
                         f"equal chunks; use a length divisible by {2 * c}")
    chunks = np.arange(t).reshape(2 * c, t // (2 * c))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * c - 1 - i]])
                           for i in range(c)])


def context_axes(t: int) -> tuple[str, ...]:
    """The mesh axes a length-t sequence is split over under the current rules (() outside
    a mesh, or where they do not divide t)."""
    spec = current_spec(("length",), (t,))
    entry = spec[0] if spec else None
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def context_size(t: int) -> int:
    mesh = current_mesh()
    return math.prod(mesh.shape[a] for a in context_axes(t)) if mesh is not None else 1


def sequence_order(t: int) -> np.ndarray | None:
    """The order a training sequence of t tokens is laid out in on the current mesh: the
    zig-zag order where it is split over `context`, else None (the natural order)."""
    c = context_size(t)
    return zigzag_order(t, c) if c > 1 else None


def causal_work(order: np.ndarray, c: int) -> np.ndarray:
    """Visible (query, key) pairs each of c devices attends to when the sequence is stored
    in `order` and split into c contiguous slices (the causal work per device)."""
    return np.array([int(np.sum(q + 1)) for q in np.split(np.asarray(order), c)])


# ---------------------------------------------------------------- the online softmax
def _scores(q: jax.Array, k: jax.Array, qpos: jax.Array, kpos: jax.Array, scale: float,
            ) -> tuple[jax.Array, jax.Array]:
    """q (b, tq, K, G, h), k (b, tk, K, h) -> masked scores (b, K, G, tq, tk) float32 and the
    mask (key position <= query position): (tq, tk) for query positions qpos (tq,) shared
    by the batch, (b, 1, 1, tq, tk) for positions per row (b, tq) (a cached step)."""
    s = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * scale
    mask = kpos[None, :] <= qpos[..., :, None]
    mask = mask if qpos.ndim == 1 else mask[:, None, None]
    return jnp.where(mask, s, NEG), mask


def _fwd_update(state: tuple, q: jax.Array, k: jax.Array, v: jax.Array, qpos: jax.Array,
                kpos: jax.Array, scale: float) -> tuple:
    """One block of keys folded into the running (max, sum, output) of queries q."""
    m, den, acc = state
    s, mask = _scores(q, k, qpos, kpos, scale)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
    corr = jnp.exp(m - m_new)
    den = den * corr + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bkgqs,bskh->bqkgh", p.astype(v.dtype), v,
                    preferred_element_type=jnp.float32)
    acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
    return m_new, den, acc


def _bwd_update(grads: tuple, q: jax.Array, k: jax.Array, v: jax.Array, do: jax.Array,
                lse: jax.Array, delta: jax.Array, qpos: jax.Array, kpos: jax.Array,
                scale: float) -> tuple:
    """The gradient contributions of one (queries, keys) block: (dq, dk, dv) added to."""
    dq, dk, dv = grads
    s, mask = _scores(q, k, qpos, kpos, scale)
    p = jnp.where(mask, jnp.exp(s - lse[..., None]), 0.0)                  # (b, K, G, q, s)
    dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p, do.astype(jnp.float32))
    dp = jnp.einsum("bqkgh,bskh->bkgqs", do, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * scale
    dq = dq + jnp.einsum("bkgqs,bskh->bqkgh", ds, k.astype(jnp.float32))
    dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, q.astype(jnp.float32))
    return dq, dk, dv


def piece_size(n: int) -> int:
    """Rows per piece of a local block of n positions: the largest divisor of its half (a
    zig-zag chunk; the whole block when n is odd) not above layers.CHUNK. A piece of
    queries meets a piece of keys at a time, so the scores held are CHUNK x CHUNK per head
    whatever the length, and a piece never straddles two chunks (whole pieces are
    skipped)."""
    return largest_divisor(n // 2 if n % 2 == 0 else n)


def largest_divisor(n: int, cap: int = CHUNK) -> int:
    """The largest divisor of n not above cap."""
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def _visible(qpos: jax.Array, kpos: jax.Array) -> jax.Array:
    return jnp.min(kpos) <= jnp.max(qpos)


def _rows(x: jax.Array, i: jax.Array, size: int, axis: int) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=axis)


def _put(x: jax.Array, rows: jax.Array, i: jax.Array, axis: int) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(x, rows, i * rows.shape[axis], axis=axis)


def _fold_block(states: tuple, q: jax.Array, k: jax.Array, v: jax.Array, qpos: jax.Array,
                kpos: jax.Array, scale: float) -> tuple:
    """Fold a block of keys into the running (max, sum, output) of queries q, a piece of
    queries against a piece of keys at a time; pieces of keys entirely after a piece of
    queries are skipped."""
    n = piece_size(q.shape[1])

    def q_piece(i, states):
        m, den, acc = states
        qs, qp = _rows(q, i, n, 1), _rows(qpos, i, n, 0)

        def k_piece(j, st):
            ks, vs, kp = _rows(k, j, n, 1), _rows(v, j, n, 1), _rows(kpos, j, n, 0)
            return jax.lax.cond(_visible(qp, kp),
                                lambda s_: _fwd_update(s_, qs, ks, vs, qp, kp, scale),
                                lambda s_: s_, st)
        st = (_rows(m, i, n, 3), _rows(den, i, n, 3), _rows(acc, i, n, 1))
        st = jax.lax.fori_loop(0, k.shape[1] // n, k_piece, st)
        return _put(m, st[0], i, 3), _put(den, st[1], i, 3), _put(acc, st[2], i, 1)
    return jax.lax.fori_loop(0, q.shape[1] // n, q_piece, states)


def _grad_block(dq: jax.Array, dkv: tuple, q: jax.Array, k: jax.Array, v: jax.Array,
                do: jax.Array, lse: jax.Array, delta: jax.Array, qpos: jax.Array,
                kpos: jax.Array, scale: float) -> tuple[jax.Array, tuple]:
    """The backward pass of `_fold_block`: dq added to, and the key block's (dk, dv)."""
    n = piece_size(q.shape[1])

    def k_piece(j, carry):
        dq, dk, dv = carry
        ks, vs, kp = _rows(k, j, n, 1), _rows(v, j, n, 1), _rows(kpos, j, n, 0)

        def q_piece(i, c2):
            dq, dkj, dvj = c2
            qp = _rows(qpos, i, n, 0)
            args = (_rows(q, i, n, 1), ks, vs, _rows(do, i, n, 1), _rows(lse, i, n, 3),
                    _rows(delta, i, n, 3), qp, kp)
            dqi, dkj, dvj = jax.lax.cond(
                _visible(qp, kp), lambda c3: _bwd_update(c3, *args, scale), lambda c3: c3,
                (_rows(dq, i, n, 1), dkj, dvj))
            return _put(dq, dqi, i, 1), dkj, dvj
        dq, dkj, dvj = jax.lax.fori_loop(0, q.shape[1] // n, q_piece,
                                         (dq, _rows(dk, j, n, 1), _rows(dv, j, n, 1)))
        return dq, _put(dk, dkj, j, 1), _put(dv, dvj, j, 1)
    dq, dk, dv = jax.lax.fori_loop(0, k.shape[1] // n, k_piece, (dq, *dkv))
    return dq, (dk, dv)


def _init_states(q: jax.Array) -> tuple:
    b, t, kh, g, h = q.shape
    return (jnp.full((b, kh, g, t), NEG, jnp.float32), jnp.zeros((b, kh, g, t), jnp.float32),
            jnp.zeros((b, t, kh, g, h), jnp.float32))


def _finish(states: tuple) -> tuple[jax.Array, jax.Array]:
    """Output (b, tq, K, G, h) float32 and its log-sum-exp (b, K, G, tq)."""
    m, den, acc = states
    return acc / jnp.moveaxis(den, -1, 1)[..., None], m + jnp.log(den)


def _pinned(*xs: Any) -> tuple:
    """The arrays a forward or backward rule works on, tied together by an optimization
    barrier: the masks depend only on positions, the same in every layer, and without the
    tie XLA hoists their computation out of the layer loop, keeping every ring step's masks
    (c x (T/c)^2 per head) alive for the whole step."""
    return jax.lax.optimization_barrier(xs)


# ---------------------------------------------------------------- ring attention
def _shift(x: Any, axes: tuple[str, ...], c: int) -> Any:
    """Pass to the next device of the ring (device i's block goes to i+1)."""
    perm = [(i, (i + 1) % c) for i in range(c)]
    return jax.tree_util.tree_map(lambda a: jax.lax.ppermute(a, axes, perm), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _ring(q: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array,
          axes: tuple[str, ...], c: int) -> jax.Array:
    return _ring_fwd(q, k, v, pos, axes, c)[0]


def _ring_fwd(q, k, v, pos, axes, c):
    q, k, v, pos = _pinned(q, k, v, pos)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def step(_, carry):  # fold the block held, pass it on (a loop: one step's buffers)
        states, kb, vb, kpos = carry
        states = _fold_block(states, q, kb, vb, pos, kpos, scale)
        return (states, *_shift((kb, vb, kpos), axes, c))
    states, kb, vb, kpos = jax.lax.fori_loop(0, c - 1, step, (_init_states(q), k, v, pos))
    out, lse = _finish(_fold_block(states, q, kb, vb, pos, kpos, scale))
    return out.astype(q.dtype), (q, k, v, pos, out.astype(q.dtype), lse)


def _ring_bwd(axes, c, res, do):
    q, k, v, pos, out, lse, do = _pinned(*res, do)
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta = jnp.einsum("bqkgh,bqkgh->bkgq", do.astype(jnp.float32), out.astype(jnp.float32))
    grad = lambda dq, dkv, kb, vb, kpos: _grad_block(dq, dkv, q, kb, vb, do, lse, delta, pos,
                                                     kpos, scale)

    def step(_, carry):  # the block's gradients travel with it
        dq, kb, vb, kpos, dkv = carry
        dq, dkv = grad(dq, dkv, kb, vb, kpos)
        return (dq, *_shift((kb, vb, kpos, dkv), axes, c))
    dq0 = jnp.zeros(q.shape, jnp.float32)
    dkv0 = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, kb, vb, kpos, dkv = jax.lax.fori_loop(0, c - 1, step, (dq0, k, v, pos, dkv0))
    dq, dkv = grad(dq, dkv, kb, vb, kpos)
    dkv = _shift(dkv, axes, c)  # the last block's gradients go home: the c-th step
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)


# ---------------------------------------------------------------- blockwise local attention
@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q: jax.Array, k: jax.Array, v: jax.Array, qpos: jax.Array, kpos: jax.Array,
               blocks: int) -> jax.Array:
    return _blockwise_fwd(q, k, v, qpos, kpos, blocks)[0]


def _blockwise_fwd(q, k, v, qpos, kpos, blocks):
    q, k, v, qpos, kpos = _pinned(q, k, v, qpos, kpos)
    scale = 1.0 / math.sqrt(q.shape[-1])

    n = k.shape[1] // blocks

    def step(i, states):  # one block of keys at a time (a loop: one block's buffers)
        return _fold_block(states, q, _rows(k, i, n, 1), _rows(v, i, n, 1), qpos,
                           _rows(kpos, i, n, 0), scale)
    out, lse = _finish(jax.lax.fori_loop(0, blocks, step, _init_states(q)))
    return out.astype(q.dtype), (q, k, v, qpos, kpos, out.astype(q.dtype), lse)


def _blockwise_bwd(blocks, res, do):
    q, k, v, qpos, kpos, out, lse, do = _pinned(*res, do)
    scale = 1.0 / math.sqrt(q.shape[-1])
    delta = jnp.einsum("bqkgh,bqkgh->bkgq", do.astype(jnp.float32), out.astype(jnp.float32))

    n = k.shape[1] // blocks

    def step(i, carry):
        dq, dk, dv = carry
        kb, vb = _rows(k, i, n, 1), _rows(v, i, n, 1)
        zero = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
        dq, (dkb, dvb) = _grad_block(dq, zero, q, kb, vb, do, lse, delta, qpos,
                                     _rows(kpos, i, n, 0), scale)
        return dq, _put(dk, dkb, i, 1), _put(dv, dvb, i, 1)
    dq, dk, dv = jax.lax.fori_loop(0, blocks, step, (jnp.zeros(q.shape, jnp.float32),
                                                     jnp.zeros(k.shape, jnp.float32),
                                                     jnp.zeros(v.shape, jnp.float32)))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


# ---------------------------------------------------------------- the entry points
def _grouped(q: jax.Array, kv_heads: int) -> jax.Array:
    b, t, n, h = q.shape
    return q.reshape(b, t, kv_heads, n // kv_heads, h)


def _local_attention(kind: str, axes: tuple[str, ...], c: int):
    def body(q, k, v, pos):
        b, t, n, h = q.shape
        qg = _grouped(q, k.shape[2])
        if kind == "ring":
            y = _ring(qg, k, v, pos, axes, c)
        else:
            gather = lambda a, axis: jax.lax.all_gather(a, axes, axis=axis, tiled=True)
            y = _blockwise(qg, gather(k, 1), gather(v, 1), pos, gather(pos, 0), c)
        return y.reshape(b, t, n, h)
    return body


def _matching_kv(q: jax.Array, k: jax.Array, v: jax.Array, q_spec: PartitionSpec,
                 kv_spec: PartitionSpec) -> tuple[jax.Array, jax.Array, PartitionSpec]:
    """k and v with their heads split like the query heads: where the rules cannot split
    the KV heads as they split the query heads (a tensor axis larger than the KV heads),
    each KV head is repeated for its query group."""
    q_entries, kv_entries = (*q_spec, None, None, None, None), (*kv_spec, None, None, None, None)
    if q_entries[2] == kv_entries[2]:
        return k, v, kv_spec
    g = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(a, g, axis=2) for a in (k, v))
    return k, v, PartitionSpec(*q_entries[:4])


def attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array,
              kind: str | None = None) -> jax.Array:
    """Causal attention of q (B, T, N, H) over k, v (B, T, K, H) whose tokens sit at
    `positions` (T,) (any order: the mask compares positions), with the sequence split over
    the current rules' `length` axes: `kind` ring or allgather (default: the rules'). Off
    such a mesh, blockwise attention on one device (the same numbers)."""
    t = q.shape[1]
    axes = context_axes(t)
    mesh = current_mesh()
    positions = jnp.asarray(positions, jnp.int32).reshape(t)
    if not axes:
        mask = positions[None, :] <= positions[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None])
    c = math.prod(mesh.shape[a] for a in axes)
    kind = kind or current_rules().context_attention
    if kind not in KINDS:
        raise ValueError(f"context_attention={kind!r}: choose {' or '.join(KINDS)}")
    q_spec = current_spec(Q_NAMES, q.shape)
    kv_spec = current_spec(KV_NAMES, k.shape)
    k, v, kv_spec = _matching_kv(q, k, v, q_spec, kv_spec)
    pos_spec = PartitionSpec(q_spec[1])
    return shard_map(_local_attention(kind, axes, c), mesh, (q_spec, kv_spec, kv_spec, pos_spec),
                     q_spec)(q, k, v, positions)


def _cached_block(q: jax.Array, k: jax.Array, v: jax.Array, qpos: jax.Array,
                  kpos: jax.Array, scale: float, n: int) -> tuple:
    """(max, sum, output) of queries q (b, t, K, G, h) at positions qpos (b, t) (per row)
    over keys at kpos (S,), pieces of n keys at a time (the online softmax of the training
    kernels; a row may see no key on this device)."""
    def fold(j, st):
        return _fwd_update(st, q, _rows(k, j, n, 1).astype(q.dtype),
                           _rows(v, j, n, 1).astype(q.dtype), qpos, _rows(kpos, j, n, 0), scale)
    return jax.lax.fori_loop(0, k.shape[1] // n, fold, _init_states(q))


def causal(q: jax.Array, k: jax.Array, v: jax.Array, order: jax.Array | None,
           implementation: str | None = None) -> jax.Array:
    """A model's training attention: tokens stored in `order` (their positions; None: the
    natural order). Where the sequence is split over `context`, `attention` across it;
    else the single-device kernel (`implementation`: layers.causal_attention's)."""
    t = q.shape[1]
    if order is None and not context_axes(t):
        return causal_attention(q, k, v, implementation)
    return attention(q, k, v, jnp.arange(t) if order is None else order)


def cached_attention(q: jax.Array, k_all: jax.Array, v_all: jax.Array,
                     q_pos: jax.Array) -> jax.Array:
    """Attention of new queries q (B, t, N, H) at positions q_pos (B, t) over a whole KV
    cache (B, S, K, H) (slot j holds position j; positions after q_pos masked). Where the
    rules split the cache's length over `context`, each device attends to its slice and
    the partial results are merged with a max and two sums over `context`; else plain
    masked attention."""
    s = k_all.shape[1]
    axes = context_axes(s)
    if not axes:
        mask = jnp.arange(s)[None, None, :] <= q_pos[:, :, None]
        return jax.nn.dot_product_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype),
                                            mask=mask[:, None])
    mesh = current_mesh()
    q_spec = current_spec(("batch", None, "heads", "kv"), q.shape)
    kv_spec = current_spec(KV_NAMES, k_all.shape)
    k_all, v_all, kv_spec = _matching_kv(q, k_all, v_all, q_spec, kv_spec)
    pos_spec = PartitionSpec(q_spec[0] if len(q_spec) else None)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def body(q, k, v, qpos):
        b, t, n, h = q.shape
        local = k.shape[1]
        kpos = jax.lax.axis_index(axes) * local + jnp.arange(local)
        qg = _grouped(q, k.shape[2])
        if t * local <= CHUNK * CHUNK:  # a decode step, a short prompt: one block
            m, den, acc = _cached_block(qg, k, v, qpos, kpos, scale, local)
        else:  # a long prompt: pieces of queries, each over pieces of the cache slice
            nq = largest_divisor(t)

            def piece(i, out):
                rows = _cached_block(_rows(qg, i, nq, 1), k, v, _rows(qpos, i, nq, 1), kpos,
                                     scale, largest_divisor(local))
                return tuple(_put(o, r, i, ax) for o, r, ax in zip(out, rows, (3, 3, 1)))
            m, den, acc = jax.lax.fori_loop(0, t // nq, piece, _init_states(qg))
        m_all = jax.lax.pmax(m, axes)  # merge the devices' partial softmaxes
        corr = jnp.exp(m - m_all)
        den = jax.lax.psum(den * corr, axes)
        acc = jax.lax.psum(acc * jnp.moveaxis(corr, -1, 1)[..., None], axes)
        y = acc / jnp.moveaxis(den, -1, 1)[..., None]
        return y.reshape(b, t, n, h).astype(q.dtype)

    return shard_map(body, mesh, (q_spec, kv_spec, kv_spec, pos_spec), q_spec)(
        q, k_all, v_all, q_pos.astype(jnp.int32))
