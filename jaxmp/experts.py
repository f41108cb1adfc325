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
into a buffer of R rows per destination, exchanges the buffers with one all-to-all over
`expert` (dispatch), runs its local experts, and sends the results back with a second
all-to-all (combine). R is the most rows a destination can receive, so nothing is ever
lost to the buffer: dropless, R = n * min(k, E/e) for n local tokens (a token sends at most
one row per local expert of the destination); with a capacity, R = b * (E/e) * C for b
local sequences, i.e. cf * n * k / e rows: the all-to-all then moves exactly the analytic
volume at cf = 1. Each expert's MLP is further split over `tensor` Megatron-style (gate
and up by columns, down by rows, one all-reduce of the combined output).

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

from jaxmp.sharding import current_mesh, current_spec

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
    b, t, k = experts.shape
    slot_major = experts.transpose(0, 2, 1).reshape(b, k * t)
    onehot = jax.nn.one_hot(slot_major, num_experts, dtype=jnp.int32)  # (b, k*T, E)
    rank = jnp.sum((jnp.cumsum(onehot, axis=1) - 1) * onehot, axis=-1)  # (b, k*T)
    return (rank < cap).reshape(b, k, t).transpose(0, 2, 1)


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


def moe_local(x: jax.Array, router: jax.Array, gate: jax.Array, up: jax.Array,
              down: jax.Array, *, k: int, normalize: bool, capacity_factor: float,
              expert_axes: tuple[str, ...] = (), tensor_axes: tuple[str, ...] = (),
              num_shards: int = 1) -> tuple[jax.Array, jax.Array]:
    """One device's share of the MoE MLP (see the module docstring): x (b, T, d) its
    tokens; router (E, d); gate and up (E/e, m, d), down (E/e, d, m) its experts (and its
    `tensor` columns / rows of each). Returns y (b, T, d) and the per-sequence statistics
    (b, 3) in STATS order."""
    b, t, d = x.shape
    num_experts, local_experts, e = router.shape[0], gate.shape[0], num_shards
    n = b * t
    logits = jnp.einsum("btd,ed->bte", x.astype(jnp.float32), router.astype(jnp.float32))
    weights, experts, probs = route(logits, k, normalize)
    if capacity_factor > 0:
        cap = capacity(capacity_factor, t, k, num_experts)
        keep = within_capacity(experts, num_experts, cap)
        slots = b * local_experts * cap
    else:
        keep = jnp.ones(experts.shape, bool)
        slots = n * min(k, local_experts)
    stats = jnp.stack([load_balancing_loss(probs, experts), router_z_loss(logits),
                       1.0 - jnp.mean(keep.astype(jnp.float32), axis=(1, 2))], axis=-1)

    # dispatch: the kept assignments sorted by expert; shard s takes experts [s*El, (s+1)*El)
    key = jnp.where(keep, experts, num_experts).reshape(n * k)
    order = jnp.argsort(key, stable=True)
    counts = jnp.sum(jax.nn.one_hot(key, num_experts, dtype=jnp.int32), axis=0)  # (E,) kept
    dest = key[order] // local_experts                         # e for dropped: out of range
    first = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                             jnp.cumsum(counts.reshape(e, local_experts).sum(1))])
    slot = jnp.arange(n * k) - first[jnp.minimum(dest, e)]
    token = order // k
    send = jnp.zeros((e, slots, d), x.dtype).at[dest, slot].set(
        x.reshape(n, d)[token], mode="drop")
    sent = counts.reshape(e, local_experts)
    if e > 1:
        rows = jax.lax.all_to_all(send, expert_axes, 0, 0, tiled=True)  # by source
        received = jax.lax.all_to_all(sent, expert_axes, 0, 0, tiled=True)
    else:
        rows, received = send, sent
    out = _experts_apply(rows, received, gate, up, down)
    back = jax.lax.all_to_all(out, expert_axes, 0, 0, tiled=True) if e > 1 else out

    # combine: each assignment's result, weighted, summed into its token
    kept = dest < e
    vals = back[jnp.minimum(dest, e - 1), jnp.clip(slot, 0, slots - 1)]
    w = jnp.where(kept, weights.reshape(n * k)[order], 0.0).astype(vals.dtype)
    y = jnp.zeros((n, d), vals.dtype).at[token].add(vals * w[:, None])
    if tensor_axes:
        y = jax.lax.psum(y, tensor_axes)
    return y.reshape(b, t, d).astype(x.dtype), stats


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
    return jax.shard_map(body, mesh=mesh, in_specs=(x_spec, PartitionSpec(), w_spec, w_spec,
                                                    d_spec),
                         out_specs=(x_spec, row_spec), check_vma=False)(x, router, gate, up,
                                                                         down)
