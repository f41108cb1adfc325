"""The compile suite: compile time of the train step at 4 and 48 layers (is depth free?)."""

from __future__ import annotations

import dataclasses
import time

from experiments.bench.harness import gpt_trainer, log, single_mesh, tokens_batch
from experiments.bench.results import Json, Target, table
from experiments.bench.structure import STRUCTURE_FULL, STRUCTURE_QUICK
from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPTConfig
from jaxmp.pipeline import PipelineSpec

COMPILE_MESHES: tuple[tuple[str, int], ...] = (("single", 1), ("data:2,pipe:2,tensor:2", 4))


@dataclasses.dataclass(frozen=True)
class CompileResult:
    meshes: dict[str, Json]  # {mesh: {layers_4_s, layers_48_s, ratio, ...}}

    def to_json(self) -> Json:
        return {"compile": self.meshes}

    def table(self) -> str:
        rows = [[mesh, f"{v['layers_4_s']:.2f}", f"{v['layers_48_s']:.2f}", f"{v['ratio']:.2f}"]
                for mesh, v in self.meshes.items()]
        return table(["mesh", "4 layers s", "48 layers s", "ratio"], rows)

    def targets(self) -> list[Target]:
        return [Target("compile 48 layers <= 1.5 x 4 layers", mesh, c["ratio"], 1.5,
                       c["ratio"] <= 1.5) for mesh, c in self.meshes.items()]


def compile_seconds(cfg: GPTConfig, mesh_name: str, microbatches: int, batch: int) -> Json:
    """Trace + lower, and XLA compile, of a fresh train step (no cache is hit)."""
    mesh = single_mesh() if mesh_name == "single" else make_mesh(mesh_name)
    pipe = PipelineSpec(mesh.shape["pipe"], microbatches if mesh.shape["pipe"] > 1 else 1, 1)
    trainer = gpt_trainer(cfg, mesh, pipe)
    t0 = time.perf_counter()
    lowered = trainer.lower(tokens_batch(batch, cfg.seq_len, cfg.vocab_size))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0}


def compile_suite(quick: bool) -> CompileResult:
    """{mesh: {layers_4_s, layers_48_s, ratio}}: the best of two fresh compiles each."""
    sizes = STRUCTURE_QUICK if quick else STRUCTURE_FULL
    depths = (4, 48)
    out: Json = {}
    for mesh_name, m in COMPILE_MESHES:
        compile_seconds(sizes.gpt(2), mesh_name, m, sizes.batch)  # warm the tracing caches
        runs: dict[int, list[Json]] = {d: [] for d in depths}
        for _ in range(2):
            for d in depths:
                runs[d].append(compile_seconds(sizes.gpt(d), mesh_name, m, sizes.batch))
        best = {d: min(runs[d], key=lambda x: x["total_s"]) for d in depths}
        out[mesh_name] = {
            "layers_4_s": best[4]["total_s"], "layers_48_s": best[48]["total_s"],
            "ratio": best[48]["total_s"] / best[4]["total_s"],
            "layers_4": best[4], "layers_48": best[48],
            "microbatches": m if mesh_name != "single" else None}
        log(f"  compile {mesh_name:<24} 4 layers {best[4]['total_s']:.2f}s, "
            f"48 layers {best[48]['total_s']:.2f}s")
    return CompileResult(out)
