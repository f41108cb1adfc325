"""The benchmark suites behind `python -m experiments.bench`. Each returns JSON-ready data.

structure  compiled memory / collectives / FLOPs per layout, next to the analytic ideal
compile    compile time of the train step at 4 and 48 layers (is depth free?)
speed      jaxmp's one-device train step against a plain JAX + optax GPT; KV-cache decoding
serve      GPT-2 small: checkpoint save / restore, KV-cache vs recompute generation
gpu        GPT-2 small / medium at T=1024 in bf16 on one accelerator (None on CPU)

Every figure is read from a compiled program or measured here; none is typed in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import bench_reference as ref
from jaxmp import analysis
from jaxmp import hlo_weightflow as weightflow
from jaxmp.checkpoint import Checkpoints
from jaxmp.experiment import RunConfig, sidecar
from jaxmp.mesh import format_mesh, make_mesh
from jaxmp.models.gpt import GPT, GPTConfig, flops_per_token, lm_loss, num_params, preset
from jaxmp.pipeline import PipelineError, PipelineSpec, bubble_factor
from jaxmp.serve import Server
from jaxmp.sharding import DEFAULT_RULES
from jaxmp.train import OptConfig, Trainer

Json = dict[str, Any]


def log(msg: str) -> None:
    print(msg, flush=True)


def tokens_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)}


def single_mesh() -> jax.sharding.Mesh:
    return make_mesh("", devices=jax.devices()[:1])


def gpt_trainer(cfg: GPTConfig, mesh: jax.sharding.Mesh, pipe: PipelineSpec = PipelineSpec(),
                opt: OptConfig = OptConfig()) -> Trainer:
    return Trainer(lambda: GPT(cfg, rngs=nnx.Rngs(0), pipeline=pipe), lm_loss, mesh,
                   optimizer=opt)


def _cb(count_bytes: tuple[int, int] | dict[str, int]) -> dict[str, int]:
    if isinstance(count_bytes, dict):
        return {"count": int(count_bytes["count"]), "bytes": int(count_bytes["bytes"])}
    return {"count": int(count_bytes[0]), "bytes": int(count_bytes[1])}


# ====================================================================== structure
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


STRUCTURE_FULL = StructureSizes()
STRUCTURE_QUICK = StructureSizes(num_layers=8, d_model=64, num_heads=8, seq_len=32)
LAYOUTS: tuple[str, ...] = ("data:8", "fsdp:8", "tensor:8", "pipe:8", "data:2,pipe:2,tensor:2",
                            "fsdp:2,pipe:2,tensor:2", "pipe:4,tensor:2")
QUICK_MATRIX: tuple[tuple[str, int, int], ...] = (
    ("data:8", 1, 1), ("tensor:8", 1, 1), ("pipe:4,tensor:2", 4, 2),
    ("data:2,pipe:2,tensor:2", 4, 1))
MICROBATCHES = (1, 4, 8)
REPEATS = (1, 2)


def layout_matrix(layouts: Sequence[str], sizes: StructureSizes,
                  ) -> list[tuple[str, int, int]]:
    """(mesh, microbatches, repeats): pipe layouts get every valid m in {1,4,8} x r in {1,2}."""
    out = []
    n = len(jax.devices())
    for layout in layouts:
        shape = make_mesh(layout).shape if _fits(layout, n) else None
        if shape is None:
            raise ValueError(f"layout {layout!r} does not fit the {n} devices present")
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


def _fits(layout: str, n: int) -> bool:
    from jaxmp.mesh import parse_mesh

    parse_mesh(layout, n)  # raises MeshError with a clear message
    return True


def structure_row(sizes: StructureSizes, layout: str, m: int, r: int,
                  single_flops: float) -> Json:
    """Compile one layout's train step and read its memory, collectives and FLOPs."""
    cfg = sizes.gpt()
    mesh = make_mesh(layout)
    shape = dict(mesh.shape)
    n = mesh.size
    p = shape["pipe"]
    pipe = PipelineSpec(p, m, r)
    trainer = gpt_trainer(cfg, mesh, pipe)
    batch = tokens_batch(sizes.batch, sizes.seq_len, sizes.vocab_size)
    t0 = time.perf_counter()
    compiled = trainer.lower(batch).compile()
    compile_s = time.perf_counter() - t0
    text = compiled.as_text()
    module = analysis.parse_hlo(text)
    mem = analysis.memory_figures(compiled)

    abstract = trainer.abstract_state()
    state_shardings = compiled.input_shardings[0][0]
    state_dev = analysis.sharded_bytes(abstract, state_shardings)
    param_total = analysis.tree_bytes(abstract.params)
    ideal_state = 3 * param_total / n  # params + Adam's two moments, spread evenly

    found = analysis.collectives(module, shape)
    totals = analysis.collective_totals(found)
    by_axes = {f"{k.op}@{k.axes}{'[loop]' if k.in_loop else ''}": _cb(v)
               for k, v in sorted(found.items(), key=lambda kv: (kv[0].op, kv[0].axes,
                                                                kv[0].in_loop))}
    flops = analysis.hlo_flops(module)
    bubble = bubble_factor(p, m, r) if p > 1 else 1.0
    rows = sizes.batch // (shape["data"] * shape["fsdp"])
    itemsize = jnp.dtype(cfg.dtype).itemsize

    tp = None
    if shape["tensor"] > 1:
        minimum = analysis.megatron_allreduce(cfg.num_layers / p, rows, cfg.seq_len,
                                              cfg.d_model, itemsize, m if p > 1 else 1)
        compiled_tp = analysis.collective_totals(found, axes="tensor", in_loop=True)["all-reduce"]
        tp = {"compiled_allreduce": _cb(compiled_tp), "megatron_min": _cb(minimum),
              "bytes_ratio": compiled_tp["bytes"] / minimum[1],
              "count_ratio": compiled_tp["count"] / minimum[0],
              "expected_ratio": bubble}
    pp = None
    if p > 1:
        minimum = analysis.pipeline_permutes(p, m, r, rows, cfg.seq_len, cfg.d_model, itemsize)
        compiled_pp = analysis.collective_totals(found, axes="pipe")["collective-permute"]
        pp = {"compiled_permute": _cb(compiled_pp), "handoff_min": _cb(minimum),
              "bytes_ratio": compiled_pp["bytes"] / minimum[1],
              "count_ratio": compiled_pp["count"] / minimum[0]}
    plan = trainer.plan()
    # All-gathers of a weight or a piece, reshaping or cast of one, traced from the
    # state's parameters through the program (weightflow.weight_derived_gathers).
    weights = {n: path for n, path in weightflow.jax_entry_parameters(compiled, module).items()
               if path.startswith("args[0].params")}
    gathers = weightflow.weight_derived_gathers(module, weights)
    dp = None
    if shape["data"] * shape["fsdp"] > 1:
        # Each device's gradients before the data / fsdp reduction: the parameters split
        # only over pipe and tensor. Reducing them once is the minimum traffic.
        grad = sum(row.bytes_total // _shards(row.spec, shape, ("pipe", "tensor"))
                   for row in plan.rows)
        reduced = {"count": 0, "bytes": 0}
        for k, (count, nbytes) in found.items():
            if k.op in ("all-reduce", "reduce-scatter") and k.axes in DP_AXES:
                reduced["count"] += count
                reduced["bytes"] += nbytes
        dp = {"compiled_gradient_reduction": reduced, "gradient_bytes": grad,
              "bytes_ratio": reduced["bytes"] / grad}
    cost = compiled.cost_analysis() or {}
    return {
        "layout": format_mesh(mesh), "devices": n, "microbatches": m, "repeats": r,
        "compile_s": compile_s,
        "argument_bytes": mem.argument_bytes, "temp_bytes": mem.temp_bytes,
        "output_bytes": mem.output_bytes, "alias_bytes": mem.alias_bytes,
        "peak_estimate_bytes": mem.peak_estimate_bytes,
        "param_bytes_per_device": plan.bytes_per_device,
        "state_bytes_per_device": state_dev,
        "ideal_state_bytes_per_device": ideal_state,
        "state_ratio": state_dev / ideal_state,
        # Data parallelism replicates the state by design: the ideal of the model-parallel
        # axes alone (fsdp, pipe, tensor) is total / (devices / data).
        "replica_ideal_state_bytes_per_device": ideal_state * shape["data"],
        "replica_state_ratio": state_dev / (ideal_state * shape["data"]),
        "collectives": totals,
        "collectives_by_axes": by_axes,
        "tensor_parallel": tp,
        "pipeline": pp,
        "data_parallel": dp,
        "weight_all_gathers": {"count": sum(g.executions for g in gathers),
                               "bytes": sum(g.bytes for g in gathers),
                               "weights": sorted({w for g in gathers for w in g.weights})},
        "flops_per_device": flops.flops,
        "dot_flops_per_device": flops.dot_flops,
        "ideal_flops_per_device": single_flops / n,
        "flops_ratio": flops.flops / (single_flops / n),
        "analytic_bubble_factor": bubble,
        "xla_cost_analysis_flops": float(cost.get("flops", 0.0)),
        "unknown_trip_counts": flops.unknown_loops,
    }


DP_AXES = ("data", "fsdp", "data+fsdp")


def _shards(spec: Any, shape: dict[str, int], axes: Sequence[str]) -> int:
    """How many pieces `spec` cuts an array into over the mesh axes `axes` only."""
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= shape[axis] if axis in axes else 1
    return n


def single_device_figures(sizes: StructureSizes) -> Json:
    """Loop-aware HLO FLOPs, XLA's cost_analysis FLOPs and temporaries of the one-device
    train step (the reference every layout is divided against)."""
    trainer = gpt_trainer(sizes.gpt(), single_mesh())
    compiled = trainer.lower(tokens_batch(sizes.batch, sizes.seq_len, sizes.vocab_size)).compile()
    cost = compiled.cost_analysis() or {}
    return {"single_device_flops": analysis.hlo_flops(compiled.as_text()).flops,
            "single_device_xla_cost_analysis_flops": float(cost.get("flops", 0.0)),
            "single_device_temp_bytes": analysis.memory_figures(compiled).temp_bytes}


def structure_suite(quick: bool, layouts: Sequence[str] | None = None) -> tuple[Json, list[Json]]:
    """(model description, one row per layout x pipeline setting)."""
    sizes = STRUCTURE_QUICK if quick else STRUCTURE_FULL
    if layouts:
        matrix = layout_matrix(layouts, sizes)
    else:
        matrix = list(QUICK_MATRIX) if quick else layout_matrix(LAYOUTS, sizes)
    single = single_device_figures(sizes)
    model = {**dataclasses.asdict(sizes), "params": num_params(sizes.gpt()), **single}
    rows = []
    for layout, m, r in matrix:
        row = structure_row(sizes, layout, m, r, single["single_device_flops"])
        log(f"  structure {row['layout']:<24} m={m} r={r}  compiled in {row['compile_s']:.1f}s")
        rows.append(row)
    return model, rows


# ====================================================================== compile
COMPILE_MESHES: tuple[tuple[str, int], ...] = (("single", 1), ("data:2,pipe:2,tensor:2", 4))


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


def compile_suite(quick: bool) -> Json:
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
    return out


# ====================================================================== speed
@dataclasses.dataclass(frozen=True)
class SpeedSizes:
    num_layers: int = 8
    d_model: int = 256
    num_heads: int = 8
    seq_len: int = 128
    batch: int = 8
    repeats: int = 7
    prompt: int = 32
    new_tokens: int = 64
    gen_batches: tuple[int, ...] = (1, 8)

    def gpt(self) -> GPTConfig:
        return GPTConfig(num_layers=self.num_layers, d_model=self.d_model,
                         num_heads=self.num_heads, seq_len=self.seq_len)


SPEED_FULL = SpeedSizes()
SPEED_QUICK = SpeedSizes(num_layers=2, d_model=64, num_heads=4, seq_len=64, repeats=5,
                         prompt=16, new_tokens=16)


def to_reference_params(params: Any, cfg: GPTConfig) -> ref.Params:
    """jaxmp's GPT parameters in the reference's layout (to check both compute the same)."""
    b, L, d = params["blocks"], cfg.num_layers, cfg.d_model
    return {
        "wte": params["wte"]["embedding"][: cfg.vocab_size], "wpe": params["wpe"],
        "ln1_g": b["ln1"]["scale"], "ln1_b": b["ln1"]["bias"],
        "w_qkv": b["attn"]["qkv"]["kernel"].reshape(L, d, 3 * d),
        "b_qkv": b["attn"]["qkv"]["bias"].reshape(L, 3 * d),
        "w_o": b["attn"]["out"]["kernel"].reshape(L, d, d), "b_o": b["attn"]["out"]["bias"],
        "ln2_g": b["ln2"]["scale"], "ln2_b": b["ln2"]["bias"],
        "w_fc": b["mlp"]["fc"]["kernel"], "b_fc": b["mlp"]["fc"]["bias"],
        "w_proj": b["mlp"]["proj"]["kernel"], "b_proj": b["mlp"]["proj"]["bias"],
        "lnf_g": params["ln_f"]["scale"], "lnf_b": params["ln_f"]["bias"],
    }


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def speed_suite(quick: bool) -> Json:
    """One-device train step: jaxmp vs the plain reference, alternating, median of
    `repeats` after warm-up; then KV-cache greedy decoding tokens/s."""
    s = SPEED_QUICK if quick else SPEED_FULL
    cfg = s.gpt()
    opt = OptConfig()
    trainer = gpt_trainer(cfg, single_mesh(), opt=opt)
    host = tokens_batch(s.batch, cfg.seq_len, cfg.vocab_size, seed=1)
    batch = trainer.put_batch(host)
    step = trainer.compiled_step(host)
    state = trainer.init_state()

    rcfg = ref.RefConfig(cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.seq_len, cfg.vocab_size)
    tx = ref.optimizer(opt.learning_rate, opt.warmup_steps, opt.total_steps, opt.weight_decay,
                       opt.clip_norm, opt.b1, opt.b2, opt.eps, opt.min_lr_ratio)
    ref_step = ref.make_train_step(rcfg, tx)
    device = jax.devices()[0]
    r_params = jax.device_put(to_reference_params(jax.device_get(state.params), cfg), device)
    r_opt = tx.init(r_params)
    r_tokens = jax.device_put(host["tokens"], device)

    holder: dict[str, Any] = {"state": state, "rp": r_params, "ro": r_opt}
    losses: dict[str, list[float]] = {"jaxmp": [], "reference": []}

    def run_jaxmp() -> Any:
        holder["state"], metrics = step(holder["state"], batch)
        losses["jaxmp"].append(metrics["loss"])
        return holder["state"], metrics

    def run_ref() -> Any:
        holder["rp"], holder["ro"], loss = ref_step(holder["rp"], holder["ro"], r_tokens)
        losses["reference"].append(loss)
        return holder["rp"], loss

    t_compile = {"jaxmp": _timed(run_jaxmp), "reference": _timed(run_ref)}  # first call compiles
    for _ in range(2):
        run_jaxmp(), run_ref()
    jax.block_until_ready((holder["state"], holder["rp"]))
    times: dict[str, list[float]] = {"jaxmp": [], "reference": []}
    for i in range(s.repeats):
        order = (("jaxmp", run_jaxmp), ("reference", run_ref))
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            times[name].append(_timed(fn))
    j, r = statistics.median(times["jaxmp"]), statistics.median(times["reference"])
    lj = [float(x) for x in losses["jaxmp"]]
    lr = [float(x) for x in losses["reference"]]
    log(f"  speed: jaxmp {j * 1e3:.1f} ms/step, reference {r * 1e3:.1f} ms/step")
    gen = generation_speed(cfg, holder["state"], trainer, s.prompt, s.new_tokens, s.gen_batches)
    return {
        "model": {**cfg.to_json(), "batch": s.batch, "params": num_params(cfg)},
        "device": str(device.device_kind), "repeats": s.repeats,
        "jaxmp_step_s": j, "reference_step_s": r, "ratio": j / r,
        "jaxmp_step_times_s": times["jaxmp"], "reference_step_times_s": times["reference"],
        "first_call_s": t_compile,
        "first_step_loss": {"jaxmp": lj[0], "reference": lr[0],
                            "abs_diff": abs(lj[0] - lr[0])},
        "tokens_per_s": {"jaxmp": s.batch * cfg.seq_len / j,
                         "reference": s.batch * cfg.seq_len / r},
        "generate_tokens_per_s": gen["tokens_per_s"],
        "generate": gen,
    }


@contextlib.contextmanager
def saved_checkpoint(state: Any, cfg: GPTConfig, mesh: jax.sharding.Mesh,
                     ) -> Iterator[tuple[str, float]]:
    """Save `state` to a temporary directory: yields (directory, save seconds)."""
    with tempfile.TemporaryDirectory(prefix="jaxmp-bench-") as d:
        ckpts = Checkpoints(d)
        meta = sidecar(RunConfig(), cfg, mesh, DEFAULT_RULES, PipelineSpec())
        t0 = time.perf_counter()
        ckpts.save(state, meta, wait=True)
        save_s = time.perf_counter() - t0
        ckpts.close()
        yield d, save_s


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(path) for f in files)


def generation_speed(cfg: GPTConfig, state: Any, trainer: Trainer, prompt: int, new: int,
                     batches: Sequence[int], repeats: int = 3) -> Json:
    """KV-cache greedy generation tokens/s through jaxmp.serve.Server (one device)."""
    with saved_checkpoint(state, cfg, trainer.mesh) as (path, _):
        server = Server(path, "")
        return kv_generation(server, prompt, new, batches, repeats)


def kv_generation(server: Server, prompt: int, new: int, batches: Sequence[int],
                  repeats: int) -> Json:
    rng = np.random.default_rng(0)
    out: Json = {"prompt_tokens": prompt, "new_tokens": new, "tokens_per_s": {},
                 "first_call_s": {}, "times_s": {}}
    for b in batches:
        prompts = rng.integers(0, server.cfg.vocab_size, (b, prompt)).tolist()
        out["first_call_s"][str(b)] = _timed(lambda p=prompts: server.generate(p, new))
        times = [_timed(lambda p=prompts: server.generate(p, new)) for _ in range(repeats)]
        t = statistics.median(times)
        out["times_s"][str(b)] = times
        out["tokens_per_s"][str(b)] = b * new / t
        log(f"  generate batch {b}: {b * new / t:,.1f} tokens/s (KV cache)")
    return out


# ====================================================================== serve
@dataclasses.dataclass(frozen=True)
class ServeSizes:
    preset: str | None = "small"
    overrides: tuple[tuple[str, int], ...] = ()
    prompt: int = 32
    new_tokens: int = 128
    recompute_tokens: int = 16
    batches: tuple[int, ...] = (1, 8)
    repeats: int = 2

    def gpt(self) -> GPTConfig:
        return preset(self.preset or "small", vocab_size=50257, **dict(self.overrides))


SERVE_FULL = ServeSizes()
SERVE_QUICK = ServeSizes(overrides=(("num_layers", 2), ("d_model", 64), ("num_heads", 4),
                                    ("seq_len", 128)),
                         prompt=8, new_tokens=16, recompute_tokens=4, repeats=1)


def recompute_generation(server: Server, prompts: np.ndarray, new: int) -> tuple[list, float]:
    """Greedy generation re-running the whole forward for every new token, on one fixed
    (B, prompt + new) window so the forward compiles once (causal: positions past the
    current end do not change the logits read). Returns (new tokens (B, new), seconds)."""
    b, plen = prompts.shape
    window = np.zeros((b, plen + new), np.int32)
    window[:, :plen] = prompts
    jax.block_until_ready(server.predict(window))  # compile
    t0 = time.perf_counter()
    for i in range(new):
        logits = server.predict(window)
        window[:, plen + i] = np.asarray(jnp.argmax(logits[:, plen + i - 1], axis=-1))
    return window[:, plen:].tolist(), time.perf_counter() - t0


def serve_suite(quick: bool) -> Json:
    s = SERVE_QUICK if quick else SERVE_FULL
    cfg = s.gpt()
    mesh = single_mesh()
    trainer = gpt_trainer(cfg, mesh)
    t0 = time.perf_counter()
    state = jax.block_until_ready(trainer.init_state())
    init_s = time.perf_counter() - t0
    abstract = trainer.abstract_state()
    out: Json = {"model": {**cfg.to_json(), "params": num_params(cfg)},
                 "state_bytes": analysis.tree_bytes(abstract), "init_s": init_s}
    with saved_checkpoint(state, cfg, mesh) as (path, save_s):
        out["checkpoint"] = {"save_s": save_s, "size_on_disk_bytes": directory_bytes(path)}
        del state
        t0 = time.perf_counter()
        restored = jax.block_until_ready(Checkpoints(path, create=False).restore(abstract))
        out["checkpoint"]["restore_train_state_s"] = time.perf_counter() - t0
        del restored
        server = Server(path, "")
        out["checkpoint"]["restore_params_for_serving_s"] = server.restore_seconds
        log(f"  serve: saved {out['checkpoint']['size_on_disk_bytes'] / 2**20:,.0f} MiB in "
            f"{save_s:.2f}s, restored the train state in "
            f"{out['checkpoint']['restore_train_state_s']:.2f}s")
        kv = kv_generation(server, s.prompt, s.new_tokens, s.batches, s.repeats)
        recompute: Json = {"new_tokens_timed": s.recompute_tokens, "tokens_per_s": {},
                           "matches_kv_cache": {},
                           "note": f"recompute timed over {s.recompute_tokens} new tokens "
                                   f"(not {s.new_tokens}) on one fixed window of "
                                   f"prompt + {s.recompute_tokens} positions"}
        rng = np.random.default_rng(1)
        for b in s.batches:
            prompts = rng.integers(0, cfg.vocab_size, (b, s.prompt)).astype(np.int32)
            toks, secs = recompute_generation(server, prompts, s.recompute_tokens)
            cached = [g.tokens for g in server.generate(prompts.tolist(), s.recompute_tokens)]
            recompute["tokens_per_s"][str(b)] = b * s.recompute_tokens / secs
            recompute["matches_kv_cache"][str(b)] = cached == toks
            log(f"  recompute batch {b}: {b * s.recompute_tokens / secs:,.1f} tokens/s")
    out["generate_kv_cache"] = kv
    out["generate_recompute"] = recompute
    out["kv_speedup"] = {b: kv["tokens_per_s"][b] / recompute["tokens_per_s"][b]
                         for b in kv["tokens_per_s"]}
    return out


# ====================================================================== gpu
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

    def gpt(self, name: str, attention: str, scan: bool = True) -> GPTConfig:
        return preset(name, vocab_size=50257, dtype="bfloat16", attention=attention,
                      scan_layers=scan, **dict(self.overrides))


GPU_QUICK = GpuSizes(models=("small",), batches=(("small", 8),), steps=3,
                     generate_batches=(1,), new_tokens=32, scan_layers=(True,))


def gpu_suite(quick: bool, attention: str = "cudnn", sizes: GpuSizes | None = None,
              cpu_ok: bool = False) -> Json | None:
    """GPT-2 small / medium, T=1024, bf16 compute: step time, MFU, peak memory, where the
    time goes (profile), KV-cache decoding against the memory roofline. None on CPU
    unless `cpu_ok` (a dry run of the same code with `sizes.overrides`)."""
    s = sizes or (GPU_QUICK if quick else GpuSizes())
    device = jax.devices()[0]
    if device.platform not in ("gpu", "cuda", "rocm") and not cpu_ok:
        return None
    out: Json = {"device_kind": device.device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                 "peak_flops": analysis.peak_flops(device),
                 "datasheet_memory_bandwidth": analysis.memory_bandwidth(device),
                 "calibration": calibrate(device, small=cpu_ok), "sizes": dataclasses.asdict(s),
                 "models": {}}
    log(f"  calibration: {out['calibration']}")
    generate = set(s.generate_models)
    for name in s.models:
        for scan in s.scan_layers:
            key = name if scan else f"{name} unrolled"
            impl = attention
            gen = name in generate
            generate.discard(name)  # decoding does not depend on scan_layers: measure once
            try:
                out["models"][key] = _gpu_model(s.gpt(name, impl, scan), key, device, s, out, gen)
            except Exception as e:  # cuDNN attention unsupported here: say so, use XLA's
                if impl == "xla" or "attention" not in str(e).lower():
                    raise
                log(f"  gpu {key}: {attention} attention failed ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160]}); retrying with XLA attention")
                impl = "xla"
                out["models"][key] = _gpu_model(s.gpt(name, impl, scan), key, device, s, out, gen)
            out["models"][key]["attention"] = impl
            out["models"][key]["scan_layers"] = scan
    return out


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
        return statistics.median(_timed(fn) for _ in range(10))

    t_copy, t_mm = median_s(lambda: copy(x)), median_s(lambda: mm(a, b))
    return {"copy_bytes_per_s": 2 * n * 2 / t_copy, "copy_bytes": 2 * n * 2,
            "matmul_flops_per_s": 2 * k**3 / t_mm, "matmul_size": k}


def _gpu_model(cfg: GPTConfig, name: str, device: jax.Device, s: GpuSizes, suite: Json,
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
              compile_s: float, device: jax.Device, s: GpuSizes, suite: Json,
              generate: bool) -> Json:
    from experiments import bench_profile

    host = tokens_batch(b, cfg.seq_len, cfg.vocab_size)
    batch = trainer.put_batch(host)
    holder = {"state": trainer.init_state()}

    def step() -> Any:
        holder["state"], metrics = compiled(holder["state"], batch)
        return metrics

    for _ in range(3):
        step()
    jax.block_until_ready(holder["state"])
    times = []
    for _ in range(s.steps):  # each step timed alone: the loop has no host sync otherwise
        times.append(_timed(step))
    t0 = time.perf_counter()
    for _ in range(s.steps):  # back to back, as a training loop runs
        metrics = step()
    jax.block_until_ready((holder["state"], metrics))
    step_s = (time.perf_counter() - t0) / s.steps
    tps = b * cfg.seq_len / step_s
    stats = device.memory_stats() or {}
    hlo = compiled.as_text()
    result: Json = {
        "batch": b, "seq_len": cfg.seq_len, "params": num_params(cfg), "compile_s": compile_s,
        "step_s": step_s, "step_s_each_synced": times, "tokens_per_s": tps,
        "mfu": analysis.mfu(tps, flops_per_token(cfg), 1, device),
        "mfu_vs_measured_matmul": tps * flops_per_token(cfg)
        / suite["calibration"]["matmul_flops_per_s"],
        "flops_per_token": flops_per_token(cfg),
        "hlo_flops_per_step": dataclasses.asdict(analysis.hlo_flops(hlo)),
        "compiled_peak_estimate_bytes": need,
        "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
        "device_memory_limit_bytes": stats.get("bytes_limit"),
        "cudnn_attention_in_hlo": analysis.has_custom_call(hlo, "cudnn$fmha"),
        "loss": float(metrics["loss"]),
    }
    log(f"  gpu {name} batch {b}: {step_s * 1e3:.1f} ms/step, {tps:,.0f} tokens/s, MFU "
        f"{result['mfu'] if result['mfu'] is None else format(result['mfu'], '.1%')}")
    if s.hlo_dir:
        import gzip
        with gzip.open(os.path.join(s.hlo_dir, f"hlo_train_{name.replace(' ', '_')}.txt.gz"),
                       "wt") as f:
            f.write(hlo)
    if s.profile:
        result["profile"] = bench_profile.profile_or_error(step, calls=2, top=60)
    if generate and s.generate_batches:
        result.update(_gpu_generate(cfg, holder["state"], trainer, s, suite))
    return result


def _gpu_generate(cfg: GPTConfig, state: Any, trainer: Trainer, s: GpuSizes, suite: Json) -> Json:
    """KV-cache greedy decoding through Server, against the memory roofline at batch 1."""
    from experiments import bench_profile

    with saved_checkpoint(state, cfg, trainer.mesh) as (path, _):
        server = Server(path, "")
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


def decode_roofline(server: Server, prompt: int, new: int, suite: Json) -> Json:
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
    bw = suite.get("datasheet_memory_bandwidth")
    out["tokens_per_s_datasheet"] = bw / per_token if bw else None
    out["tokens_per_s_measured_copy"] = suite["calibration"]["copy_bytes_per_s"] / per_token
    return out


def device_summary() -> str:
    d = jax.devices()
    kinds = sorted({x.device_kind for x in d})
    return f"{len(d)} x {'/'.join(kinds)} ({d[0].platform})"
