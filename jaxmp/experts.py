"""Mixture of experts: the router, its losses, dispatch and combine, and the expert-parallel
MLP (the fifth kind of parallelism: an `expert` mesh axis).

A router scores each token against the E experts (softmax in float32); each token goes to
its top-k experts, with the top-k weights renormalised to sum to 1 where the model asks
(Mixtral and Qwen3 do, OLMoE does not). Every token reaches its k experts (dropless, the
default): the assignments are sorted by expert and each expert's rows are one group of a
grouped matmul (`jax.lax.ragged_dot`). With a capacity factor cf an expert takes at most
C = ceil(cf * T * k / E) assignments of each sequence of T tokens, first choices before
second choices, earlier positions first; the rest are dropped (their share of the output
is zero, not renormalised).

Expert parallelism: the experts' weights are split over `expert` by their `experts`
dimension, and outside the experts `expert` splits the batch like `data`. Inside a
shard_map each device routes its own tokens, packs the rows bound for each expert shard
into a fixed buffer, exchanges the buffers with one all-to-all over `expert` (dispatch),
runs its local experts, and sends the results back with a second all-to-all (combine).
The buffers hold the most a destination can receive, so nothing is lost to them:
  - dropless: the assignments sorted by expert, R = n * min(k, E/e) rows per destination
    for n local tokens (a token sends at most one row per local expert there), each
    expert's rows one group of the grouped matmul. On XLA's CPU backend, which has no
    ragged all-to-all, the buffers are this worst case: e * min(k, E/e) / k times the
    rows a balanced routing moves;
  - capacity: fixed slots (GShard): local expert j takes the device's sequence q at
    slots q*C + rank, a buffer (e, E/e, b*C, d) of cf * n * k rows, exactly the analytic
    volume at cf = 1, and each expert one dense matmul over its slots.
Each expert's MLP is further split over `tensor` Megatron-style (gate and up by columns,
down by rows, one all-reduce of the combined output).

Routing statistics are kept per sequence, so that every layout (meshes, micro-batches,
pipeline stages, accumulation) computes the same losses as one device:
  - load balancing (Switch / Mixtral form): E * sum_e f_e * P_e over each sequence's
    tokens, f_e the fraction of its tokens routed to e (over all k choices: sum_e f_e = k,
    so a perfectly balanced router scores k) and P_e the mean router probability of e;
  - router z-loss (ST-MoE): the mean over tokens of logsumexp(router logits)^2;
  - the dropped fraction: of the sequence's T * k assignments, those over capacity.
The model averages them over sequences and layers.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxmp.sharding import current_mesh, current_spec, shard_map

STATS = ("aux_loss", "router_z_loss", "dropped_fraction")  # per sequence, in this order


# ---------------------------------------------------------------- the router
def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits (..., E) -> top-k weights (..., k) float32, their experts (..., k) int32
    (best first; ties to the lower index) and the probabilities (..., E) float32."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32), probs


def load_balancing_loss(probs: jax.Array, experts: jax.Array) -> jax.Array:
    """E * sum_e f_e * P_e over the token axis (-2): probs (..., T, E), experts (..., T, k)
    -> (...). f_e = (tokens whose top-k holds e) / T, P_e = mean probability of e."""
    num, tokens = probs.shape[-1], probs.shape[-2]
    counts = jnp.sum(jax.nn.one_hot(experts, num, dtype=jnp.float32), axis=(-3, -2))  # (..., E)
    return num * jnp.sum(counts / tokens * jnp.mean(probs, axis=-2), axis=-1)


def router_z_loss(logits: jax.Array) -> jax.Array:
    """Mean over the token axis (-2) of logsumexp(logits)^2: logits (..., T, E) -> (...)."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)), axis=-1)


def capacity(factor: float, tokens: int, k: int, num_experts: int) -> int:
    """Assignments an expert takes from one sequence of `tokens` tokens (factor > 0)."""
    return max(1, math.ceil(factor * tokens * k / num_experts))


def within_capacity(experts: jax.Array, num_experts: int, cap: int) -> jax.Array:
    """experts (b, T, k) -> (b, T, k) bool: the assignments an expert keeps when it takes
    `cap` per sequence, first choices before second ones, earlier positions first."""
    return arrival_rank(experts, num_experts) < cap


def arrival_rank(experts: jax.Array, num_experts: int) -> jax.Array:
    """experts (b, T, k) -> (b, T, k): how many of the sequence's assignments to the same
    expert come first (first choices before second ones, earlier positions first)."""
    b, t, k = experts.shape
    slot_major = experts.transpose(0, 2, 1).reshape(b, k * t)
    onehot = jax.nn.one_hot(slot_major, num_experts, dtype=jnp.int32)  # (b, k*T, E)
    rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # (b, k*T)
    return rank.reshape(b, k, t).transpose(0, 2, 1)


# ---------------------------------------------------------------- the expert MLP
def grouped_matmul(x: jax.Array, w: jax.Array, sizes: jax.Array,
                   dense: bool | None = None) -> jax.Array:
    """Rows x (n, in) grouped by `sizes` (g,) against w (g, out, in) stored as HF stores a
    Linear: (n, out); rows past the groups give 0. `jax.lax.ragged_dot_general` on
    accelerators; on CPU (dense=None) a masked matmul per group, which is what XLA's CPU
    backend makes of a ragged dot anyway, and which, unlike it (JAX 0.10.2), also works
    under two nested vmaps (a pipeline's stages inside its data replicas)."""
    w = w.astype(x.dtype)
    if dense is None:
        dense = jax.default_backend() == "cpu"
    if not dense:
        dims = jax.lax.RaggedDotDimensionNumbers(
            dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
            rhs_group_dimensions=[0])
        return jax.lax.ragged_dot_general(x, w, sizes, dims)
    group = jnp.searchsorted(jnp.cumsum(sizes), jnp.arange(x.shape[0]), side="right")
    y = jnp.zeros((x.shape[0], w.shape[1]), x.dtype)
    for g in range(w.shape[0]):
        y = jnp.where((group == g)[:, None], x @ w[g].T, y)
    return y


def moe_local(x: jax.Array, router: jax.Array, gate: jax.Array, up: jax.Array,
              down: jax.Array, *, k: int, normalize: bool, capacity_factor: float,
              expert_axes: tuple[str, ...] = (), tensor_axes: tuple[str, ...] = (),
              num_shards: int = 1) -> tuple[jax.Array, jax.Array]:
    """One device's share of the MoE MLP (see the module docstring): x (b, T, d) its
    tokens; router (E, d); gate and up (E/e, m, d), down (E/e, d, m) its experts (and its
    `tensor` columns / rows of each). Returns y (b, T, d) and the per-sequence statistics
    (b, 3) in STATS order."""
    b, t, d = x.shape
    num_experts = router.shape[0]
    logits = jnp.einsum("btd,ed->bte", x.astype(jnp.float32), router.astype(jnp.float32))
    weights, experts, probs = route(logits, k, normalize)
    exchange = functools.partial(_exchange, axes=expert_axes, shards=num_shards)
    if capacity_factor > 0:
        cap = capacity(capacity_factor, t, k, num_experts)
        rank = arrival_rank(experts, num_experts)
        keep = rank < cap
        y = _capacity_dispatch(x, experts, rank, weights, cap, (gate, up, down), exchange,
                               num_shards)
    else:
        keep = jnp.ones(experts.shape, bool)
        y = _dropless_dispatch(x, experts, weights, (gate, up, down), exchange, num_shards)
    if tensor_axes:
        y = jax.lax.psum(y, tensor_axes)
    stats = jnp.stack([load_balancing_loss(probs, experts), router_z_loss(logits),
                       1.0 - jnp.mean(keep.astype(jnp.float32), axis=(1, 2))], axis=-1)
    return y.reshape(b, t, d).astype(x.dtype), stats


def _exchange(a: jax.Array, *, axes: tuple[str, ...], shards: int) -> jax.Array:
    """Block s of axis 0 to expert shard s, block s back from it (one all-to-all)."""
    return jax.lax.all_to_all(a, axes, 0, 0, tiled=True) if shards > 1 else a


def _capacity_dispatch(x: jax.Array, experts: jax.Array, rank: jax.Array, weights: jax.Array,
                       cap: int, mlp: tuple[jax.Array, ...], exchange: Any,
                       shards: int) -> jax.Array:
    """Fixed slots (GShard-style): local expert j of shard s takes this device's sequence
    q's assignments at slots q*C + rank (C the capacity, rank < C kept): one buffer
    (e, E/e, b*C, d) each way, i.e. cf * n * k rows (the analytic volume at cf = 1), and
    each expert one dense matmul over its slots. Returns the combined output (n, d)."""
    b, t, d = x.shape
    gate, up, down = mlp
    local = gate.shape[0]
    slots = b * cap
    kept = rank < cap
    # out-of-range shard index e: the dropped assignments are not written
    dest = jnp.where(kept, experts // local, shards)
    j = experts % local
    slot = jnp.arange(b)[:, None, None] * cap + jnp.minimum(rank, cap - 1)
    tokens = jnp.broadcast_to(x[:, :, None, :], (b, t, experts.shape[-1], d))
    send = jnp.zeros((shards, local, slots, d), x.dtype).at[dest, j, slot].set(
        tokens, mode="drop")
    out = exchange(_swiglu(exchange(send), gate, up, down))   # back by destination
    vals = out[jnp.minimum(dest, shards - 1), j, slot]        # (b, T, k, d)
    w = jnp.where(kept, weights, 0.0).astype(vals.dtype)
    return jnp.sum(vals * w[..., None], axis=2).reshape(b * t, d)


def _swiglu(x: jax.Array, gate: jax.Array, up: jax.Array, down: jax.Array) -> jax.Array:
    """Each local expert j on its slots: x (s, El, C, d) -> (s, El, C, d)."""
    g = jnp.einsum("sjcd,jmd->sjcm", x, gate.astype(x.dtype))
    u = jnp.einsum("sjcd,jmd->sjcm", x, up.astype(x.dtype))
    return jnp.einsum("sjcm,jdm->sjcd", jax.nn.silu(g) * u, down.astype(x.dtype))


def _dropless_dispatch(x: jax.Array, experts: jax.Array, weights: jax.Array,
                       mlp: tuple[jax.Array, ...], exchange: Any, shards: int) -> jax.Array:
    """Every assignment, sorted by expert; shard s takes experts [s*El, (s+1)*El) in a
    buffer of R = n * min(k, El) rows per destination (the most it can receive from this
    device: nothing is lost to the buffer); each expert's rows one group of the grouped
    matmul. Returns the combined output (n, d)."""
    b, t, d = x.shape
    n, k, local = b * t, experts.shape[-1], mlp[0].shape[0]
    key = experts.reshape(n * k)
    order = jnp.argsort(key, stable=True)
    counts = jnp.sum(jax.nn.one_hot(key, local * shards, dtype=jnp.int32), axis=0)  # (E,)
    dest = key[order] // local
    first = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                             jnp.cumsum(counts.reshape(shards, local).sum(1))])
    slot = jnp.arange(n * k) - first[dest]
    token = order // k
    rows = n * min(k, local)
    send = jnp.zeros((shards, rows, d), x.dtype).at[dest, slot].set(x.reshape(n, d)[token])
    out = _experts_apply(exchange(send), exchange(counts.reshape(shards, local)), *mlp)
    vals = exchange(out)[dest, slot]                          # back by destination
    w = weights.reshape(n * k)[order].astype(vals.dtype)
    return jnp.zeros((n, d), vals.dtype).at[token].add(vals * w[:, None])


def _experts_apply(rows: jax.Array, counts: jax.Array, gate: jax.Array, up: jax.Array,
                   down: jax.Array) -> jax.Array:
    """The local experts on received rows (e, R, d) whose first counts[s, j] rows after
    those of experts < j (in each source s's block) belong to local expert j: regroup by
    expert, SwiGLU through the grouped matmul, and put the results back: (e, R, d)."""
    e, r, d = rows.shape
    bounds = jnp.cumsum(counts, axis=1)                                   # (e, El)
    local = jnp.sum(jnp.arange(r)[None, :, None] >= bounds[:, None, :], axis=-1)  # (e, R)
    order = jnp.argsort(local.reshape(e * r), stable=True)               # padding (El) last
    x = rows.reshape(e * r, d)[order]
    sizes = jnp.sum(counts, axis=0)                                       # (El,)
    m = gate.shape[1]
    gu = grouped_matmul(x, jnp.concatenate([gate, up], axis=1), sizes)    # (e*R, 2m)
    y = grouped_matmul(jax.nn.silu(gu[:, :m]) * gu[:, m:], down, sizes)   # (e*R, d)
    return jnp.zeros_like(y).at[order].set(y).reshape(e, r, d)


def _axes(entry: Any) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def moe_mlp(x: jax.Array, router: jax.Array, gate: jax.Array, up: jax.Array,
            down: jax.Array, *, k: int, normalize: bool,
            capacity_factor: float) -> tuple[jax.Array, jax.Array]:
    """The MoE MLP of x (B, T, d) on the current mesh: router (E, d), gate and up
    (E, m, d), down (E, d, m) laid out by the rules (`experts` -> expert, `mlp` -> tensor).
    Returns y (B, T, d) and the per-sequence statistics (B, 3) (STATS order)."""
    run = functools.partial(moe_local, k=k, normalize=normalize,
                            capacity_factor=capacity_factor)
    mesh = current_mesh()
    if mesh is None or mesh.size == 1:
        return run(x, router, gate, up, down)
    x_spec = current_spec(("batch", None, None), x.shape)
    w_spec = current_spec(("experts", "mlp", None), gate.shape, "params")
    d_spec = current_spec(("experts", None, "mlp"), down.shape, "params")
    w_entries = (*w_spec, None, None)
    expert_axes, tensor_axes = _axes(w_entries[0]), _axes(w_entries[1])
    shards = math.prod(mesh.shape[a] for a in expert_axes)
    row_spec = PartitionSpec(*x_spec[:1])
    body = functools.partial(run, expert_axes=expert_axes, tensor_axes=tensor_axes,
                             num_shards=shards)
    return shard_map(body, mesh, (x_spec, PartitionSpec(), w_spec, w_spec, d_spec),
                     (x_spec, row_spec))(x, router, gate, up, down)
