"""The HTTP server for real: uvicorn on an ephemeral 127.0.0.1 port, clients on httpx,
serving the Hugging Face fixture (a tokenizer, so text in and out).

Bugs these catch: a slot whose cache rows or position leak into another request (the
concurrent requests would differ from generating each alone), a stream that differs from
the plain answer, prompt log-probabilities off by one position (lm-evaluation-harness's
scores), a stop sequence cut in the wrong place, unseeded sampling, an error that kills
the server or returns a stack trace, a cancelled request that keeps its slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import helpers
import httpx
import jax
import numpy as np
import pytest
from helpers import ROOT
from test_hf import TINY

from jaxmp.engine import Engine
from jaxmp.http import HTTPLimits, running
from jaxmp.serve import Server

PROMPTS = ["def main(argv):", "Hello", "naïve café", "x", "import json\nprint(",
           "The quick brown fox jumps over", "class A:\n    def f(self):", "1 + 1 =",
           "for i in range(10):\n   ", "a b c d e f g", "return", "    # comment",
           "if __name__ == '__main__':", "print('hi')", "while True:", "[1, 2, 3]"]
MAX_TOKENS = [1, 3, 20, 7, 12, 2, 16, 9, 5, 20, 11, 4, 8, 15, 6, 10]


MODEL = "tiny-gpt2"  # the served name (not the default), which every reply must carry


@contextlib.contextmanager
def serving(mesh: str = "", *, slots: int = 4, max_queue: int = 64, max_len: int = 32,
            prefix_cache_tokens: int | None = None, **limits):
    server = Server.from_checkpoint(TINY, mesh)
    engine = Engine(server, slots=slots, max_queue=max_queue, max_len=max_len,
                    prefix_cache_tokens=prefix_cache_tokens)
    engine.warm_up()
    engine.start()
    try:
        with running(engine, HTTPLimits(**{"model_name": MODEL, **limits})) as url:
            yield url, server, engine
    finally:
        engine.stop()


def _post(url, body, **kw):
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120, **kw)


async def _concurrent(url, bodies):
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*[client.post(f"{url}/v1/completions", json=b)
                                      for b in bodies])


def _expected_tokens(server, prompts, max_tokens):
    """Server.generate of each prompt alone (one batched call: tested equal to alone), cut
    at the end-of-text token (where a completion ends)."""
    outs = server.generate(prompts, max_new_tokens=max(max_tokens))
    eos = server.codec.end_of_text()
    cut = lambda t: t[:t.index(eos)] if eos in t else t
    return [cut(o.tokens[:m]) for o, m in zip(outs, max_tokens)]


def _expected(server, prompts, max_tokens):
    return [server.decode_text(t) for t in _expected_tokens(server, prompts, max_tokens)]


def _check_concurrent(url, server):
    bodies = [{"prompt": p, "max_tokens": m, "temperature": 0} for p, m in zip(PROMPTS, MAX_TOKENS)]
    replies = asyncio.run(_concurrent(url, bodies))
    assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
    got = [r.json()["choices"][0]["text"] for r in replies]
    assert got == _expected(server, PROMPTS, MAX_TOKENS)
    usage = [r.json()["usage"]["completion_tokens"] for r in replies]
    assert usage == [len(t) for t in _expected_tokens(server, PROMPTS, MAX_TOKENS)]


def test_sixteen_concurrent_requests_equal_generating_each_alone(one):
    url, server, engine = one
    before = engine.steps
    _check_concurrent(url, server)
    # 16 requests through 4 slots: far fewer decode steps than requests x tokens
    assert engine.steps - before < sum(MAX_TOKENS) / 2


@pytest.mark.slow
@pytest.mark.parametrize("mesh", ["data:2,tensor:2"])  # (tensor:2: the SDK test's mesh)
def test_concurrent_requests_on_sharded_meshes(mesh):
    with serving(mesh, slots=4) as (url, server, _):
        _check_concurrent(url, server)


def _stream(url, body):
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
    assert chunks[-1] == "[DONE]"
    return [json.loads(c) for c in chunks[:-1]]


def test_streaming_returns_the_same_tokens(one):
    url, _, _ = one
    body = {"prompt": "naïve café 東京", "max_tokens": 12, "temperature": 0, "logprobs": 1}
    plain = _post(url, body).json()["choices"][0]
    chunks = _stream(url, body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["text"]
    streamed = [t for c in chunks if c["choices"][0]["logprobs"]
                for t in c["choices"][0]["logprobs"]["tokens"]]
    assert streamed == plain["logprobs"]["tokens"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_echo_logprobs_equal_the_log_softmax_of_predict(one):
    """lm-evaluation-harness's loglikelihood request: echo, max_tokens 0, logprobs."""
    url, server, _ = one
    text = "def main(argv):\n    return 0"
    r = _post(url, {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": 1})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    ids = server.encode(text)
    logits = np.asarray(server.predict([ids]))[0, :, :server.cfg.vocab_size]
    want = jax.nn.log_softmax(logits, axis=-1)[np.arange(len(ids) - 1), ids[1:]]
    assert lp["token_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:], want, atol=2e-5)
    assert "".join(lp["tokens"]) == text == r.json()["choices"][0]["text"]
    # the same with max_tokens=1 (what newer harness versions send): prompt scores unchanged
    r1 = _post(url, {"prompt": text, "max_tokens": 1, "echo": True, "logprobs": 1,
                     "temperature": 0}).json()["choices"][0]["logprobs"]
    np.testing.assert_allclose(r1["token_logprobs"][1:len(ids)], want, atol=2e-5)
    assert len(r1["tokens"]) == len(ids) + 1


def test_stop_sequences_cut_where_they_should(one):
    url, server, _ = one
    full = _post(url, {"prompt": "def main(", "max_tokens": 24, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text[5:8]
    assert len(stop) == 3 and stop in text
    cut = _post(url, {"prompt": "def main(", "max_tokens": 24, "temperature": 0,
                      "stop": [stop, "never-there"]}).json()["choices"][0]
    assert cut["text"] == text[:text.index(stop)] and cut["finish_reason"] == "stop"
    streamed = _stream(url, {"prompt": "def main(", "max_tokens": 24, "temperature": 0,
                             "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in streamed) == cut["text"]


def test_n_with_a_seed_is_reproducible(one):
    url, _, _ = one
    body = {"prompt": ["Hello", "x = "], "max_tokens": 12, "temperature": 1.0, "top_p": 0.9,
            "top_k": 50, "n": 3, "seed": 7}
    a, b = _post(url, body).json(), _post(url, body).json()
    texts = [c["text"] for c in a["choices"]]
    assert texts == [c["text"] for c in b["choices"]]
    assert [c["index"] for c in a["choices"]] == list(range(6))
    assert len(set(texts[:3])) > 1  # the choices of one prompt differ
    other = _post(url, {**body, "seed": 8}).json()
    assert [c["text"] for c in other["choices"]] != texts


def test_models_and_health(one):
    url, _, engine = one
    assert httpx.get(f"{url}/health").json()["slots"] == engine.slots
    assert httpx.get(f"{url}/v1/models").json()["data"][0]["context_length"] == engine.max_len == 64


BAD = [
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "x", "max_tokens": "five"}, 400, "'max_tokens' must be int"),
    ({"prompt": "x", "temprature": 0.5}, 400, "unknown field 'temprature'"),
    ({"prompt": "x", "max_tokens": 100}, 400, "exceeds the context of 32 tokens by 69"),
    ({"prompt": [1, 2, 999]}, 400, "token ids must be in [0, 500)"),
    ({"prompt": "x", "logprobs": 21}, 400, "'logprobs'=21 must be in [0, 20]"),
    ({"max_tokens": 3}, 400, "'prompt' is required"),
    ({"prompt": "x", "presence_penalty": 1.0}, 400, "'presence_penalty'=1.0 is not supported"),
    ({"prompt": "x", "n": 40, "max_tokens": 1}, 400, "exceeds the limit of 16 completions"),
    ({"prompt": "x" * 3000}, 413, "the limit of 2048 bytes"),
]


@pytest.mark.slow
def test_bad_requests_get_one_line_json_errors_and_the_server_keeps_serving():
    with serving("", slots=2, api_key="sekrit", max_body_bytes=2048, max_prompts=16) as (url, _, _):
        auth = {"Authorization": "Bearer sekrit"}
        for body, status, msg in BAD:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            r = httpx.post(f"{url}/v1/completions", headers=auth, timeout=60, **kw)
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert msg in err["message"] and "\n" not in err["message"], err
            assert "Traceback" not in r.text
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = _post(url, {"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = _post(url, {"prompt": "x", "max_tokens": 2}, headers=auth)
        assert r.status_code == 200 and len(r.json()["choices"]) == 1


@pytest.mark.slow
def test_a_full_queue_answers_429_and_disconnects_free_their_slots():
    with serving("", slots=2, max_queue=1) as (url, _, engine):
        bodies = [{"prompt": "a", "max_tokens": 30, "temperature": 0}] * 6
        replies = asyncio.run(_concurrent(url, bodies))
        codes = sorted(r.status_code for r in replies)
        assert codes.count(429) >= 1 and codes.count(200) >= 3, codes  # 2 slots + 1 queued
        busy = [r for r in replies if r.status_code == 429][0].json()["error"]
        assert "queue is full" in busy["message"]
        # a streaming client that goes away: its slot is free again at once
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"prompt": "a", "max_tokens": 30, "stream": True}) as r:
            next(r.iter_lines())
        deadline = time.time() + 10
        while engine.active and time.time() < deadline:
            time.sleep(0.05)
        assert not engine.active
        assert _post(url, {"prompt": "b", "max_tokens": 2}).status_code == 200


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_zero(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["XLA_FLAGS"] = helpers.CHILD_XLA_FLAGS
    template = tmp_path / "chat.jinja"  # --chat_template replaces the model's own
    template.write_text("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    proc = subprocess.Popen([sys.executable, "-m", "experiments.serve", f"--ckpt_dir={TINY}",
                             f"--http={port}", "--slots=2", "--simulate_devices=1",
                             f"--chat_template={template}", "--prefix_cache_tokens=0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "serving http://127.0.0.1" in line:
                break
        else:
            pytest.fail("the server never started:\n" + "".join(seen[-20:]))
        # the socket listens before the line is printed: no retry needed
        chat = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).json()
        from jaxmp.tokenizer import TextCodec, read_tokenizer

        codec = TextCodec(500, read_tokenizer(TINY))
        assert chat["usage"]["prompt_tokens"] == len(codec.encode_text("<user>Hi"))
        health = httpx.get(f"http://127.0.0.1:{port}/health").json()
        assert health["prefix_cache"]["capacity_blocks"] == 0
        # a streamed request is in flight from its first chunk to [DONE]: SIGTERM in between
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "a", "max_tokens": 60, "temperature": 0,
                                "ignore_eos": True, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [first, *lines]
        events = [json.loads(x[6:]) for x in rest if x.startswith("data: {")]
        assert [x for x in rest if x][-1] == "data: [DONE]"
        assert events[-1]["usage"]["completion_tokens"] == 60
        assert proc.wait(60) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_http_benchmark_counts_what_it_asked_for():
    from experiments.bench import http_load as bench_http

    server = Server.from_checkpoint(TINY, "")
    h = bench_http.http_record(server, count=4, longest=20, slots=4)
    asked = sum(b["max_tokens"] for b in bench_http.requests(server, 4, 20))
    for c in ("1", "4", "16"):
        row = h["concurrency"][c]
        assert row["tokens"] == asked and 0 < row["p50_s"] <= row["p99_s"] <= row["wall_s"]
    assert h["equal_lengths_c16_tokens_per_s"] > 0 and h["offline_batch16_tokens_per_s"] > 0
    p = h["prefix_cache"]
    assert p["cached_tokens"] == p["prefix_tokens"] // 16 * 16 > 0 and p["speedup"] > 0
    assert {t.target for t in bench_http.http_targets(h)} == {
        "http tokens/s at concurrency 16 / concurrency 1 >= 4",
        "time to first token, prefix-cache miss / hit >= 5",
        "http tokens/s at c=16 / offline generate batch 16 >= 0.9"}


def test_a_shorter_slot_cache_bounds_requests(one):
    from jaxmp.engine import Request
    from jaxmp.serve import ServeError

    _, server, _ = one
    engine = Engine(server, slots=2, max_len=32)
    assert engine.cache[0].shape[2] == 32
    with pytest.raises(ServeError, match="exceeds the context of 32 tokens by 3"):
        engine.submit(Request(list(range(30)), max_tokens=5))
    with pytest.raises(ValueError, match="max_len=100 must be in"):
        Engine(server, max_len=100)


def test_the_port_listens_before_loading_and_a_port_in_use_is_refused():
    """Catches a `serving` line printed before the socket listens (a client that connects at
    once is refused) and a port in use found only after minutes of loading."""
    from experiments.serve import listen
    from jaxmp.config import ServeConfig

    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    sock = listen(ServeConfig(http=port))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the backlog holds it: nothing has called accept yet
        with pytest.raises(ValueError, match=f"--http={port}: cannot listen on 127.0.0.1"):
            listen(ServeConfig(http=port))
    finally:
        sock.close()
