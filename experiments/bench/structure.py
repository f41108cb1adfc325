"""The structure suite: each layout's compiled train step (memory, collectives, FLOPs, which
all-gathers gather a weight) next to the analytic ideal, read from the compiled program."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from experiments.bench import traffic
from experiments.bench.context_structure import ContextStructure, context_structure
from experiments.bench.harness import gpt_trainer, log, single_mesh, tokens_batch
from experiments.bench.moe_structure import MoEStructure, moe_structure
from experiments.bench.results import Json, Target, count_mib, mib, table
from experiments.bench.schedule_structure import ScheduleStructure, schedule_structure
from jaxmp.mesh import format_mesh, make_mesh, parse_mesh
from jaxmp.models.gpt import GPT, GPTConfig, num_params
from jaxmp.models.llama import Llama, LlamaConfig
from jaxmp.models.llama import num_params as llama_params
from jaxmp.pipeline import PipelineError, PipelineSpec, bubble_factor
from jaxmp.plan import analysis
from jaxmp.sharding import DEFAULT_RULES
from jaxmp.train import OptConfig, Trainer


@dataclasses.dataclass(frozen=True)
class StructureSizes:
    num_layers: int = 16
    d_model: int = 256
    num_heads: int = 8
    seq_len: int = 128
    batch: int = 16
    vocab_size: int = 256

    def gpt(self, num_layers: int | None = None) -> GPTConfig:
        return GPTConfig(num_layers=num_layers or self.num_layers, d_model=self.d_model,
                         num_heads=self.num_heads, seq_len=self.seq_len,
                         vocab_size=self.vocab_size)

    def llama(self) -> LlamaConfig:
        """The same depth, width and heads as a Llama: half as many KV heads, SwiGLU of
        2.75 d (Llama's 8/3 d rounded to a multiple of 64 at d=256)."""
        return LlamaConfig(num_layers=self.num_layers, d_model=self.d_model,
                           num_heads=self.num_heads, num_kv_heads=self.num_heads // 2,
                           mlp_dim=self.d_model * 11 // 4, seq_len=self.seq_len,
                           vocab_size=self.vocab_size)

    def config(self, option: str) -> Any:
        return self.llama() if option == "llama" else self.gpt()


STRUCTURE_FULL = StructureSizes()
STRUCTURE_QUICK = StructureSizes(num_layers=8, d_model=64, num_heads=8, seq_len=32)
LAYOUTS: tuple[str, ...] = ("data:8", "fsdp:8", "tensor:8", "pipe:8", "data:2,pipe:2,tensor:2",
                            "fsdp:2,pipe:2,tensor:2", "pipe:4,tensor:2")
QUICK_MATRIX: tuple[tuple[str, int, int], ...] = (
    ("data:8", 1, 1), ("tensor:8", 1, 1), ("pipe:4,tensor:2", 4, 2),
    ("data:2,pipe:2,tensor:2", 4, 1))
# Rows of the layout options (LayoutConfig): (mesh, m, r, option). "sp": sequence
# parallelism; "gather-once": pipeline_fsdp_gather_once; "accum2": 2 accumulation parts
# (gradients reduced once over data); "replicated-state": --noshard_state (the old layout);
# "llama": the Llama family at the same sizes (StructureSizes.llama).
OPTION_ROWS: tuple[tuple[str, int, int, str], ...] = (
    ("tensor:8", 1, 1, "sp"), ("pipe:4,tensor:2", 8, 2, "sp"),
    ("fsdp:2,pipe:2,tensor:2", 1, 1, "gather-once"), ("fsdp:2,pipe:2,tensor:2", 4, 1, "gather-once"),
    ("fsdp:2,pipe:2,tensor:2", 8, 1, "gather-once"), ("fsdp:2,pipe:2,tensor:2", 1, 1, ""),
    ("fsdp:2,pipe:2,tensor:2", 4, 1, ""),
    ("data:8", 1, 1, "accum2"), ("data:8", 1, 1, "replicated-state"),
    ("data:2,tensor:4", 1, 1, "llama"), ("pipe:4,tensor:2", 8, 2, "llama"),
    ("data:2,pipe:2,tensor:2", 8, 2, "llama"))
QUICK_OPTION_ROWS: tuple[tuple[str, int, int, str], ...] = (
    ("tensor:8", 1, 1, "sp"), ("fsdp:2,pipe:2,tensor:2", 4, 1, "gather-once"))
OPTIONS = ("", "sp", "gather-once", "accum2", "replicated-state", "llama")
MICROBATCHES = (1, 4, 8)
REPEATS = (1, 2)


# ====================================================================== the result
@dataclasses.dataclass(frozen=True)
class StructureResult:
    model: Json        # the sizes, the parameter count, the one-device figures
    rows: list[Json]   # one per layout x pipeline setting (structure_row)
    moe: MoEStructure | None = None  # the mixture-of-experts rows
    context: ContextStructure | None = None  # the context-parallel rows
    schedules: ScheduleStructure | None = None  # the pipeline schedules' rows

    def to_json(self) -> Json:
        return {"structure_model": self.model, "structure": self.rows,
                **(self.moe.to_json() if self.moe else {}),
                **(self.context.to_json() if self.context else {}),
                **(self.schedules.to_json() if self.schedules else {})}

    def table(self) -> str:
        head = ["layout", "option", "m", "r", "state MiB", "ideal", "x", "x repl", "temp MiB", "all-reduce",
                "all-gather", "red-scat", "coll-perm", "all-to-all", "GFLOP/dev", "x ideal",
                "bubble", "TP x min", "PP x min", "DP x min", "W-gather"]
        text = self._note() + "\n" + table(head, [_table_row(r) for r in self.rows])
        extra = [part.table() for part in (self.moe, self.context, self.schedules) if part]
        return "\n\n".join([text, *extra])

    def _note(self) -> str:
        m = self.model
        return (
            f"GPT {m['num_layers']} layers, d={m['d_model']}, T={m['seq_len']}, "
            f"batch {m['batch']}, {m['params']:,} params; one device: "
            f"{m['single_device_flops'] / 1e9:.2f} GFLOP/step (XLA cost_analysis, loop "
            f"bodies once: {m['single_device_xla_cost_analysis_flops'] / 1e9:.2f}), "
            f"{mib(m['single_device_temp_bytes'])} MiB temporaries.\n"
            "x: state / (total / devices) (parameters and Adam moments, split over data and "
            "fsdp at rest unless replicated-state); x repl: state / (total / (devices / data)). "
            "collectives: count/MiB per device per step (loops x trip count); TP x min: "
            "all-reduce bytes over tensor in the layer loops / Megatron minimum; PP x min: "
            "collective-permute bytes over pipe / one hand-off per tick (sp: all-gather + "
            "reduce-scatter bytes / Megatron-SP's, 10 per layer); DP x min: gradient "
            "all-reduce / reduce-scatter bytes over data, fsdp / the gradients once; W-gather: "
            "all-gathers of a weight or a piece, reshaping or cast of one (traced from the "
            "parameters through the program). An all-reduce whose every use keeps only its "
            "own share is counted as the reduce-scatter it is (XLA's CPU backend lowers "
            "reduce-scatters so; GPU/TPU XLA emits one).")

    def targets(self) -> list[Target]:
        return ([t for r in self.rows for t in _row_targets(r)] + _option_targets(self.rows)
                + [t for part in (self.moe, self.context, self.schedules) if part
                   for t in part.targets()])


def _table_row(r: Json) -> list[Any]:
    c = r["collectives"]
    tp, pp, dp = r["tensor_parallel"], r["pipeline"], r["data_parallel"]
    ratio = lambda d: f"{d['bytes_ratio']:.3f}" if d else "-"
    return [r["layout"], r.get("option", ""), r["microbatches"], r["repeats"],
            mib(r["state_bytes_per_device"]),
            mib(r["ideal_state_bytes_per_device"]), f"{r['state_ratio']:.3f}",
            f"{r['replica_state_ratio']:.3f}", mib(r["temp_bytes"]), count_mib(c["all-reduce"]),
            count_mib(c["all-gather"]), count_mib(c["reduce-scatter"]),
            count_mib(c["collective-permute"]), count_mib(c["all-to-all"]),
            f"{r['flops_per_device'] / 1e9:.2f}", f"{r['flops_ratio']:.3f}",
            f"{r['analytic_bubble_factor']:.3f}", ratio(tp), ratio(pp), ratio(dp),
            r["weight_all_gathers"]["count"]]


def _row_targets(r: Json) -> list[Target]:
    where = _where(r)
    out = []
    if r.get("option") != "replicated-state":
        out.append(Target("state bytes <= 1.05 x ideal", where, r["state_ratio"], 1.05,
                          r["state_ratio"] <= 1.05))
    tp = r["tensor_parallel"]
    if tp:
        v = tp["bytes_ratio"] / tp["expected_ratio"]
        what = ("SP all-gather + reduce-scatter bytes == Megatron-SP's (x bubble factor)"
                if r.get("option") == "sp" else
                "TP all-reduce bytes == Megatron minimum (x bubble factor)")
        out.append(Target(what, where, v, 1.0, abs(v - 1) < 0.01))
    if "fsdp" not in r["layout"]:
        # ZeRO-1 gathers the compute copy of the parameters (split over data at rest) once
        # per step; anything else gathering a weight is a layout bug.
        gathered = r["weight_all_gathers"]["bytes"]
        zero = "data" in r["layout"] and r.get("option") != "replicated-state"
        allowed = r["param_bytes_per_device"] if zero else 0
        out.append(Target("weights all-gathered outside FSDP only by ZeRO-1, once per step "
                          "(bytes / compute copy)", where,
                          gathered / r["param_bytes_per_device"], allowed and 1.0,
                          gathered <= allowed))
    dp = r["data_parallel"]
    if dp:
        out.append(Target("(extra) gradient reduction bytes <= 1.05 x gradients once", where,
                          dp["bytes_ratio"], 1.05, dp["bytes_ratio"] <= 1.05))
    if r["microbatches"] > 1 or "pipe" in r["layout"]:
        v = r["flops_ratio"] / r["analytic_bubble_factor"]
        out.append(Target("FLOPs per device <= 1.02 x ideal x bubble factor", where, v, 1.02,
                          v <= 1.02))
    return out


def _where(r: Json) -> str:
    option = f" {r['option']}" if r.get("option") else ""
    return f"{r['layout']} m={r['microbatches']} r={r['repeats']}{option}"


def _option_targets(rows: list[Json]) -> list[Target]:
    """Targets that compare rows: gather-once traffic independent of m; sequence
    parallelism's activation saving against Korthikanti et al.'s prediction."""
    out = []
    once = {r["microbatches"]: r for r in rows if r.get("option") == "gather-once"}
    if len(once) > 1:
        lo, hi = once[min(once)], once[max(once)]
        for what, key in (("all-gather", "all_gather"), ("gradient reduction", "reduction")):
            a, b = lo["fsdp_traffic"][key], hi["fsdp_traffic"][key]
            v = b / a if a else float("inf")
            out.append(Target(f"gather-once: fsdp {what} bytes m={max(once)} / m={min(once)} "
                              "within 5%", lo["layout"], v, 1.05, abs(v - 1) <= 0.05))
    for r in rows:
        if r.get("option") != "sp":
            continue
        base = next((b for b in rows if not b.get("option") and b["layout"] == r["layout"]
                     and b["microbatches"] == r["microbatches"]
                     and b["repeats"] == r["repeats"]), None)
        if base is None:
            continue
        saved = base["temp_bytes"] - r["temp_bytes"]
        v = saved / r["sp_predicted_saving_bytes"]
        r["sp_measured_saving_bytes"] = saved
        out.append(Target("SP activation saving / Korthikanti prediction within 25%", _where(r),
                          v, 1.0, abs(v - 1) <= 0.25))
    return out


def sp_predicted_saving(cfg: GPTConfig, rows: int, shape: Mapping[str, int], m: int,
                        r: int = 1) -> float:
    """Korthikanti et al. (2022) eq. 2 vs 4: sequence parallelism divides by t the
    activations kept between the tensor-parallel regions, per layer 10*s*b*h bytes in
    16-bit terms of which 2*s*b*h are dropout masks (none here): 4 arrays of s*b*h
    (the two norm inputs, the two projection inputs), for the layers of a stage and all
    its micro-batches. With a pipeline, the residual-stream arrays the pipeline itself
    keeps are split too (its input of every tick, saved for the backward pass, and its
    input and output buffers of the data shard's rows): ticks*rows/m + 2*rows rows."""
    t, p = shape["tensor"], shape["pipe"]
    row = cfg.seq_len * cfg.d_model * jnp.dtype(cfg.dtype).itemsize
    kept = cfg.num_layers / p * 4 * rows * row
    if p > 1:
        kept += ((r * m + p - 1) * rows / m + 2 * rows) * row
    return kept * (1 - 1 / t)


# ====================================================================== the suite
def structure_suite(quick: bool, layouts: Sequence[str] | None = None) -> StructureResult:
    """The model description and one row per layout x pipeline setting."""
    sizes = STRUCTURE_QUICK if quick else STRUCTURE_FULL
    if layouts:
        matrix = layout_matrix(layouts, sizes)
    else:
        matrix = list(QUICK_MATRIX) if quick else layout_matrix(LAYOUTS, sizes)
        matrix = [(*row, "") for row in matrix]
        matrix += [row for row in (QUICK_OPTION_ROWS if quick else OPTION_ROWS)
                   if row not in matrix]
    single = single_device_figures(sizes)
    model = {**dataclasses.asdict(sizes), "params": num_params(sizes.gpt()), **single}
    if any("llama" in row[3:] for row in matrix):
        llama = single_device_figures(sizes, "llama")
        model["llama"] = {"params": llama_params(sizes.llama()), **llama}
    rows = []
    for layout, m, r, *option in matrix:
        one = model["llama"] if option == ["llama"] else single
        row = structure_row(sizes, layout, m, r, one["single_device_flops"], *option)
        log(f"  structure {row['layout']:<24} m={m} r={r} {row['option']:<16} compiled in "
            f"{row['compile_s']:.1f}s")
        rows.append(row)
    if layouts:
        return StructureResult(model, rows)
    return StructureResult(model, rows, moe_structure(quick), context_structure(quick),
                           schedule_structure(quick))


def layout_matrix(layouts: Sequence[str], sizes: StructureSizes,
                  ) -> list[tuple[str, int, int]]:
    """(mesh, microbatches, repeats): pipe layouts get every valid m in {1,4,8} x r in {1,2}."""
    out = []
    n = len(jax.devices())
    for layout in layouts:
        parse_mesh(layout, n)  # raises MeshError with a clear message
        shape = make_mesh(layout).shape
        p = shape["pipe"]
        if p == 1:
            out.append((layout, 1, 1))
            continue
        per_shard = sizes.batch // (shape["data"] * shape["fsdp"])
        for r in REPEATS:
            for m in MICROBATCHES:
                try:
                    PipelineSpec(p, m, r).validate(sizes.num_layers, per_shard)
                except PipelineError:
                    continue
                out.append((layout, m, r))
    return out


def _trainer(sizes: StructureSizes, option: str, mesh: Any, pipe: PipelineSpec = PipelineSpec(),
             **options: Any) -> Trainer:
    return gpt_trainer(sizes.config(option), mesh, pipe,
                       model=Llama if option == "llama" else GPT, **options)


def single_device_figures(sizes: StructureSizes, option: str = "") -> Json:
    """Loop-aware HLO FLOPs, XLA's cost_analysis FLOPs and temporaries of the one-device
    train step (the reference every layout is divided against)."""
    trainer = _trainer(sizes, option, single_mesh())
    compiled = trainer.lower(tokens_batch(sizes.batch, sizes.seq_len, sizes.vocab_size)).compile()
    cost = compiled.cost_analysis() or {}
    return {"single_device_flops": analysis.hlo_flops(compiled.as_text()).flops,
            "single_device_xla_cost_analysis_flops": float(cost.get("flops", 0.0)),
            "single_device_temp_bytes": analysis.memory_figures(compiled).temp_bytes}


def structure_row(sizes: StructureSizes, layout: str, m: int, r: int,
                  single_flops: float, option: str = "") -> Json:
    """Compile one layout's train step (with one of OPTIONS) and read its memory,
    collectives and FLOPs."""
    if option not in OPTIONS:
        raise ValueError(f"structure option {option!r}: choose one of {OPTIONS}")
    cfg = sizes.config(option)
    mesh = make_mesh(layout)
    shape, n = dict(mesh.shape), mesh.size
    p = shape["pipe"]
    rules = DEFAULT_RULES.override(activations={"sequence": "tensor"} if option == "sp"
                                   else None)
    trainer = _trainer(sizes, option, mesh,
                       PipelineSpec(p, m, r, fsdp_gather_once=option == "gather-once"),
                       opt=OptConfig(grad_accum_steps=2 if option == "accum2" else 1),
                       rules=rules, shard_state=option != "replicated-state")
    t0 = time.perf_counter()
    compiled = trainer.lower(tokens_batch(sizes.batch, sizes.seq_len, sizes.vocab_size)).compile()
    compile_s = time.perf_counter() - t0
    module = analysis.parse_hlo(compiled.as_text())
    found = analysis.collectives(module, shape)
    flops = analysis.hlo_flops(module)
    bubble = bubble_factor(p, m, r) if p > 1 else 1.0
    plan = trainer.plan()
    cost = compiled.cost_analysis() or {}
    rows = sizes.batch // (shape["data"] * shape["fsdp"])
    return {
        "layout": format_mesh(mesh), "option": option, "devices": n, "microbatches": m,
        "repeats": r, "compile_s": compile_s,
        **traffic.memory(compiled, trainer.abstract_state(), plan.bytes_per_device, shape, n),
        "collectives": analysis.collective_totals(found),
        "collectives_by_axes": traffic.by_axes(found),
        **traffic.parallel_traffic(found, cfg, sizes.batch, shape, m, r, bubble, plan, option),
        "fsdp_traffic": {"all_gather": analysis.axis_bytes(found, "fsdp", ("all-gather",)),
                         "reduction": analysis.axis_bytes(found, "fsdp", ("all-reduce", "reduce-scatter"))},
        "sp_predicted_saving_bytes": (sp_predicted_saving(cfg, rows, shape, m, r)
                                      if option == "sp" else None),
        "weight_all_gathers": traffic.weight_gathers(compiled, module),
        "flops_per_device": flops.flops,
        "dot_flops_per_device": flops.dot_flops,
        "ideal_flops_per_device": single_flops / n,
        "flops_ratio": flops.flops / (single_flops / n),
        "analytic_bubble_factor": bubble,
        "xla_cost_analysis_flops": float(cost.get("flops", 0.0)),
        "unknown_trip_counts": flops.unknown_loops,
    }
