"""The plan suite: what `inspect --target` predicts against what runs.

- memory: layouts of the structure suite's model (GPT, 16 layers, d=256), pipelines with
  remat among them: the plan extrapolated from two shallow compiles (`plan_depth=reduced`)
  against the full-depth train step after it has run a step on the simulated mesh (XLA's
  memory figures of that program; CPU devices keep no allocator statistics).
- time on this CPU: the speed suite's model on four layouts of the 8 simulated devices:
  the plan on the `cpu` target (matmul FLOP/s and copy bandwidth measured now, shared by the
  simulated devices) with the efficiency calibrated on the one-device run of the same model,
  against the measured median step.
- GPU: the H100 efficiency calibrated on GPT-2 small's measured step (BUILD_NOTES "GPU",
  one H100, 2026-11-26: that session's device is not available here, so its recorded times
  are the measurements), then GPT-2 medium and the scanned variants predicted from it.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import jax

from experiments.bench.harness import log, timed
from experiments.bench.results import Json, Target, table
from jaxmp.accelerators import GIB, H100
from jaxmp.config import RunConfig
from jaxmp.plan import planner as planning
from jaxmp.plan.analysis import memory_figures

MEMORY_BASE = dict(num_layers=16, d_model=256, num_heads=8, seq_len=128, batch_size=16)
MEMORY_ROWS: tuple[dict[str, Any], ...] = (
    dict(mesh="data:8"), dict(mesh="fsdp:8"), dict(mesh="tensor:8"),
    dict(mesh="pipe:4,tensor:2", microbatches=8, remat="block"),
    dict(mesh="data:2,pipe:2,tensor:2", microbatches=4, pipeline_repeats=2, remat="dots"),
    dict(mesh="fsdp:2,pipe:2,tensor:2", microbatches=4, pipeline_fsdp_gather_once=True),
    dict(mesh="tensor:8", sequence_parallel=True, remat="block"))
TIME_BASE = dict(num_layers=8, d_model=256, num_heads=8, seq_len=128, batch_size=8)
TIME_ROWS: tuple[dict[str, Any], ...] = (
    dict(mesh="data:8"), dict(mesh="fsdp:8"), dict(mesh="tensor:8"),
    dict(mesh="data:2,pipe:2,tensor:2", microbatches=4))
QUICK_BASE = dict(num_layers=8, d_model=64, num_heads=4, seq_len=32, batch_size=16)
QUICK_MEMORY = (dict(mesh="data:8"), dict(mesh="pipe:2,tensor:4", microbatches=4, remat="block"))
QUICK_TIME = (dict(mesh="data:2,tensor:4"),)
# One H100 SXM (BUILD_NOTES "GPU", 2026-11-26): GPT-2 at T=1024, bf16, cuDNN attention:
# (preset, batch, scan_layers, step seconds, peak GiB or None where not recorded)
H100_MEASURED: tuple[tuple[str, int, bool, float, float | None], ...] = (
    ("small", 32, False, 0.0679, None), ("medium", 16, False, 0.0898, None),
    ("small", 32, True, 0.0822, 16.9), ("medium", 16, True, 0.1113, 19.8))
MEMORY_TOLERANCE = 0.10


def _label(row: dict[str, Any]) -> str:
    extra = [f"{k}={v}" for k, v in row.items() if k != "mesh"]
    return " ".join([row["mesh"], *extra])


def memory_row(base: dict[str, Any], row: dict[str, Any]) -> Json:
    """Predicted (reduced depth) vs the full program after one step."""
    cfg = RunConfig.flat(**base, **row)
    layout, program, how = planning.compile_program(cfg, "reduced")
    predicted = planning.make_plan(layout, program, planning.target("h100", 8), how)
    compiled, loss = layout.run_step()
    ran = memory_figures(compiled)
    return {"layout": _label(row), "how": how, "predicted_bytes": predicted.peak_bytes,
            "measured_bytes": ran.peak_estimate_bytes,
            "ratio": predicted.peak_bytes / ran.peak_estimate_bytes, "loss": loss,
            "terms": dict(predicted.memory_terms()),
            "activations_per_tick_bytes": predicted.activation_bytes / predicted.ticks,
            "ticks": predicted.ticks}


def _cpu_efficiency(base: dict[str, Any], card: Any, repeats: int) -> tuple[float, float, float]:
    """(efficiency, one-device step s, its FLOPs): the one-device program's FLOPs over its
    measured step time x this host's matmul peak."""
    one = planning.Layout.build(RunConfig.flat(**base, mesh=""), devices=jax.devices()[:1])
    flops = one.compile().flops
    step_s = _step_time(one, repeats)
    host_peak = card.peak("float32") * len(jax.devices())
    return flops / (step_s * host_peak), step_s, flops


def _step_time(layout: planning.Layout, repeats: int) -> float:
    trainer = layout.trainer
    holder = {"state": trainer.init_state()}
    batch = trainer.put_batch(layout.batch)

    def step() -> Any:
        holder["state"], m = trainer.step(holder["state"], batch)
        return m["loss"]
    for _ in range(2):
        timed(step)
    return statistics.median(timed(step) for _ in range(repeats))


def time_rows(base: dict[str, Any], rows: tuple[dict[str, Any], ...], repeats: int,
              ) -> tuple[Json, list[Json]]:
    card = planning.target("cpu", len(jax.devices()))
    eff, one_s, one_flops = _cpu_efficiency(base, card, repeats)
    card = dataclasses.replace(card, efficiency=eff)
    calib = {"efficiency": eff, "one_device_step_s": one_s, "one_device_flops": one_flops,
             "sources": card.sources}
    log(f"  cpu: efficiency {eff:.3f} from one device ({one_s * 1e3:.1f} ms/step)")
    out = []
    for row in rows:
        p = planning.plan(RunConfig.flat(**base, **row), card, "full")
        measured = _step_time(planning.Layout.build(RunConfig.flat(**base, **row)), repeats)
        out.append({"layout": _label(row), "predicted_s": p.step_s, "measured_s": measured,
                    "ratio": p.step_s / measured, "compute_s": p.compute_s,
                    "bubble_s": p.bubble_s, "collective_s": p.collective_s,
                    "by_axis_s": p.by_axis()})
        log(f"  {_label(row)}: predicted {p.step_s * 1e3:.1f} ms, measured "
            f"{measured * 1e3:.1f} ms")
    return calib, out


def gpu_rows() -> tuple[Json, list[Json]]:
    """The H100 calibration from GPT-2 small's recorded steps (efficiency scanned and
    unrolled, the bf16 activation scale from its peak memory), then every recorded step of
    GPT-2 small and medium predicted with it."""
    one = jax.devices()[:1]
    programs = {}
    for preset, batch, scan, _, _ in H100_MEASURED:
        cfg = RunConfig.flat(preset=preset, vocab_size=50257, dtype="bfloat16", mesh="",
                             batch_size=batch, scan_layers=scan)
        programs[(preset, batch, scan)] = planning.compile_program(cfg, "full", H100, one)
        log(f"  compiled GPT-2 {preset} batch {batch} scan={scan}")
    peak = H100.peak("bfloat16")
    small = {scan: (programs[(p, b, scan)], s, g)
             for p, b, scan, s, g in H100_MEASURED if p == "small"}
    unrolled = small[False][0][1].flops / (small[False][1] * peak)
    scanned = small[True][0][1].flops / (small[True][1] * peak)
    (layout, program, how), _, measured_gib = small[True]
    raw = planning.make_plan(layout, program, dataclasses.replace(H100, bf16_activation_scale=1.0),
                             how)
    fixed = raw.peak_bytes - raw.xla_activation_bytes
    scale = (measured_gib * GIB - fixed) / raw.xla_activation_bytes
    card = dataclasses.replace(H100, efficiency=scanned, unrolled_efficiency=unrolled,
                               bf16_activation_scale=scale)
    rows = []
    for preset, batch, scan, step_s, peak_gib in H100_MEASURED:
        layout, program, how = programs[(preset, batch, scan)]
        p = planning.make_plan(layout, program, card, how)
        rows.append({"model": f"GPT-2 {preset}", "batch": batch, "scan_layers": scan,
                     "predicted_s": p.step_s, "measured_s": step_s,
                     "ratio": p.step_s / step_s, "tflop": program.flops / 1e12,
                     "predicted_peak_gib": p.peak_bytes / GIB, "measured_peak_gib": peak_gib,
                     "xla_cpu_peak_gib": p.memory.peak_estimate_bytes / GIB,
                     "predicted_mfu": p.mfu, "calibration": preset == "small"})
    return {"efficiency_scanned": scanned, "efficiency_unrolled": unrolled,
            "bf16_activation_scale": scale, "calibrated_on": "GPT-2 small, batch 32",
            "peak_flops": peak}, rows


@dataclasses.dataclass(frozen=True)
class PlanSuiteResult:
    memory: list[Json]
    cpu_calibration: Json
    time: list[Json]
    gpu_calibration: Json | None
    gpu: list[Json]

    def to_json(self) -> Json:
        return {"plan": dataclasses.asdict(self)}

    def table(self) -> str:
        mem = table(["layout", "predicted MiB", "ran MiB", "ratio", "how"],
                    [[r["layout"], f"{r['predicted_bytes'] / 2**20:.1f}",
                      f"{r['measured_bytes'] / 2**20:.1f}", f"{r['ratio']:.3f}", r["how"]]
                     for r in self.memory])
        tim = table(["layout", "predicted ms", "measured ms", "ratio", "compute", "bubble",
                     "collectives"],
                    [[r["layout"], f"{r['predicted_s'] * 1e3:.1f}",
                      f"{r['measured_s'] * 1e3:.1f}", f"{r['ratio']:.2f}",
                      f"{r['compute_s'] * 1e3:.1f}", f"{r['bubble_s'] * 1e3:.1f}",
                      f"{r['collective_s'] * 1e3:.1f}"] for r in self.time])
        c = self.cpu_calibration
        out = [mem, f"cpu efficiency {c['efficiency']:.3f} (one device "
                    f"{c['one_device_step_s'] * 1e3:.1f} ms); {c['sources']}", tim]
        if self.gpu_calibration:
            g = self.gpu_calibration
            out.append(f"H100 calibrated on {g['calibrated_on']}: efficiency "
                       f"{g['efficiency_scanned']:.3f} scanned, {g['efficiency_unrolled']:.3f} "
                       f"unrolled; bf16 activation scale {g['bf16_activation_scale']:.3f}")
            out.append(table(
                ["model", "batch", "scan", "predicted ms", "measured ms", "ratio",
                 "pred GiB", "meas GiB", "XLA CPU GiB", "MFU pred", "role"],
                [[r["model"], r["batch"], r["scan_layers"], f"{r['predicted_s'] * 1e3:.1f}",
                  f"{r['measured_s'] * 1e3:.1f}", f"{r['ratio']:.2f}",
                  f"{r['predicted_peak_gib']:.1f}",
                  "-" if r["measured_peak_gib"] is None else f"{r['measured_peak_gib']:.1f}",
                  f"{r['xla_cpu_peak_gib']:.1f}", f"{r['predicted_mfu']:.1%}",
                  "calibration" if r["calibration"] else "prediction"] for r in self.gpu]))
        return "\n".join(out)

    def targets(self) -> list[Target]:
        return [Target("plan memory within 10% of the run's", r["layout"],
                       abs(r["ratio"] - 1), MEMORY_TOLERANCE,
                       abs(r["ratio"] - 1) <= MEMORY_TOLERANCE) for r in self.memory]


def plan_suite(quick: bool) -> PlanSuiteResult:
    base = QUICK_BASE if quick else MEMORY_BASE
    memory = []
    for row in (QUICK_MEMORY if quick else MEMORY_ROWS):
        memory.append(memory_row(base, row))
        r = memory[-1]
        log(f"  {r['layout']}: predicted {r['predicted_bytes'] / 2**20:.1f} MiB, ran "
            f"{r['measured_bytes'] / 2**20:.1f} MiB ({r['ratio']:.3f})")
    calib, times = time_rows(QUICK_BASE if quick else TIME_BASE,
                             QUICK_TIME if quick else TIME_ROWS, 3 if quick else 7)
    gpu_calib, gpu = (None, []) if quick else gpu_rows()
    return PlanSuiteResult(memory, calib, times, gpu_calib, gpu)
