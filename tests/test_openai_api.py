"""The HTTP server as real clients see it: the official `openai` SDK (sync, async,
streaming, its exception classes), chat completions with the model's template, the
prefix cache, disconnects, request isolation and compiles after warm-up.

Bugs these catch: a middleware that hides disconnects (a dropped client keeps its slot
until its tokens run out), a request whose bad input fails the requests prefilled with
it, seeds cut to 32 bits (2^32 samples like 0) or refused above 2^63, a lone surrogate
that reaches the tokenizer (500), a text prompt read as ids, streamed chunks that name
another model, stream_options / user refused, 404/405 bodies that are not OpenAI's error
object, /v1/models without created/owned_by, a chat prompt that differs from
transformers' apply_chat_template, a prefix-cache hit that changes tokens or
log-probabilities (wrong positions, blocks of another prompt, an evicted block read
back), prompt scores of an echo hit taken from the wrong position, a compile per request
(the first request on one device, echo's scoring program, a new length).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import httpx
import jax
import numpy as np
import openai
import pytest
from test_hf import TINY
from test_http import MODEL, PROMPTS, _expected, _post, _stream

from jaxmp.chat import ChatTemplate, read_chat, read_template_file
from jaxmp.engine import Request
from jaxmp.serve import seed_key_data

GOLDEN = os.path.join(os.path.dirname(__file__), "fixtures", "hf_chat_golden.json")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def _golden() -> list[dict]:
    with open(GOLDEN, encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------- chat template
def test_chat_template_renders_what_transformers_renders():
    """Golden text and ids from transformers' apply_chat_template (the fixture script)."""
    chat = read_chat(TINY)
    assert chat["eos_token"] == chat["bos_token"] == "<|endoftext|>"
    template = ChatTemplate(chat)
    from jaxmp.tokenizer import TextCodec, read_tokenizer

    codec = TextCodec(500, read_tokenizer(TINY))
    for g in _golden():
        text = template.render(g["messages"])
        assert text == g["text"]
        assert codec.encode_text(text) == g["ids"]


def test_chat_template_file_and_errors(tmp_path):
    base = read_chat(TINY)
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                    "{{ eos_token }}")
    chat = read_template_file(str(path), base)
    assert ChatTemplate(chat).render([{"role": "user", "content": "hi"}]) == \
        "[user]hi<|endoftext|>"
    path.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="does not parse"):
        read_template_file(str(path), base)
    with pytest.raises(ValueError, match="no such file"):
        read_template_file(str(tmp_path / "missing.jinja"), base)


# ---------------------------------------------------------------- the SDK
def test_openai_sdk_completions_sync_async_and_streaming(one):
    url, server, _ = one
    client = _client(url)
    want = _expected(server, PROMPTS[:3], [6, 6, 6])
    for prompt, text in zip(PROMPTS[:3], want):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                      user="someone")
        assert r.choices[0].text == text and r.model == MODEL
        assert r.usage.completion_tokens == 6
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=6,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert {c.model for c in chunks} == {MODEL}
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*[
            aclient.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0)
            for p in PROMPTS[:3]])
        stream = await aclient.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=6,
                                                  temperature=0, stream=True)
        streamed = "".join([c.choices[0].text async for c in stream])
        await aclient.close()
        return [r.choices[0].text for r in replies], streamed
    texts, streamed = asyncio.run(run())
    assert texts == want and streamed == want[0]


def test_openai_sdk_chat_sync_async_streaming_and_logprobs(one):
    url, server, _ = one
    client = _client(url)
    g = _golden()[0]
    out = server.generate([g["ids"]], max_new_tokens=8)[0].tokens
    eos = server.codec.end_of_text()
    cut = out.index(eos) if eos in out else len(out)
    want = server.decode_text(out[:cut])
    r = client.chat.completions.create(model=MODEL, messages=g["messages"], max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=3, seed=5)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want
    assert choice.finish_reason == ("stop" if cut < 8 else "length")
    assert r.usage.prompt_tokens == len(g["ids"])  # the server rendered what transformers did
    lp = choice.logprobs.content
    assert [e.token for e in lp] == [server.decode_text([t]) for t in out[:cut]]
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob - 1e-6
               for e in lp)
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=g["messages"], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.prompt_tokens == len(g["ids"])
    assert {c.object for c in chunks} == {"chat.completion.chunk"}

    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        r = await aclient.chat.completions.create(model=MODEL, messages=g["messages"],
                                                  max_tokens=8, temperature=0, n=2)
        await aclient.close()
        return [c.message.content for c in r.choices]
    assert asyncio.run(run()) == [want, want]


def test_openai_sdk_errors_map_to_its_exception_classes(one):
    url, _, _ = one
    client = _client(url)
    with pytest.raises(openai.BadRequestError, match="unknown field 'temprature'"):
        client.completions.create(model=MODEL, prompt="x", extra_body={"temprature": 1})
    with pytest.raises(openai.BadRequestError, match="roles are supported, not tool"):
        # the template's own raise_exception, as a 400
        client.chat.completions.create(model=MODEL, messages=[
            {"role": "tool", "content": "x", "tool_call_id": "1"}], max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("another-model")
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.owned_by == "jaxmp" and card.created > 0
    assert [m.id for m in client.models.list()] == [MODEL]
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        r = httpx.request(method, f"{url}{path}")
        assert r.status_code == status
        assert set(r.json()["error"]) >= {"message", "type", "code"}, r.text


# ---------------------------------------------------------------- isolation and inputs
def test_a_bad_request_never_fails_its_neighbours(one):
    """Good requests sent together with bad ones (a seed past 64 bits, a lone surrogate, a
    wrong type) all answer; each bad one gets its own 400."""
    url, server, _ = one
    good = [{"prompt": p, "max_tokens": 5, "temperature": 0} for p in PROMPTS[:6]]
    bad = [{"prompt": "x", "max_tokens": 3, "seed": 2**64 + 5},
           {"prompt": "a\ud800b", "max_tokens": 3},
           {"prompt": "x", "max_tokens": 3, "stop": ["ok", "a\udfffb"]},
           {"prompt": {"text": "x"}, "max_tokens": 3}]
    bodies = good[:3] + bad + good[3:]

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[
                c.post(f"{url}/v1/completions", content=json.dumps(b).encode()) for b in bodies])
    replies = asyncio.run(run())
    codes = [r.status_code for r in replies]
    assert codes == [200] * 3 + [400] * 4 + [200] * 3, [r.text for r in replies]
    assert "64-bit" in replies[3].json()["error"]["message"]
    assert "surrogate" in replies[4].json()["error"]["message"]
    texts = [r.json()["choices"][0]["text"] for r in replies if r.status_code == 200]
    assert texts == _expected(server, PROMPTS[:6], [5] * 6)


def test_engine_isolates_a_request_that_fails_inside_a_group(one):
    """A request that fails while its group is prefilled (a seed the engine cannot use,
    submitted past the HTTP checks) ends alone with an error; the others answer."""
    _, server, engine = one
    ids = [server.encode(p) for p in PROMPTS[:3]]
    requests = [Request(ids[0], 4), Request(ids[1], 4, temperature=1.0, seed=2**70),
                Request(ids[2], 4)]
    gate = _Gate(engine)
    try:  # queued while the engine is held in a decode call: admitted as one group
        busy = engine.submit(Request(ids[0], 40))
        while not engine.active:
            time.sleep(0.005)
        gate.open.clear()
        assert gate.waiting.wait(60)
        handles = [engine.submit(r) for r in requests]
    finally:
        gate.restore()
    events = [list(h) for h in handles]
    list(busy)
    assert events[1][-1].reason == "error" and "64-bit" in events[1][-1].error
    want = server.generate(ids[0:1], 4)[0].tokens, server.generate(ids[2:3], 4)[0].tokens
    assert [[t.id for t in events[i][:-1]] for i in (0, 2)] == list(want)


def test_seeds_use_all_64_bits_and_text_is_text(one):
    url, server, _ = one
    body = {"prompt": "Hello", "max_tokens": 12, "temperature": 1.0}
    texts = {s: _post(url, {**body, "seed": s}).json()["choices"][0]["text"]
             for s in (0, 2**32, 2**63 + 1, 2**64 - 1, -1)}
    assert texts[0] != texts[2**32]            # the high word counts
    assert texts[2**64 - 1] == texts[-1]       # two's complement
    assert texts[2**63 + 1] == _post(url, {**body, "seed": 2**63 + 1}).json()["choices"][0]["text"]
    assert (seed_key_data(2**63 + 1) == [2**31, 1]).all()
    r = _post(url, {"prompt": "ids:1,2", "max_tokens": 1, "temperature": 0}).json()
    assert r["usage"]["prompt_tokens"] == len(server.codec.encode_text("ids:1,2")) > 2
    # many stop sequences (lm-evaluation-harness adds the end-of-text to a task's own)
    stops = [f"never{i}" for i in range(20)] + ["<|endoftext|>"]
    assert _post(url, {"prompt": "x", "max_tokens": 3, "stop": stops}).status_code == 200


# ---------------------------------------------------------------- prefix cache
def _prompt(seed: int, length: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 500, length).tolist()


def test_prefix_cache_hits_give_the_same_tokens_and_logprobs(one):
    url, server, engine = one
    shared = _prompt(1, 40)  # two full blocks of 16 reusable
    a = {"prompt": shared + [5, 6, 7], "max_tokens": 6, "temperature": 0, "logprobs": 2,
         "echo": True}
    first = _post(url, a).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    again = _post(url, a).json()
    # an echo hit re-runs the last cached token (its logits score the next prompt token)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 31
    for x, y in zip(first["choices"][0]["logprobs"]["token_logprobs"][1:],
                    again["choices"][0]["logprobs"]["token_logprobs"][1:]):
        assert abs(x - y) < 1e-5
    assert first["choices"][0]["text"] == again["choices"][0]["text"]
    # another suffix on the same prefix: equal to generating without any cache
    other = shared[:35] + [9, 9]
    r = _post(url, {"prompt": other, "max_tokens": 6, "temperature": 0}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 32
    assert r["choices"][0]["text"] == server.decode_text(server.generate([other], 6)[0].tokens)
    # a prompt of exactly two blocks: the hit leaves its last token to run
    whole = _prompt(2, 32)
    b = {"prompt": whole, "max_tokens": 5, "temperature": 0.8, "seed": 11}
    cold, warm = _post(url, b).json(), _post(url, b).json()
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] == 16
    assert warm["choices"][0]["text"] == cold["choices"][0]["text"]  # sampled: same draws
    # a cached block after another cached first block is not a hit: its keys and values
    # depend on everything before it
    z = _prompt(3, 16)
    _post(url, {"prompt": z + _prompt(4, 16) + [5, 5], "max_tokens": 1})  # caches z, then w
    swapped = z + whole[16:] + [7, 7]  # z, then whole's second block
    r = _post(url, {"prompt": swapped, "max_tokens": 5, "temperature": 0}).json()
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] == 16
    assert r["choices"][0]["text"] == server.decode_text(server.generate([swapped], 5)[0].tokens)
    # the prompt's own log-probabilities on a hit equal predict's
    logits = np.asarray(server.predict([a["prompt"]]))[0, :, :server.cfg.vocab_size]
    want = jax.nn.log_softmax(logits, axis=-1)[np.arange(42), a["prompt"][1:]]
    np.testing.assert_allclose(again["choices"][0]["logprobs"]["token_logprobs"][1:43], want,
                               atol=2e-5)


def test_prefix_cache_is_bounded_and_right_under_concurrency_and_eviction(one):
    url, server, engine = one
    bodies, prompts = [], []
    for i in range(16):  # 8 prefixes of 2 blocks each: twice the cache's 8 blocks
        p = _prompt(100 + i % 8, 33) + [i + 1, i + 2]
        prompts.append(p)
        bodies.append({"prompt": p, "max_tokens": 4, "temperature": 0})

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json=b)
                                          for b in bodies])
    for _ in range(2):
        replies = asyncio.run(run())
        got = [r.json()["choices"][0]["text"] for r in replies]
        assert got == [server.decode_text(g.tokens) for g in server.generate(prompts, 4)]
    stats = httpx.get(f"{url}/health").json()["prefix_cache"]
    assert stats["blocks"] <= stats["capacity_blocks"] == 8
    assert stats["hit_tokens"] > 0


# ---------------------------------------------------------------- compiles
def test_no_compilation_after_warm_up_on_a_mixed_workload(one):
    url, _, _ = one
    from jax._src import monitoring

    compiles = []

    def count(name, *args, **kwargs):
        if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            compiles.append(name)
    jax.monitoring.register_event_duration_secs_listener(count)
    bodies = [{"prompt": "x", "max_tokens": 1},
              {"prompt": _prompt(7, 50), "max_tokens": 10, "temperature": 0.7, "top_p": 0.9},
              {"prompt": _prompt(7, 50), "max_tokens": 0, "echo": True, "logprobs": 3},
              {"prompt": "Hello", "max_tokens": 5, "echo": True, "logprobs": 1, "n": 2},
              {"prompt": ["a", "bb", "ccc", "dddd", "eeeee"], "max_tokens": 3, "stop": "e"},
              {"prompt": _prompt(8, 20), "max_tokens": 8, "best_of": 3, "n": 2, "seed": 3}]

    async def run():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*[c.post(f"{url}/v1/completions", json=b)
                                          for b in bodies] + [
                c.post(f"{url}/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})])
    try:
        for _ in range(2):
            assert all(r.status_code == 200 for r in asyncio.run(run()))
        assert _stream(url, {"prompt": "x", "max_tokens": 3})[-1]["model"] == MODEL
    finally:
        monitoring.unregister_event_duration_listener(count)
    assert compiles == []


# ---------------------------------------------------------------- disconnects
class _Gate:
    """Holds the engine before its next decode call while the test looks at it."""

    def __init__(self, engine):
        self.engine, self.decode = engine, engine._decode
        self.open, self.waiting = threading.Event(), threading.Event()
        self.open.set()

        def gated(*args):
            if not self.open.is_set():
                self.waiting.set()
                self.open.wait()
            return self.decode(*args)
        engine._decode = gated

    def restore(self):
        self.open.set()
        self.engine._decode = self.decode


def _raw_post(url: str, body: dict) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nContent-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_dropped_client_frees_its_slot_within_one_decode_call(one, stream):
    """The engine is held before a decode call; the client drops; its request must be
    cancelled with the engine still held (no tokens needed to notice), and the slot free
    after at most one more decode call (the engine's own step counter)."""
    url, _, engine = one
    gate = _Gate(engine)
    try:
        sock = _raw_post(url, {"prompt": "Hello", "max_tokens": 50, "temperature": 0,
                               "stream": stream})
        deadline = time.time() + 60
        while not engine.active and time.time() < deadline:
            time.sleep(0.005)
        (slot, state), = engine.active.items()
        handle = state.handle
        if stream:
            assert sock.recv(65536)  # the first chunks arrived
        gate.open.clear()
        assert gate.waiting.wait(60)
        sock.close()
        deadline = time.time() + 10
        while not handle.cancelled.is_set() and time.time() < deadline:
            time.sleep(0.005)
        assert handle.cancelled.is_set(), "the server did not notice the disconnect"
        before = engine.steps
        gate.open.set()
        deadline = time.time() + 60
        while slot in engine.active and time.time() < deadline:
            time.sleep(0.005)
        assert slot not in engine.active
        assert engine.steps - before <= engine.decode_steps
        assert len(handle.tokens) < 50
    finally:
        gate.restore()


@pytest.mark.slow
def test_openai_sdk_on_a_tensor_parallel_mesh():
    """The same SDK calls against the model split over tensor:2 (and an API key)."""
    from test_http import serving

    with serving("tensor:2", slots=2, max_len=64, api_key="k") as (url, server, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        want = _expected(server, PROMPTS[:2], [6, 6])
        got = [client.completions.create(model=MODEL, prompt=p, max_tokens=6,
                                         temperature=0).choices[0].text for p in PROMPTS[:2]]
        assert got == want
        g = _golden()[0]
        r = client.chat.completions.create(model=MODEL, messages=g["messages"], max_tokens=4,
                                           temperature=0)
        out = server.generate([g["ids"]], max_new_tokens=4)[0].tokens
        eos = server.codec.end_of_text()
        assert r.choices[0].message.content == server.decode_text(
            out[:out.index(eos)] if eos in out else out)
        r = httpx.get(f"{url}/v1/models", headers={"Authorization": "bearer k"})
        assert r.status_code == 200  # the auth scheme is case-insensitive
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0
                          ).models.list()


def test_a_stop_token_ends_the_completion_before_it(one):
    """Chat ends at the template's eos_token, completions at the end-of-text token unless
    ignore_eos; the stop token is not part of the text."""
    from jaxmp.http import HTTPLimits
    from jaxmp.openai_fields import parse_chat, parse_completion

    _, server, engine = one
    limits = HTTPLimits()
    chat = parse_chat({"messages": [{"role": "user", "content": "Hi"}]}, engine, limits,
                      read_chat(TINY))
    assert chat.requests[0].stop_ids == (server.codec.end_of_text(),) == (0,)
    assert parse_completion({"prompt": "x"}, engine, limits).requests[0].stop_ids == (0,)
    assert parse_completion({"prompt": "x", "ignore_eos": True}, engine,
                            limits).requests[0].stop_ids == ()
    ids = server.encode("def main(argv):")
    greedy = server.generate([ids], 12)[0].tokens
    k = next(i for i in range(2, 12) if greedy[i] not in greedy[:i])
    events = list(engine.submit(Request(ids, 12, stop_ids=(greedy[k],))))
    assert [e.id for e in events[:-1]] == greedy[:k]
    assert events[-1].reason == "stop" and events[-1].text == server.decode_text(greedy[:k])


def test_best_of_returns_the_most_likely_samples(one):
    url, _, _ = one
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 1.0, "seed": 21, "logprobs": 0}
    every = _post(url, {**body, "n": 4}).json()["choices"]
    score = lambda c: sum(c["logprobs"]["token_logprobs"])
    best = _post(url, {**body, "n": 2, "best_of": 4}).json()
    assert [c["text"] for c in best["choices"]] == [
        c["text"] for c in sorted(every, key=score, reverse=True)[:2]]
    assert best["usage"]["completion_tokens"] == sum(len(c["logprobs"]["tokens"]) for c in every)


def test_generate_and_the_engine_draw_the_same_tokens_for_a_seed(one):
    """One serving core: Server.generate's prompt i with seed s + i and the engine's
    request with seed s + i sample with the same sampler, keyed the same way (by the seed
    and the position of the logits), so they draw the same tokens. Bugs: the two paths
    keying draws differently (a batch-wide key, the chunk index, the first two tokens
    sharing a key), generate without top_p."""
    _, server, engine = one
    prompts = [server.encode(p) for p in PROMPTS[:3]]
    settings = dict(temperature=0.9, top_p=0.8)
    offline = server.generate(prompts, 10, seed=2**63 + 5, **settings)
    for i, ids in enumerate(prompts):
        events = list(engine.submit(Request(ids, 10, top_k=0, seed=2**63 + 5 + i, **settings)))
        assert [e.id for e in events[:-1]] == offline[i].tokens


def test_what_a_new_client_tried_round_two(one):
    """Inputs a new user's probe found mishandled: JSON the parser refuses in other ways
    (an integer of 5,000 digits, 3,000-deep nesting), a field name with a lone surrogate,
    a trailing slash, audio modalities, max_completion_tokens null beside max_tokens;
    usage that counts a prompt once (n > 1) and never caches more than the prompt."""
    url, _, _ = one
    for raw in (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
                b'{"prompt": ' + b"[" * 3000 + b"]" * 3000 + b"}",
                b'{"prompt": "x", "\\ud800": 1}'):
        r = httpx.post(f"{url}/v1/completions", content=raw, timeout=60)
        assert r.status_code == 400 and "error" in r.json(), r.text[:200]
    r = httpx.post(f"{url}/v1/completions/", json={"prompt": "x"}, timeout=60)
    assert r.status_code == 404 and "error" in r.json()
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    r = httpx.post(f"{url}/v1/chat/completions", json={**chat, "modalities": ["audio"]})
    assert r.status_code == 400 and "text only" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                   json={**chat, "max_completion_tokens": None, "max_tokens": 2}).json()
    assert r["usage"]["completion_tokens"] <= 2
    for _ in range(2):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=60,
                       json={**chat, "max_tokens": 2, "n": 3}).json()
    assert r["usage"]["prompt_tokens"] >= r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    r = _post(url, {"prompt": "hello", "max_tokens": 1, "n": 3}).json()
    assert r["usage"]["prompt_tokens"] == len(one[1].codec.encode_text("hello"))


def test_streamed_logprobs_equal_the_plain_ones_with_stops_and_echo(one):
    """The stream leaves out the log-probabilities of tokens past a stop's cut (as the
    plain answer does), and with echo its first chunk carries the prompt's scores and the
    completion's text_offset counts the prompt."""
    url, _, _ = one
    full = _post(url, {"prompt": "def main(", "max_tokens": 12, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 2) if text.find(text[i:i + 2]) == i)
    for extra in ({"stop": stop}, {"echo": True}, {"echo": True, "stop": stop}):
        body = {"prompt": "def main(", "max_tokens": 12, "temperature": 0, "logprobs": 2,
                **extra}
        plain = _post(url, body).json()["choices"][0]["logprobs"]
        chunks = _stream(url, body)
        streamed = {k: [v for c in chunks if c["choices"][0]["logprobs"]
                        for v in c["choices"][0]["logprobs"][k]] for k in plain}
        assert streamed == plain, (extra, streamed, plain)
