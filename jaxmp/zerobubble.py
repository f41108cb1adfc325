"""The zero-bubble pipeline schedule ZB-H1 (`--pipeline_schedule=zb`, Qi et al. 2023).

1F1B (jaxmp.scheduled) runs every stage in lockstep: each tick is the same program on
every stage, masked. A zero-bubble schedule needs the opposite: in one slot, stage 0 runs
a forward, stage 2 an input gradient and stage 3 a weight gradient. So this executor is
a `shard_map` manual over `pipe` only (data, fsdp, tensor and sequence axes stay
automatic inside), and each slot is a `lax.switch` on the device's own entry of the ZB-H1
table (jaxmp.schedules.simulate): a real conditional, one branch run per device. After
each slot every stage sends its forward output to stage s+1 and its input gradient to
stage s-1 (two collective-permutes over `pipe`); what arrives is kept in an inbox until
the table's slot that uses it.

The three operations (jaxmp.wgrad splits the backward pass at the weight GEMMs):
- F: the stage's layers forward (stage 0 from the stem: the embedding; the last stage
  then runs the tail: head, loss and the output's gradient). The VJP's residuals are
  kept for B, less the stage's own weights (recognised by identity, never copied).
- B: the input gradient, each GEMM's (input, output gradient) for W, and the gradients
  of the parameters that are not GEMM weights (norms, biases, experts); stage 0 runs
  the stem's VJP.
- W: each GEMM's weight gradient, x^T g, deferred by the table to a slot where the
  stage would otherwise wait.

Every buffer (the inboxes, F's residuals, B's GEMM pairs) is a ring over micro-batches
sized by the table's most live items on a stage (each is filled and emptied in
micro-batch order, so micro-batch mod size never collides); live stage activations stay
at 1F1B's bound of p.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxmp import schedules, wgrad
from jaxmp.pipeline import PipelineError, replica_axes, to_stages
from jaxmp.sharding import current_mesh, current_rules, mapped_axes
from jaxmp.stack import remat

# the branch a device runs in a slot
IDLE, F, F_FIRST, F_LAST, B, B_FIRST, W = range(7)


def tables(p: int, m: int) -> dict[str, np.ndarray]:
    """The ZB-H1 grid as (slots, p) integer tables: `op` (the branch), `mb` (its micro-
    batch), `from_prev` / `from_next` (the micro-batch whose forward output / input
    gradient arrives from stage s-1 / s+1 at the end of the slot, -1 for none), and the
    ring sizes (`x`, `g`, `res`, `taps`: most items a stage holds at once)."""
    grid = schedules.simulate("zb", p, m)
    n = grid.length
    op = np.zeros((n, p), np.int32)
    mb = np.zeros((n, p), np.int32)
    from_prev = np.full((n, p), -1, np.int32)
    from_next = np.full((n, p), -1, np.int32)
    for t, row in enumerate(grid.slots):
        for s, cell in enumerate(row):
            if cell is None:
                continue
            kind, i, _ = cell
            mb[t, s] = i
            op[t, s] = {"F": F_LAST if s == p - 1 else F_FIRST if s == 0 else F,
                        "B": B_FIRST if s == 0 else B, "W": W}[kind]
            if kind == "F" and s < p - 1:
                from_prev[t, s + 1] = i
            if kind == "B" and s > 0:
                from_next[t, s - 1] = i
    return dict(op=op, mb=mb, from_prev=from_prev, from_next=from_next,
                **_ring_sizes(op, mb, from_prev, from_next))


def step_flops(text: str, total: float, p: int, m: int) -> dict[str, Any]:
    """The compiled zb step's FLOPs per device on its critical path, from its HLO `text`
    and `total` (analysis.hlo_flops, which counts every branch in every slot): the work
    outside the slot loop plus each slot's slowest branch in the table. Also the bubble
    (idle share of the slots' time: 1 - work / (p x the slots' summed maxima)), the
    paper's (p-1)(F+B-W) / (m(F+B+W) + (p-1)(F+B-W)) with the measured F, B, W, and each
    branch's FLOPs."""
    from jaxmp.plan import analysis

    cost = np.array(analysis.branch_flops(text))
    op = tables(p, m)["op"]
    work = cost[op]  # (slots, p)
    slots = work.max(axis=1).sum()
    f, b, w = cost[F], cost[B], cost[W]
    return {"flops": float(total - op.shape[0] * cost.sum() + slots),
            "bubble": float(1 - work.sum() / (p * slots)),
            "paper_bubble": float((p - 1) * (f + b - w) / (m * (f + b + w) + (p - 1) * (f + b - w))),
            "branch_flops": cost.tolist()}


def grid_cells(p: int, m: int) -> list[list[str]]:
    """cells[s][t]: 'F3' / 'B3' / 'W3' (forward, input gradient, weight gradient of
    micro-batch 3) or '.' (idle) in slot t on stage s."""
    grid = schedules.simulate("zb", p, m)
    return [[("." if row[s] is None else f"{row[s][0]}{row[s][1]}") for row in grid.slots]
            for s in range(p)]


def format_grid(p: int, m: int) -> str:
    """The stage x slot table with the bubble (F = B = W = 1) against 1F1B's."""
    cells = grid_cells(p, m)
    width = max(len(c) for row in cells for c in row)
    lines = ["slot     " + " ".join(str(t).rjust(width) for t in range(len(cells[0])))]
    lines += [f"stage {s:<2} " + " ".join(c.rjust(width) for c in row)
              for s, row in enumerate(cells)]
    tab = tables(p, m)
    lines.append(f"{len(cells[0])} slots of one F, B (input gradient) or W (weight gradient) "
                 f"per stage; bubble (F = B = W) {schedules.simulate('zb', p, m).bubble():.3f} "
                 f"(1f1b's {(p - 1) / (m + p - 1):.3f}); stage activations kept: "
                 f"{max(tab['res'], tab['taps'])}")
    return "\n".join(lines)


def _ring_sizes(op: np.ndarray, mb: np.ndarray, from_prev: np.ndarray,
                from_next: np.ndarray) -> dict[str, int]:
    """Most items live at once on any stage, per buffer: inbox x (arrival -> its F),
    inbox g (arrival, or the last stage's F -> its B), residuals (F -> B), taps (B -> W)."""
    n, p = op.shape
    sizes = {"x": 1, "g": 1, "res": 1, "taps": 1}
    for s in range(p):
        live = {key: 0 for key in sizes}
        for t in range(n):
            o = op[t, s]
            # consumed in this slot
            if o in (F, F_LAST):
                live["x"] -= 1
            if o in (B, B_FIRST):
                live["g"] -= 1
                live["res"] -= 1
            if o == W:
                live["taps"] -= 1
            # produced in this slot
            if o in (F, F_FIRST, F_LAST):
                live["res"] += 1
            if o == F_LAST:
                live["g"] += 1
            if o in (B, B_FIRST):
                live["taps"] += 1
            live["x"] += from_prev[t, s] >= 0
            live["g"] += from_next[t, s] >= 0
            for key in sizes:
                sizes[key] = max(sizes[key], live[key])
    return sizes


class ZeroBubble:
    """One step of ZB-H1 for the rows it is given (the interface of scheduled._Executor)."""

    def __init__(self, stack: Any, x_names: tuple[str | None, ...], stack_names: Any,
                 outer_names: Any, *, stem: Callable, layer: Callable, tail: Callable,
                 total: int):
        self.spec, self.num_layers = stack.pipeline, stack.num_layers
        self.x_names, self.stack_names, self.outer_names = x_names, stack_names, outer_names
        self.stem, self.tail, self.total = stem, tail, total
        self.plain_layer = layer
        # the taps are arguments of the remat'd function, not a closure: jax.checkpoint
        # caches its trace by function and argument shapes, so a closure over one trace's
        # taps would be replayed into another's
        self.split_layer = remat(_split_layer(layer), stack.remat)

    def replicated(self, outer: Any, stacked: Any, batch: dict) -> tuple:
        """The whole batch at once (the data replicas run inside `run`'s shard_map)."""
        loss, metrics, d_outer, d_stack = self.run(outer, stacked, batch)
        return (loss / self.total, {k: v / self.total for k, v in metrics.items()},
                d_outer, d_stack)

    def run(self, outer: Any, stacked: Any, batch: dict) -> tuple:
        p, m = self.spec.stages, self.spec.microbatches
        k = self.num_layers // p
        mesh = current_mesh()
        if mesh is None or "pipe" not in mesh.axis_names:
            raise PipelineError("pipeline_schedule=zb runs on a mesh with a pipe axis")
        rules = current_rules()
        if mesh.shape.get("context", 1) > 1 and rules and rules.context_attention == "ring":
            raise PipelineError("pipeline_schedule=zb with a context axis needs "
                                "context_attention=allgather (ring attention's permutes cannot "
                                "run inside its per-stage switch); or use 1f1b")
        weights = jax.tree_util.tree_map(lambda a: a[:, 0],
                                         to_stages(stacked, self.stack_names, p, 1, k, "params"))
        mbs = jax.tree_util.tree_map(
            lambda a: a.reshape(a.shape[0] // m, m, *a.shape[1:]).swapaxes(0, 1), batch)
        tab = tables(p, m)
        # data replicas (data, and fsdp with gather-once) are manual too where the rows
        # split evenly: each runs the slots on its own rows and its weight gradients are
        # summed once at the end, not in every slot's B and W
        axes, d, _ = replica_axes(self.spec)
        rows_total = jax.tree_util.tree_leaves(batch)[0].shape[0]
        axes = axes if d > 1 and rows_total % (d * m) == 0 else ()
        manual = ("pipe", *axes)

        def body(w: Any, o: Any, rows: Any) -> tuple:
            with mapped_axes(*manual):
                return self._device(tab, jax.tree_util.tree_map(lambda a: a[0], w), o, rows,
                                    axes)

        w_spec = jax.tree_util.tree_map(lambda _: P("pipe"), weights)
        rep = lambda tree: jax.tree_util.tree_map(lambda _: P(), tree)
        split = P(None, axes) if axes else P()
        loss, metrics, d_outer, d_stack = jax.shard_map(
            body, mesh=mesh, in_specs=(w_spec, rep(outer), jax.tree_util.tree_map(
                lambda _: split, mbs)),
            out_specs=(P(), P(), rep(outer), w_spec), axis_names=set(manual),
            check_vma=False)(weights, outer, mbs)
        d_stack = jax.tree_util.tree_map(lambda g: g.reshape(self.num_layers, *g.shape[2:]),
                                         d_stack)
        return loss, metrics, d_outer, d_stack

    def _gemms(self, w0: Any, h: Any) -> tuple[list, list[int]]:
        """The layer's weight GEMMs (wgrad.record) and, for each, the index of its weight
        among the layer's parameter leaves."""
        out: list = []

        def probe(wl: Any, x: jax.Array) -> jax.Array:
            with wgrad.record() as rec:
                self.plain_layer(wl, x)  # (not remat'd: remat would hide the weights)
            leaves = jax.tree_util.tree_leaves(wl)
            for gm in rec.gemms:
                hit = [i for i, leaf in enumerate(leaves) if leaf is gm.weight]
                if not hit:
                    raise PipelineError(
                        "pipeline_schedule=zb: a layer gave a GEMM a weight that is not one of "
                        "its parameters (a fused or reshaped weight); use "
                        "--pipeline_schedule=1f1b for this model")
                out.append((dataclasses.replace(gm, weight=None), hit[0]))
            return x

        jax.eval_shape(probe, w0, h)
        return [g for g, _ in out], [i for _, i in out]

    # ------------------------------------------------------------ one device's program
    def _device(self, tab: dict, w: Any, outer: Any, mbs: Any, replicas: tuple) -> tuple:
        p = self.spec.stages
        s = jax.lax.axis_index("pipe")
        first = jax.tree_util.tree_map(lambda a: a[0], mbs)
        h = jax.eval_shape(self.stem, outer, first)
        _, metric_shapes = jax.eval_shape(self.tail, outer, h, first)
        w0 = jax.tree_util.tree_map(lambda a: a[0], w)
        gemms, where = self._gemms(w0, h)
        k = jax.tree_util.tree_leaves(w)[0].shape[0]
        zeros_taps = [(jnp.zeros((k, *gm.x.shape), gm.x.dtype),
                       jnp.zeros((k, *gm.y.shape), gm.y.dtype)) for gm in gemms]

        def stage(wt: Any, x: jax.Array, taps: list) -> jax.Array:
            def one(c: jax.Array, wl_tl: tuple) -> tuple:
                return self.split_layer(wl_tl[0], c, wl_tl[1]), None
            return jax.lax.scan(one, x, (wt, taps))[0]

        def vjp_parts(wt: Any, x: jax.Array) -> tuple:
            """y, the VJP's residual leaves, its tree, and for each leaf the index of the
            stage weight it is (-1: a residual F keeps for B)."""
            y, fn = jax.vjp(stage, wt, x, zeros_taps)
            leaves, tree = jax.tree_util.tree_flatten(fn)
            pos = {id(leaf): q for q, leaf in enumerate(jax.tree_util.tree_leaves(wt))}
            return y, leaves, tree, [pos.get(id(leaf), -1) for leaf in leaves]

        # F keeps the VJP's residuals (less the weights; with remat, what its policy saves)
        # and B runs only the backward program: the VJP's structure is traced once here, F
        # checks its own against it, and B rebuilds the VJP from it (a VJP function is a
        # pytree: its tree holds the backward program, its leaves the residuals).
        sized: dict = {}

        def size(wt: Any, x: jax.Array) -> list:
            _, leaves, sized["tree"], sized["kinds"] = vjp_parts(wt, x)
            return [leaf for leaf, q in zip(leaves, sized["kinds"]) if q < 0]

        res_shapes = jax.eval_shape(size, w, h)
        tree, kinds = sized["tree"], sized["kinds"]
        ring = lambda n, shp: jnp.zeros((n, *shp.shape), shp.dtype)
        state = dict(
            x=ring(tab["x"], h), g=ring(tab["g"], h),
            res=[ring(tab["res"], r) for r in res_shapes],
            taps=[(ring(tab["taps"], xt), ring(tab["taps"], gt)) for xt, gt in zeros_taps],
            gw=jax.tree_util.tree_map(jnp.zeros_like, w),
            go=jax.tree_util.tree_map(jnp.zeros_like, outer),
            loss=jnp.zeros((), jnp.float32),
            metrics={name: jnp.zeros((), jnp.float32) for name in metric_shapes})
        get = lambda buf, i: jax.lax.dynamic_index_in_dim(buf, i % buf.shape[0], 0, False)
        put = lambda buf, i, v: jax.lax.dynamic_update_index_in_dim(buf, v, i % buf.shape[0], 0)
        rows = lambda i: jax.tree_util.tree_map(lambda a: get(a, i), mbs)
        zero_h = jnp.zeros(h.shape, h.dtype)
        add = lambda a, b: jax.tree_util.tree_map(jnp.add, a, b)

        # (each branch gets the weights as an operand, wv: a residual that is one of them
        # is then recognised by identity, as in the eval_shape that sized the rings)
        def forward(st: dict, i: jax.Array, x: jax.Array, wv: Any) -> tuple[dict, jax.Array]:
            y, leaves, _, mine = vjp_parts(wv, x)
            kept = [leaf for leaf, q in zip(leaves, mine) if q < 0]
            if mine != kinds or [(a.shape, a.dtype) for a in kept] != [
                    (r.shape, r.dtype) for r in res_shapes]:
                raise PipelineError("pipeline_schedule=zb: this stage's backward program "
                                    "differs between traces; use --pipeline_schedule=1f1b")
            return dict(st, res=[put(buf, i, a) for buf, a in zip(st["res"], kept)]), y

        def backward(st: dict, i: jax.Array, wv: Any) -> tuple[dict, jax.Array]:
            weights, kept = jax.tree_util.tree_leaves(wv), iter(st["res"])
            leaves = [weights[q] if q >= 0 else get(next(kept), i) for q in kinds]
            fn = jax.tree_util.tree_unflatten(tree, leaves)
            dw, dx, dtaps = fn(get(st["g"], i))
            taps = [(put(bx, i, gx), put(bg, i, gg))
                    for (bx, bg), (gx, gg) in zip(st["taps"], dtaps)]
            return dict(st, gw=add(st["gw"], dw), taps=taps), dx

        def op_f(st: dict, i: jax.Array, wv: Any) -> tuple:
            st, y = forward(st, i, get(st["x"], i), wv)
            return st, y, zero_h

        def op_f_first(st: dict, i: jax.Array, wv: Any) -> tuple:
            st, y = forward(st, i, self.stem(outer, rows(i)), wv)
            return st, y, zero_h

        def op_f_last(st: dict, i: jax.Array, wv: Any) -> tuple:
            st, y = forward(st, i, get(st["x"], i), wv)
            r = rows(i)
            losses, tail_vjp, mets = jax.vjp(lambda o, a: self.tail(o, a, r), outer, y,
                                             has_aux=True)
            d_tail, dy = tail_vjp(jnp.full_like(losses, 1.0 / self.total))
            st = dict(st, go=add(st["go"], d_tail), g=put(st["g"], i, dy.astype(h.dtype)),
                      loss=st["loss"] + jnp.sum(losses),
                      metrics={n: v + jnp.sum(mets[n]) for n, v in st["metrics"].items()})
            return st, zero_h, zero_h

        def op_b(st: dict, i: jax.Array, wv: Any) -> tuple:
            st, dx = backward(st, i, wv)
            return st, zero_h, dx

        def op_b_first(st: dict, i: jax.Array, wv: Any) -> tuple:
            st, dx = backward(st, i, wv)
            r = rows(i)
            d_stem = jax.vjp(lambda o: self.stem(o, r), outer)[1](dx)[0]
            return dict(st, go=add(st["go"], d_stem)), zero_h, zero_h

        def op_w(st: dict, i: jax.Array, wv: Any) -> tuple:
            grads = [jnp.zeros_like(a) for a in jax.tree_util.tree_leaves(wv)]
            for n, gm in enumerate(gemms):
                bx, bg = st["taps"][n]
                xs, gs = get(bx, i), get(bg, i)
                j = where[n]
                layer_w = jax.tree_util.tree_leaves(wv)[j]
                grads[j] = grads[j] + jax.vmap(
                    lambda a, xx, gg, gm=gm: wgrad.weight_grad(gm, a, xx, gg))(layer_w, xs, gs)
            dw = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(wv), grads)
            return dict(st, gw=add(st["gw"], dw)), zero_h, zero_h

        def op_idle(st: dict, i: jax.Array, wv: Any) -> tuple:
            return st, zero_h, zero_h

        branches = [op_idle, op_f, op_f_first, op_f_last, op_b, op_b_first, op_w]
        fwd_perm = [(j, j + 1) for j in range(p - 1)]
        bwd_perm = [(j + 1, j) for j in range(p - 1)]
        col = lambda name: jnp.asarray(tab[name])

        def slot(st: dict, t: jax.Array) -> tuple[dict, None]:
            pick = lambda name: jax.lax.dynamic_index_in_dim(col(name)[t], s, 0, False)
            st, out_f, out_b = jax.lax.switch(pick("op"), branches, st, pick("mb"), w)
            got_f = jax.lax.ppermute(out_f, "pipe", fwd_perm)
            got_b = jax.lax.ppermute(out_b, "pipe", bwd_perm)
            jf, jb = pick("from_prev"), pick("from_next")
            st = dict(st, x=jnp.where(jf >= 0, put(st["x"], jnp.maximum(jf, 0), got_f), st["x"]),
                      g=jnp.where(jb >= 0, put(st["g"], jnp.maximum(jb, 0), got_b), st["g"]))
            return st, None

        state, _ = jax.lax.scan(slot, state, jnp.arange(tab["op"].shape[0]))
        every = ("pipe", *replicas)
        loss = jax.lax.psum(state["loss"], every)
        metrics = {n: jax.lax.psum(v, every) for n, v in state["metrics"].items()}
        go = jax.lax.psum(state["go"], every)
        gw = state["gw"] if not replicas else jax.lax.psum(state["gw"], replicas)
        gw = jax.tree_util.tree_map(lambda a: a[None], gw)
        return loss, metrics, go, gw


def _split_layer(layer: Callable) -> Callable:
    """layer(w, x) with the GEMMs of its backward pass split at the taps (jaxmp.wgrad)."""
    def run(w: Any, x: jax.Array, taps: list) -> jax.Array:
        with wgrad.split(taps):
            return layer(w, x)
    return run
