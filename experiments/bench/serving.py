"""The serve suite: GPT-2 small's checkpoint save / restore, and KV-cache generation against
re-running the whole forward for every new token, on one device."""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import http_load as bench_http
from experiments.bench.harness import (
    directory_bytes,
    gpt_trainer,
    kv_generation,
    log,
    saved_checkpoint,
    single_mesh,
    timed,
)
from experiments.bench.results import Json, Target, mib, table
from jaxmp.checkpoint import Checkpoints
from jaxmp.models.gpt import GPTConfig, num_params, preset
from jaxmp.plan import analysis
from jaxmp.serve import Server, bucket


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
    roofline: Json | None = None  # decode_roofline: KV-cache tokens/s vs memory bandwidth

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
        if self.roofline:
            parts.append(roofline_table(self.roofline))
        return "\n".join(parts + ([bench_http.http_table(self.http)] if self.http else []))

    def targets(self) -> list[Target]:
        out = roofline_targets(self.roofline) if self.roofline else []
        return out + (bench_http.http_targets(self.http) if self.http else [])


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
        roofline = decode_roofline(server, kv, quick)
        recompute = recompute_record(server, s, cfg.vocab_size)
        http = bench_http.http_record(server)
    return ServeResult(model={**cfg.to_json(), "params": num_params(cfg)},
                       state_bytes=analysis.tree_bytes(abstract), init_s=init_s, checkpoint=ckpt,
                       generate_kv_cache=kv, generate_recompute=recompute, http=http,
                       roofline=roofline)


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
                       http=bench_http.http_record(server),
                       roofline=decode_roofline(server, kv, quick=False))


# ====================================================================== decode roofline
def read_bandwidth(nbytes: int, repeats: int = 5) -> Json:
    """The machine's memory read bandwidth, measured in this run by XLA programs that only
    stream an array in: a sum over `nbytes` of float32, and a (1, K) x (K, N) matrix-vector
    product over a matrix of nbytes (what a batch-1 decode step is made of). Best of
    `repeats` each; the faster of the two is the bound."""
    n = nbytes // 4
    x = jnp.ones((n,), jnp.float32)
    total = jax.jit(jnp.sum)
    k = 4096
    w = jnp.ones((k, n // k), jnp.float32)
    v = jnp.ones((1, k), jnp.float32)
    gemv = jax.jit(lambda v, w: v @ w)
    out: Json = {"array_bytes": nbytes}
    for name, fn, args in (("sum", total, (x,)), ("gemv", gemv, (v, w))):
        jax.block_until_ready(fn(*args))
        best = min(timed(lambda f=fn, a=args: f(*a)) for _ in range(repeats))
        out[f"{name}_bytes_per_s"] = 4 * n / best
    out["bytes_per_s"] = max(out["sum_bytes_per_s"], out["gemv_bytes_per_s"])
    return out


def decode_bytes(server: Server, cache_len: int) -> tuple[int, int]:
    """(weight bytes, KV-cache bytes per row) one greedy decode step must read: every
    parameter once (the tied embedding whole, as the LM head), except the position table,
    of which one row per sequence; and each row's whole cache (attention reads every
    position of it, masked), keys and values of every layer."""
    params = jax.tree_util.tree_leaves_with_path(server.params)
    weights = sum(x.nbytes for p, x in params if "wpe" not in jax.tree_util.keystr(p))
    c = server.cfg
    kv = 2 * c.num_layers * cache_len * c.num_heads * c.head_dim * jnp.dtype(c.dtype).itemsize
    return weights, kv


def decode_roofline(server: Server, kv: Json, quick: bool) -> Json:
    """KV-cache generation tokens/s (kv_generation's) against the memory-bandwidth bound:
    a step of batch B reads the weights once and B rows of cache, and emits B tokens."""
    bandwidth = read_bandwidth((64 if quick else 512) * 2**20)
    cache_len = min(server.cfg.seq_len, bucket(kv["prompt_tokens"], 8)
                    + bucket(kv["new_tokens"], 8))
    weights, per_row = decode_bytes(server, cache_len)
    rows: Json = {}
    for b, measured in kv["tokens_per_s"].items():
        step = weights + int(b) * per_row
        bound = int(b) * bandwidth["bytes_per_s"] / step
        rows[b] = {"bytes_per_step": step, "bound_tokens_per_s": bound,
                   "tokens_per_s": measured, "fraction": measured / bound}
        log(f"  roofline batch {b}: {measured:,.1f} of {bound:,.1f} tokens/s "
            f"({measured / bound:.0%}; {step / 2**20:,.0f} MiB per step at "
            f"{bandwidth['bytes_per_s'] / 1e9:.1f} GB/s)")
    speeds = kv["tokens_per_s"]
    return {"bandwidth": bandwidth, "weight_bytes": weights, "kv_bytes_per_row": per_row,
            "cache_len": cache_len, "batches": rows,
            "scaling": ({"batch": max(speeds, key=int), "over_batch_1":
                         speeds[max(speeds, key=int)] / speeds["1"]} if "1" in speeds else None)}


def roofline_table(r: Json) -> str:
    bw = r["bandwidth"]
    head = (f"decode roofline: read bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s (sum "
            f"{bw['sum_bytes_per_s'] / 1e9:.1f}, matrix-vector {bw['gemv_bytes_per_s'] / 1e9:.1f}); "
            f"weights {r['weight_bytes'] / 2**20:,.0f} MiB + KV cache "
            f"{r['kv_bytes_per_row'] / 2**20:.1f} MiB per row ({r['cache_len']} positions) per step")
    rows = [[b, f"{x['bytes_per_step'] / 2**20:,.0f}", f"{x['bound_tokens_per_s']:,.1f}",
             f"{x['tokens_per_s']:,.1f}", f"{x['fraction']:.2f}"] for b, x in r["batches"].items()]
    return "\n".join([head, table(["batch", "MiB/step", "bound tok/s", "tok/s", "fraction"],
                                   rows)])


def roofline_targets(r: Json) -> list[Target]:
    out = []
    one = r["batches"].get("1")
    if one:
        out.append(Target("decode tokens/s >= 0.75 x memory-bandwidth bound at batch 1",
                          "GPT-2, one device", one["fraction"], 0.75, one["fraction"] >= 0.75))
    sc = r["scaling"]
    if sc and sc["batch"] == "8":
        out.append(Target("decode tokens/s at batch 8 >= 3.5 x batch 1", "GPT-2, one device",
                          sc["over_batch_1"], 3.5, sc["over_batch_1"] >= 3.5))
    return out


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
