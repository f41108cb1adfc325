"""Pipeline schedules that run their own backward pass inside one jit: 1F1B and
interleaved 1F1B (`--pipeline_schedule=1f1b|interleaved`); `stack_loss` also hands zb to
jaxmp.zerobubble.

GPipe (jaxmp.pipeline) is a forward tick loop that JAX differentiates: every micro-batch's
activations stay alive until the backward pass begins, so memory grows with m. Here the
loss is part of the schedule, and each micro-batch's backward pass starts on the last
stage in the tick its forward pass ends there:

    tick:      0     1     2     3     4     5     6     (p=3, m=3, r=1)
    stage 0:  F0    F1    F2    .     B0    B1    B2
    stage 1:   .    F0    F1  F2 B0  B1    B2     .
    stage 2:   .     .  F0 B0 F1 B1 F2 B2  .     .

A stage keeps the input of each micro-batch it has run forward and not yet backward (at
most 2p-1 on stage 0, however large m is) and recomputes its layers from that input when
the backward pass reaches it (jax.vjp of the stage per tick; weight gradients accumulate
in the loop). The stem (embedding) runs on stage 0 and the tail (head and loss) on the
last stage inside the same ticks, so no (B, T, D) activation of the whole batch is kept.

Interleaved (r = pipeline_repeats > 1 layer groups per stage, the circular storage order):
micro-batches enter in groups of p; a group goes round the p stages r times forward, then
r times backward, both rings exact in time (the item leaving the last stage is the one
stage 0 runs next tick), so the bubble is (p-1)/(r m + p - 1) like the circular GPipe's.

SPMD lockstep: every stage runs the same program each tick (a vmap over the stage axis
split over `pipe`). Ticks before the first backward run only forwards, ticks after the
last forward only backwards, so the step costs (F + B) (r m + p - 1) per stage where B
includes the recomputed forward: the time of GPipe with --remat=block, with activation
memory bounded by the stages instead of the micro-batches. In lockstep a tick cannot run
a forward on one stage and only a backward on another, which is also why the zero-bubble
schedule (a weight-gradient pass moved into another stage's idle slot) has its own,
per-device executor (jaxmp.zerobubble).

The executor computes the loss and every gradient in the forward pass; the loss it returns
is `stop_gradient(loss) + <params, stop_gradient(grads)> - stop_gradient(<...>)`, whose
value is the loss and whose gradient is `grads`, so the Trainer's value_and_grad,
gradient accumulation and data-replica vmap work unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmp.pipeline import PipelineError, replica_axes, to_stages
from jaxmp.sharding import constrain, logical_axes, mapped_axes, per_replica
from jaxmp.stack import LayerStack, _split, remat
from jaxmp.zerobubble import ZeroBubble

# stem(model, rows) -> h (b, ...); layer(layer module, h) -> h;
# tail(model, h, rows) -> (per-row losses (b,), {metric: per-row values (b,)})
Stem = Callable[[nnx.Module, Mapping[str, jax.Array]], jax.Array]
Layer = Callable[[nnx.Module, jax.Array], jax.Array]
Tail = Callable[[nnx.Module, jax.Array, Mapping[str, jax.Array]],
                tuple[jax.Array, dict[str, jax.Array]]]


# ---------------------------------------------------------------- the schedule (pure)
def num_ticks(p: int, m: int, r: int) -> int:
    """Ticks of a step: r*m + (r+1)*p - 2 (forwards end at r*m + p - 2)."""
    return r * m + (r + 1) * p - 2


def first_backward(p: int, r: int) -> int:
    """Tick of the first backward (on the last stage, after the first forward of the last
    round reaches it)."""
    return r * p - 1


def phases(p: int, m: int, r: int) -> tuple[int, int, int]:
    """(end of the forward-only ticks, end of the forward+backward ticks, end)."""
    return first_backward(p, r), r * m + p - 1, num_ticks(p, m, r)


def forward_item(t: Any, s: Any) -> Any:
    """Index of the item (micro-batch, round) stage s runs forward at tick t."""
    return t - s


def backward_item(t: Any, s: Any, p: int, r: int) -> Any:
    return t - first_backward(p, r) - (p - 1 - s)


def forward_of(k: Any, p: int, r: int) -> tuple[Any, Any]:
    """(micro-batch, round) of forward item k: groups of p micro-batches, round by round."""
    return (k // (r * p)) * p + k % p, (k % (r * p)) // p


def backward_of(k: Any, p: int, r: int) -> tuple[Any, Any]:
    """(micro-batch, round) of backward item k: the same groups, last round first."""
    return (k // (r * p)) * p + k % p, r - 1 - (k % (r * p)) // p


def forward_index(mb: Any, j: Any, p: int, r: int) -> Any:
    """The forward item index of (micro-batch, round)."""
    return (mb // p) * (r * p) + j * p + mb % p


def backward_index(mb: Any, j: Any, p: int, r: int) -> Any:
    """The backward item index of (micro-batch, round): rounds in reverse."""
    return forward_index(mb, r - 1 - j, p, r)


def _at(k: Any, n: int, of: Callable, p: int, r: int) -> tuple[Any, Any, Any]:
    """(valid, micro-batch, round) of item index k of n (forward_of / backward_of), the
    micro-batch and round clamped into range where k is not a real item (bubble)."""
    return ((k >= 0) & (k < n), *of(jnp.clip(k, 0, n - 1), p, r))


def slots(p: int, m: int, r: int) -> int:
    """Stage inputs a stage keeps at once (the ring buffer's size): one more than the
    longest wait between an item's forward and its backward, at most r*m."""
    t0 = first_backward(p, r)
    span = 0
    for mb in range(m):
        for j in range(r):
            kf = forward_index(mb, j, p, r)
            kb = backward_index(mb, j, p, r)
            span = max(span, max(t0 + kb + (p - 1 - s) - (kf + s) for s in range(p)))
    return min(span + 1, r * m)


def grid(p: int, m: int, r: int) -> list[list[tuple[tuple[int, int] | None,
                                                      tuple[int, int] | None]]]:
    """grid[t][s] = (forward (micro-batch, round) or None, backward ... or None)."""
    out = []
    for t in range(num_ticks(p, m, r)):
        row = []
        for s in range(p):
            kf, kb = forward_item(t, s), backward_item(t, s, p, r)
            row.append((forward_of(kf, p, r) if 0 <= kf < r * m else None,
                        backward_of(kb, p, r) if 0 <= kb < r * m else None))
        out.append(row)
    return out


def grid_cells(p: int, m: int, r: int) -> list[list[str]]:
    """cells[s][t]: 'F3' / 'B3' micro-batch 3 forward / backward ('F3.1': round 1), 'F3B1'
    both in one tick, '.' idle."""
    def cell(c: tuple[int, int] | None, kind: str) -> str:
        return "" if c is None else f"{kind}{c[0]}" + (f".{c[1]}" if r > 1 else "")
    g = grid(p, m, r)
    return [[(cell(row[s][0], "F") + cell(row[s][1], "B")) or "." for row in g]
            for s in range(p)]


def format_grid(p: int, m: int, r: int) -> str:
    """Stage x tick table: 'F3' / 'B3' micro-batch 3 forward / backward ('F3.1': round 1),
    'F3B1' both in one tick, '.' idle."""
    cells = grid_cells(p, m, r)
    width = max(len(c) for row in cells for c in row)
    lines = ["tick     " + " ".join(str(t).rjust(width) for t in range(len(cells[0])))]
    lines += [f"stage {s:<2} " + " ".join(c.rjust(width) for c in row)
              for s, row in enumerate(cells)]
    warm, steady, end = phases(p, m, r)
    lines.append(f"{end} ticks: {warm} forward-only, {steady - warm} forward+backward, "
                 f"{end - steady} backward-only; bubble (p-1)/(r*m+p-1) = "
                 f"{(p - 1) / (r * m + p - 1):.3f}; stage inputs kept: {slots(p, m, r)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the loss
def stack_loss(model: nnx.Module, key: str, stem: Stem, layer: Layer, tail: Tail,
               batch: Mapping[str, jax.Array], x_names: tuple[str | None, ...]
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss and metrics of a model built as stem -> layer stack `model.<key>` -> tail
    over the rows of `batch`. Through the 1F1B executor when the stack's schedule drives
    its own backward pass and the model is training; else stem, `LayerStack.apply`, tail."""
    stack: LayerStack = model.stack
    if not stack.pipeline.drives_backward or getattr(model, "deterministic", False):
        h = stack.apply(getattr(model, key), stem(model, batch), x_names, layer)
        rows, metrics = tail(model, h, batch)
        return jnp.mean(rows), {k: jnp.mean(v) for k, v in metrics.items()}
    if any(isinstance(v, nnx.RngStream) for _, v in nnx.iter_graph(model)):
        raise PipelineError(f"pipeline_schedule={stack.pipeline.schedule} does not run models "
                            "with random streams (dropout); use --pipeline_schedule=gpipe")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    names = logical_axes(params)
    params = nnx.to_pure_dict(params)
    rest = jax.tree_util.tree_map(jnp.asarray, rest)
    layer_def = _split(getattr(model, key))[0]
    fixed = jax.lax.stop_gradient(params)
    outer = {k: v for k, v in fixed.items() if k != key}
    outer_names = {k: v for k, v in names.items() if k != key}

    def merged(o: Any) -> nnx.Module:
        return nnx.merge(graphdef, {**o, key: fixed[key]}, rest)

    run = (ZeroBubble if stack.pipeline.schedule == "zb" else _Executor)(
        stack, x_names, names[key], outer_names,
        stem=lambda o, rows: stem(merged(o), rows),
        layer=lambda w, h: layer(nnx.merge(layer_def, w), h),
        tail=lambda o, h, rows: tail(merged(o), h, rows),
        total=jax.tree_util.tree_leaves(batch)[0].shape[0])
    loss, metrics, d_outer, d_stack = run.replicated(outer, fixed[key], dict(batch))
    grads = {**d_outer, key: d_stack}
    link = sum(jnp.vdot(a, jax.lax.stop_gradient(g).astype(a.dtype))
               for a, g in zip(jax.tree_util.tree_leaves(params),
                               jax.tree_util.tree_leaves(grads)))
    return loss + link - jax.lax.stop_gradient(link), metrics


class _Executor:
    """One step of the 1F1B / interleaved schedule for the rows it is given."""

    def __init__(self, stack: LayerStack, x_names: tuple[str | None, ...], stack_names: Any,
                 outer_names: Any, *, stem: Callable, layer: Callable, tail: Callable,
                 total: int):
        self.spec, self.num_layers = stack.pipeline, stack.num_layers
        self.x_names, self.stack_names, self.outer_names = x_names, stack_names, outer_names
        self.stem, self.tail, self.total = stem, tail, total
        self.layer = remat(layer, stack.remat)

    def replicated(self, outer: Any, stacked: Any, batch: dict) -> tuple:
        """`run` per data replica (each with its own copy of the weights, gradients summed
        once after the last tick, as `pipeline_apply` does), or once."""
        axes, d, lead = replica_axes(self.spec)
        b = jax.tree_util.tree_leaves(batch)[0].shape[0]
        if d == 1 or b % (d * self.spec.microbatches):
            return self._finish(*self.run(outer, stacked, batch))
        row_names = {k: ("batch",) + (None,) * (np.ndim(v) - 1) for k, v in batch.items()}
        (o, w), rows = per_replica((outer, stacked), (self.outer_names, self.stack_names),
                                   batch, row_names, d, lead)
        with mapped_axes(*axes):
            out = jax.vmap(self.run, spmd_axis_name=lead)(o, w, rows)
        return self._finish(*jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), out))

    def _finish(self, loss: jax.Array, metrics: dict, d_outer: Any, d_stack: Any) -> tuple:
        return (loss / self.total, {k: v / self.total for k, v in metrics.items()},
                d_outer, d_stack)

    def run(self, outer: Any, stacked: Any, batch: dict) -> tuple:
        """(sum of the rows' losses, sums of their metrics, gradients of the outer
        parameters, gradients of the stack in storage order) for these rows."""
        p, m, r = self.spec.stages, self.spec.microbatches, self.spec.repeats
        k = self.num_layers // (p * r)
        weights = to_stages(stacked, self.stack_names, p, r, k, "params")  # (p, r, k, ...)
        mbs = jax.tree_util.tree_map(
            lambda a: a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1), batch)
        first = jax.tree_util.tree_map(lambda a: a[0], mbs)
        h = jax.eval_shape(self.stem, outer, first)
        _, metric_shapes = jax.eval_shape(self.tail, outer, h, first)
        names = ("stage", *self.x_names)
        zeros = lambda shape, dtype, n: constrain(jnp.zeros(shape, dtype), n)
        carry = dict(
            fwd=zeros((p, *h.shape), h.dtype, names), bwd=zeros((p, *h.shape), h.dtype, names),
            store=zeros((p, slots(p, m, r), *h.shape), h.dtype, ("stage", None, *self.x_names)),
            gw=jax.tree_util.tree_map(jnp.zeros_like, weights),
            go=jax.tree_util.tree_map(jnp.zeros_like, outer),
            loss=jnp.zeros((), jnp.float32),
            metrics={name: jnp.zeros((), jnp.float32) for name in metric_shapes})
        warm, steady, end = phases(p, m, r)
        for lo, hi, do_f, do_b in ((0, warm, True, False), (warm, steady, True, True),
                                   (steady, end, False, True)):
            if hi > lo:
                body = lambda c, t, f=do_f, b=do_b: (self._tick(c, t, f, b, weights, outer, mbs),
                                                     None)
                carry, _ = jax.lax.scan(body, carry, jnp.arange(lo, hi))
        d_stack = jax.tree_util.tree_map(lambda g: g.reshape(self.num_layers, *g.shape[3:]),
                                         carry["gw"])
        return carry["loss"], carry["metrics"], carry["go"], d_stack

    def _tick(self, carry: dict, t: jax.Array, do_f: bool, do_b: bool, weights: Any,
              outer: Any, mbs: Any) -> dict:
        """One tick: every stage's forward (stage 0's input from the stem), the tail's
        loss and output gradient for the item leaving the last stage, every stage's
        backward (stage 0's input gradient into the stem). The stem and tail run outside
        the stages' vmap, on stage 0's and the last stage's slices, laid out as the model
        lays them out (the head's vocabulary split over pipe and tensor): the same work and
        traffic as GPipe's one head over the whole batch."""
        p, m, r = self.spec.stages, self.spec.microbatches, self.spec.repeats
        n = r * m
        names = ("stage", *self.x_names)
        new = dict(carry)
        if do_f:
            # stage s-1's output (stage 0: stage p-1's, the next round's input)
            x_in = constrain(jnp.roll(carry["fwd"], 1, axis=0), names)
            valid0, mb0, j0 = _at(forward_item(t, 0), n, forward_of, p, r)
            fresh = valid0 & (j0 == 0)
            stem = _spread(self.stem(outer, _take(mbs, mb0)), p, names)
            x_in = constrain(jnp.where(_on(p, 0, x_in.ndim) & fresh, stem, x_in), names)
            with mapped_axes("pipe"):
                new["store"], new["fwd"] = jax.vmap(
                    lambda s, w, x, st: self._forward(s, w, x, st, t), spmd_axis_name="pipe")(
                    jnp.arange(p), weights, x_in, carry["store"])
            new["fwd"] = constrain(new["fwd"], names)
            new["store"] = constrain(new["store"], ("stage", None, *self.x_names))
        if do_b:
            # stage s+1's input gradient (stage p-1: stage 0's, the previous round's)
            g_in = constrain(jnp.roll(carry["bwd"], -1, axis=0), names)
            if do_f:  # the loss of the item leaving the last stage, its output's gradient
                valid_l, mbl, jl = _at(forward_item(t, p - 1), n, forward_of, p, r)
                last = valid_l & (jl == r - 1)
                rows = _take(mbs, mbl)
                losses, tail_vjp, mets = jax.vjp(lambda o, y: self.tail(o, y, rows), outer,
                                                 _slice(new["fwd"], p - 1), has_aux=True)
                scale = jnp.where(last, 1.0 / self.total, 0.0).astype(losses.dtype)
                d_tail, dy = tail_vjp(jnp.full_like(losses, scale))
                new["go"] = jax.tree_util.tree_map(jnp.add, new["go"], d_tail)
                new["loss"] = new["loss"] + jnp.where(last, jnp.sum(losses), 0.0)
                new["metrics"] = {k: v + jnp.where(last, jnp.sum(mets[k]), 0.0)
                                  for k, v in new["metrics"].items()}
                dy = _spread(dy.astype(g_in.dtype), p, names)
                g_in = constrain(jnp.where(_on(p, p - 1, g_in.ndim) & last, dy, g_in), names)
            with mapped_axes("pipe"):
                new["gw"], new["bwd"] = jax.vmap(
                    lambda s, w, g, st, gw: self._backward(s, w, g, st, gw, t),
                    spmd_axis_name="pipe")(jnp.arange(p), weights, g_in, new["store"], carry["gw"])
            new["bwd"] = constrain(new["bwd"], names)
            valid0, mb0, j0 = _at(backward_item(t, 0, p, r), n, backward_of, p, r)
            into_stem = valid0 & (j0 == 0)
            rows0 = _take(mbs, mb0)
            stem_vjp = jax.vjp(lambda o: self.stem(o, rows0), outer)[1]
            dx = _slice(jnp.where(into_stem, new["bwd"], jnp.zeros_like(new["bwd"])), 0)
            new["go"] = jax.tree_util.tree_map(jnp.add, new["go"], stem_vjp(dx)[0])
        return new

    def _chunk(self, w: Any, h: jax.Array) -> jax.Array:
        return jax.lax.scan(lambda c, wl: (self.layer(wl, c), None), h, w)[0]

    def _forward(self, s: jax.Array, w: Any, x: jax.Array, store: jax.Array, t: jax.Array,
                 ) -> tuple[jax.Array, jax.Array]:
        """Stage s runs its forward item of tick t on x and keeps x for the backward."""
        p, r, n = self.spec.stages, self.spec.repeats, self.spec.repeats * self.spec.microbatches
        valid, mb, j = _at(forward_item(t, s), n, forward_of, p, r)
        slot = forward_index(mb, j, p, r) % store.shape[0]
        old = jax.lax.dynamic_index_in_dim(store, slot, 0, keepdims=False)
        store = jax.lax.dynamic_update_index_in_dim(store, jnp.where(valid, x, old), slot, 0)
        return store, self._chunk(_take(w, j), x)

    def _backward(self, s: jax.Array, w: Any, g: jax.Array, store: jax.Array, gw: Any,
                  t: jax.Array) -> tuple[Any, jax.Array]:
        """Stage s's backward item of tick t: the layers recomputed from the kept input,
        their weight gradients added to gw, the input's gradient returned."""
        p, r, n = self.spec.stages, self.spec.repeats, self.spec.repeats * self.spec.microbatches
        valid, mb, j = _at(backward_item(t, s, p, r), n, backward_of, p, r)
        g = jnp.where(valid, g, jnp.zeros_like(g))
        kept = jax.lax.dynamic_index_in_dim(store, forward_index(mb, j, p, r) % store.shape[0],
                                            0, keepdims=False)
        dw, dx = jax.vjp(self._chunk, _take(w, j), kept)[1](g)
        gw = jax.tree_util.tree_map(
            lambda a, d: jax.lax.dynamic_update_index_in_dim(a, _take(a, j) + d, j, 0), gw, dw)
        return gw, dx


def _take(tree: Any, i: jax.Array) -> Any:
    return jax.tree_util.tree_map(
        lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False), tree)


def _on(p: int, s: int, ndim: int) -> jax.Array:
    """A (p, 1, ...) mask of stage s for a select on a stage-major array (no data moves)."""
    return (jnp.arange(p) == s).reshape(p, *([1] * (ndim - 1)))


def _slice(a: jax.Array, s: int) -> jax.Array:
    """Stage s's slice of a stage-major array, on every stage: a masked sum (one all-reduce
    of the slice over pipe, where indexing would gather the whole array)."""
    return jnp.sum(jnp.where(_on(a.shape[0], s, a.ndim), a, jnp.zeros_like(a)), axis=0)


def _spread(x: jax.Array, p: int, names: tuple[str | None, ...]) -> jax.Array:
    """x on every stage, laid out like the stage-major arrays (a broadcast: no data moves)."""
    return constrain(jnp.broadcast_to(x[None], (p, *x.shape)), names)
