"""Layer-wise pipeline parallelism inside one jit step (GSPMD style).

p stages (the `pipe` mesh axis), m micro-batches, r repeats (circular schedule); the L
stacked layers form p*r groups of k = L/(p*r) consecutive layers. Group g = j*p + s runs
on stage s in round j, so with r > 1 each stage holds r non-adjacent groups.

    tick:      0     1     2     3     4            (p=3, m=2, r=1: ticks = r*m + p - 1)
    stage 0:  m0g0  m1g0   .     .     .
    stage 1:   .    m0g1  m1g1   .     .
    stage 2:   .     .    m0g2  m1g2   .    -> outputs leave stage 2 at ticks 2 and 3

At each tick every stage applies its current group to its input (a vmap over the stage
axis, which is sharded over `pipe`, so every device runs only its own stage), then the
outputs shift one stage down (a collective-permute). Stage 0 reads fresh micro-batches
from, and stage p-1 returns finished ones to, a per-stage buffer of m slots; with r > 1
an item leaving stage p-1 re-enters stage 0 for its next round, which needs m >= p.

The schedule is written as pure integer functions below; `pipeline_apply` uses the same
functions with traced tick numbers, so the tests of the schedule test the real indices.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxmp import schedules
from jaxmp.sharding import constrain, current_mesh, mapped, mapped_axes, per_replica


class PipelineError(ValueError):
    """A pipeline configuration that cannot run."""


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    stages: int = 1        # p: size of the `pipe` mesh axis
    microbatches: int = 1  # m
    repeats: int = 1       # r: rounds of the circular schedule
    # Under FSDP: gather each stage's weights over `fsdp` once per step (and reduce their
    # gradients once), not at every tick; costs the stage's whole (unsharded over fsdp)
    # weights and their gradients per device for the step (MaxText's
    # pipeline_fsdp_ag_once).
    fsdp_gather_once: bool = False
    # gpipe / circular: a forward tick loop that JAX differentiates (every micro-batch's
    # activations live until the backward pass; gpipe with repeats > 1 is the circular
    # one). 1f1b / interleaved: the pipeline runs each micro-batch's backward pass as soon
    # as it can (jaxmp.scheduled), so live activations are bounded by the stages.
    schedule: str = "gpipe"

    @property
    def enabled(self) -> bool:
        return self.stages > 1

    @property
    def drives_backward(self) -> bool:
        """The schedule runs its own backward pass (jaxmp.scheduled), not JAX's autodiff."""
        return self.enabled and self.schedule in DRIVEN

    def validate(self, num_layers: int, batch_per_shard: int | None = None,
                 what: str = "decoder layers") -> None:
        p, m, r = self.stages, self.microbatches, self.repeats
        if p < 1 or m < 1 or r < 1:
            raise PipelineError(f"pipe={p}, microbatches={m}, pipeline_repeats={r}: all must be >= 1")
        _check_schedule(self.schedule, p, m, r)  # (first: a schedule that cannot use r says so)
        if num_layers % (p * r):
            raise PipelineError(
                f"{num_layers} {what} cannot be split into pipe({p}) x pipeline_repeats({r}) = "
                f"{p * r} equal groups; use a layer count divisible by {p * r}")
        if r > 1 and m < p:
            raise PipelineError(
                f"the circular schedule (pipeline_repeats={r}) needs microbatches >= pipe size "
                f"({m} < {p}): an item leaving the last stage must find stage 0 free; "
                f"use microbatches={p} or more, or pipeline_repeats=1")
        if batch_per_shard is not None and batch_per_shard % m:
            raise PipelineError(
                f"the batch per data shard ({batch_per_shard}) is not divisible by "
                f"microbatches={m}; choose a batch size so that batch/(data*fsdp) divides by {m}")


_DIFFERENTIATED = contextvars.ContextVar("jaxmp_loss_differentiated", default=False)


@contextlib.contextmanager
def differentiated() -> Any:
    """The Trainer computes the loss to differentiate it (not an evaluation): a stack whose
    schedule runs its own backward pass must then be run by jaxmp.scheduled.stack_loss."""
    token = _DIFFERENTIATED.set(True)
    try:
        yield
    finally:
        _DIFFERENTIATED.reset(token)


def check_driven(spec: PipelineSpec) -> None:
    """Refuse to run a 1f1b / interleaved stack as a plain forward under the gradient."""
    if spec.drives_backward and _DIFFERENTIATED.get():
        raise PipelineError(
            f"pipeline_schedule={spec.schedule} runs the loss inside the pipeline, and this "
            "model's loss calls LayerStack.apply; write the family's loss with "
            "jaxmp.scheduled.stack_loss (stem, layer, tail), or use --pipeline_schedule=gpipe")


SCHEDULES = ("gpipe", "circular", "1f1b", "interleaved", "zb")
DRIVEN = ("1f1b", "interleaved", "zb")


def _check_schedule(kind: str, p: int, m: int, r: int) -> None:
    if kind not in SCHEDULES:
        raise PipelineError(f"pipeline_schedule={kind!r}: choose one of {', '.join(SCHEDULES)}")
    if kind == "circular" and r < 2:
        raise PipelineError("pipeline_schedule=circular holds several layer groups per stage: "
                            "set --pipeline_repeats >= 2 (or use gpipe)")
    if kind in DRIVEN:  # the sizes their tables need (jaxmp.schedules)
        try:
            schedules.check(kind, p, m, r)
        except schedules.ScheduleError as err:
            raise PipelineError(str(err)) from None


# ---------------------------------------------------------------- the schedule (pure)
def num_ticks(p: int, m: int, r: int) -> int:
    """Compute ticks per step: r*m + p - 1."""
    return r * m + p - 1


def bubble_fraction(p: int, m: int, r: int = 1) -> float:
    """Share of stage-ticks that are idle: (p - 1) / (r*m + p - 1)."""
    return (p - 1) / num_ticks(p, m, r)


def bubble_factor(p: int, m: int, r: int = 1, schedule: str = "gpipe") -> float:
    """Time per device relative to a bubble-free pipeline: (r*m + p - 1) / (r*m); for the
    zero-bubble schedule ZB-H1, (3m + p - 1) / (3m) (F = B = W, jaxmp.schedules)."""
    if schedule == "zb":
        return (3 * m + p - 1) / (3 * m)
    return num_ticks(p, m, r) / (r * m)


def item(t: Any, s: Any) -> Any:
    """Index of the work item (round * m + micro-batch) stage s holds at tick t."""
    return t - s


def is_active(t: Any, s: Any, p: int, m: int, r: int) -> Any:
    i = item(t, s)
    return (i >= 0) & (i < r * m)


def microbatch(t: Any, s: Any, m: int) -> Any:
    return item(t, s) % m


def round_index(t: Any, s: Any, m: int, r: int) -> Any:
    """Round j (which of the stage's r layer groups) at tick t, clamped in the bubble."""
    return _clip(item(t, s) // m, 0, r - 1)


def _clip(x: Any, lo: int, hi: int) -> Any:
    if isinstance(x, int):
        return max(lo, min(hi, x))
    return jnp.clip(x, lo, hi)


def layer_group(t: int, s: int, p: int, m: int, r: int) -> int:
    """Canonical index of the layer group (j*p + s) stage s applies at tick t, with the
    round j that `pipeline_apply` picks (round_index), so the schedule's tests test it."""
    return round_index(t, s, m, r) * p + s


def read_slot(t: Any, m: int) -> Any:
    """Buffer slot stage 0 reads its input from at tick t (item t)."""
    return t % m


def arrival(t: Any, p: int, m: int, r: int) -> tuple[Any, Any]:
    """(valid, slot): at tick t stage 0 receives item t-p from stage p-1 into slot (t-p) % m."""
    i = t - p
    return (i >= 0) & (i < r * m), i % m


def schedule(p: int, m: int, r: int) -> list[list[tuple[int, int] | None]]:
    """grid[t][s] = (micro-batch, layer group) or None (bubble), for every compute tick."""
    return [[(microbatch(t, s, m), layer_group(t, s, p, m, r)) if is_active(t, s, p, m, r) else None
             for s in range(p)] for t in range(num_ticks(p, m, r))]


def timeline(p: int, m: int, r: int) -> list[list[str]]:
    """Stage x tick grid of a whole step: forward ticks, then the backward pass (which JAX
    derives by running the forward scan in reverse). Cells: 'F3' / 'B3' = micro-batch 3
    forward / backward ('F3.1' in round 1 when r > 1), '.' = bubble."""
    fwd = schedule(p, m, r)
    def cell(c: tuple[int, int] | None, kind: str) -> str:
        if c is None:
            return "."
        b, g = c
        return f"{kind}{b}" + (f".{g // p}" if r > 1 else "")
    ticks = [[cell(row[s], "F") for row in fwd] + [cell(row[s], "B") for row in fwd[::-1]]
             for s in range(p)]
    return ticks


def format_timeline(p: int, m: int, r: int) -> str:
    grid = timeline(p, m, r)
    width = max(len(c) for row in grid for c in row)
    head = "tick     " + " ".join(str(t).rjust(width) for t in range(len(grid[0])))
    lines = [head] + [f"stage {s:<2} " + " ".join(c.rjust(width) for c in row)
                      for s, row in enumerate(grid)]
    lines.append(f"{num_ticks(p, m, r)} forward + {num_ticks(p, m, r)} backward ticks; "
                 f"bubble fraction (p-1)/(r*m+p-1) = {p - 1}/{num_ticks(p, m, r)} = "
                 f"{bubble_fraction(p, m, r):.3f}")
    return "\n".join(lines)


def storage_order(num_layers: int, p: int, r: int) -> list[int]:
    """order[q] = canonical layer stored at position q of the stacked `layers` axis.

    Storage is stage-major, so splitting the `layers` axis into p contiguous blocks over
    `pipe` gives every stage exactly its r groups. Identity when r == 1 or p == 1.
    """
    k = num_layers // (p * r)
    return [j * p * k + s * k + i for s in range(p) for j in range(r) for i in range(k)]


def stage_layers(num_layers: int, spec: PipelineSpec) -> list[list[int]]:
    """The canonical layers each stage holds, in the order it applies them."""
    order = storage_order(num_layers, spec.stages, spec.repeats)
    per = num_layers // spec.stages
    return [order[s * per:(s + 1) * per] for s in range(spec.stages)]


# ---------------------------------------------------------------- the pipelined apply
def pipeline_apply(layer_fn: Callable[..., Any], stacked: Any, x: jax.Array,
                   spec: PipelineSpec, param_names: Any, x_names: tuple[str | None, ...],
                   state: Any = None, state_names: Any = None) -> Any:
    """Apply L stacked layers to x (B, ...) through the pipeline; returns (B, ...).

    With a `data` mesh axis, each data replica runs the pipeline on its own rows with its
    own copy of the weights (a broadcast along a new leading axis split over `data`): the
    weight gradients then accumulate locally over the ticks and are summed over `data`
    once per step (the broadcast's transpose), not once per tick. With
    `spec.fsdp_gather_once` the same is done over `fsdp`: the copy is gathered over `fsdp`
    once, before the first tick, and its gradients reduced once, after the last.
    """
    axes, d, lead = replica_axes(spec)
    b = x.shape[0]
    if d == 1 or state is not None or b % d:
        return _pipeline(layer_fn, stacked, x, spec, param_names, x_names, state, state_names)
    reps, xs = per_replica(stacked, param_names, x, x_names, d, lead)
    with mapped_axes(*axes):
        ys = jax.vmap(lambda w, h: _pipeline(layer_fn, w, h, spec, param_names, x_names),
                      spmd_axis_name=lead)(reps, xs)
    return constrain(ys.reshape(b, *x.shape[1:]), x_names)


def replica_axes(spec: PipelineSpec) -> tuple[tuple[str, ...], int, Any]:
    """The mesh axes a pipeline runs one replica per (data, and fsdp with
    fsdp_gather_once; those of size > 1 not already mapped), their product, and the vmap's
    spmd_axis_name for them."""
    mesh = current_mesh()
    axes = tuple(a for a in ("data",) + (("fsdp",) if spec.fsdp_gather_once else ())
                 if mesh is not None and mesh.shape[a] > 1 and a not in mapped())
    d = math.prod(mesh.shape[a] for a in axes) if axes else 1
    return axes, d, (axes if len(axes) > 1 else axes[0]) if axes else None


def _pipeline(layer_fn: Callable[..., Any], stacked: Any, x: jax.Array, spec: PipelineSpec,
              param_names: Any, x_names: tuple[str | None, ...], state: Any = None,
              state_names: Any = None) -> Any:
    """The pipeline proper (see `pipeline_apply`) for one data replica.

    layer_fn(one_layer_params, h) -> h. `stacked` holds the layers in `storage_order`;
    `param_names` the logical names of its leaves (leading 'layers'); x_names those of x.

    With `state` (per-layer arrays stacked like the parameters, e.g. a KV cache, whose
    logical names are `state_names`), layer_fn(params, h, layer_state) -> (h, layer_state)
    and the result is (y, new_state); each stage updates only its own layers' state, on
    its own devices. This is the serving path and needs one micro-batch (m = 1).
    """
    p, m, r = spec.stages, spec.microbatches, spec.repeats
    if state is not None and m != 1:
        raise PipelineError(f"per-layer state (KV cache) needs microbatches=1, not {m}")
    L = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    k = L // (p * r)
    b = x.shape[0]

    weights = to_stages(stacked, param_names, p, r, k, "params")
    if state is not None:
        state = to_stages(state, state_names, p, r, k, "activations")

    buf, out = _microbatches(x, p, m, x_names)
    stage = jnp.arange(p)

    run_stages = jax.vmap(_stage_fn(layer_fn), spmd_axis_name="pipe")
    pick = jax.vmap(lambda w, j: jax.tree_util.tree_map(lambda a: a[j], w))
    put = jax.vmap(lambda w, j, new: jax.tree_util.tree_map(lambda a, n: a.at[j].set(n), w, new))
    receive = lambda buf, out, t: _receive(buf, out, t, spec, x_names)

    def tick(carry: tuple, t: jax.Array):
        buf, out, st = carry
        buf, shifted = receive(buf, out, t)
        fresh = jax.lax.dynamic_index_in_dim(buf, read_slot(t, m), 1, keepdims=False)
        first = (stage == 0).reshape(p, *([1] * (shifted.ndim - 1)))
        inp = constrain(jnp.where(first, fresh, shifted), ("stage", *x_names))
        j = round_index(t, stage, m, r)
        w = pick(weights, j)
        if st is None:
            out = run_stages(w, inp)
        else:
            cur = pick(st, j)
            out, new = run_stages(w, inp, cur)
            active = is_active(t, stage, p, m, r)
            keep = lambda n, c: jnp.where(active.reshape(p, *([1] * (n.ndim - 1))), n, c)
            st = put(st, j, jax.tree_util.tree_map(keep, new, cur))
        return (buf, constrain(out, ("stage", *x_names)), st), None

    ticks = num_ticks(p, m, r)
    (buf, out, state), _ = jax.lax.scan(tick, (buf, out, state), jnp.arange(ticks))
    buf, _ = receive(buf, out, jnp.asarray(ticks))
    y = buf[0]  # (m, B/m, ...): stage 0 holds every finished micro-batch
    y = constrain(y.swapaxes(0, 1).reshape(b, *x.shape[1:]), x_names)
    if state is None:
        return y
    state = jax.tree_util.tree_map(lambda a: a.reshape(L, *a.shape[3:]), state)
    return y, state


def _microbatches(x: jax.Array, p: int, m: int, x_names: tuple[str | None, ...]
                  ) -> tuple[jax.Array, jax.Array]:
    """The tick loop's buffers: every stage's copy of the m micro-batches (p, m, B/m, ...)
    (stage 0 reads its fresh input there; the finished ones come back to it) and the
    stages' outputs (p, B/m, ...). (B, ...) -> (m, B/m, ...): micro-batch i takes rows i,
    m+i, 2m+i, ... so that every micro-batch keeps the batch's data sharding (no data
    moves)."""
    b = x.shape[0]
    mb = x.reshape(b // m, m, *x.shape[1:]).swapaxes(0, 1)
    buf = constrain(jnp.broadcast_to(mb[None], (p, *mb.shape)), ("stage", None, *x_names))
    out = constrain(jnp.zeros((p, *mb.shape[1:]), x.dtype), ("stage", *x_names))
    return buf, out


def to_stages(tree: Any, names: Any, p: int, r: int, k: int, kind: str) -> Any:
    """Stacked (L, ...) arrays -> (p, r, k, ...), the stage axis split over `pipe`."""
    return jax.tree_util.tree_map(
        lambda a, n: constrain(a.reshape(p, r, k, *a.shape[1:]), ("stage", None, None, *n[1:]),
                               kind=kind), tree, names)


def _stage_fn(layer_fn: Callable[..., Any]) -> Callable[..., Any]:
    """One stage's k layers in order (threading per-layer state when there is some)."""
    def stage(w: Any, h: jax.Array, st: Any = None) -> Any:
        if st is None:
            return jax.lax.scan(lambda c, wl: (layer_fn(wl, c), None), h, w)[0]
        return jax.lax.scan(lambda c, ws: layer_fn(ws[0], c, ws[1]), h, (w, st))
    return stage


def _receive(buf: jax.Array, out: jax.Array, t: jax.Array, spec: PipelineSpec,
             x_names: tuple[str | None, ...]) -> tuple[jax.Array, jax.Array]:
    """Shift every stage's output one stage on (s-1 -> s: a collective-permute) and store
    what leaves the last stage in stage 0's buffer slot for it (arrival)."""
    p, m, r = spec.stages, spec.microbatches, spec.repeats
    shifted = constrain(jnp.roll(out, 1, axis=0), ("stage", *x_names))
    valid, slot = arrival(t, p, m, r)
    keep = ((jnp.arange(p) == 0) & valid).reshape(p, *([1] * (shifted.ndim - 1)))
    cur = jax.lax.dynamic_index_in_dim(buf, slot, 1, keepdims=False)
    buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(keep, shifted, cur), slot, 1)
    return constrain(buf, ("stage", None, *x_names)), shifted
