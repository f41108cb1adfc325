"""What the benchmark suites measure with: a GPT trainer on a mesh, a random token batch,
a timer, a checkpoint saved to a temporary directory, KV-cache generation through Server."""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from experiments.bench.results import Json
from jaxmp.checkpoint import CheckpointRecord, Checkpoints
from jaxmp.mesh import make_mesh
from jaxmp.models.gpt import GPT, GPTConfig, lm_loss
from jaxmp.pipeline import PipelineSpec
from jaxmp.run.console import log
from jaxmp.serve import Server
from jaxmp.sharding import DEFAULT_RULES
from jaxmp.train import OptConfig, Trainer


def timed(fn: Callable[[], Any]) -> float:
    """Seconds until `fn()`'s result is ready."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def step_ms(trainer: Trainer, compiled: Any, batch: dict, steps: int = 3) -> float:
    """Milliseconds per step of a compiled train step (one warm-up step first)."""
    state = trainer.init_state()
    placed = trainer.put_batch(batch)
    state, m = compiled(state, placed)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, m = compiled(state, placed)
    jax.block_until_ready(m)
    return (time.perf_counter() - t0) / steps * 1e3


def tokens_batch(batch: int, seq_len: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, vocab, (batch, seq_len + 1)).astype(np.int32)}


def single_mesh() -> jax.sharding.Mesh:
    return make_mesh("", devices=jax.devices()[:1])


def gpt_trainer(cfg: GPTConfig, mesh: jax.sharding.Mesh, pipe: PipelineSpec = PipelineSpec(),
                opt: OptConfig = OptConfig(), model: type = GPT, **trainer_options: Any) -> Trainer:
    """A Trainer of the language model `model` (GPT, or Llama with its config)."""
    return Trainer(lambda: model(cfg, rngs=nnx.Rngs(0), pipeline=pipe), lm_loss, mesh,
                   optimizer=opt, **trainer_options)


@contextlib.contextmanager
def saved_checkpoint(state: Any, cfg: GPTConfig, mesh: jax.sharding.Mesh,
                     ) -> Iterator[tuple[str, float]]:
    """Save `state` to a temporary directory: yields (directory, save seconds)."""
    with tempfile.TemporaryDirectory(prefix="jaxmp-bench-") as d:
        ckpts = Checkpoints(d)
        meta = CheckpointRecord.create("gpt", "blocks", cfg, mesh, DEFAULT_RULES, PipelineSpec())
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
        server = Server.from_checkpoint(path, "")
        return kv_generation(server, prompt, new, batches, repeats)


def kv_generation(server: Server, prompt: int, new: int, batches: Sequence[int],
                  repeats: int) -> Json:
    """Greedy KV-cache generation of `new` tokens after random prompts, per batch size:
    tokens/s of the median of `repeats` after a first (compiling) call."""
    rng = np.random.default_rng(0)
    out: Json = {"prompt_tokens": prompt, "new_tokens": new, "tokens_per_s": {},
                 "first_call_s": {}, "times_s": {}}
    for b in batches:
        prompts = rng.integers(0, server.cfg.vocab_size, (b, prompt)).tolist()
        out["first_call_s"][str(b)] = timed(lambda p=prompts: server.generate(p, new))
        times = [timed(lambda p=prompts: server.generate(p, new)) for _ in range(repeats)]
        t = statistics.median(times)
        out["times_s"][str(b)] = times
        out["tokens_per_s"][str(b)] = b * new / t
        log(f"  generate batch {b}: {b * new / t:,.1f} tokens/s (KV cache)")
    return out


def device_summary() -> str:
    d = jax.devices()
    kinds = sorted({x.device_kind for x in d})
    return f"{len(d)} x {'/'.join(kinds)} ({d[0].platform})"
