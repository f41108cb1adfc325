"""Memory and time of a train step on a target accelerator, from the compiled program.

The real train step (the one `experiments.train` runs) is compiled ahead of time for the
target's device count on a simulated CPU mesh and read with the benchmarks' accounting
(jaxmp.plan.analysis): XLA's memory analysis per device, the HLO's FLOPs (loop bodies x
trip counts) and its collectives per mesh axis. Then:

- memory per device = arguments + temporaries + outputs not aliased to the arguments (the
  state is donated), split into parameters, optimizer state, gradients, the gathered compute
  copy of the parameters and activations (the rest of XLA's temporaries);
- step time = FLOPs / (peak x efficiency) + each collective's ring time over the link its
  mesh axes map to (NVLink inside a host, the network across hosts) + a latency per
  collective. The model assumes no overlap of collectives with compute (an upper bound
  where XLA's scheduler hides some) and that XLA's CPU program has the FLOPs and
  collectives the accelerator's would (same partitioner; fusion and remat decisions may
  differ). The pipeline's idle ticks are inside the FLOPs (a stage computes on every
  tick) and are reported as the bubble's share.

With `depth="reduced"` two shallow copies of the model (2 and 4 layers per pipeline stage
and round) are compiled and every figure is extrapolated linearly to the full depth
(BUILD_NOTES "Planning a run": how close that comes).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from jaxmp.accelerators import GIB, KNOWN, Accelerator
from jaxmp.config import RunConfig, replace_flat
from jaxmp.layers import CHUNK
from jaxmp.mesh import format_mesh
from jaxmp.models.registry import model_shape
from jaxmp.pipeline import bubble_factor
from jaxmp.plan import analysis
from jaxmp.plan.analysis import CollectiveKey, MemoryFigures
from jaxmp.plan.targets import cpu_accelerator, target  # noqa: F401  (re-exported)
from jaxmp.scheduled import slots
from jaxmp.train import Trainer

DEPTHS = ("auto", "full", "reduced")
RING_FACTOR = {"all-reduce": lambda n: 2 * (n - 1) / n, "all-gather": lambda n: (n - 1) / n,
               "reduce-scatter": lambda n: (n - 1) / n, "all-to-all": lambda n: (n - 1) / n,
               "collective-permute": lambda n: 1.0}


# ====================================================================== compiling
@dataclasses.dataclass(frozen=True)
class Program:
    """What one compile of the train step gives (per device), at `layers` layers."""
    layers: int
    memory: MemoryFigures
    flops: float
    collectives: dict[CollectiveKey, tuple[float, float]]  # (count, bytes)

    def scaled(self, other: Program, layers: int) -> Program:
        """Both programs' figures extrapolated linearly in depth to `layers`."""
        w = (layers - self.layers) / (other.layers - self.layers)
        mix = lambda a, b: a + w * (b - a)
        mem = MemoryFigures(*(int(round(mix(getattr(self.memory, f.name),
                                                getattr(other.memory, f.name))))
                              for f in dataclasses.fields(MemoryFigures)))
        keys = set(self.collectives) | set(other.collectives)
        zero = (0.0, 0.0)
        coll = {k: tuple(max(0.0, mix(a, b)) for a, b in
                         zip(self.collectives.get(k, zero), other.collectives.get(k, zero)))
                for k in keys}
        return Program(layers, mem, mix(self.flops, other.flops), coll)


@dataclasses.dataclass
class Layout:
    """A run's layout built the way `experiments.train` builds it (no data read)."""
    cfg: RunConfig
    family: Any
    model_cfg: Any
    mesh: jax.sharding.Mesh
    pipe: Any
    trainer: Trainer
    batch: dict[str, np.ndarray]
    tokens_per_step: int

    @classmethod
    def build(cls, cfg: RunConfig, num_layers: int | None = None,
              devices: Any = None) -> Layout:
        """The layout of `cfg` (at `num_layers` layers if given) over `devices` (all)."""
        from jaxmp.run import layout, make_trainer, model_config

        cfg.validate()
        family, model_cfg = model_config(cfg)
        if num_layers is not None:
            model_cfg = dataclasses.replace(model_cfg, num_layers=num_layers)
        mesh, pipe, rules = layout(cfg, family, model_cfg, devices)
        trainer = make_trainer(cfg, family, model_cfg, mesh, pipe, rules)
        batches = family.batches(model_cfg, cfg.data.data, cfg.data.batch_size, 0)
        batch = batches.example()
        for x in batch.values():
            trainer.batch_spec(x)
        return cls(cfg, family, model_cfg, mesh, pipe, trainer, batch, batches.tokens_per_step)

    def run_step(self) -> tuple[Any, float]:
        """Compile the train step, run one step of it from a fresh state: (the executable,
        the loss). The executable is the program that ran (pass it to `compile`)."""
        compiled = self.trainer.lower(self.batch).compile()
        _, metrics = compiled(self.trainer.init_state(), self.trainer.put_batch(self.batch))
        return compiled, float(jax.block_until_ready(metrics["loss"]))

    def compile(self, compiled: Any = None) -> Program:
        """The figures of this layout's compiled train step (compiled now unless given: an
        executable of `trainer.lower(batch).compile()`, e.g. one that has run)."""
        compiled = compiled or self.trainer.lower(self.batch).compile()
        text = compiled.as_text()
        coll = analysis.collectives(text, dict(self.mesh.shape))
        flops = analysis.hlo_flops(text).flops
        if self.pipe.enabled and self.pipe.schedule == "zb":  # (each slot's slowest branch)
            from jaxmp.zerobubble import step_flops
            flops = step_flops(text, flops, self.pipe.stages, self.pipe.microbatches)["flops"]
        return Program(self.model_cfg.num_layers, analysis.memory_figures(compiled), flops,
                       {k: (float(c), float(b)) for k, (c, b) in coll.items()})


def reduced_depths(layout: Layout) -> tuple[int, int] | None:
    """Two shallow depths to extrapolate from: 2 and 4 layers per pipeline stage and round
    (u), else u and 2u; None where neither is shallower than the model. (A scan of one
    layer compiles to a different program, so u = 1 is never used.)"""
    u = layout.pipe.stages * layout.pipe.repeats
    layers = layout.model_cfg.num_layers
    if 4 * u < layers:
        return 2 * u, 4 * u
    if 2 * u < layers and u >= 2:
        return u, 2 * u
    return None


def compile_program(cfg: RunConfig, depth: str = "auto", card: Accelerator | None = None,
                    devices: Any = None) -> tuple[Layout, Program, str]:
    """The layout and its program at full depth ('full'), extrapolated from two shallow
    compiles ('reduced'), or 'auto': reduced where the layers are unrolled
    (--noscan_layers: compile time grows with depth), else full. Returns how it was made.
    For a GPU `card`, see `stand_in`."""
    if depth not in DEPTHS:
        raise ValueError(f"plan_depth={depth!r}: expected one of {', '.join(DEPTHS)}")
    from jaxmp.run import model_config

    cfg, note = stand_in(cfg, model_config(cfg)[1], card)
    full = Layout.build(cfg, devices=devices)
    unrolled = not model_shape(full.model_cfg).scan_layers
    depths = reduced_depths(full) if depth == "reduced" or (depth == "auto" and unrolled) else None
    if depths is None:
        return (full, full.compile(),
                f"compiled at full depth ({full.model_cfg.num_layers} layers){note}")
    a, b = (Layout.build(cfg, n, devices).compile() for n in depths)
    layers = full.model_cfg.num_layers
    return full, a.scaled(b, layers), (f"extrapolated to {layers} layers from compiles at "
                                       f"{depths[0]} and {depths[1]} layers{note}")


def stand_in(cfg: RunConfig, model_cfg: Any, card: Accelerator | None) -> tuple[RunConfig, str]:
    """The run to compile on this host for `card`: on an NVIDIA target a bf16 model's
    attention is cuDNN flash attention (auto picks it; jaxmp's GPU runs use it), which keeps
    no (T, T) scores for the backward pass, and XLA's CPU attention does. Chunked attention
    (jaxmp.layers.causal_attention) stands in for it: the same memory behaviour and about
    the FLOPs flash attention's backward pass spends recomputing the scores."""
    shape = model_shape(model_cfg)
    gpu_target = card is not None and card.name in KNOWN
    on_gpu = jax.default_backend() == "gpu"
    t = shape.seq_len
    if (not gpu_target or on_gpu or shape.attention not in ("auto", "cudnn")
            or shape.dtype != "bfloat16" or t % min(CHUNK, t or 1)):
        return cfg, ""
    return (replace_flat(cfg, attention="chunked"),
            "; cuDNN flash attention compiled as chunked attention")


# ====================================================================== the plan
@dataclasses.dataclass(frozen=True)
class CollectiveTime:
    op: str
    axes: str
    group: int
    link: str          # "nvlink" | "network" ("in host" for the cpu target)
    count: float
    bytes: float       # the whole buffer per device (analysis.collective_bytes), summed
    seconds: float


@dataclasses.dataclass(frozen=True)
class PlanResult:
    target: Accelerator
    mesh: dict[str, int]
    how: str                        # how the program was obtained (full / extrapolated)
    memory: MemoryFigures
    params_bytes: int               # at rest, per device
    opt_bytes: int
    compute_param_bytes: int        # the compute layout's copy (= gradients' size)
    gathered: bool                  # whether the compute copy is gathered from the state
    batch_bytes: int
    ticks: int                      # micro-batch items whose activations a stage keeps
    remat: str
    flops: float
    compute_s: float
    bubble_s: float
    collectives: list[CollectiveTime]
    model_flops: float | None       # per step, from the family's flops_per_token
    dtype: str
    efficiency: float               # the fraction of peak the compute time assumes
    activation_scale: float = 1.0   # Accelerator.bf16_activation_scale where it applies

    @property
    def peak_bytes(self) -> int:
        """XLA's peak (arguments + temporaries + outputs not aliased), with the activations
        scaled to the target's."""
        return self.memory.peak_estimate_bytes - (self.xla_activation_bytes
                                                  - self.activation_bytes)

    @property
    def spare_bytes(self) -> int:
        return self.target.memory_bytes - self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.spare_bytes >= 0

    @property
    def gradient_bytes(self) -> int:
        return self.compute_param_bytes

    @property
    def xla_activation_bytes(self) -> int:
        """XLA's temporaries less the gradients and the gathered compute copy."""
        held = self.gradient_bytes + (self.compute_param_bytes if self.gathered else 0)
        return max(0, self.memory.temp_bytes - held)

    @property
    def activation_bytes(self) -> int:
        return int(round(self.xla_activation_bytes * self.activation_scale))

    @property
    def collective_s(self) -> float:
        return sum(c.seconds for c in self.collectives)

    @property
    def step_s(self) -> float:
        return self.compute_s + self.collective_s

    @property
    def mfu(self) -> float | None:
        if self.model_flops is None:
            return None
        n = math.prod(self.mesh.values())
        return self.model_flops / (self.step_s * self.target.peak(self.dtype) * n)

    def memory_terms(self) -> list[tuple[str, int]]:
        terms = [("parameters (at rest)", self.params_bytes),
                 ("optimizer state", self.opt_bytes),
                 ("gradients", self.gradient_bytes)]
        if self.gathered:
            terms.append(("gathered parameters (compute copy)", self.compute_param_bytes))
        terms.append(("activations and other temporaries", self.activation_bytes))
        rest = self.peak_bytes - sum(t for _, t in terms)
        return [*terms, ("batch and outputs", max(0, rest))]

    def by_axis(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.collectives:
            out[c.axes] = out.get(c.axes, 0.0) + c.seconds
        return out

    def verdict(self) -> str:
        largest = max(self.memory_terms(), key=lambda t: t[1])[0]
        cap = size(self.target.memory_bytes)
        if self.fits:
            return (f"fits: {size(self.peak_bytes)} of {cap} per device, "
                    f"{size(self.spare_bytes)} to spare (largest: {largest})")
        return (f"does NOT fit: {size(self.peak_bytes)} per device needed, {cap} present: "
                f"over by {size(-self.spare_bytes)} (largest: {largest})")

    def format(self) -> str:
        t = self.target
        lines = [f"memory and time plan on {format_mesh(self.mesh)} x {t.name} "
                 f"({t.devices_per_host} per host; {self.how})",
                 f"  target: {size(t.memory_bytes)}, {t.peak(self.dtype) / 1e12:.3g} TFLOP/s "
                 f"peak ({self.dtype}) at efficiency {self.efficiency:.2f}, links "
                 f"{t.intra_host_bytes_per_s / 1e9:.3g} GB/s in a host, "
                 f"{t.inter_host_bytes_per_s / 1e9:.3g} GB/s across, per device and direction",
                 f"  sources: {t.sources}",
                 "  memory per device:"]
        for name, b in self.memory_terms():
            lines.append(f"    {name:<38} {size(b):>11}")
        act = self.activation_bytes
        lines.append(f"    {'activations per micro-batch tick':<38} {size(act / self.ticks):>11}"
                     f"  (x {self.ticks} live, remat={self.remat})")
        lines.append(f"    {'peak (args + temps + outputs)':<38} {size(self.peak_bytes):>11}")
        lines.append(f"    {'(XLA: temporaries, arguments)':<38} {size(self.memory.temp_bytes):>11}"
                     f"  {size(self.memory.argument_bytes)}")
        if self.activation_scale != 1:
            lines.append(f"    (activations: XLA's CPU figure {size(self.xla_activation_bytes)} x "
                         f"{self.activation_scale:.3f}, the bf16 scale calibrated on an H100)")
        lines.append(f"  verdict: {self.verdict()}")
        lines.append(f"  step time: {self.step_s * 1e3:.1f} ms (no overlap of collectives "
                     f"and compute; fully overlapped: "
                     f"{max(self.compute_s, self.collective_s) * 1e3:.1f} ms)")
        work = (f"{self.flops / 1e12:.2f} TFLOP" if self.flops >= 1e12
                else f"{self.flops / 1e9:.2f} GFLOP")
        lines.append(f"    compute {self.compute_s * 1e3:9.1f} ms  ({work} per device, of which "
                     f"pipeline bubble {self.bubble_s * 1e3:.1f} ms)")
        for c in sorted(self.collectives, key=lambda c: -c.seconds):
            if c.seconds * 1e3 >= 0.05:
                lines.append(f"    {c.op:<18} over {c.axes:<10} ({c.group} devices, {c.link:7})"
                             f" {c.seconds * 1e3:9.1f} ms  ({c.count:.0f} x, "
                             f"{size(c.bytes)})")
        if self.mfu is not None:
            lines.append(f"  MFU predicted: {self.mfu:.1%} (model FLOPs per step "
                         f"{self.model_flops / 1e12:.4g} TFLOP)")
        return "\n".join(lines)


def size(n: float) -> str:
    """Bytes as GiB from 1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def link_of(axes: str, mesh: Mapping[str, int], devices_per_host: int) -> str:
    """'nvlink' if the devices of one group over `axes` sit in one host (the mesh's devices
    in row-major order, `devices_per_host` consecutive ones per host), else 'network'."""
    names = list(mesh)
    over = axes.split("+")
    if any(a not in names for a in over):
        return "network"  # unknown groups: the slower link
    ids = np.arange(math.prod(mesh.values())).reshape([mesh[a] for a in names])
    group = ids[tuple(slice(None) if a in over else 0 for a in names)].reshape(-1)
    return "nvlink" if len(set(group // devices_per_host)) == 1 else "network"


def link_speed(card: Accelerator, link: str) -> tuple[float, float]:
    """(bytes/s per device and direction, seconds of latency per call) of a link_of link."""
    if link == "nvlink":
        return card.intra_host_bytes_per_s, card.intra_host_latency_s
    return card.inter_host_bytes_per_s, card.inter_host_latency_s


def collective_times(program: Program, mesh: Mapping[str, int],
                     card: Accelerator) -> list[CollectiveTime]:
    """Ring-algorithm time of each (op, axes) over its link, plus a latency per call."""
    merged: dict[tuple[str, str], list[float]] = {}
    for k, (count, nbytes) in program.collectives.items():
        m = merged.setdefault((k.op, k.axes), [0.0, 0.0])
        m[0] += count
        m[1] += nbytes
    out = []
    for (op, axes), (count, nbytes) in merged.items():
        group = math.prod(mesh.get(a, 1) for a in axes.split("+"))
        if group < 2 or not nbytes:
            continue
        link = link_of(axes, mesh, card.devices_per_host)
        bw, lat = link_speed(card, link)
        if card.name not in KNOWN:
            link = "in host" if link == "nvlink" else link  # (simulated devices: memory)
        seconds = nbytes * RING_FACTOR[op](group) / bw + count * lat
        out.append(CollectiveTime(op, axes, group, link, count, nbytes, seconds))
    return out


def make_plan(layout: Layout, program: Program, card: Accelerator, how: str) -> PlanResult:
    tr, model_cfg, pipe = layout.trainer, layout.model_cfg, layout.pipe
    state = tr.abstract_state()
    params_b = analysis.sharded_bytes(state.params, tr.state_shardings.params)
    opt_b = analysis.sharded_bytes(state.opt_state, tr.state_shardings.opt_state)
    compute_b = analysis.sharded_bytes(state.params, tr.param_shardings)
    batch_b = sum(analysis.sharded_bytes(jax.ShapeDtypeStruct(v.shape, v.dtype), sh)
                  for (k, v), sh in zip(layout.batch.items(),
                                        tr.batch_sharding(layout.batch).values()))
    shape = model_shape(model_cfg)
    dtype = shape.dtype
    scanned = pipe.enabled or shape.scan_layers
    efficiency = card.efficiency_for(scanned)
    compute_s = program.flops / (card.peak(dtype) * efficiency)
    scale = (card.bf16_activation_scale if dtype == "bfloat16" and jax.default_backend() == "cpu"
             else 1.0)
    p, m, r = pipe.stages, pipe.microbatches, pipe.repeats
    bubble_s = (compute_s * (1 - 1 / bubble_factor(p, m, r, pipe.schedule)) if pipe.enabled
                else 0.0)
    fpt = layout.family.flops_per_token
    return PlanResult(
        target=card, mesh=dict(layout.mesh.shape), how=how, memory=program.memory,
        params_bytes=params_b, opt_bytes=opt_b, compute_param_bytes=compute_b,
        gathered=compute_b > params_b, batch_bytes=batch_b,
        ticks=live_items(pipe),
        remat=shape.remat or "none", flops=program.flops, compute_s=compute_s,
        bubble_s=bubble_s, collectives=collective_times(program, layout.mesh.shape, card),
        model_flops=fpt(model_cfg) * layout.tokens_per_step if fpt else None, dtype=dtype,
        efficiency=efficiency, activation_scale=scale)


def live_items(pipe: Any) -> int:
    """Micro-batch items whose activations a device keeps at once: every tick's in GPipe's
    loop (r m + p - 1), the kept stage inputs plus the one recomputed in 1F1B's (whose
    backward recomputes each stage), the items whose residuals ZB-H1 keeps from F to B (at
    most p), one without a pipeline."""
    if not pipe.enabled:
        return 1
    p, m, r = pipe.stages, pipe.microbatches, pipe.repeats
    if pipe.schedule == "zb":
        from jaxmp.zerobubble import tables
        return tables(p, m)["res"]
    if pipe.drives_backward:
        return slots(p, m, r) + 1
    return r * m + p - 1


def plan(cfg: RunConfig, card: Accelerator, depth: str = "auto") -> PlanResult:
    """The memory and time plan of the run `cfg` describes, on `card`."""
    layout, program, how = compile_program(cfg, depth, card)
    return make_plan(layout, program, card, how)
