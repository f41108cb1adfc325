"""The gpu suite: GPT-2 small / medium at T=1024 in bf16 on one accelerator: step time, MFU,
peak memory, where the time goes (profile), KV-cache decoding against the memory roofline.
Skipped (None) without an accelerator."""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import loss_head
from experiments.bench.harness import gpt_trainer, kv_generation, log, saved_checkpoint, timed, tokens_batch
from experiments.bench.results import Json, Target, mib, table
from jaxmp import fp8, throughput
from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPTConfig, flops_per_token, num_params, preset
from jaxmp.plan import analysis
from jaxmp.serve import Server
from jaxmp.train import OptConfig, Trainer


@dataclasses.dataclass(frozen=True)
class GpuSizes:
    models: tuple[str, ...] = ("small", "medium")
    # Fixed global batch per model (sequences of T=1024); a model not listed searches
    # `search` for the largest batch that compiles within the device's memory.
    batches: tuple[tuple[str, int], ...] = (("small", 32), ("medium", 16))
    search: tuple[int, ...] = (8, 16, 32, 64, 128)
    steps: int = 10
    generate_models: tuple[str, ...] = ("small",)
    generate_batches: tuple[int, ...] = (1, 32)
    prompt: int = 128
    new_tokens: int = 128
    profile: bool = False
    scan_layers: tuple[bool, ...] = (True, False)  # each model with scanned / unrolled layers
    hlo_dir: str = ""      # write each model's optimized train-step HLO here (gzip)
    overrides: tuple[tuple[str, int], ...] = ()  # model shape overrides (CPU dry runs)
    # models also measured with --nofused_loss (the (B, T, V) logits stored): the fused
    # loss's before / after; and the head + loss alone, fused and plain, at this batch
    # (0: not measured)
    unfused_models: tuple[str, ...] = ("small",)
    # models also measured with --matmul_precision=fp8 (their FP8 GEMMs counted)
    fp8_models: tuple[str, ...] = ("small", "medium")
    head_batch: int = 8

    def gpt(self, name: str, attention: str, scan: bool = True) -> GPTConfig:
        return preset(name, vocab_size=50257, dtype="bfloat16", attention=attention,
                      scan_layers=scan, **dict(self.overrides))


GPU_QUICK = GpuSizes(models=("small",), batches=(("small", 8),), steps=3,
                     generate_batches=(1,), new_tokens=32, scan_layers=(True,), unfused_models=(),
                     fp8_models=())


@dataclasses.dataclass(frozen=True)
class GpuResult:
    device_kind: str
    xla_flags: str
    peak_flops: float | None                  # datasheet, None where unknown
    datasheet_memory_bandwidth: float | None
    calibration: Json                         # the measured ceilings (calibrate)
    sizes: Json                               # the GpuSizes run
    models: dict[str, Json]                   # {'small', 'small unrolled', ...: figures}
    loss_head: Json | None = None             # fused vs plain head + loss (loss_head.py)

    def to_json(self) -> Json:
        return {"gpu": {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def table(self) -> str:
        pct = lambda v: f"{v:.1%}" if v is not None else "-"
        rows = [[name, m["batch"], f"{m['step_s'] * 1e3:.1f}", f"{m['tokens_per_s']:,.0f}",
                 pct(m["mfu"]), pct(m["mfu_vs_measured_matmul"]),
                 mib(m["peak_device_memory_bytes"] or 0), m["attention"],
                 "yes" if m["cudnn_attention_in_hlo"] else "no", f"{m['compile_s']:.0f}"]
                for name, m in self.models.items()]
        cal = self.calibration
        lines = [f"{self.device_kind}, XLA_FLAGS={self.xla_flags!r}; measured: copy "
                 f"{cal['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 matmul "
                 f"{cal['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s",
                 table(["model", "batch", "step ms", "tokens/s", "MFU", "of matmul", "peak MiB",
                        "attention", "cuDNN fmha", "compile s"], rows)]
        for name, m in self.models.items():
            if "generate_tokens_per_s" not in m:
                continue
            roof = m["decode_roofline"]
            gen = ", ".join(f"batch {b}: {v:,.0f}" for b, v in m["generate_tokens_per_s"].items())
            lines.append(f"{name} decode tokens/s {gen}; batch-1 roofline "
                         f"{roof['tokens_per_s_datasheet'] or 0:,.0f} (datasheet) / "
                         f"{roof['tokens_per_s_measured_copy']:,.0f} (measured copy) -> "
                         f"{pct(roof.get('fraction_datasheet'))} / "
                         f"{pct(roof.get('fraction_measured_copy'))}")
        if self.loss_head:
            lines.append(loss_head.HeadResult(**{k: self.loss_head[k] for k in (
                "sizes", "times_s", "temp_bytes", "loss")}).table())
        return "\n".join(lines)

    def targets(self) -> list[Target]:
        return []


def gpu_suite(quick: bool, attention: str = "cudnn", sizes: GpuSizes | None = None,
              cpu_ok: bool = False) -> GpuResult | None:
    """GPT-2 small / medium, T=1024, bf16 compute: step time, MFU, peak memory, where the
    time goes (profile), KV-cache decoding against the memory roofline. None on CPU
    unless `cpu_ok` (a dry run of the same code with `sizes.overrides`)."""
    s = sizes or (GPU_QUICK if quick else GpuSizes())
    device = jax.devices()[0]
    if device.platform not in ("gpu", "cuda", "rocm") and not cpu_ok:
        return None
    out = GpuResult(device_kind=device.device_kind, xla_flags=os.environ.get("XLA_FLAGS", ""),
                    peak_flops=throughput.peak_flops(device),
                    datasheet_memory_bandwidth=throughput.memory_bandwidth(device),
                    calibration=calibrate(device, small=cpu_ok), sizes=dataclasses.asdict(s),
                    models={})
    log(f"  calibration: {out.calibration}")
    generate = set(s.generate_models)
    for name in s.models:
        for scan in s.scan_layers:
            key = name if scan else f"{name} unrolled"
            impl = attention
            gen = name in generate
            generate.discard(name)  # decoding does not depend on scan_layers: measure once
            try:
                out.models[key] = _gpu_model(s.gpt(name, impl, scan), key, device, s, out, gen)
            except Exception as e:  # cuDNN attention unsupported here: say so, use XLA's
                if impl == "xla" or "attention" not in str(e).lower():
                    raise
                log(f"  gpu {key}: {attention} attention failed ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160]}); retrying with XLA attention")
                impl = "xla"
                out.models[key] = _gpu_model(s.gpt(name, impl, scan), key, device, s, out, gen)
            out.models[key]["attention"] = impl
            out.models[key]["scan_layers"] = scan
    variants = [(n, "unfused loss", {"fused_loss": False}) for n in s.unfused_models]
    variants += [(n, "fp8", {"matmul_precision": "fp8"}) for n in s.fp8_models]
    for name, label, change in variants:
        if name not in s.models:
            continue
        ran = out.models.get(name) or out.models[f"{name} unrolled"]  # (its attention)
        cfg = dataclasses.replace(s.gpt(name, ran["attention"]), **change)
        key = f"{name} {label}"
        out.models[key] = _gpu_model(cfg, key, device, s, out, False)
        out.models[key].update(attention=cfg.attention, scan_layers=True)
    if not s.head_batch:
        return out
    shape = dict(s.overrides)
    head = loss_head.head_bench(loss_head.HeadSizes(
        batch=s.head_batch, seq_len=shape.get("seq_len", 1024),
        d_model=shape.get("d_model", 768), dtype="bfloat16", repeats=s.steps))
    return dataclasses.replace(out, loss_head=head.to_json())


def calibrate(device: jax.Device, small: bool = False) -> Json:
    """The two ceilings measured here: a device-to-device copy (bytes read + written per
    second) and a bf16 matrix product (FLOP/s), each the median of 10 after warm-up."""
    n, k = (1 << 20, 512) if small else (1 << 29, 8192)
    x = jax.device_put(jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16), device)
    a = jax.device_put(jax.random.normal(jax.random.key(1), (k, k), jnp.bfloat16), device)
    b = jax.device_put(jax.random.normal(jax.random.key(2), (k, k), jnp.bfloat16), device)
    copy = jax.jit(lambda x: x * 2)
    mm = jax.jit(lambda a, b: a @ b)

    def median_s(fn: Callable[[], Any]) -> float:
        jax.block_until_ready(fn())
        return statistics.median(timed(fn) for _ in range(10))

    t_copy, t_mm = median_s(lambda: copy(x)), median_s(lambda: mm(a, b))
    return {"copy_bytes_per_s": 2 * n * 2 / t_copy, "copy_bytes": 2 * n * 2,
            "matmul_flops_per_s": 2 * k**3 / t_mm, "matmul_size": k}


def _gpu_model(cfg: GPTConfig, name: str, device: jax.Device, s: GpuSizes, suite: GpuResult,
               generate: bool) -> Json:
    mesh = make_mesh("", devices=[device])
    limit = (device.memory_stats() or {}).get("bytes_limit")
    fixed = dict(s.batches).get(name.split()[0])
    candidates = (fixed,) if fixed else s.search
    fitted: list[tuple[int, Trainer, Any, int, float]] = []
    for b in candidates:
        trainer = gpt_trainer(cfg, mesh, opt=OptConfig(warmup_steps=10, total_steps=1000))
        t0 = time.perf_counter()
        try:
            compiled = trainer.lower(tokens_batch(b, cfg.seq_len, cfg.vocab_size)).compile()
        except Exception as e:  # XLA refuses programs that cannot fit
            log(f"  gpu {name} batch {b}: does not compile ({str(e).splitlines()[0][:120]})")
            break
        compile_s = time.perf_counter() - t0
        need = analysis.memory_figures(compiled).peak_estimate_bytes
        log(f"  gpu {name} batch {b}: compiled in {compile_s:.1f}s, needs {need / 2**30:.2f} GiB")
        if limit and need > 0.95 * limit:
            log(f"  gpu {name} batch {b}: needs {need / 2**30:.1f} GiB of {limit / 2**30:.1f} GiB")
            break
        fitted.append((b, trainer, compiled, need, compile_s))
    if not fitted:
        raise RuntimeError(f"no batch in {candidates} fits GPT-2 {name}")
    for b, trainer, compiled, need, compile_s in reversed(fitted):
        try:
            return _gpu_time(cfg, name, trainer, compiled, b, need, compile_s, device, s, suite,
                             generate)
        except Exception as e:  # ran out of memory at run time: next smaller batch
            if not any(m in str(e) for m in ("RESOURCE_EXHAUSTED", "out of memory")):
                raise
            log(f"  gpu {name} batch {b}: out of memory at run time "
                f"({str(e).splitlines()[0][:160]})")
    raise RuntimeError(f"every fitting batch of GPT-2 {name} failed at run time")


def _gpu_time(cfg: GPTConfig, name: str, trainer: Trainer, compiled: Any, b: int, need: int,
              compile_s: float, device: jax.Device, s: GpuSizes, suite: GpuResult,
              generate: bool) -> Json:
    from experiments.bench import profile_trace as bench_profile

    batch = trainer.put_batch(tokens_batch(b, cfg.seq_len, cfg.vocab_size))
    holder = {"state": trainer.init_state()}

    def step() -> Any:
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    times, step_s, metrics = _time_steps(step, s.steps, holder)
    tps = b * cfg.seq_len / step_s
    stats = device.memory_stats() or {}
    hlo = compiled.as_text()
    result: Json = {
        "batch": b, "seq_len": cfg.seq_len, "params": num_params(cfg), "compile_s": compile_s,
        "step_s": step_s, "step_s_each_synced": times, "tokens_per_s": tps,
        "mfu": throughput.mfu(tps, flops_per_token(cfg), 1, device),
        "mfu_vs_measured_matmul": tps * flops_per_token(cfg)
        / suite.calibration["matmul_flops_per_s"],
        "flops_per_token": flops_per_token(cfg),
        "hlo_flops_per_step": dataclasses.asdict(analysis.hlo_flops(hlo)),
        "compiled_peak_estimate_bytes": need,
        "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
        "device_memory_limit_bytes": stats.get("bytes_limit"),
        "cudnn_attention_in_hlo": analysis.has_custom_call(hlo, "cudnn$fmha"),
        "fp8_gemms": fp8.fp8_gemms(hlo),
        "loss": float(metrics["loss"]),
    }
    log(f"  gpu {name} batch {b}: {step_s * 1e3:.1f} ms/step, {tps:,.0f} tokens/s, MFU "
        f"{result['mfu'] if result['mfu'] is None else format(result['mfu'], '.1%')}")
    if s.hlo_dir:
        _write_hlo(s.hlo_dir, name, hlo)
    if s.profile:
        result["profile"] = bench_profile.profile_or_error(step, calls=2, top=60)
    if generate and s.generate_batches:
        result.update(_gpu_generate(cfg, holder["state"], trainer, s, suite))
    return result


def _time_steps(step: Callable[[], Any], steps: int, holder: dict[str, Any],
                ) -> tuple[list[float], float, Any]:
    """(each step timed alone, the mean of `steps` back to back, the last metrics)."""
    for _ in range(3):
        step()
    jax.block_until_ready(holder["state"])
    times = [timed(step) for _ in range(steps)]  # alone: the loop has no host sync otherwise
    t0 = time.perf_counter()
    for _ in range(steps):  # back to back, as a training loop runs
        metrics = step()
    jax.block_until_ready((holder["state"], metrics))
    return times, (time.perf_counter() - t0) / steps, metrics


def _write_hlo(folder: str, name: str, hlo: str) -> None:
    import gzip

    with gzip.open(os.path.join(folder, f"hlo_train_{name.replace(' ', '_')}.txt.gz"), "wt") as f:
        f.write(hlo)


def _gpu_generate(cfg: GPTConfig, state: Any, trainer: Trainer, s: GpuSizes,
                  suite: GpuResult) -> Json:
    """KV-cache greedy decoding through Server, against the memory roofline at batch 1."""
    from experiments.bench import profile_trace as bench_profile

    with saved_checkpoint(state, cfg, trainer.mesh) as (path, _):
        server = Server.from_checkpoint(path, "")
        gen = kv_generation(server, s.prompt, s.new_tokens, s.generate_batches, repeats=3)
        roof = decode_roofline(server, s.prompt, s.new_tokens, suite)
        out: Json = {"generate_tokens_per_s": gen["tokens_per_s"], "generate": gen,
                     "decode_roofline": roof}
        one = gen["tokens_per_s"].get("1")
        if one:
            for key in ("datasheet", "measured_copy"):
                if roof.get(f"tokens_per_s_{key}"):
                    roof[f"fraction_{key}"] = one / roof[f"tokens_per_s_{key}"]
        log(f"  decode roofline: {roof}")
        if s.profile:
            prompts = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, s.prompt)).tolist()
            out["generate_profile"] = bench_profile.profile_or_error(
                lambda: server.generate(prompts, s.new_tokens), calls=1, top=60)
        return out


def decode_roofline(server: Server, prompt: int, new: int, suite: GpuResult) -> Json:
    """Tokens/s at batch 1 if each new token read every weight once in the compute dtype
    (bf16), plus the KV cache up to the mean position, at the card's bandwidth."""
    cfg = server.cfg
    itemsize = jnp.dtype(cfg.dtype).itemsize
    weights = num_params(cfg, real=False, embeddings=False) * itemsize  # one wpe row: ignored
    held = analysis.tree_bytes(server.params)
    mean_pos = prompt + new / 2
    kv = 2 * cfg.num_layers * mean_pos * cfg.d_model * itemsize
    per_token = weights + kv
    out: Json = {"bytes_per_token": per_token, "weight_bytes": weights, "kv_bytes": kv,
                 "server_param_bytes": held}
    bw = suite.datasheet_memory_bandwidth
    out["tokens_per_s_datasheet"] = bw / per_token if bw else None
    out["tokens_per_s_measured_copy"] = suite.calibration["copy_bytes_per_s"] / per_token
    return out
