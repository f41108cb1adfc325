"""Shared set-up for the equivalence tests: one tiny GPT, one batch, cached results."""

from __future__ import annotations

import dataclasses
import functools
import os
import subprocess
import sys
from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPT, GPTConfig, lm_loss
from jaxmp.pipeline import PipelineSpec
from jaxmp.stack import LayerStack
from jaxmp.train import OptConfig, Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the entry points the tests start get as XLA_FLAGS (their --simulate_devices adds the
# device count): LLVM at -O0, as in this process (conftest)
CHILD_XLA_FLAGS = "--xla_backend_optimization_level=0"
# processes a test starts (`launched`): conftest kills those still running after the test,
# so a failed assertion never leaves a 100000-step run behind to slow the rest
LAUNCHED: list[subprocess.Popen] = []


def launched(proc: subprocess.Popen) -> subprocess.Popen:
    LAUNCHED.append(proc)
    return proc
CFG = GPTConfig(num_layers=8, d_model=32, num_heads=8, seq_len=16)
# Adam's eps is raised from 1e-8 for the comparisons: with eps=1e-8 an element whose
# gradient is ~1e-9 moves by ~lr/10, so the last-bit differences that any change of
# summation order makes (sharded vs single-device reductions) would move it by ~lr/100.
OPT = OptConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, eps=1e-6)
BATCH = 16
STEPS = 3


def batches(steps: int = STEPS, batch: int = BATCH, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.integers(0, CFG.vocab_size, (batch, CFG.seq_len + 1)).astype(np.int32)}
            for _ in range(steps)]


def trainer(mesh: str, pipe: PipelineSpec = PipelineSpec(), cfg: GPTConfig = CFG,
            opt: OptConfig = OPT, model: type = GPT, **kw) -> Trainer:
    """A Trainer of `model` (GPT, or Llama with a LlamaConfig) on `mesh` ("single": one
    device)."""
    m = make_mesh("", devices=jax.devices()[:1]) if mesh == "single" else make_mesh(mesh)
    return Trainer(lambda: model(cfg, rngs=nnx.Rngs(0), pipeline=pipe), lm_loss, m,
                   optimizer=opt, **kw)


def train(tr: Trainer, data: list[dict]) -> tuple[list[float], dict, list[float]]:
    """Per-step losses, final parameters, per-step gradient norms."""
    state = tr.init_state()
    losses, norms = [], []
    for b in data:
        state, m = tr.step(state, tr.put_batch(b))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    return losses, jax.device_get(state.params), norms


FAMILY = {GPT: "gpt"}  # the model classes helpers.run builds, by registry family name


def layout_trainer(mesh: str, p: int = 1, m: int = 1, r: int = 1, accum: int = 1, *,
                   shard_state: bool = True, sequence_parallel: bool = False,
                   gather_once: bool = False, model: type = GPT, cfg: Any = CFG,
                   opt: OptConfig = OPT, **layout: Any) -> tuple[Trainer, PipelineSpec]:
    """The Trainer `experiments.train` would build for these layout options: the options
    go into a RunConfig and through jaxmp.run.layout (mesh, pipeline, the rules that
    --sequence_parallel adds) and make_trainer, the functions the entry point calls, so a
    flag that stops reaching the code fails the tests that use this. ("single": one
    device.)"""
    from jaxmp import run as experiment
    from jaxmp.config import RunConfig
    from jaxmp.models import registry

    if "llama" not in FAMILY.values():
        from jaxmp.models.llama import Llama
        FAMILY[Llama] = "llama"
    run_cfg = RunConfig.flat(
        mesh="" if mesh == "single" else mesh, microbatches=m, pipeline_repeats=r,
        shard_state=shard_state, sequence_parallel=sequence_parallel,
        pipeline_fsdp_gather_once=gather_once, batch_size=BATCH, steps=opt.total_steps, seed=0,
        **layout)
    run_cfg.optimizer = OptConfig(**{**opt.__dict__, "grad_accum_steps": accum})
    run_cfg.validate()
    family = registry.get(FAMILY[model])
    devices = jax.devices()[:1] if mesh == "single" else None
    m_, pipe, rules = experiment.layout(run_cfg, family, cfg, devices)
    assert pipe.stages == p, (mesh, p)
    return experiment.make_trainer(run_cfg, family, cfg, m_, pipe, rules), pipe


@functools.cache
def run(mesh: str, p: int = 1, m: int = 1, r: int = 1, layers: int = CFG.num_layers,
        accum: int = 1, *, shard_state: bool = True, sequence_parallel: bool = False,
        gather_once: bool = False, model: type = GPT, cfg: Any = None,
        schedule: str = "gpipe", remat: str | None = None,
        ) -> tuple[list[float], dict, list[float]]:
    """Per-step losses, final parameters (canonical layer order) and per-step gradient
    norms of STEPS steps (with the layout options of jaxmp.config.LayoutConfig, through
    the entry point's own functions: layout_trainer) of `model` with `cfg` (default: CFG
    with `layers` layers)."""
    cfg = cfg or GPTConfig(**{**CFG.to_json(), "num_layers": layers})
    if remat is not None:
        cfg = dataclasses.replace(cfg, remat=remat)
    tr, pipe = layout_trainer(mesh, p, m, r, accum, shard_state=shard_state,
                              sequence_parallel=sequence_parallel, gather_once=gather_once,
                              model=model, cfg=cfg, pipeline_schedule=schedule)
    losses, params, norms = train(tr, batches())
    return losses, canonical(params, pipe, cfg), norms


def canonical(params: dict, pipe: PipelineSpec, cfg: GPTConfig = CFG) -> dict:
    """GPT parameters (or gradients) with the decoder blocks in canonical layer order."""
    return LayerStack(cfg.num_layers, pipe).canonical_params(params, "blocks")


def assert_same_run(got: tuple, ref: tuple, param_atol: float = 1e-6) -> None:
    """Losses and gradient norms (rtol 1e-5), parameters (rtol 1e-4, atol 1e-6 unless
    said)."""
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-5)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=param_atol), got[1],
        ref[1])


@functools.cache
def _reference_grads() -> tuple[float, dict]:
    tr = trainer("single")
    loss, g = tr.grads(tr.init_state().params, tr.put_batch(batches(1)[0]))
    return float(loss), jax.device_get(g)


def assert_same_grads(mesh: str, pipe: PipelineSpec = PipelineSpec(), accum: int = 1) -> float:
    """Loss and gradients of one batch on `mesh` (gradient accumulation in `accum` parts;
    built through the entry point's layout path) equal the single-device whole-batch ones:
    rtol 1e-5 per element, and for elements much smaller than their tensor (sums that
    cancel) 1e-5 of the tensor's largest gradient (float32 sums in another order). The
    evaluation loss of the same batch (the step's layout and accumulation parts, no
    gradients) equals the loss too. Returns the largest relative difference seen."""
    ref_loss, ref_g = _reference_grads()
    tr, _ = layout_trainer(mesh, pipe.stages, pipe.microbatches, pipe.repeats, accum)
    params, batch = tr.init_state().params, tr.put_batch(batches(1)[0])
    loss, g = tr.grads(params, batch)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(float(tr.compiled_eval(batch)(params, batch)), ref_loss, rtol=1e-6)
    g = canonical(jax.device_get(g), pipe)
    worst = []

    def check(a: np.ndarray, b: np.ndarray) -> None:
        scale = np.abs(b).max()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale)
        worst.append(float(np.abs(a - b).max() / scale) if scale else 0.0)
    jax.tree_util.tree_map(check, g, ref_g)
    return max(worst)


def trained_checkpoint(directory: Any, **settings: Any) -> str:
    """A run trained through the Python API (jaxmp.run.train) with these flag settings,
    checkpointed in `directory`/run (for module-scoped serving fixtures)."""
    from jaxmp.config import RunConfig
    from jaxmp.run import train as train_run

    d = os.path.join(str(directory), "run")
    train_run(RunConfig.flat(**{"steps": 2, "log_every": 1, **settings, "ckpt_dir": d}))
    return d


def engine_completions(server: Any, prompts: list[str], lengths: list[int],
                       model_name: str = "jaxmp") -> list[str]:
    """Greedy completions of `prompts` sent together over HTTP to a continuous-batching
    engine (4 slots of 32 positions) on `server`: the reply texts, in order."""
    import asyncio

    import httpx

    from jaxmp.engine import Engine
    from jaxmp.http import HTTPLimits, running

    engine = Engine(server, slots=4, max_len=32, prefix_cache_tokens=0)
    engine.start()  # no warm-up: only the programs these requests need are compiled

    async def ask(url):
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*[client.post(f"{url}/v1/completions", json={
                "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True})
                for p, n in zip(prompts, lengths)])
    try:
        with running(engine, HTTPLimits(model_name=model_name)) as url:
            replies = asyncio.run(ask(url))
    finally:
        engine.stop()
    return [r.json()["choices"][0]["text"] for r in replies]


def run_module(*args: str, timeout: int = 600, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run `python -m <args>` from the repository root; raise with its output on failure."""
    e = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    e["XLA_FLAGS"] = CHILD_XLA_FLAGS
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
