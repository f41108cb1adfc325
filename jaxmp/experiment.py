"""A training run end to end: config -> mesh, model, data -> steps, logs, metrics file.

experiments/train.py only turns flags into a RunConfig and calls `train(config)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxmp import analysis
from jaxmp.checkpoint import Checkpoints
from jaxmp.data import TokenBatches, load_tokens, make_global
from jaxmp.mesh import format_mesh, make_mesh
from jaxmp.models import gpt, mlp
from jaxmp.pipeline import PipelineSpec, bubble_fraction, stage_layers, storage_order
from jaxmp.sharding import DEFAULT_RULES, Rules, parse_rule_overrides
from jaxmp.train import OptConfig, Trainer, TrainState


class NonFiniteLoss(FloatingPointError):
    """The loss or gradient norm became NaN or infinite."""


class StopSignal:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit 0. Second: abort at once
    (orbax only ever lists fully written checkpoints, so the last complete one survives)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            log(f"second {name}: aborting now; the last complete checkpoint is kept")
            os._exit(128 + signum)
        self.requested = name
        log(f"{name} received: finishing this step, then checkpointing and exiting")

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclasses.dataclass
class RunConfig:
    model: str = "gpt"
    preset: str = "tiny"
    num_layers: int | None = None
    d_model: int | None = None
    num_heads: int | None = None
    seq_len: int | None = None
    vocab_size: int | None = None  # default: 256 for byte data, 50257 for token files
    mesh: str = "data:2,pipe:2,tensor:2"
    microbatches: int = 4
    pipeline_repeats: int = 1
    batch_size: int = 16
    steps: int = 200
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    grad_accum_steps: int = 1
    seed: int = 0
    dtype: str = "float32"
    remat: str = "none"
    attention: str = "auto"
    scan_layers: bool = True
    data: str = "builtin"
    rules: str = ""  # overrides, e.g. "embed=;mlp=tensor" (params) -- see parse_rule_overrides
    activation_rules: str = ""
    metrics_file: str | None = None
    log_every: int = 10
    profile_dir: str | None = None
    ckpt_dir: str | None = None  # None: a fresh runs/<timestamp> directory
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    resume: bool | None = None  # None: resume when ckpt_dir holds checkpoints
    async_checkpoint: bool = True
    serve_mesh: str = "tensor:4"  # "" skips the closing train -> checkpoint -> serve demo
    serve_prompt: str = "def main("
    run_until: int | None = None  # stop (with a checkpoint) after this step; schedule of `steps`

    def model_config(self) -> gpt.GPTConfig | mlp.MLPConfig:
        if self.model == "gpt":
            vocab = self.vocab_size or (256 if _is_bytes(self.data) else 50257)
            return gpt.preset(self.preset, num_layers=self.num_layers, d_model=self.d_model,
                              num_heads=self.num_heads, seq_len=self.seq_len, vocab_size=vocab,
                              dtype=self.dtype, remat=self.remat, attention=self.attention,
                              scan_layers=self.scan_layers)
        if self.model == "mlp":
            over = {k: v for k, v in (("num_layers", self.num_layers),
                                      ("hidden_dim", self.d_model)) if v is not None}
            cfg = mlp.MLPConfig(dtype=self.dtype, remat=self.remat, **over)
            cfg.validate()
            return cfg
        raise ValueError(f"--model={self.model!r}: choose gpt or mlp")


def _is_bytes(source: str) -> bool:
    return source == "builtin" or not source.endswith((".bin", ".npy"))


def _fresh_run_dir() -> str:
    """runs/<date-time>, with a suffix if that exists already."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S"))
    path, n = base, 1
    while os.path.exists(path):
        path, n = f"{base}-{n}", n + 1
    return path


def build_rules(cfg: RunConfig) -> Rules:
    return DEFAULT_RULES.override(params=parse_rule_overrides(cfg.rules),
                                  activations=parse_rule_overrides(cfg.activation_rules))


def build_model_factory(model_cfg: Any, pipeline: PipelineSpec, seed: int) -> Callable:
    if isinstance(model_cfg, gpt.GPTConfig):
        return lambda: gpt.GPT(model_cfg, rngs=nnx.Rngs(seed), pipeline=pipeline)
    return lambda: mlp.LayerwiseMLP(model_cfg, rngs=nnx.Rngs(seed), pipeline=pipeline)


def log(msg: str) -> None:
    """Progress lines come from process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)


class Batches:
    """Global batches for a run: token windows for GPT, the synthetic task for the MLP."""

    def __init__(self, cfg: RunConfig, model_cfg: Any):
        self.model_cfg = model_cfg
        self.batch_size, self.seed = cfg.batch_size, cfg.seed
        if isinstance(model_cfg, gpt.GPTConfig):
            src = "the built-in corpus" if cfg.data == "builtin" else f"--data={cfg.data}"
            tokens = load_tokens(cfg.data, model_cfg.vocab_size)
            self.tokens = TokenBatches(tokens, cfg.batch_size, model_cfg.seq_len, cfg.seed, src)
            self.tokens_per_step = cfg.batch_size * model_cfg.seq_len
        else:
            self.tokens = None
            self.tokens_per_step = cfg.batch_size

    def example(self) -> dict[str, np.ndarray]:
        """Host arrays with the batch's shapes and dtypes (for compiling)."""
        if self.tokens is not None:
            return {"tokens": np.zeros((self.batch_size, self.tokens.seq_len + 1), np.int32)}
        c = self.model_cfg
        return {"x": np.zeros((self.batch_size, c.input_dim), np.float32),
                "y": np.zeros((self.batch_size,), np.int32)}

    def device(self, step: int, shardings: dict) -> dict[str, jax.Array]:
        if self.tokens is not None:
            return self.tokens.global_batch(step, shardings["tokens"])
        made: dict[tuple[int, int, int], dict] = {}  # x and y of the same rows, drawn once

        def rows(key: str) -> Callable[[range], np.ndarray]:
            def fn(r: range) -> np.ndarray:
                ident = (r.start, r.stop, r.step)
                if ident not in made:
                    made[ident] = mlp.synthetic_batch(self.model_cfg, self.seed, step,
                                                      np.asarray(r))
                return made[ident][key]
            return fn

        ex = self.example()
        return {k: make_global(ex[k].shape, shardings[k], rows(k)) for k in ex}


@dataclasses.dataclass
class RunResult:
    state: TrainState
    trainer: Trainer
    losses: list[float]  # per step, for the steps this run took
    first_loss: float
    last_loss: float
    ckpt_dir: str | None = None
    stopped_by: str | None = None
    completion: str | None = None


def sidecar(cfg: RunConfig, model_cfg: Any, mesh: Any, rules: Rules, pipe: PipelineSpec) -> dict:
    """What a checkpoint needs to rebuild its model with no training flags."""
    import flax
    import orbax.checkpoint

    import jaxmp

    return {
        "model": cfg.model, "config": model_cfg.to_json(), "mesh": format_mesh(mesh),
        "rules": rules.to_json(),
        "pipeline": {"stages": pipe.stages, "microbatches": pipe.microbatches,
                     "repeats": pipe.repeats},
        "layer_order": storage_order(model_cfg.num_layers, pipe.stages, pipe.repeats),
        "stacked": "blocks" if cfg.model == "gpt" else "hidden",
        "data": {"source": cfg.data, "seed": cfg.seed, "batch_size": cfg.batch_size},
        "versions": {"jaxmp": jaxmp.__version__, "jax": jax.__version__,
                     "flax": flax.__version__, "orbax": orbax.checkpoint.__version__},
    }


def check_same_flags(cfg: RunConfig) -> None:
    """Every process of a multi-process job must run the same configuration."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    text = json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)
    digest = np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int64)
    every = np.asarray(multihost_utils.process_allgather(digest)).reshape(-1)
    differ = [i for i, d in enumerate(every) if d != every[0]]
    if differ:
        raise ValueError(f"process {differ[0]} was started with other training flags than "
                         "process 0; start every process with the same flags")


def train(cfg: RunConfig) -> RunResult:
    check_same_flags(cfg)
    model_cfg = cfg.model_config()
    mesh = make_mesh(cfg.mesh)
    pipe = PipelineSpec(mesh.shape["pipe"], cfg.microbatches, cfg.pipeline_repeats)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size < 1 or cfg.steps < 1:
        raise ValueError(f"--batch_size={cfg.batch_size} and --steps={cfg.steps} must be >= 1")
    if pipe.enabled:
        per_shard = cfg.batch_size // max(1, cfg.grad_accum_steps) // shards
        pipe.validate(model_cfg.num_layers, per_shard,
                      "decoder layers" if cfg.model == "gpt" else "hidden layers")
    rules = build_rules(cfg)
    opt = OptConfig(learning_rate=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
                    total_steps=cfg.steps, grad_accum_steps=cfg.grad_accum_steps)
    loss_fn = gpt.lm_loss if cfg.model == "gpt" else mlp.classification_loss
    trainer = Trainer(build_model_factory(model_cfg, pipe, cfg.seed), loss_fn, mesh,
                      rules=rules, optimizer=opt, seed=cfg.seed)
    batches = Batches(cfg, model_cfg)

    log(f"jaxmp: {cfg.model} {json.dumps(model_cfg.to_json())}")
    log(f"mesh {format_mesh(mesh)} over {mesh.size} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es) x {jax.local_device_count()} local device(s)")
    if pipe.enabled:
        log(f"pipeline: {pipe.stages} stages, {pipe.microbatches} micro-batches, "
            f"{pipe.repeats} repeat(s); bubble fraction "
            f"{bubble_fraction(pipe.stages, pipe.microbatches, pipe.repeats):.3f}")
        for s, layers in enumerate(stage_layers(model_cfg.num_layers, pipe)):
            log(f"  stage {s} (pipe index {s}): layers {layers}")
    log(trainer.plan().format())
    fpt = gpt.flops_per_token(model_cfg) if cfg.model == "gpt" else None
    unit = "tok" if cfg.model == "gpt" else "examples"

    if not cfg.ckpt_dir and jax.process_count() > 1:
        raise ValueError("a multi-process run needs --ckpt_dir, on storage every process "
                         "can reach")
    ckpt_dir = cfg.ckpt_dir or _fresh_run_dir()
    ckpts = Checkpoints(ckpt_dir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
    meta = sidecar(cfg, model_cfg, mesh, rules, pipe)
    if cfg.ckpt_every < 1:
        raise ValueError(f"--ckpt_every={cfg.ckpt_every} must be >= 1")
    latest = ckpts.latest_step()
    if latest is not None and cfg.resume is not False:
        saved = ckpts.meta(latest)
        if saved.get("model") != cfg.model or saved.get("config") != meta["config"]:
            raise ValueError(
                f"--ckpt_dir={ckpt_dir} holds a run of {saved.get('model')} "
                f"{json.dumps(saved.get('config'))}, not of these flags; use another --ckpt_dir "
                "or the original model flags")
        state = ckpts.restore(trainer.abstract_state(), step=latest,
                              layer_order=meta["layer_order"], stacked=meta["stacked"])
        log(f"resumed from {ckpts.directory} step {latest} (trained on {saved.get('mesh')})")
    else:
        if cfg.resume:
            log(f"--resume: no checkpoint in {ckpts.directory} yet; starting from scratch")
        state = trainer.init_state()
    log(f"checkpoints: {ckpts.directory} every {cfg.ckpt_every} steps, keeping "
        f"{cfg.keep_checkpoints}")
    shardings = trainer.batch_sharding(batches.example())
    step_fn = trainer.compiled_step(batches.example())
    metrics_out = open(cfg.metrics_file, "a") if cfg.metrics_file and jax.process_index() == 0 \
        else None
    losses: list[float] = []
    pending: list[tuple[int, dict]] = []
    start = int(jax.device_get(state.step))
    t_last, step_last = time.perf_counter(), start
    t_begin = t_last
    stop = StopSignal()
    saved_step = start

    last_metrics: list[dict] = [{}]

    def check(pending: list[tuple[int, dict]]) -> None:
        """Fetch the queued step metrics; stop at the first non-finite step."""
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, fetched):
            if not bool(m["finite"]):
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {s} (loss={float(m['loss'])}, "
                    f"grad_norm={float(m['grad_norm'])}); the update was not applied and no "
                    "checkpoint was written from it. Lower --learning_rate, or use "
                    "--dtype=float32")
            losses.append(float(m["loss"]))
        pending.clear()
        last_metrics[0] = fetched[-1]

    try:
        stop.__enter__()
        end = min(cfg.steps, cfg.run_until) if cfg.run_until else cfg.steps
        for step in range(start, end):
            if cfg.profile_dir and step == start + 2:
                jax.profiler.start_trace(cfg.profile_dir)
            state, metrics = step_fn(state, batches.device(step, shardings))
            done = step + 1
            pending.append((done, metrics))
            if cfg.profile_dir and step == start + 4:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            save_now = done % cfg.ckpt_every == 0 or done == end or stop.requested
            if save_now:  # never checkpoint a state whose steps were not checked
                check(pending)
                ckpts.save(state, meta, wait=bool(stop.requested))
                saved_step = done
                log(f"checkpoint step {done}: " + ("committed" if stop.requested else
                                                  "saving in the background"))
            if stop.requested:
                log(f"stopped by {stop.requested} after step {done}; checkpoint committed in "
                    f"{ckpts.directory}")
                break
            if done % cfg.log_every and done != end and done != start + 1:
                continue
            check(pending)
            now = time.perf_counter()
            dt = (now - t_last) / max(1, done - step_last)
            t_last, step_last = now, done
            m = last_metrics[0]
            tps = batches.tokens_per_step / dt
            util = analysis.mfu(tps, fpt, mesh.size) if fpt else None
            eta = dt * (cfg.steps - done)
            log(f"step {done:6d}/{cfg.steps}  loss {float(m['loss']):.4f}  "
                f"grad_norm {float(m['grad_norm']):.3f}  lr {float(m['learning_rate']):.2e}  "
                f"{tps:,.0f} {unit}/s  {dt * 1e3:.1f} ms/step  ETA {eta:.0f}s"
                + (f"  MFU {util:.1%}" if util is not None else "")
                + ("  (includes compile)" if done == start + 1 else ""))
            if metrics_out:
                metrics_out.write(json.dumps({
                    "step": done, "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                    "learning_rate": float(m["learning_rate"]), "step_time_s": dt,
                    "tokens_per_s": tps, "mfu": util}) + "\n")
                metrics_out.flush()
        check(pending)
    finally:
        stop.__exit__()
        if metrics_out:
            metrics_out.close()
        ckpts.close()  # waits for an asynchronous save in flight
    first = losses[0] if losses else math.nan
    last = losses[-1] if losses else math.nan
    log(f"trained {len(losses)} steps in {time.perf_counter() - t_begin:.1f}s; "
        f"loss {first:.4f} -> {last:.4f}; last checkpoint: step {saved_step} in "
        f"{ckpts.directory}")
    result = RunResult(state, trainer, losses, first, last, ckpts.directory, stop.requested)
    if (cfg.model == "gpt" and cfg.serve_mesh and not stop.requested and saved_step == cfg.steps
            and jax.process_count() == 1):
        result.completion = serve_demo(ckpts.directory, cfg.serve_mesh, cfg.serve_prompt)
    return result


def serve_demo(ckpt_dir: str, mesh: str, prompt: str) -> str:
    """Restore the final checkpoint on another mesh and complete a prompt greedily."""
    from jaxmp.serve import Server

    server = Server(ckpt_dir, mesh)
    new = min(48, server.cfg.seq_len - len(server.encode(prompt)))
    out = server.generate([prompt], max_new_tokens=new, temperature=0.0)[0]
    text = server.decode_text(out.tokens)
    log(f"served step {server.step} on {format_mesh(server.mesh)} "
        f"(restored in {server.restore_seconds:.2f}s); greedy completion of {prompt!r}:")
    log(prompt + text)
    return text
