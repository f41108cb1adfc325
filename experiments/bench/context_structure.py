"""The structure suite's context-parallel rows: each layout's compiled programs against
the analytic ideal (the key/value bytes the ring or the all-gather moves per layer, the
activation temporaries per device against one device's / c), the causal work per device
of the zig-zag layout, and the CPU step time of ring against all-gather attention."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx

from experiments.bench.harness import log, single_mesh, step_ms, tokens_batch
from experiments.bench.results import Json, Target, count_mib, mib, table
from jaxmp import context
from jaxmp.mesh import batch_shards, format_mesh, make_mesh
from jaxmp.models.llama import Llama, LlamaConfig, lm_loss
from jaxmp.plan import analysis
from jaxmp.sharding import DEFAULT_RULES
from jaxmp.train import Trainer

# a long sequence for a small model: the activations, not the weights, fill the memory
CFG = LlamaConfig(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=128,
                  seq_len=2048, vocab_size=256)
BATCH = 2
ROWS: tuple[tuple[str, str], ...] = (
    ("context:8", "ring"), ("context:8", "allgather"), ("data:2,context:4", "ring"),
    ("context:4,tensor:2", "ring"), ("context:4,tensor:2", "allgather"))
QUICK_ROWS: tuple[tuple[str, str], ...] = (("context:8", "ring"), ("context:8", "allgather"))
QUICK_SEQ_LEN = 1024  # --quick: the same rows on half the sequence


@dataclasses.dataclass(frozen=True)
class ContextStructure:
    model: Json
    rows: list[Json]

    def to_json(self) -> Json:
        return {"structure_context_model": self.model, "structure_context": self.rows}

    def table(self) -> str:
        m = self.model
        head = ["layout", "attention", "KV moved/layer", "x analytic", "temp MiB/dev",
                "x single/c", "work max/min", "plain split", "ms/step"]
        body = [[r["layout"], r["attention"], count_mib(r["kv_moved_per_layer"]),
                 f"{r['kv_ratio']:.3f}", mib(r["temp_bytes"]), f"{r['temp_ratio']:.3f}",
                 f"{r['causal_work_ratio']:.3f}", f"{r['plain_work_ratio']:.2f}",
                 f"{r['step_ms']:.1f}" if r["step_ms"] else "-"]
                for r in self.rows]
        note = (f"Llama {m['num_layers']} layers, d={m['d_model']}, {m['num_heads']} heads "
                f"({m['num_kv_heads']} KV), T={m['seq_len']}, batch {m['batch']}; one device "
                f"(chunked attention): {mib(m['single_device_temp_bytes'])} MiB temporaries "
                f"per train step. KV moved/layer: the forward program's collective-permutes "
                "(ring) or all-gathers (allgather) over context per layer, count/MiB, against "
                "2 x (c-1)/c x T x kv_dim x bytes per sequence a device holds (what each "
                "device must receive; an all-gather's buffer counted at (c-1)/c); temp: XLA's "
                "temporaries of the whole train step per device against one device's / c; "
                "work: causal (query, key) pairs per device, busiest over idlest, zig-zag "
                "against the plain split.")
        return note + "\n" + table(head, body)

    def targets(self) -> list[Target]:
        out = []
        for r in self.rows:
            where = f"{r['layout']} {r['attention']}"
            out += [Target("context: KV bytes per layer <= 1.05 x analytic", where,
                           r["kv_ratio"], 1.05, r["kv_ratio"] <= 1.05),
                    Target("context: activation temporaries per device <= 1.2 x one "
                           "device's / c", where, r["temp_ratio"], 1.2, r["temp_ratio"] <= 1.2),
                    Target("context: causal work per device max/min <= 1.1 (zig-zag)", where,
                           r["causal_work_ratio"], 1.1, r["causal_work_ratio"] <= 1.1)]
        return out


def _trainer(mesh: Any, kind: str, cfg: LlamaConfig = CFG, shard_state: bool = True) -> Trainer:
    return Trainer(lambda: Llama(cfg, rngs=nnx.Rngs(0)), lm_loss, mesh,
                   rules=DEFAULT_RULES.override(context_attention=kind),
                   shard_state=shard_state)


def kv_analytic_bytes(cfg: LlamaConfig, shape: dict, itemsize: int = 4) -> float:
    """Bytes of keys and values one device must receive per layer: 2 (k, v) x (c-1)/c x T
    x its KV heads' width, for each sequence it holds."""
    c, t = shape["context"], shape["tensor"]
    kv_heads = cfg.num_kv_heads // t if cfg.num_kv_heads % t == 0 else cfg.num_heads // t
    rows = BATCH // batch_shards(shape)[0]
    return 2 * (c - 1) / c * cfg.seq_len * kv_heads * cfg.head_dim * itemsize * rows


def context_row(layout: str, kind: str, single_temp: int, timed: bool,
                cfg: LlamaConfig = CFG) -> Json:
    mesh = make_mesh(layout)
    shape = dict(mesh.shape)
    c = shape["context"]
    trainer = _trainer(mesh, kind, cfg)
    batch = tokens_batch(BATCH, cfg.seq_len, cfg.vocab_size)
    abs_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    # attention's traffic alone: the state kept replicated over context here (spread over
    # it, the forward program also gathers the parameters once over context)
    whole = _trainer(mesh, kind, cfg, shard_state=False)
    fwd = whole.compiled_eval(batch).lower(whole.abstract_state().params, abs_batch)
    found = analysis.collectives(fwd.compile().as_text(), shape)
    op = "collective-permute" if kind == "ring" else "all-gather"
    moved = analysis.collective_totals(found, axes="context")[op]
    per_layer = {"count": moved["count"] / cfg.num_layers,
                 "bytes": moved["bytes"] / cfg.num_layers}
    received = per_layer["bytes"] * ((c - 1) / c if kind == "allgather" else 1.0)
    analytic = kv_analytic_bytes(cfg, shape)
    compiled = trainer.lower(batch).compile()
    temp = analysis.memory_figures(compiled).temp_bytes
    order = context.zigzag_order(cfg.seq_len, c)
    work = context.causal_work(order, c)
    plain = context.causal_work(range(cfg.seq_len), c)
    return {"layout": format_mesh(mesh), "attention": kind, "kv_moved_per_layer": per_layer,
            "kv_analytic_bytes_per_layer": analytic, "kv_ratio": received / analytic,
            "temp_bytes": temp, "temp_ratio": temp / (single_temp / c),
            "causal_work_ratio": float(work.max() / work.min()),
            "plain_work_ratio": float(plain.max() / plain.min()),
            "step_ms": step_ms(trainer, compiled, batch, 2) if timed else None}


def context_structure(quick: bool) -> ContextStructure:
    """The rows (QUICK_ROWS with --quick), after the one-device figure (chunked attention:
    no (T, T) scores kept, the fair comparison)."""
    cfg = dataclasses.replace(CFG, seq_len=QUICK_SEQ_LEN) if quick else CFG
    one = _trainer(single_mesh(), "ring", dataclasses.replace(cfg, attention="chunked"))
    batch = tokens_batch(BATCH, cfg.seq_len, cfg.vocab_size)
    single = analysis.memory_figures(one.lower(batch).compile()).temp_bytes
    rows = []
    for layout, kind in (QUICK_ROWS if quick else ROWS):
        row = context_row(layout, kind, single, timed=layout == "context:8", cfg=cfg)
        log(f"  structure context {row['layout']:<20} {kind}")
        rows.append(row)
    model = {**{k: getattr(cfg, k) for k in ("num_layers", "d_model", "num_heads",
                                             "num_kv_heads", "seq_len")},
             "batch": BATCH, "single_device_temp_bytes": single}
    timed = {r["attention"]: r["step_ms"] for r in rows if r["step_ms"]}
    if len(timed) == 2:
        model["cpu_step_ms_ring_over_allgather"] = timed["ring"] / timed["allgather"]
    return ContextStructure(model, rows)


def longest_sequence(mesh: str, card: str = "h100", preset: str = "llama-3.2-1b",
                     low: int = 1024, high: int = 1 << 20, batch: int = 1) -> int:
    """The longest seq_len (a multiple of 2 x 8 x 512, so every context size and chunk
    divides it) of `preset` whose train step the planner fits on `card` with `mesh`,
    bfloat16, remat=block: a bisection over compiles."""
    from jaxmp.config import RunConfig
    from jaxmp.mesh import parse_mesh
    from jaxmp.plan.planner import compile_program, make_plan, target

    step = 2 * 8 * 512
    n = math.prod(parse_mesh(mesh, None).values())
    card_, devices = target(card, n), jax.devices()[:n]

    def fits(t: int) -> bool:
        cfg = RunConfig.flat(model="llama", preset=preset, seq_len=t, mesh=mesh,
                             batch_size=batch, dtype="bfloat16", remat="block", microbatches=1,
                             serve_mesh="")
        ok = make_plan(*compile_program(cfg, "full", card_, devices)[:2], card_, "").fits
        log(f"  {preset} on {mesh}: seq_len {t} {'fits' if ok else 'does not fit'}")
        return ok
    lo, hi = max(1, low // step), high // step
    if not fits(lo * step):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid - 1)
    return lo * step


if __name__ == "__main__":  # python -m experiments.bench.context_structure: the planner's limit
    from jaxmp.mesh import simulate_cpu_devices

    simulate_cpu_devices(8)
    for m in ("data:1", "context:8"):
        print(m, longest_sequence(m), flush=True)
