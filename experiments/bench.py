"""Benchmarks: compiled structure per layout, compile time, speed, serving, GPU throughput.

    python -m experiments.bench --suite=structure --output=structure.json   # 8 CPU devices
    python -m experiments.bench --suite=speed --output=speed.json
    python -m experiments.bench --suite=all --quick --output=/tmp/bench.json

Prints a table per suite and writes one JSON file: device, jax_version, date, then one key
per suite (null where not run; gpu is null without an accelerator), and `targets`.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

from absl import app, flags, logging

from experiments.common import run_guarded

F = flags.FLAGS
SUITES = ("structure", "compile", "speed", "serve", "gpu")
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
flags.DEFINE_string("gpu_hlo_dir", "", "gpu: write each train step's optimized HLO here.")

Json = dict[str, Any]
# Set (before JAX starts) only where a CUDA plugin is installed: a CPU-only jaxlib rejects them.
GPU_XLA_FLAGS: tuple[str, ...] = ("--xla_gpu_enable_latency_hiding_scheduler=true",)


def accelerator_plugin_present() -> bool:
    """Whether a CUDA plugin is installed, found without starting JAX."""
    import importlib.util

    return any(importlib.util.find_spec(m) is not None
               for m in ("jax_cuda12_plugin", "jax_cuda13_plugin"))


# ---------------------------------------------------------------------------- tables
def table(head: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in [head, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]),
                      *(line(r) for r in cells[1:])])


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def cb(d: Json) -> str:
    return f"{d['count']}/{mib(d['bytes'])}" if d["count"] else "-"


def structure_table(model: Json, rows: list[Json]) -> str:
    head = ["layout", "m", "r", "state MiB", "ideal", "x", "x repl", "temp MiB", "all-reduce",
            "all-gather", "red-scat", "coll-perm", "all-to-all", "GFLOP/dev", "x ideal",
            "bubble", "TP x min", "PP x min", "DP x min", "W-gather"]
    body = []
    for r in rows:
        c = r["collectives"]
        tp, pp, dp = r["tensor_parallel"], r["pipeline"], r["data_parallel"]
        body.append([
            r["layout"], r["microbatches"], r["repeats"], mib(r["state_bytes_per_device"]),
            mib(r["ideal_state_bytes_per_device"]), f"{r['state_ratio']:.3f}",
            f"{r['replica_state_ratio']:.3f}", mib(r["temp_bytes"]), cb(c["all-reduce"]), cb(c["all-gather"]),
            cb(c["reduce-scatter"]), cb(c["collective-permute"]), cb(c["all-to-all"]),
            f"{r['flops_per_device'] / 1e9:.2f}", f"{r['flops_ratio']:.3f}",
            f"{r['analytic_bubble_factor']:.3f}",
            f"{tp['bytes_ratio']:.3f}" if tp else "-", f"{pp['bytes_ratio']:.3f}" if pp else "-",
            f"{dp['bytes_ratio']:.3f}" if dp else "-", r["weight_all_gathers"]["count"]])
    note = (f"GPT {model['num_layers']} layers, d={model['d_model']}, T={model['seq_len']}, "
            f"batch {model['batch']}, {model['params']:,} params; one device: "
            f"{model['single_device_flops'] / 1e9:.2f} GFLOP/step (XLA cost_analysis, loop "
            f"bodies once: {model['single_device_xla_cost_analysis_flops'] / 1e9:.2f}), "
            f"{mib(model['single_device_temp_bytes'])} MiB temporaries.\n"
            "x: state / (total / devices); x repl: state / (total / (devices / data)). "
            "collectives: count/MiB per device per step (loops x trip count); TP x min: "
            "all-reduce bytes over tensor in the layer loops / Megatron minimum; PP x min: "
            "collective-permute bytes over pipe / one hand-off per tick; DP x min: gradient "
            "all-reduce / reduce-scatter bytes over data, fsdp / the gradients once; W-gather: "
            "all-gathers of a weight or a piece, reshaping or cast of one (traced from the "
            "parameters through the program).")
    return note + "\n" + table(head, body)


def compile_table(res: Json) -> str:
    rows = [[mesh, f"{v['layers_4_s']:.2f}", f"{v['layers_48_s']:.2f}", f"{v['ratio']:.2f}"]
            for mesh, v in res.items()]
    return table(["mesh", "4 layers s", "48 layers s", "ratio"], rows)


def speed_table(res: Json) -> str:
    rows = [["jaxmp", f"{res['jaxmp_step_s'] * 1e3:.1f}", f"{res['tokens_per_s']['jaxmp']:,.0f}"],
            ["reference", f"{res['reference_step_s'] * 1e3:.1f}",
             f"{res['tokens_per_s']['reference']:,.0f}"]]
    gen = ", ".join(f"batch {b}: {v:,.1f}" for b, v in res["generate_tokens_per_s"].items())
    return (table(["train step", "ms (median)", "tokens/s"], rows)
            + f"\nratio jaxmp/reference: {res['ratio']:.3f}; first-step loss difference "
              f"{res['first_step_loss']['abs_diff']:.2e}\nKV-cache generation tokens/s: {gen}")


def serve_table(res: Json) -> str:
    c = res["checkpoint"]
    lines = [f"GPT {res['model']['num_layers']} layers d={res['model']['d_model']} "
             f"({res['model']['params']:,} params); checkpoint {mib(c['size_on_disk_bytes'])} "
             f"MiB on disk: save {c['save_s']:.2f}s, restore train state "
             f"{c['restore_train_state_s']:.2f}s, restore params for serving "
             f"{c['restore_params_for_serving_s']:.2f}s"]
    kv, rc = res["generate_kv_cache"], res["generate_recompute"]
    rows = [[b, f"{kv['tokens_per_s'][b]:,.1f}", f"{rc['tokens_per_s'][b]:,.1f}",
             f"{res['kv_speedup'][b]:.1f}", rc["matches_kv_cache"][b]] for b in kv["tokens_per_s"]]
    return "\n".join([*lines, table(["batch", "KV tokens/s", "recompute tokens/s", "speed-up",
                                     "same tokens"], rows), rc["note"]])


def gpu_table(res: Json | None) -> str:
    if res is None:
        return "no accelerator: gpu suite skipped (null)"
    pct = lambda v: f"{v:.1%}" if v is not None else "-"
    rows = [[name, m["batch"], f"{m['step_s'] * 1e3:.1f}", f"{m['tokens_per_s']:,.0f}",
             pct(m["mfu"]), pct(m["mfu_vs_measured_matmul"]),
             mib(m["peak_device_memory_bytes"] or 0), m["attention"],
             "yes" if m["cudnn_attention_in_hlo"] else "no", f"{m['compile_s']:.0f}"]
            for name, m in res["models"].items()]
    cal = res["calibration"]
    lines = [f"{res['device_kind']}, XLA_FLAGS={res['xla_flags']!r}; measured: copy "
             f"{cal['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
             f"{cal['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s",
             table(["model", "batch", "step ms", "tokens/s", "MFU", "of matmul", "peak MiB",
                    "attention", "cuDNN fmha", "compile s"], rows)]
    for name, m in res["models"].items():
        if "generate_tokens_per_s" not in m:
            continue
        roof = m["decode_roofline"]
        gen = ", ".join(f"batch {b}: {v:,.0f}" for b, v in m["generate_tokens_per_s"].items())
        lines.append(f"{name} decode tokens/s {gen}; batch-1 roofline "
                     f"{roof['tokens_per_s_datasheet'] or 0:,.0f} (datasheet) / "
                     f"{roof['tokens_per_s_measured_copy']:,.0f} (measured copy) -> "
                     f"{pct(roof.get('fraction_datasheet'))} / "
                     f"{pct(roof.get('fraction_measured_copy'))}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- targets
def targets(out: Json) -> list[Json]:
    """The issue's targets, each with its measured value."""
    checks: list[Json] = []

    def check(name: str, where: str, value: float, limit: float, ok: bool) -> None:
        checks.append({"target": name, "where": where, "value": value, "limit": limit, "ok": ok,
                       "equal": "==" in name})

    for r in out.get("structure") or []:
        where = f"{r['layout']} m={r['microbatches']} r={r['repeats']}"
        check("state bytes <= 1.05 x ideal", where, r["state_ratio"], 1.05,
              r["state_ratio"] <= 1.05)
        tp = r["tensor_parallel"]
        if tp:
            v = tp["bytes_ratio"] / tp["expected_ratio"]
            check("TP all-reduce bytes == Megatron minimum (x bubble factor)", where, v, 1.0,
                  abs(v - 1) < 0.01)
        if "fsdp" not in r["layout"]:
            n = r["weight_all_gathers"]["count"]
            check("no all-gather of weights outside FSDP", where, n, 0, n == 0)
        dp = r["data_parallel"]
        if dp:
            check("(extra) gradient reduction bytes <= 1.05 x gradients once", where,
                  dp["bytes_ratio"], 1.05, dp["bytes_ratio"] <= 1.05)
        if r["microbatches"] > 1 or "pipe" in r["layout"]:
            v = r["flops_ratio"] / r["analytic_bubble_factor"]
            check("FLOPs per device <= 1.02 x ideal x bubble factor", where, v, 1.02, v <= 1.02)
    for mesh, c in (out.get("compile") or {}).items():
        check("compile 48 layers <= 1.5 x 4 layers", mesh, c["ratio"], 1.5, c["ratio"] <= 1.5)
    if out.get("speed"):
        ratio = out["speed"]["ratio"]
        check("jaxmp / reference step time <= 1.05", "one device", ratio, 1.05, ratio <= 1.05)
    return checks


def targets_table(checks: list[Json]) -> str:
    """One line per target: how many places meet it, the worst value, where it is missed."""
    rows = []
    for name in dict.fromkeys(c["target"] for c in checks):
        mine = [c for c in checks if c["target"] == name]
        worst = max(mine, key=lambda c: (not c["ok"], abs(c["value"] - c["limit"]) if c["equal"]
                                         else c["value"]))
        missed = sorted({c["where"].split(" m=")[0] for c in mine if not c["ok"]})
        rows.append([name, f"{sum(c['ok'] for c in mine)}/{len(mine)}",
                     f"{worst['value']:.3f} ({worst['where']})", ", ".join(missed) or "-"])
    return table(["target", "met", "worst value (where)", "missed on"], rows)


# ---------------------------------------------------------------------------- main
def gpu_sizes() -> Any:
    """The gpu suite's sizes from the --gpu_* flags (None with --quick)."""
    from experiments.bench_suites import GpuSizes

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
                    profile=F.gpu_profile, hlo_dir=F.gpu_hlo_dir)


def run(suites: list[str], quick: bool, layouts: list[str], attention: str) -> Json:
    import jax

    from experiments import bench_suites as S

    out: Json = {"device": S.device_summary(), "jax_version": jax.__version__,
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "quick": quick, "suites": suites, "structure_model": None, "structure": None,
                 "compile": None, "speed": None, "serve": None, "gpu": None}
    if "structure" in suites:
        print("== structure", flush=True)
        out["structure_model"], out["structure"] = S.structure_suite(quick, layouts)
        print(structure_table(out["structure_model"], out["structure"]), flush=True)
    runners = {"compile": (lambda: S.compile_suite(quick), compile_table),
               "speed": (lambda: S.speed_suite(quick), speed_table),
               "serve": (lambda: S.serve_suite(quick), serve_table),
               "gpu": (lambda: S.gpu_suite(quick, attention, gpu_sizes()), gpu_table)}
    for name, (run, show) in runners.items():
        if name in suites:
            print(f"== {name}", flush=True)
            out[name] = run()
            print(show(out[name]), flush=True)
    out["targets"] = targets(out)
    if out["targets"]:
        print("== targets", flush=True)
        print(targets_table(out["targets"]), flush=True)
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
        if layouts and "structure" not in suites:
            raise ValueError(f"--layouts applies to the structure suite, not --suite={F.suite}")
        out = run(suites, F.quick, layouts, F.gpu_attention)
        if F.output:
            with open(F.output, "w") as f:
                json.dump(out, f, indent=1)
            print(f"wrote {F.output}", flush=True)
    return run_guarded(argv, body)


if __name__ == "__main__":
    app.run(main)
