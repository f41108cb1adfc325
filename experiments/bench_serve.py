"""The serve suite: GPT-2 small's checkpoint save / restore, and KV-cache generation against
re-running the whole forward for every new token, on one device."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import analysis, bench_http
from experiments.bench_harness import (
    directory_bytes,
    gpt_trainer,
    kv_generation,
    log,
    saved_checkpoint,
    single_mesh,
)
from experiments.bench_results import Json, Target, mib, table
from jaxmp.checkpoint import Checkpoints
from jaxmp.models.gpt import GPTConfig, num_params, preset
from jaxmp.serve import Server


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


@dataclasses.dataclass(frozen=True)
class ServeResult:
    model: Json               # the GPT config and parameter count
    state_bytes: int          # the whole train state
    init_s: float
    checkpoint: Json          # save / restore seconds, size on disk
    generate_kv_cache: Json   # bench_harness.kv_generation
    generate_recompute: Json  # recompute_record
    http: Json | None = None  # bench_http.http_record: the completions server under load

    @property
    def kv_speedup(self) -> dict[str, float]:
        """{batch: KV-cache tokens/s over recompute tokens/s}."""
        kv, rc = self.generate_kv_cache["tokens_per_s"], self.generate_recompute["tokens_per_s"]
        return {b: kv[b] / rc[b] for b in kv}

    def to_json(self) -> Json:
        return {"serve": {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                          "kv_speedup": self.kv_speedup}}

    def table(self) -> str:
        c, m = self.checkpoint, self.model
        line = f"GPT {m['num_layers']} layers d={m['d_model']} ({m['params']:,} params); "
        if "source" in c:
            line += f"served from {c['source']}: loaded in {c['load_s']:.2f}s"
        else:
            line += (f"checkpoint {mib(c['size_on_disk_bytes'])} MiB on disk: save "
                     f"{c['save_s']:.2f}s, restore train state {c['restore_train_state_s']:.2f}s, "
                     f"restore params for serving {c['restore_params_for_serving_s']:.2f}s")
        kv, rc, up = self.generate_kv_cache, self.generate_recompute, self.kv_speedup
        rows = [[b, f"{kv['tokens_per_s'][b]:,.1f}", f"{rc['tokens_per_s'][b]:,.1f}",
                 f"{up[b]:.1f}", rc["matches_kv_cache"][b]] for b in kv["tokens_per_s"]]
        parts = [line, table(["batch", "KV tokens/s", "recompute tokens/s", "speed-up",
                              "same tokens"], rows), rc["note"]]
        return "\n".join(parts + ([bench_http.http_table(self.http)] if self.http else []))

    def targets(self) -> list[Target]:
        return bench_http.http_targets(self.http) if self.http else []


def serve_suite(quick: bool, source: str | None = None) -> ServeResult:
    """Checkpoint save / restore and generation of a fresh GPT-2, or generation of the
    model in `source` (a Hugging Face directory or a jaxmp checkpoint)."""
    s = SERVE_QUICK if quick else SERVE_FULL
    if source:
        return _serve_from(source, s)
    cfg = s.gpt()
    mesh = single_mesh()
    trainer = gpt_trainer(cfg, mesh)
    t0 = time.perf_counter()
    state = jax.block_until_ready(trainer.init_state())
    init_s = time.perf_counter() - t0
    abstract = trainer.abstract_state()
    with saved_checkpoint(state, cfg, mesh) as (path, save_s):
        ckpt: Json = {"save_s": save_s, "size_on_disk_bytes": directory_bytes(path)}
        del state
        t0 = time.perf_counter()
        restored = jax.block_until_ready(Checkpoints(path, create=False).restore(abstract))
        ckpt["restore_train_state_s"] = time.perf_counter() - t0
        del restored
        server = Server.from_checkpoint(path, "")
        ckpt["restore_params_for_serving_s"] = server.restore_seconds
        log(f"  serve: saved {ckpt['size_on_disk_bytes'] / 2**20:,.0f} MiB in "
            f"{save_s:.2f}s, restored the train state in {ckpt['restore_train_state_s']:.2f}s")
        kv = kv_generation(server, s.prompt, s.new_tokens, s.batches, s.repeats)
        recompute = recompute_record(server, s, cfg.vocab_size)
        http = bench_http.http_record(server)
    return ServeResult(model={**cfg.to_json(), "params": num_params(cfg)},
                       state_bytes=analysis.tree_bytes(abstract), init_s=init_s, checkpoint=ckpt,
                       generate_kv_cache=kv, generate_recompute=recompute, http=http)


def _serve_from(source: str, s: ServeSizes) -> ServeResult:
    server = Server.from_checkpoint(source, "")
    log(f"  serve: loaded {source} in {server.restore_seconds:.2f}s")
    cfg = server.cfg
    prompt = min(s.prompt, cfg.seq_len // 4)  # the sizes, within the model's context
    s = dataclasses.replace(s, prompt=prompt, new_tokens=min(s.new_tokens, cfg.seq_len - prompt),
                            recompute_tokens=min(s.recompute_tokens, cfg.seq_len - prompt))
    kv = kv_generation(server, s.prompt, s.new_tokens, s.batches, s.repeats)
    return ServeResult(model={**cfg.to_json(), "params": num_params(cfg)},
                       state_bytes=analysis.tree_bytes(server.params), init_s=0.0,
                       checkpoint={"source": source, "load_s": server.restore_seconds},
                       generate_kv_cache=kv,
                       generate_recompute=recompute_record(server, s, cfg.vocab_size),
                       http=bench_http.http_record(server))


def recompute_record(server: Server, s: ServeSizes, vocab_size: int) -> Json:
    """Recompute generation tokens/s per batch, and whether it picks the KV cache's tokens."""
    out: Json = {"new_tokens_timed": s.recompute_tokens, "tokens_per_s": {},
                 "matches_kv_cache": {},
                 "note": f"recompute timed over {s.recompute_tokens} new tokens "
                         f"(not {s.new_tokens}) on one fixed window of "
                         f"prompt + {s.recompute_tokens} positions"}
    rng = np.random.default_rng(1)
    for b in s.batches:
        prompts = rng.integers(0, vocab_size, (b, s.prompt)).astype(np.int32)
        toks, secs = recompute_generation(server, prompts, s.recompute_tokens)
        cached = [g.tokens for g in server.generate(prompts.tolist(), s.recompute_tokens)]
        out["tokens_per_s"][str(b)] = b * s.recompute_tokens / secs
        out["matches_kv_cache"][str(b)] = cached == toks
        log(f"  recompute batch {b}: {b * s.recompute_tokens / secs:,.1f} tokens/s")
    return out


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
