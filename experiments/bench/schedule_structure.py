"""The structure suite's pipeline-schedule rows: per schedule and m = p, 2p, 4p on
data:2,pipe:4, the compiled train step's temporaries per device, its FLOPs per device
against one device's (with the same recomputation), the bubble fitted from those FLOPs
against the analytic one, its collectives (bytes, kinds, those over pipe), and the CPU
step time.

The fitted bubble: a lockstep pipeline executes c + u*(r*m) units of stage work per device
(u per item, c the idle ticks' masked work), so two m give u and c, and c / (c + u r m) is
the share of the executed work that is bubble, measured from the compiled programs.

zb is not lockstep: each device runs one branch of a switch per slot (jaxmp.zerobubble),
so its bubble comes from the compiled branches' FLOPs (F, F with the stem, F with the
tail, B, B with the stem, W) placed in its table: a slot costs its slowest stage's
branch, so the bubble is 1 - (work done) / (p x the slots' summed maxima), against the
analytic (p-1)/(3m+p-1) (F = B = W) and the paper's (p-1)(F+B-W) with the measured F, B,
W. Its FLOPs per device are the critical path's: the slots' maxima plus the work outside
the slot loop."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from experiments.bench.harness import log, single_mesh, step_ms, tokens_batch
from experiments.bench.results import Json, Target, mib, table
from jaxmp import zerobubble
from jaxmp.mesh import format_mesh, make_mesh
from jaxmp.models.gpt import GPT, GPTConfig, lm_loss
from jaxmp.pipeline import PipelineSpec
from jaxmp.plan import analysis
from jaxmp.train import Trainer

# GEMMs dominate attention (12 d^2 against 2 T d per token and layer, as in the models a
# pipeline is for): the zero-bubble schedule's F, B and W are then of similar cost
CFG = GPTConfig(num_layers=8, d_model=128, num_heads=4, seq_len=64, vocab_size=256)
QUICK_CFG = GPTConfig(num_layers=4, d_model=32, num_heads=4, seq_len=64, vocab_size=128)
LAYOUT = "data:2,pipe:4"
ROWS_PER_MICROBATCH = 2
# (schedule, repeats); the recomputation the one-device reference makes: 1f1b and
# interleaved recompute each stage's forward in its backward (remat=block's work)
SCHEDULES: tuple[tuple[str, int], ...] = (("gpipe", 1), ("1f1b", 1), ("interleaved", 2),
                                          ("zb", 1))
QUICK_SCHEDULES = SCHEDULES[:2]
REMAT = {"gpipe": "none", "1f1b": "block", "interleaved": "block", "zb": "none"}


@dataclasses.dataclass(frozen=True)
class ScheduleStructure:
    model: Json
    rows: list[Json]

    def to_json(self) -> Json:
        return {"structure_schedule_model": self.model, "structure_schedule": self.rows}

    def table(self) -> str:
        head = ["schedule", "r", "m", "temp MiB/dev", "x m=p", "GFLOP/dev", "x one dev",
                "bubble fit", "analytic", "paper", "coll MiB", "x gpipe", "ms/step"]
        body = [[r["schedule"], r["repeats"], r["microbatches"], mib(r["temp_bytes"]),
                 f"{r['temp_vs_m_eq_p']:.2f}", f"{r['flops_per_device'] / 1e9:.3f}",
                 f"{r['flops_ratio']:.3f}" if r["flops_ratio"] else "-",
                 f"{r['fitted_bubble']:.3f}" if r["fitted_bubble"] is not None else "-",
                 f"{r['analytic_bubble']:.3f}",
                 f"{r['paper_bubble']:.3f}" if r.get("paper_bubble") is not None else "-",
                 mib(r["collective_bytes"]),
                 f"{r['collective_vs_gpipe']:.3f}" if r["collective_vs_gpipe"] else "-",
                 f"{r['step_ms']:.0f}" if r["step_ms"] else "-"] for r in self.rows]
        m = self.model
        note = (f"GPT {m['num_layers']} layers, d={m['d_model']}, T={m['seq_len']}, "
                f"{m['rows_per_microbatch']} rows per micro-batch and data shard on "
                f"{m['layout']} (the batch grows with m). temp: XLA's temporaries of the "
                "train step per device (x m=p: against the same schedule's at m = p); x one "
                "dev: FLOPs per device / (one device's / 8) with the same recomputation "
                "(1f1b, interleaved: remat=block); bubble fit: the idle share of the executed "
                "work fitted from the two largest m (zb: from its branches' FLOPs in its "
                "table; module doc); paper: zb's (p-1)(F+B-W) with the measured F, B, W; "
                "coll: collective bytes per device per step (x gpipe: against GPipe's at "
                "the same m).")
        return note + "\n" + table(head, body)

    def targets(self) -> list[Target]:
        out = []
        for r in self.rows:
            where = f"{r['schedule']} m={r['microbatches']}"
            if r["schedule"] != "gpipe" and r["microbatches"] == 4 * self.model["stages"]:
                out.append(Target("schedules: peak temporaries at m=4p <= 1.3 x m=p", where,
                                  r["temp_vs_m_eq_p"], 1.3, r["temp_vs_m_eq_p"] <= 1.3))
            if r["fitted_bubble"] is not None:
                ref = r["paper_bubble"] if r.get("paper_bubble") is not None else r[
                    "analytic_bubble"]
                gap = abs(r["fitted_bubble"] / ref - 1)
                out.append(Target("schedules: bubble within 5% of analytic", where, gap, 0.05,
                                  gap <= 0.05))
            one = self._row("1f1b", r["microbatches"])
            if r["schedule"] == "zb" and one is not None:
                theirs = (one["fitted_bubble"] if one["fitted_bubble"] is not None
                          else one["analytic_bubble"])
                out.append(Target("schedules: zb bubble < 1f1b's at the same m", where,
                                  r["fitted_bubble"] / theirs, 1.0,
                                  r["fitted_bubble"] < theirs))
        return out

    def _row(self, schedule: str, m: int) -> Json | None:
        return next((r for r in self.rows if r["schedule"] == schedule
                     and r["microbatches"] == m), None)


def _trainer(mesh: Any, cfg: GPTConfig, schedule: str, m: int, r: int,
             remat: str = "none") -> Trainer:
    cfg = dataclasses.replace(cfg, remat=remat)
    p = mesh.shape["pipe"]
    pipe = PipelineSpec(p, m, r, schedule=schedule) if p > 1 else PipelineSpec()
    return Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0), pipeline=pipe), lm_loss, mesh)


def schedule_structure(quick: bool) -> ScheduleStructure:
    """Every (schedule, m) row; with --quick gpipe and 1f1b at m = p and 4p on a smaller
    GPT, untimed."""
    cfg, schedules = (QUICK_CFG, QUICK_SCHEDULES) if quick else (CFG, SCHEDULES)
    mesh = make_mesh(LAYOUT)
    p, shards = mesh.shape["pipe"], mesh.shape["data"] * mesh.shape["fsdp"]
    rows, single = [], {}
    for schedule, r in schedules:
        base = {}
        for m in (p, 4 * p) if quick else (p, 2 * p, 4 * p):
            batch = tokens_batch(ROWS_PER_MICROBATCH * m * shards, cfg.seq_len, cfg.vocab_size)
            key = (REMAT[schedule], m)
            if key not in single and not quick:  # (--quick: no one-device compile)
                one = _trainer(single_mesh(), cfg, "gpipe", 1, 1, REMAT[schedule])
                single[key] = analysis.hlo_flops(one.lower(batch).compile().as_text()).flops
            trainer = _trainer(mesh, cfg, schedule, m, r)
            compiled = trainer.lower(batch).compile()
            text = compiled.as_text()
            found = analysis.collectives(text, dict(mesh.shape))
            over_pipe = analysis.collective_totals(found, axes="pipe")
            flops = analysis.hlo_flops(text).flops
            zb = zerobubble.step_flops(text, flops, p, m) if schedule == "zb" else {}
            flops = zb.pop("flops", flops)
            if zb:
                zb["fitted_bubble"] = zb.pop("bubble")
            row = {"schedule": schedule, "repeats": r, "microbatches": m,
                   "temp_bytes": analysis.memory_figures(compiled).temp_bytes,
                   "flops_per_device": flops,
                   "flops_ratio": flops / (single[key] / mesh.size) if key in single else None,
                   "analytic_bubble": (p - 1) / ((3 if schedule == "zb" else r) * m + p - 1),
                   "collective_bytes": sum(v["bytes"] for v in
                                           analysis.collective_totals(found).values()),
                   "pipe_permutes": over_pipe["collective-permute"]["count"],
                   "pipe_all_gather_bytes": over_pipe["all-gather"]["bytes"],
                   "collective_kinds": sorted(k for k, v in analysis.collective_totals(
                       found).items() if v["count"]),
                   "step_ms": None if quick else step_ms(trainer, compiled, batch, 2), **zb}
            base.setdefault("temp", row["temp_bytes"])
            row["temp_vs_m_eq_p"] = row["temp_bytes"] / base["temp"]
            rows.append(row)
            log(f"  schedule {schedule:<12} m={m:<3} temp {mib(row['temp_bytes'])} MiB")
    _fit_bubbles(rows, p)
    gpipe = {r["microbatches"]: r["collective_bytes"] for r in rows if r["schedule"] == "gpipe"}
    for r in rows:
        r["collective_vs_gpipe"] = r["collective_bytes"] / gpipe[r["microbatches"]]
    model = {**dataclasses.asdict(cfg), "layout": format_mesh(mesh), "stages": p,
             "rows_per_microbatch": ROWS_PER_MICROBATCH}
    return ScheduleStructure(model, rows)


def _fit_bubbles(rows: list[Json], p: int) -> None:
    """Per schedule, work per item u and idle work c from its two largest m (FLOPs =
    c + u r m); each row's fitted bubble c / (c + u r m) (None for the rows not in the fit)."""
    for schedule in {r["schedule"] for r in rows} - {"zb"}:
        mine = {r["microbatches"]: r for r in rows if r["schedule"] == schedule}
        lo, hi = sorted(mine)[-2:]
        a, b = mine[lo], mine[hi]
        rr = a["repeats"]
        u = (b["flops_per_device"] - a["flops_per_device"]) / (rr * (hi - lo))
        c = a["flops_per_device"] - u * rr * lo
        for m, row in mine.items():
            row["fitted_bubble"] = c / (c + u * rr * m) if m in (lo, hi) else None
