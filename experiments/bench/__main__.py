"""Benchmarks: compiled structure per layout, compile time, speed, serving, GPU throughput,
the planner's predictions against measurements.

    python -m experiments.bench --suite=structure --output=structure.json   # 8 CPU devices
    python -m experiments.bench --suite=speed --output=speed.json
    python -m experiments.bench --suite=all --quick --output=/tmp/bench.json

Each suite (experiments/bench_<suite>.py) returns a typed result that writes its JSON,
renders its table and checks its targets. Prints a table per suite and writes one JSON
file: device, jax_version, date, then one key per suite (null where not run; gpu is null
without an accelerator), and `targets`.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from experiments.bench.results import Json, SuiteResult, Target, table
from jaxmp.cli.startup import parse_flags, run_guarded

F = flags.FLAGS
SUITES = ("structure", "compile", "speed", "serve", "gpu", "plan")
flags.DEFINE_enum("suite", "structure", [*SUITES, "all"],
                  "Which benchmarks to run (structure also runs compile unless --quick).")
flags.DEFINE_string("output", "bench.json", "Write the results here as JSON ('' = do not write).")
flags.DEFINE_bool("quick", False, "Reduced matrix and tiny models (the smoke test).")
flags.DEFINE_string("layouts", "", "structure: ';'-separated meshes instead of the default "
                    "matrix, e.g. 'data:8;pipe:4,tensor:2' (every valid m, r of each).")
flags.DEFINE_enum("gpu_attention", "cudnn", ["cudnn", "xla"],
                  "gpu: attention implementation of the training step.")
flags.DEFINE_list("gpu_models", ["small", "medium"], "gpu: GPT-2 presets to train.")
flags.DEFINE_list("gpu_batches", ["small:32", "medium:16"],
                  "gpu: fixed global batch per preset (name:batch); a preset not listed searches "
                  "for the largest batch that fits.")
flags.DEFINE_list("gpu_generate", ["1", "32"],
                  "gpu: KV-cache decoding batch sizes, measured on the first preset ('' = none).")
flags.DEFINE_bool("gpu_profile", False, "gpu: profile the train step and batch-1 decoding "
                  "(top ops by device time) into the JSON.")
flags.DEFINE_list("gpu_scan_layers", ["true", "false"], "gpu: train each preset with scanned "
                  "(true) and/or unrolled (false) layers.")
flags.DEFINE_string("serve_from", None, "serve: generate with the model of this Hugging Face "
                    "directory or jaxmp checkpoint instead of a fresh GPT-2 small.")
flags.DEFINE_string("gpu_hlo_dir", "", "gpu: write each train step's optimized HLO here.")
flags.DEFINE_list("gpu_fp8_models", ["small", "medium"], "gpu: presets (of --gpu_models) also "
                  "trained with --matmul_precision=fp8.")
flags.DEFINE_list("gpu_unfused_models", ["small"], "gpu: presets (of --gpu_models) also "
                  "trained with --nofused_loss.")
flags.DEFINE_integer("gpu_head_batch", 8, "gpu: sequences of the fused vs plain LM head + "
                     "loss rows (0: none).", lower_bound=0)

# Set (before JAX starts) only where a CUDA plugin is installed: a CPU-only jaxlib rejects them.
GPU_XLA_FLAGS: tuple[str, ...] = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def accelerator_plugin_present() -> bool:
    """Whether a CUDA plugin is installed, found without starting JAX."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None
               for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


# ---------------------------------------------------------------------------- targets
def targets_table(checks: list[Target]) -> str:
    """One line per target: how many places meet it, the worst value, where it is missed."""
    rows = []
    for name in dict.fromkeys(c.target for c in checks):
        mine = [c for c in checks if c.target == name]
        worst = max(mine, key=lambda c: (not c.ok, abs(c.value - c.limit) if c.equal else c.value))
        missed = sorted({c.where.split(" m=")[0] for c in mine if not c.ok})
        rows.append([name, f"{sum(c.ok for c in mine)}/{len(mine)}",
                     f"{worst.value:.3f} ({worst.where})", ", ".join(missed) or "-"])
    return table(["target", "met", "worst value (where)", "missed on"], rows)


# ---------------------------------------------------------------------------- main
def gpu_sizes() -> Any:
    """The gpu suite's sizes from the --gpu_* flags (None with --quick)."""
    from experiments.bench.gpu import GpuSizes

    if F.quick:
        return None
    batches = []
    for item in F.gpu_batches:
        name, _, b = item.partition(":")
        if not b.isdigit() or int(b) < 1:
            raise ValueError(f"--gpu_batches={item!r}: expected preset:batch, e.g. small:32")
        batches.append((name, int(b)))
    gen = tuple(int(b) for b in F.gpu_generate if b.strip())
    scans = []
    for v in F.gpu_scan_layers:
        if v.lower() not in ("true", "false"):
            raise ValueError(f"--gpu_scan_layers={v!r}: expected true and/or false")
        scans.append(v.lower() == "true")
    return GpuSizes(models=tuple(F.gpu_models), batches=tuple(batches),
                    scan_layers=tuple(scans),
                    generate_models=tuple(F.gpu_models[:1]), generate_batches=gen,
                    profile=F.gpu_profile, hlo_dir=F.gpu_hlo_dir,
                    fp8_models=tuple(m for m in F.gpu_fp8_models if m),
                    unfused_models=tuple(m for m in F.gpu_unfused_models if m),
                    head_batch=F.gpu_head_batch)


def suite_runners(quick: bool, layouts: list[str], attention: str,
                  ) -> dict[str, Callable[[], SuiteResult | None]]:
    """Each suite by name, ready to run (imported here: JAX starts after main sets XLA_FLAGS)."""
    from experiments.bench import compiling as bench_compile
    from experiments.bench import gpu as bench_gpu
    from experiments.bench import plan_check as bench_plan
    from experiments.bench import serving as bench_serve
    from experiments.bench import speed as bench_speed
    from experiments.bench import structure as bench_structure

    return {"structure": lambda: bench_structure.structure_suite(quick, layouts),
            "compile": lambda: bench_compile.compile_suite(quick),
            "speed": lambda: bench_speed.speed_suite(quick),
            "serve": lambda: bench_serve.serve_suite(quick, F.serve_from),
            "gpu": lambda: bench_gpu.gpu_suite(quick, attention, gpu_sizes()),
            "plan": lambda: bench_plan.plan_suite(quick)}


def run(suites: list[str], quick: bool, layouts: list[str], attention: str) -> Json:
    import jax

    from experiments.bench.harness import device_summary

    out: Json = {"device": device_summary(), "jax_version": jax.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "quick": quick, "suites": suites, "structure_model": None, "structure": None,
                 "compile": None, "speed": None, "serve": None, "gpu": None, "plan": None}
    checks: list[Target] = []
    for name, runner in suite_runners(quick, layouts, attention).items():
        if name not in suites:
            continue
        print(f"== {name}", flush=True)
        result = runner()
        if result is None:  # only the gpu suite, without an accelerator
            print(f"no accelerator: {name} suite skipped (null)", flush=True)
            continue
        out.update(result.to_json())
        print(result.table(), flush=True)
        checks += result.targets()
    out["targets"] = [c.to_json() for c in checks]
    if checks:
        print("== targets", flush=True)
        print(targets_table(checks), flush=True)
    return out


def main(argv: list[str]) -> int:
    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
    suites = list(SUITES) if F.suite == "all" else [F.suite]
    layouts = [x.strip() for x in F.layouts.split(";") if x.strip()]
    if F.suite == "structure" and not F.quick and not layouts:
        suites.append("compile")
    if "gpu" in suites and accelerator_plugin_present():  # before JAX starts
        flags_now = os.environ.get("XLA_FLAGS", "").split()
        os.environ["XLA_FLAGS"] = " ".join(
            [*flags_now, *(f for f in GPU_XLA_FLAGS if f not in flags_now)])

    def body() -> None:
        folder = os.path.dirname(os.path.abspath(F.output)) if F.output else ""
        if F.output and not os.path.isdir(folder):
            raise ValueError(f"--output={F.output}: directory {folder} does not exist")
        if F.output and os.path.isdir(F.output):
            raise ValueError(f"--output={F.output} is a directory; give a file name, e.g. "
                             f"--output={os.path.join(F.output, 'bench.json')}")
        if F.output and not os.access(folder, os.W_OK):
            raise ValueError(f"--output={F.output}: directory {folder} is not writable")
        if layouts and "structure" not in suites:
            raise ValueError(f"--layouts applies to the structure suite, not --suite={F.suite}")
        out = run(suites, F.quick, layouts, F.gpu_attention)
        if F.output:
            with open(F.output, "w") as f:
                json.dump(out, f, indent=1)
            print(f"wrote {F.output}", flush=True)
    return run_guarded(argv, body)


def console() -> None:
    """The `jaxmp-bench` console script (pyproject's [project.scripts])."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    console()
