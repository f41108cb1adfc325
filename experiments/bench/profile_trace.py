"""Where the device time goes: run a function under the JAX profiler and summarize the
trace as top ops by time, grouped into kinds (matmul, attention, fusion, copy, ...).

The trace is read with `jax.profiler.ProfileData` (the XSpace protobuf JAX writes), so
no TensorBoard plugin is needed. On a GPU the events are the kernels on the device's
stream lines; on CPU they are XLA's thunks on the PjRt client threads (which is how the
summary is tested without an accelerator).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax

Json = dict[str, Any]

# Kernel-name fragments -> kind, first match wins (names seen from cuBLAS, cuDNN, CUTLASS
# and XLA's own emitters; XLA fusion kernels carry the fusion's name).
KINDS: tuple[tuple[str, str], ...] = (
    ("fmha", "attention"), ("flash", "attention"), ("cudnn", "attention"),
    ("gemm", "matmul"), ("xmma", "matmul"), ("cutlass", "matmul"), ("nvjet", "matmul"),
    ("cublas", "matmul"), ("triton_gemm", "matmul"), ("dot", "matmul"),
    ("memcpy", "copy"), ("memset", "copy"), ("copy", "copy"), ("dynamic_update_slice", "copy"),
    ("reduce", "reduction"), ("scatter", "scatter/gather"), ("gather", "scatter/gather"),
    ("fusion", "elementwise fusion"), ("loop_", "elementwise fusion"),
    ("input_", "elementwise fusion"), ("convert", "elementwise fusion"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for fragment, kind in KINDS:
        if fragment in low:
            return kind
    return "other"


def _device_lines(planes: Iterable[Any]) -> list[tuple[str, Any]]:
    """(plane/line name, line) holding the device's own work: GPU stream lines, or on CPU
    the PjRt client threads that run XLA's thunks."""
    planes = list(planes)
    gpu = [(f"{p.name}/{ln.name}", ln) for p in planes if p.name.startswith("/device:GPU")
           for ln in p.lines if ln.name.startswith("Stream")]
    if gpu:
        return gpu
    return [(f"{p.name}/{ln.name}", ln) for p in planes if p.name.startswith("/host:CPU")
            for ln in p.lines if "PjRtCpuClient" in ln.name]  # thunks, not intra-op tasks


def _stats(event: Any) -> dict[str, Any]:
    try:
        return {k: v for k, v in event.stats}
    except Exception:  # a stat the binding cannot convert
        return {}


def summarize(trace_dir: str, top: int = 25, calls: int = 1) -> Json:
    """Summary of the newest trace under `trace_dir`: device time per op and per kind,
    divided by `calls` (the number of traced calls, so figures are per call)."""
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
                   key=os.path.getmtime)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(files[-1])
    per_op: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    hlo_of: dict[str, str] = {}
    lines = _device_lines(data.planes)
    on_gpu = any(name.startswith("/device:GPU") for name, _ in lines)
    busy_ns, first, last = 0.0, None, None
    for _, line in lines:
        for ev in line.events:
            name, dur = ev.name, float(ev.duration_ns)
            stats = _stats(ev)
            # GPU stream lines hold kernels and copies only; CPU client threads also hold
            # the runtime's own events (thread-pool waits), which carry no hlo_op
            if dur <= 0 or (not on_gpu and "hlo_op" not in stats):
                continue
            hlo = str(stats.get("hlo_op", "")) or name
            key = name if len(name) <= 160 else name[:157] + "..."
            per_op[key][0] += dur
            per_op[key][1] += 1
            hlo_of.setdefault(key, hlo)
            busy_ns += dur
            start = float(ev.start_ns)
            first = start if first is None else min(first, start)
            last = start + dur if last is None else max(last, start + dur)
    kinds: dict[str, float] = collections.defaultdict(float)
    for name, (ns, _) in per_op.items():
        kinds[kind_of(f"{name} {hlo_of[name]}")] += ns
    ranked = sorted(per_op.items(), key=lambda kv: -kv[1][0])
    span_ns = (last - first) if first is not None else 0.0
    return {
        "trace_file": files[-1], "lines": [n for n, _ in lines], "calls": calls,
        "device_busy_ms": busy_ns / 1e6 / calls,
        "device_span_ms": span_ns / 1e6 / calls,
        "kinds_ms": {k: v / 1e6 / calls for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "top": [{"name": n, "hlo_op": hlo_of[n], "kind": kind_of(f"{n} {hlo_of[n]}"),
                 "ms": ns / 1e6 / calls, "count": c / calls,
                 "share": ns / busy_ns if busy_ns else 0.0}
                for n, (ns, c) in ranked[:top]],
    }


def profile(fn: Callable[[], Any], calls: int = 2, top: int = 25,
            trace_dir: str | None = None) -> Json:
    """Trace `calls` calls of `fn` (already compiled and warm) and summarize them;
    `wall_ms` is the host-measured time per call while tracing."""
    with tempfile.TemporaryDirectory(prefix="jaxmp-trace-") as tmp:
        where = trace_dir or tmp
        jax.profiler.start_trace(where)
        t0 = time.perf_counter()
        try:
            for _ in range(calls):
                jax.block_until_ready(fn())
        finally:
            wall = (time.perf_counter() - t0) / calls
            jax.profiler.stop_trace()
        out = summarize(where, top, calls)
    out["wall_ms"] = wall * 1e3
    return out


def profile_table(p: Json, rows: int = 12) -> str:
    """A short text view: the kinds, then the top ops."""
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in p["kinds_ms"].items())
    lines = [f"device busy {p['device_busy_ms']:.2f} ms of {p['wall_ms']:.2f} ms wall per call "
             f"(span {p['device_span_ms']:.2f} ms); by kind (ms): {kinds}"]
    for t in p["top"][:rows]:
        name = re.sub(r"\s+", " ", t["name"])[:70]
        lines.append(f"  {t['ms']:8.3f} ms {t['share']:6.1%} x{t['count']:<6g} {t['kind']:<18} "
                     f"{name}  [{t['hlo_op'][:40]}]")
    return "\n".join(lines)


def profile_or_error(fn: Callable[[], Any], calls: int = 2, top: int = 25) -> Json:
    """`profile`, printed; a profiler that fails (no CUPTI, say) gives {"error": ...}
    instead of ending the benchmark."""
    try:
        p = profile(fn, calls, top)
    except Exception as e:
        print(f"  profile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        return {"error": f"{type(e).__name__}: {e}"[:2000]}
    print(profile_table(p), flush=True)
    return p
