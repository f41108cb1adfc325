"""The structure suite's mixture-of-experts rows: each expert-parallel layout's compiled
train step against the analytic ideal (all-to-all bytes, the experts' weights per device,
FLOPs per device against the active parameters), and the CPU step time of dropless and
capacity routing."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments.bench.harness import log, single_mesh, step_ms, tokens_batch
from experiments.bench.results import Json, Target, count_mib, mib, table
from jaxmp.mesh import batch_shards, format_mesh, make_mesh
from jaxmp.models.moe import MoE, MoEConfig, moe_loss
from jaxmp.plan import analysis
from jaxmp.train import Trainer

CFG = MoEConfig(num_layers=4, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=64,
                num_experts=8, experts_per_token=2, seq_len=32, vocab_size=256)
BATCH = 16
# (mesh, capacity factor: 0 = dropless)
ROWS: tuple[tuple[str, float], ...] = (
    ("expert:8", 1.0), ("data:2,expert:4", 1.0), ("expert:4,tensor:2", 1.0),
    ("fsdp:2,expert:4", 1.0), ("expert:8", 0.0), ("data:2,expert:4", 0.0))
QUICK_ROWS: tuple[tuple[str, float], ...] = (("data:2,expert:4", 1.0), ("data:2,expert:4", 0.0))
EXPERT_WEIGHTS = ("mlp/gate", "mlp/up", "mlp/down")


@dataclasses.dataclass(frozen=True)
class MoEStructure:
    model: Json
    rows: list[Json]

    def to_json(self) -> Json:
        return {"structure_moe_model": self.model, "structure_moe": self.rows}

    def table(self) -> str:
        m = self.model
        head = ["layout", "routing", "all-to-all", "x analytic", "expert MiB/dev", "x ideal",
                "GFLOP/dev", "x active", "ms/step"]
        body = [[r["layout"], r["routing"], count_mib(r["all_to_all"]),
                 f"{r['all_to_all_ratio']:.3f}", mib(r["expert_bytes_per_device"]),
                 f"{r['expert_bytes_ratio']:.3f}", f"{r['flops_per_device'] / 1e9:.3f}",
                 f"{r['flops_ratio']:.3f}", f"{r['step_ms']:.1f}" if r["step_ms"] else "-"]
                for r in self.rows]
        note = (f"router load imbalance (busiest expert / mean, per layer, initial weights): "
                f"{', '.join(f'{x:.2f}' for x in m['router_load_imbalance'])}. "
                f"MoE {m['num_layers']} layers, d={m['d_model']}, {m['num_experts']} experts "
                f"top-{m['experts_per_token']}, expert width {m['mlp_dim']}, T={m['seq_len']}, "
                f"batch {m['batch']}. all-to-all: count/MiB per device per step against "
                "tokens x d x k x 2 directions (dispatch, combine) x 2 (forward, backward) per "
                "layer; expert MiB/dev: the experts' weights a device holds against total / "
                "(expert x tensor x fsdp); x active: FLOPs per device against the one-device step "
                "at capacity factor 1 (each token through exactly k experts) / devices. "
                "Dropless buffers hold the worst case on CPU (no ragged all-to-all in "
                "XLA:CPU), and its grouped matmul is a masked matmul per expert there.")
        return note + "\n" + table(head, body)

    def targets(self) -> list[Target]:
        out = []
        for r in self.rows:
            where = f"{r['layout']} {r['routing']}"
            out.append(Target("MoE expert weights per device <= 1.05 x total / (expert x "
                              "tensor x fsdp)", where, r["expert_bytes_ratio"], 1.05,
                              r["expert_bytes_ratio"] <= 1.05))
            if r["routing"] == "capacity 1.0":
                out += [Target("MoE all-to-all bytes <= 1.05 x analytic", where,
                               r["all_to_all_ratio"], 1.05, r["all_to_all_ratio"] <= 1.05),
                        Target("MoE FLOPs per device <= 1.05 x the active-parameter ideal",
                               where, r["flops_ratio"], 1.05, r["flops_ratio"] <= 1.05)]
        return out


def _trainer(mesh: Any, cfg: MoEConfig) -> Trainer:
    return Trainer(lambda: MoE(cfg, rngs=nnx.Rngs(0)), moe_loss, mesh)


def moe_row(layout: str, factor: float, active_flops: float, timed: bool) -> Json:
    cfg = dataclasses.replace(CFG, expert_capacity_factor=factor)
    mesh = make_mesh(layout)
    shape = dict(mesh.shape)
    trainer = _trainer(mesh, cfg)
    batch = tokens_batch(BATCH, cfg.seq_len, cfg.vocab_size)
    compiled = trainer.lower(batch).compile()
    module = analysis.parse_hlo(compiled.as_text())
    found = analysis.collectives(module, shape)
    a2a = {"count": 0, "bytes": 0}
    for key, (count, nbytes) in found.items():
        if key.op == "all-to-all":
            a2a["count"] += count
            a2a["bytes"] += nbytes
    tokens = BATCH // batch_shards(shape)[0] * cfg.seq_len
    analytic = 4 * cfg.num_layers * tokens * cfg.experts_per_token * cfg.d_model * 4
    rows = [r for r in trainer.plan().rows if any(w in r.path for w in EXPERT_WEIGHTS)]
    total = sum(r.bytes_total for r in rows)
    ideal = total / (shape["expert"] * shape["tensor"] * shape["fsdp"])
    held = sum(r.bytes_per_device for r in rows)
    flops = analysis.hlo_flops(module).flops
    return {"layout": format_mesh(mesh), "routing": f"capacity {factor}" if factor else
            "dropless", "all_to_all": a2a, "all_to_all_analytic_bytes": analytic,
            "all_to_all_ratio": a2a["bytes"] / analytic if shape["expert"] > 1 else math.nan,
            "expert_bytes_per_device": held, "expert_bytes_ratio": held / ideal,
            "flops_per_device": flops, "flops_ratio": flops / (active_flops / mesh.size),
            "step_ms": step_ms(trainer, compiled, batch) if timed else None}


def moe_structure(quick: bool) -> MoEStructure:
    """The rows (QUICK_ROWS with --quick); the one-device active-parameter FLOPs first."""
    one = _trainer(single_mesh(), dataclasses.replace(CFG, expert_capacity_factor=1.0))
    batch = tokens_batch(BATCH, CFG.seq_len, CFG.vocab_size)
    active = analysis.hlo_flops(one.lower(batch).compile().as_text()).flops
    rows = []
    for layout, factor in (QUICK_ROWS if quick else ROWS):
        row = moe_row(layout, factor, active, timed=layout == "data:2,expert:4")
        log(f"  structure moe {row['layout']:<20} {row['routing']}")
        rows.append(row)
    params = one.init_state().params
    loads = np.asarray(one.model(params).expert_loads(jnp.asarray(batch["tokens"][:, :-1])))
    model = {**{k: getattr(CFG, k) for k in ("num_layers", "d_model", "num_experts",
                                             "experts_per_token", "mlp_dim", "seq_len")},
             "batch": BATCH, "single_device_active_flops": active,
             # the busiest expert's share over the mean share, per layer (1.0: balanced);
             # the expert shard holding it sets the step's pace
             "router_load_imbalance": [float(x) for x in loads.max(1) * CFG.num_experts]}
    timed = {r["routing"]: r["step_ms"] for r in rows if r["step_ms"]}
    if len(timed) == 2:
        model["cpu_step_ms_dropless_over_capacity"] = (
            timed["dropless"] / timed["capacity 1.0"])
    return MoEStructure(model, rows)
