"""`inspect --search`: the layouts of a model on N devices that fit, fastest first.

Every layout of the device count is a candidate: data x fsdp x pipe x tensor sizes (tensor
within a host; for a mixture of experts also `expert` sizes dividing the experts, the
batch's share of the devices split between data and expert; for a sequence of
LONG_SEQUENCE tokens or more also `context` sizes within a host), micro-batches and circular
repeats of the pipeline and its schedule (1f1b / interleaved beside gpipe / circular: the
bounded activation memory for a recomputed forward), gathering FSDP weights once per step,
rematerialization and gradient accumulation. A rough analytic estimate
(FLOPs, bubble, recompute, Megatron / FSDP / data-parallel / pipeline traffic) only orders
them; each layout proposed has been compiled for the target (jaxmp.plan.planner) and fits
by its plan's memory. The search stops at the compile budget, or once `top` layouts fit
and the next one's estimate is 1.5x the fastest compiled plan's time. Shortcuts keep the
compiles few, from memory falling with more remat and more accumulation: a layout needing
more memory than one that did not fit is not compiled, nor one slower than a fitting
layout of the same shape, nor one whose activations, scaled from the compiled layouts'
per token and layer, would not fit.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax

from jaxmp.accelerators import Accelerator
from jaxmp.config import RunConfig, replace_flat
from jaxmp.mesh import format_mesh
from jaxmp.models.registry import model_shape
from jaxmp.pipeline import DRIVEN, bubble_factor
from jaxmp.plan import analysis
from jaxmp.plan.planner import Layout, PlanResult, compile_program, link_of, link_speed, make_plan, size

REMAT_LEVEL = {"none": 0, "dots": 1, "block": 2}
REMAT_COST = {"none": 1.0, "dots": 1.15, "block": 4 / 3}  # forward recomputed: ~1/3 more
STOP_MARGIN = 1.5  # the estimate is rough: keep compiling while within 1.5x of the best


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: tuple[tuple[str, int], ...]
    microbatches: int
    repeats: int
    gather_once: bool
    remat: str
    accum: int
    schedule: str = "gpipe"

    @property
    def shape(self) -> dict[str, int]:
        return dict(self.mesh)

    @property
    def base(self) -> tuple:
        return (self.mesh, self.microbatches, self.repeats, self.gather_once, self.schedule)

    @property
    def drives_backward(self) -> bool:
        """1f1b / interleaved: the schedule recomputes each stage's forward in its backward
        (zb keeps the forward's residuals instead)."""
        return self.schedule in DRIVEN and self.schedule != "zb"

    @property
    def kind(self) -> str:
        """What activation memory scales with: gpipe's ticks, 1f1b's stage inputs, zb's
        residuals of at most p micro-batches."""
        return "zb" if self.schedule == "zb" else "driven" if self.drives_backward else "gpipe"

    def settings(self) -> dict[str, Any]:
        return {"mesh": format_mesh(self.shape), "microbatches": self.microbatches,
                "pipeline_repeats": self.repeats, "pipeline_fsdp_gather_once": self.gather_once,
                "remat": self.remat, "grad_accum_steps": self.accum,
                "pipeline_schedule": self.schedule}

    def flags(self) -> str:
        s = self.settings()
        out = [f"--mesh={s['mesh']}"]
        if self.shape["pipe"] > 1:
            out += [f"--microbatches={self.microbatches}"]
            out += [f"--pipeline_repeats={self.repeats}"] if self.repeats > 1 else []
            out += ["--pipeline_fsdp_gather_once"] if self.gather_once else []
            default = "circular" if self.repeats > 1 else "gpipe"
            out += [f"--pipeline_schedule={self.schedule}"] if self.schedule != default else []
        out += [f"--remat={self.remat}"] if self.remat != "none" else []
        out += [f"--grad_accum_steps={self.accum}"] if self.accum > 1 else []
        return " ".join(out)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# context parallelism is considered from this sequence length on (below it the sequence
# is better split by the batch axes)
LONG_SEQUENCE = 4096


def candidates(num_devices: int, num_layers: int, batch: int, devices_per_host: int,
               remats: tuple[str, ...] = ("none", "dots", "block"),
               num_experts: int = 1, seq_len: int = 0) -> list[Candidate]:
    """Every layout to consider (see the module docstring); shapes the model's heads or
    widths do not divide are found when the layout is built."""
    out = []
    for t in divisors(num_devices):
        if t > devices_per_host:
            continue
        for p in divisors(num_devices // t):
            if p > num_layers or num_layers % p:
                continue
            for cx in _context_sizes(num_devices // (t * p), seq_len, devices_per_host // t):
                dp = num_devices // (t * p * cx)
                for e in (e for e in divisors(dp) if num_experts % e == 0):
                    for mesh in _batch_meshes(dp, e, t, p, devices_per_host, cx):
                        out += _settings(mesh, num_layers, batch, dp, remats)
    return out


def _context_sizes(n: int, seq_len: int, within_host: int) -> list[int]:
    """Sizes of the `context` axis to try on n devices: 1, and for a long sequence every
    size within a host whose 2c chunks divide it."""
    if seq_len < LONG_SEQUENCE:
        return [1]
    return [c for c in divisors(n) if c == 1 or (c <= within_host and seq_len % (2 * c) == 0)]


def _batch_meshes(dp: int, e: int, t: int, p: int, devices_per_host: int,
                  cx: int = 1) -> list[tuple]:
    """The meshes splitting dp batch shards as data x fsdp x expert (expert e, fsdp 1, all
    that is left, or filling a host), with a context axis of cx."""
    rest = dp // e
    fsdps = {1, rest}
    inner = t * p * e * cx
    if devices_per_host % inner == 0 and 1 < devices_per_host // inner < rest:
        fsdps.add(devices_per_host // inner)  # fsdp filling a host
    expert = (("expert", e),) if e > 1 else ()
    context = (("context", cx),) if cx > 1 else ()
    return [(("data", rest // f), ("fsdp", f), ("pipe", p), *expert, *context, ("tensor", t))
            for f in sorted(fsdps)]


def _settings(mesh: tuple, num_layers: int, batch: int, dp: int,
              remats: tuple[str, ...]) -> list[Candidate]:
    """A mesh's candidates: pipeline settings, gather-once, remat, accumulation."""
    s = dict(mesh)
    p, f = s["pipe"], s["fsdp"]
    pipes = [(1, 1)] if p == 1 else [
        (m, r) for m in _microbatches(p, batch, dp) for r in (1, 2) if num_layers % (p * r) == 0]
    out = []
    for m, r in pipes:
        for schedule in _schedules(p, m, r):
            for once in ((False, True) if p > 1 and f > 1 else (False,)):
                for remat in remats:
                    accum = 1
                    while batch % (accum * dp * m) == 0:
                        out.append(Candidate(mesh, m, r, once, remat, accum, schedule))
                        accum *= 2
    return out


def _microbatches(p: int, batch: int, dp: int) -> list[int]:
    """Micro-batch counts to try on a pipe of p: p, 2p, 4p, or where none divides a batch
    shard's rows, those rows' divisors from p to 4p (a batch of 7 on pipe:4 runs m=7)."""
    if batch % dp:
        return [p]  # (no accumulation setting divides it either: no candidate)
    rows = batch // dp
    usual = [m for m in (p, 2 * p, 4 * p) if rows % m == 0]
    return usual or [m for m in divisors(rows) if p <= m <= 4 * p]


def _schedules(p: int, m: int, r: int) -> tuple[str, ...]:
    """The pipeline schedules a (pipe, micro-batches, repeats) setting can run: GPipe's
    (gpipe, circular), 1F1B's (1f1b, interleaved) where their sizes allow, and the
    zero-bubble zb with one layer group per stage."""
    if p == 1:
        return ("gpipe",)
    if r == 1:
        return ("gpipe", "1f1b", "zb")
    return ("circular", "interleaved") if m % p == 0 else ("circular",)


def estimate_s(c: Candidate, n_params: int, model_flops: float, num_layers: int,
               d_model: int, seq_len: int, batch: int, itemsize: int, card: Accelerator,
               dtype: str, experts_per_token: int = 1) -> float:
    """A rough step time, only to decide which layouts to compile first."""
    s = c.shape
    n = math.prod(s.values())
    p, t, f, e = s["pipe"], s["tensor"], s["fsdp"], s.get("expert", 1)
    d = s["data"] * e  # outside the experts `expert` splits the batch like data
    bubble = bubble_factor(p, c.microbatches, c.repeats, c.schedule)
    compute = (model_flops / n * remat_cost(c) * bubble
               / (card.peak(dtype) * card.efficiency_for(True)))

    def bw(axis: str) -> float:
        return link_speed(card, link_of(axis, s, card.devices_per_host))[0]
    comm = 0.0
    if t > 1:  # Megatron: 4 all-reduces of a data shard's (rows, T, d) activations per layer
        rows = batch // (d * f)
        comm += (4 * num_layers / p * rows * seq_len * d_model * itemsize * bubble
                 * 2 * (t - 1) / t / bw("tensor"))
    weights = 4 * n_params / (t * p)
    if f > 1:  # gather forward + backward, reduce-scatter the gradients (per tick in a pipeline)
        ticks = 1 if (p == 1 or c.gather_once) else c.microbatches * c.repeats
        comm += 3 * weights * ticks * c.accum * (f - 1) / f / bw("fsdp")
    if d > 1:  # gather the state's parameters, reduce-scatter the gradients
        comm += 2 * weights * (d - 1) / d / bw("data")
    if p > 1:  # each tick hands a micro-batch's (rows, T, d) activations on, both ways
        rows = batch / (d * f * c.accum * c.microbatches)
        ticks = c.repeats * c.microbatches + p - 1
        comm += 2 * ticks * c.accum * rows * seq_len * d_model * itemsize / bw("pipe")
    cx = s.get("context", 1)
    if cx > 1:  # ring attention: (c-1) key/value blocks per layer forward, ~3x that backward
        rows = batch / (d * f * c.accum)
        comm += (4 * num_layers / p * rows * 2 * seq_len * d_model * itemsize * bubble
                 * (cx - 1) / cx * c.accum / bw("context"))
    if e > 1:  # each MoE layer: dispatch + combine, forward and backward, k rows a token
        tokens = batch / (d * f) * seq_len
        comm += (4 * num_layers / p * tokens * experts_per_token * d_model * itemsize * bubble
                 * (e - 1) / e / bw("expert"))
    return compute + comm


@dataclasses.dataclass
class SearchResult:
    found: list[tuple[Candidate, PlanResult]]   # fitting, fastest first
    rejected: dict[str, int]                    # reason -> candidates
    considered: int
    compiled: int
    budget_hit: bool

    def format(self, top: int) -> str:
        head = ["#", "layout (flags)", "memory", "spare", "step ms", "compute", "bubble",
                "collectives", "MFU", "why"]
        rows = []
        for i, (c, p) in enumerate(self.found[:top]):
            rows.append([str(i + 1), c.flags(), size(p.peak_bytes), size(p.spare_bytes),
                         f"{p.step_s * 1e3:.1f}",
                         f"{(p.compute_s - p.bubble_s) * 1e3:.1f}", f"{p.bubble_s * 1e3:.1f}",
                         f"{p.collective_s * 1e3:.1f}",
                         "-" if p.mfu is None else f"{p.mfu:.1%}", why(p)])
        from jaxmp.plan.text import table

        lines = [table(head, rows)] if rows else ["no layout fits"]
        reasons = "; ".join(f"{v} {k}" for k, v in sorted(self.rejected.items(),
                                                           key=lambda kv: -kv[1]))
        lines.append(f"{self.considered} layouts considered, {self.compiled} compiled, "
                     f"{len(self.found)} fit" + (f"; set aside: {reasons}" if reasons else ""))
        if self.budget_hit:
            lines.append("stopped at --search_compiles; raise it to compile more layouts")
        return "\n".join(lines)


def why(p: PlanResult) -> str:
    """The largest terms of a plan in a few words."""
    parts = [f"compute {(p.compute_s - p.bubble_s) / p.step_s:.0%}"]
    if p.bubble_s:
        parts.append(f"bubble {p.bubble_s / p.step_s:.0%}")
    axes = p.by_axis()
    if axes:
        worst = max(axes, key=axes.get)
        links = {c.link for c in p.collectives if c.axes == worst}
        parts.append(f"{worst} {axes[worst] / p.step_s:.0%} ({'/'.join(sorted(links))})")
    largest = max(p.memory_terms(), key=lambda t: t[1])[0]
    parts.append(f"memory: {largest.split(' (')[0].split(' and')[0]}")
    return ", ".join(parts)


def remat_cost(c: Candidate) -> float:
    """FLOPs over the model's: remat's recompute, plus 1F1B's recomputed stage forward (its
    backward runs jax.vjp of the stage from the kept input: one more forward)."""
    return REMAT_COST[c.remat] + (1 / 3 if c.drives_backward else 0.0)


def activation_units(c: Candidate, batch: int, seq_len: int, num_layers: int) -> float:
    """Tokens x layers whose activations one device keeps at once (the pipeline keeps every
    tick's), over the tensor size: what activation memory scales with, roughly."""
    s = c.shape
    p, t = s["pipe"], s["tensor"]
    tokens = (batch / (s["data"] * s["fsdp"] * s.get("expert", 1) * c.accum) * max(1, seq_len)
              / s.get("context", 1))
    if p > 1 and c.drives_backward:  # one micro-batch's stage at a time (plus kept inputs)
        return tokens / c.microbatches * num_layers / (p * c.repeats) / t
    if p > 1 and c.schedule == "zb":  # a whole stage's residuals of up to p micro-batches
        return tokens / c.microbatches * min(p, c.microbatches) * num_layers / p / t
    if p > 1:
        ticks = c.repeats * c.microbatches + p - 1
        return tokens / c.microbatches * ticks * num_layers / (p * c.repeats) / t
    return tokens * num_layers / t


@dataclasses.dataclass
class _MeshInfo:
    fixed_bytes: int = 0      # state + gradients (+ the gathered compute copy), exact
    error: str | None = None  # why no layout of this mesh can be built


@dataclasses.dataclass
class _Progress:
    """What the search has learnt so far: layouts that fit or not per shape, each mesh's
    fixed bytes, the least activation bytes per unit per remat and kind of schedule, why
    candidates were set aside."""
    fits: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    misses: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))
    meshes: dict = dataclasses.field(default_factory=dict)
    per_unit: dict = dataclasses.field(default_factory=dict)
    found: list = dataclasses.field(default_factory=list)
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    compiled: int = 0
    best: float = math.inf

    def dominated(self, c: Candidate) -> str | None:
        """Why a layout of the same shape already compiled makes `c` pointless (or None)."""
        level = REMAT_LEVEL[c.remat]
        if any(REMAT_LEVEL[o.remat] >= level and o.accum >= c.accum for o in self.misses[c.base]):
            return "need more memory than a layout that did not fit"
        if any(REMAT_LEVEL[o.remat] <= level and o.accum <= c.accum for o in self.fits[c.base]):
            return "slower than a fitting layout of the same shape"
        return None

    def too_big(self, c: Candidate, info: _MeshInfo, units: float, memory: int) -> str | None:
        """Why `c`'s mesh rules it out, or its memory certainly exceeds `memory` (or None)."""
        if info.error:
            return f"invalid ({info.error})"
        if info.fixed_bytes > memory:
            return "parameters, optimizer state and gradients alone do not fit"
        key = (c.remat, c.kind)
        if key in self.per_unit and info.fixed_bytes + self.per_unit[key] * units > memory:
            return "activations (scaled from the compiled layouts) do not fit"
        return None

    def record(self, c: Candidate, result: PlanResult, info: _MeshInfo, units: float) -> None:
        self.compiled += 1
        rest = max(0, result.peak_bytes - info.fixed_bytes) / max(units, 1.0)
        key = (c.remat, c.kind)
        self.per_unit[key] = min(self.per_unit.get(key, rest), rest)
        if result.fits:
            self.found.append((c, result))
            self.fits[c.base].append(c)
            self.best = min(self.best, result.step_s)
        else:
            self.rejected["compiled, does not fit"] += 1
            self.misses[c.base].append(c)


def search(cfg: RunConfig, card: Accelerator, num_devices: int, *, top: int = 5,
           max_compiles: int = 40, depth: str = "auto",
           remats: tuple[str, ...] = ("none", "dots", "block"),
           progress: Callable[[str], None] | None = None) -> SearchResult:
    """The fitting layouts of `cfg`'s model and global batch on `num_devices` x `card`:
    candidates in order of a rough estimate, each pruned by what earlier compiles showed
    or compiled for the target, until `top` fit and the rest are well behind."""
    base = Layout.build(replace_flat(cfg, mesh="", microbatches=1, pipeline_repeats=1,
                                     grad_accum_steps=1, pipeline_fsdp_gather_once=False),
                        devices=jax.devices()[:1])  # the model, its batch and counts
    mc, shape = base.model_cfg, model_shape(base.model_cfg)
    remats = remats if shape.remat is not None else ("none",)
    n_params = sum(math.prod(a.shape) for a in
                   jax.tree_util.tree_leaves(base.trainer.abstract_params))
    fpt = base.family.flops_per_token
    model_flops = fpt(mc) * base.tokens_per_step if fpt else 6.0 * n_params * base.tokens_per_step
    itemsize = 2 if shape.dtype == "bfloat16" else 4
    batch = cfg.data.batch_size
    found_all = candidates(num_devices, mc.num_layers, batch, card.devices_per_host, remats,
                           shape.experts, shape.seq_len)
    est = {c: estimate_s(c, n_params, model_flops, mc.num_layers, shape.width, shape.seq_len,
                         batch, itemsize, card, shape.dtype, shape.experts_per_token)
           for c in found_all}
    order = sorted(found_all, key=lambda c: (est[c], REMAT_LEVEL[c.remat], c.accum))
    state, budget_hit = _Progress(), False
    for c in order:
        if (why := state.dominated(c)) is not None:
            state.rejected[why] += 1
            continue
        if len(state.found) >= top and est[c] > STOP_MARGIN * state.best:
            break  # even its rough estimate is well behind a compiled layout that fits
        info = state.meshes.get(c.mesh) or state.meshes.setdefault(c.mesh, _mesh_info(cfg, c))
        units = activation_units(c, batch, shape.seq_len, mc.num_layers)
        if (why := state.too_big(c, info, units, card.memory_bytes)) is not None:
            state.rejected[why] += 1
            continue
        if state.compiled >= max_compiles:
            budget_hit = True
            break
        try:
            layout, program, how = compile_program(replace_flat(cfg, **c.settings()), depth, card)
        except ValueError as e:  # (ShardingError, PipelineError, MeshError are ValueErrors)
            state.rejected[f"invalid ({_short(e)})"] += 1
            continue
        result = make_plan(layout, program, card, how)
        state.record(c, result, info, units)
        if progress:
            progress(f"  {state.compiled:3d}. {c.flags()}: {size(result.peak_bytes)}, "
                     f"{result.step_s * 1e3:.1f} ms" + ("" if result.fits else " (does not fit)"))
    state.found.sort(key=lambda cp: cp[1].step_s)
    return SearchResult(state.found, dict(state.rejected), len(found_all), state.compiled,
                        budget_hit)


def _mesh_info(cfg: RunConfig, c: Candidate) -> _MeshInfo:
    """The exact bytes of state and gradients on `c`'s mesh (no compile), or why the model
    cannot be laid out on it."""
    m = c.microbatches if c.shape["pipe"] > 1 else 1  # (the state does not depend on m)
    try:
        layout = Layout.build(replace_flat(cfg, mesh=format_mesh(c.shape), microbatches=m,
                                           pipeline_repeats=1, grad_accum_steps=1,
                                           pipeline_fsdp_gather_once=False, remat="none"))
    except ValueError as e:  # (ShardingError, PipelineError, MeshError are ValueErrors)
        return _MeshInfo(error=_short(e))
    tr = layout.trainer
    at_rest = analysis.sharded_bytes(tr.abstract_params, tr.state_shardings.params)
    compute = analysis.sharded_bytes(tr.abstract_params, tr.param_shardings)
    fixed = tr.state_bytes_per_device() + compute + (compute if compute > at_rest else 0)
    return _MeshInfo(fixed)


def _short(e: Exception) -> str:
    """The first clause of an error, without the mesh sizes (one reason per kind)."""
    text = str(e).split(";")[0]
    text = text.split(": ", 1)[-1] if text.count(":") else text
    text = re.sub(r"\b(data|fsdp|pipe|expert|context|tensor)=\d+", r"\1", text)
    return text if len(text) < 70 else text[:67] + "..."
