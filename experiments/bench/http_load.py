"""The serve suite's HTTP part: the OpenAI completions server (continuous batching) under
concurrent clients, against offline `Server.generate` on the same prompts.

Mixed lengths: request i has a prompt of 8..40 tokens and asks for 16..64 new tokens (a
fixed pattern); concurrency c means c clients each sending its share of the requests one
after another. Tokens/s counts generated tokens over the wall time; latency is per
request. The offline comparison sends every request with the same max_tokens, so both
do the same work: 16 requests at once against one batch-16 `generate` call. The prefix
cache's row: time to first token with a long shared prefix, missed and hit.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import numpy as np

from experiments.bench.harness import log
from experiments.bench.results import Json, Target
from jaxmp.engine import Engine
from jaxmp.http import running
from jaxmp.serve import Server

CONCURRENCY = (1, 4, 16)


def requests(server: Server, count: int, longest: int) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(count):
        plen = 8 + (i * 7) % 33
        new = min(16 + (i * 13) % 49, longest)
        out.append({"prompt": rng.integers(0, server.cfg.vocab_size, plen).tolist(),
                    "max_tokens": new, "temperature": 0})
    return out


async def _drive(url: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, generated tokens)."""
    todo = list(bodies)
    latencies: list[float] = []
    tokens = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while todo:
            body = todo.pop(0)
            t0 = time.perf_counter()
            r = await http.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            tokens += r.json()["usage"]["completion_tokens"]
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    return time.perf_counter() - t0, latencies, tokens


def http_record(server: Server, count: int = 16, longest: int = 64, slots: int = 16) -> Json:
    longest = min(longest, server.cfg.seq_len - 41)
    # the slots' cache as long as the offline call's (prompt bucket 64 + new-token bucket)
    max_len = min(server.cfg.seq_len, 64 + max(8, 1 << (longest - 1).bit_length()))
    engine = Engine(server, slots=slots, max_len=max_len)
    engine.warm_up()
    engine.start()
    out: Json = {"requests": count, "prompt_tokens": "8..40", "new_tokens": f"16..{longest}",
                 "slots": slots, "max_len": max_len, "concurrency": {}}
    try:
        with running(engine) as url:
            bodies = requests(server, count, longest)
            asyncio.run(_drive(url, bodies[:2], 2))  # first requests: connections, caches
            for c in CONCURRENCY:
                wall, lat, tokens = asyncio.run(_drive(url, bodies, c))
                lat.sort()
                row = {"tokens_per_s": tokens / wall, "p50_s": statistics.median(lat),
                       "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))], "wall_s": wall,
                       "tokens": tokens}
                out["concurrency"][str(c)] = row
                log(f"  http concurrency {c}: {row['tokens_per_s']:,.1f} tokens/s, p50 "
                    f"{row['p50_s']:.2f}s, p99 {row['p99_s']:.2f}s")
            same = [{**b, "max_tokens": longest} for b in bodies]
            wall, _, tokens = asyncio.run(_drive(url, same, 16))
            out["equal_lengths_c16_tokens_per_s"] = tokens / wall
    finally:
        engine.stop()
    prompts = [b["prompt"] for b in bodies]
    server.generate(prompts, max_new_tokens=longest)  # compile
    t0 = time.perf_counter()
    server.generate(prompts, max_new_tokens=longest)
    out["offline_batch16_tokens_per_s"] = len(prompts) * longest / (time.perf_counter() - t0)
    log(f"  http equal lengths c=16: {out['equal_lengths_c16_tokens_per_s']:,.1f} tokens/s; "
        f"offline generate batch 16: {out['offline_batch16_tokens_per_s']:,.1f}")
    out["prefix_cache"] = prefix_record(server)
    return out


def prefix_record(server: Server, prefix: int = 1024, suffix: int = 16,
                  repeats: int = 3) -> Json:
    """Time to first token (a request for one new token, end to end over HTTP) for a prompt
    of `prefix` shared tokens + `suffix` own ones: a miss (a prefix never seen) against a
    hit (the prefix cached by an earlier request); medians of `repeats`."""
    prefix = min(prefix, server.cfg.seq_len - suffix - 1)
    engine = Engine(server, slots=4, prefix_cache_tokens=2 * (prefix + suffix))
    engine.warm_up()
    engine.start()
    rng = np.random.default_rng(1)
    fresh = lambda n: rng.integers(0, server.cfg.vocab_size, n).tolist()

    def ttft(url: str, prompt: list[int]) -> tuple[float, int]:
        t0 = time.perf_counter()
        r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1,
                                                      "temperature": 0}, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    try:
        with running(engine) as url:
            ttft(url, fresh(8))  # the connection
            miss, hit, cached = [], [], 0
            for _ in range(repeats):
                shared = fresh(prefix)
                miss.append(ttft(url, shared + fresh(suffix))[0])  # caches the prefix
                dt, cached = ttft(url, shared + fresh(suffix))
                hit.append(dt)
    finally:
        engine.stop()
    out = {"prefix_tokens": prefix, "suffix_tokens": suffix, "cached_tokens": cached,
           "miss_ttft_s": statistics.median(miss), "hit_ttft_s": statistics.median(hit)}
    out["speedup"] = out["miss_ttft_s"] / out["hit_ttft_s"]
    log(f"  prefix cache: TTFT {out['miss_ttft_s'] * 1e3:,.1f} ms on a miss, "
        f"{out['hit_ttft_s'] * 1e3:,.1f} ms on a hit of {cached} of {prefix + suffix} tokens "
        f"({out['speedup']:.1f}x)")
    return out


def http_targets(h: Json) -> list[Target]:
    c = h["concurrency"]
    scale = c["16"]["tokens_per_s"] / c["1"]["tokens_per_s"]
    share = h["equal_lengths_c16_tokens_per_s"] / h["offline_batch16_tokens_per_s"]
    p = h["prefix_cache"]["speedup"]
    return [Target("http tokens/s at concurrency 16 / concurrency 1 >= 4", "serve", scale, 4.0,
                   scale >= 4.0),
            Target("time to first token, prefix-cache miss / hit >= 5", "serve", p, 5.0, p >= 5.0),
            Target("http tokens/s at c=16 / offline generate batch 16 >= 0.9", "serve", share,
                   0.9, share >= 0.9)]


def http_table(h: Json) -> str:
    from experiments.bench.results import table

    rows = [[c, f"{r['tokens_per_s']:,.1f}", f"{r['p50_s']:.2f}", f"{r['p99_s']:.2f}"]
            for c, r in h["concurrency"].items()]
    return "\n".join([
        f"HTTP server ({h['requests']} requests, prompts {h['prompt_tokens']} tokens, "
        f"{h['new_tokens']} new, {h['slots']} slots of {h['max_len']} positions):",
        table(["concurrency", "tokens/s", "p50 s", "p99 s"], rows),
        f"equal lengths at c=16: {h['equal_lengths_c16_tokens_per_s']:,.1f} tokens/s vs offline "
        f"generate batch 16: {h['offline_batch16_tokens_per_s']:,.1f} "
        f"({h['equal_lengths_c16_tokens_per_s'] / h['offline_batch16_tokens_per_s']:.0%})",
        f"time to first token, {h['prefix_cache']['prefix_tokens']}-token shared prefix + "
        f"{h['prefix_cache']['suffix_tokens']}: {h['prefix_cache']['miss_ttft_s'] * 1e3:,.1f} ms "
        f"on a miss, {h['prefix_cache']['hit_ttft_s'] * 1e3:,.1f} ms on a hit "
        f"({h['prefix_cache']['speedup']:.1f}x)"])
