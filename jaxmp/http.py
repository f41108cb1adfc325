"""An OpenAI-compatible completions API over the continuous-batching engine (FastAPI; the
optional `serve` extra).

    app = make_app(engine, HTTPLimits(api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions (prompt as text or ids, or a list of them; max_tokens,
temperature, top_k, top_p, seed, stop, n, stream (server-sent events), logprobs, echo),
GET /v1/models, GET /health. Handlers only validate and queue; the engine's loop owns
the device. Every error is a JSON body {"error": {"message", "type", "code"}} with the
status it deserves, never a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, StreamingResponse

from jaxmp.engine import TOP, Done, Engine, Handle, QueueFull, Request, Token, check
from jaxmp.serve import ServeError

OPENAI_IGNORED = {"user": None, "suffix": None, "presence_penalty": 0, "frequency_penalty": 0,
                  "best_of": 1, "logit_bias": None}  # accepted only at their no-op values


@dataclasses.dataclass(frozen=True)
class HTTPLimits:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompts: int = 64       # prompts x n per request
    model_name: str = "jaxmp"


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": " ".join(message.split()), "type": kind,
                                   "code": status}}, status_code=status)


def make_app(engine: Engine, limits: HTTPLimits = HTTPLimits()) -> Any:
    app = FastAPI(title="jaxmp", docs_url=None, redoc_url=None, openapi_url=None)
    codec = engine.server.codec

    @app.middleware("http")
    async def guard(request: HTTPRequest, call_next):
        try:
            if request.url.path.startswith("/v1/"):
                if limits.api_key and request.headers.get("authorization") != \
                        f"Bearer {limits.api_key}":
                    return _error(401, "missing or wrong API key: send 'Authorization: Bearer "
                                  "<key>'", "authentication_error")
                size = request.headers.get("content-length")
                if size is not None and int(size) > limits.max_body_bytes:
                    return _error(413, f"the request body has {size} bytes, over the limit "
                                  f"of {limits.max_body_bytes} bytes")
            return await call_next(request)
        except Exception as e:  # never a stack trace
            return _error(500, f"internal error ({type(e).__name__})", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": engine.queue.qsize(), "active": len(engine.active),
                "slots": engine.slots}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": limits.model_name, "object": "model",
                                            "owned_by": "jaxmp",
                                            "context_length": engine.max_len}]}

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        try:
            body = await _read_body(request, limits.max_body_bytes)
            spec = parse_completion(body, codec, engine, limits)
            handles = [engine.submit(r) for r in spec.requests]
        except APIError as e:
            return _error(e.status, e.message, e.kind)
        except QueueFull as e:
            return _error(429, str(e), "rate_limit_error")
        except ServeError as e:
            return _error(400, str(e))
        if spec.stream:
            return StreamingResponse(_stream(request, handles, spec, codec),
                                     media_type="text/event-stream")
        try:
            results = await _gather(request, handles)
        except _Gone:
            return _error(499, "client closed the request")
        for _, done in results:
            if done.reason == "error":
                return _error(500, f"generation failed ({done.error})", "server_error")
        return JSONResponse(_response(spec, results, codec, limits.model_name))

    return app


class _Gone(Exception):
    pass


async def _read_body(request: Any, limit: int) -> dict:
    data = bytearray()
    async for chunk in request.stream():  # a body without Content-Length is counted too
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        body = json.loads(bytes(data))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


@dataclasses.dataclass
class CompletionSpec:
    prompts: list[list[int]]
    requests: list[Request]   # prompt-major: prompt i, choice j at i * n + j
    n: int
    stream: bool
    echo: bool
    logprobs: int | None


FIELDS: dict[str, tuple[type, ...]] = {
    "model": (str,), "prompt": (str, list), "max_tokens": (int,), "temperature": (int, float),
    "top_k": (int,), "top_p": (int, float), "seed": (int,), "stop": (str, list), "n": (int,),
    "stream": (bool,), "logprobs": (int,), "echo": (bool,)}


def parse_completion(body: dict, codec: Any, engine: Engine, limits: HTTPLimits) -> CompletionSpec:
    """Validate an OpenAI completions body: each problem one 400 that names the field."""
    for name, value in body.items():
        if name in OPENAI_IGNORED:
            if value not in (OPENAI_IGNORED[name], None):
                raise APIError(400, f"'{name}' is not supported (leave it out)")
            continue
        if name not in FIELDS:
            raise APIError(400, f"unknown field '{name}'; known: {', '.join(sorted(FIELDS))}")
        ok = value is None or (isinstance(value, FIELDS[name]) and not (
            isinstance(value, bool) and bool not in FIELDS[name]))
        if not ok:
            want = " or ".join(t.__name__ for t in FIELDS[name])
            raise APIError(400, f"'{name}' must be {want}, got {type(value).__name__}")
    get = lambda k, d: d if body.get(k) is None else body[k]
    if "prompt" not in body:
        raise APIError(400, "'prompt' is required")
    prompts = _prompts(body["prompt"], codec)
    n, max_tokens = get("n", 1), get("max_tokens", 16)
    logprobs = body.get("logprobs")
    if n < 1:
        raise APIError(400, f"'n'={n} must be >= 1")
    if len(prompts) * n > limits.max_prompts:
        raise APIError(400, f"{len(prompts)} prompts x n={n} exceeds the limit of "
                       f"{limits.max_prompts} completions per request")
    if logprobs is not None and not 0 <= logprobs <= TOP:
        raise APIError(400, f"'logprobs'={logprobs} must be in [0, {TOP}]")
    stop = get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
        raise APIError(400, "'stop' must be a non-empty string or a list of at most 4 of them")
    echo, stream = get("echo", False), get("stream", False)
    if stream and n > 1:
        raise APIError(400, "'stream' with n > 1 is not supported; send n requests")
    if max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens'=0 needs echo=true (scoring the prompt)")
    seed = get("seed", int(time.time_ns() % 2**31) if get("temperature", 1.0) else 0)
    requests = [Request(p, max_tokens, float(get("temperature", 1.0)), get("top_k", 0),
                        float(get("top_p", 1.0)), seed + j, tuple(stop),
                        prompt_logprobs=echo and logprobs is not None)
                for p in prompts for j in range(n)]
    for r in requests:
        try:
            check(engine.cfg, r, engine.max_len)
        except ServeError as e:
            raise APIError(400, str(e)) from None
    return CompletionSpec(prompts, requests, n, stream, echo, logprobs)


def _prompts(prompt: Any, codec: Any) -> list[list[int]]:
    """str | list[int] | list[str] | list[list[int]] -> token id lists."""
    def one(p: Any) -> list[int]:
        if isinstance(p, str):
            try:
                return codec.encode(p)
            except ValueError as e:
                raise APIError(400, str(e)) from None
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return list(p)
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of those")
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        return [one(prompt)]
    if isinstance(prompt, list) and prompt:
        return [one(p) for p in prompt]
    raise APIError(400, "'prompt' is empty")


async def _next(request: Any, handle: Handle) -> Token | Done:
    """The handle's next event, cancelling it if the client goes away meanwhile. The engine
    wakes this coroutine through the event loop (no polling); the client is checked when
    there is nothing to read, at least every half second."""
    if handle.on_event is None:
        loop, waker = asyncio.get_running_loop(), asyncio.Event()
        handle.waker = waker  # type: ignore[attr-defined]
        handle.on_event = lambda: loop.call_soon_threadsafe(waker.set)
    waker = handle.waker  # type: ignore[attr-defined]
    while True:
        waker.clear()
        try:
            return handle.events.get_nowait()
        except queue.Empty:
            pass
        if await request.is_disconnected():
            handle.cancel()
            raise _Gone
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waker.wait(), 0.5)


async def _gather(request: Any, handles: list[Handle]) -> list[tuple[list[Token], Done]]:
    out = []
    try:
        for h in handles:
            tokens: list[Token] = []
            while not isinstance(event := await _next(request, h), Done):
                tokens.append(event)
            out.append((tokens, event))
    except _Gone:
        for h in handles:
            h.cancel()
        raise
    return out


def _logprob_block(codec: Any, ids: list[int], entries: list[Token | None], k: int,
                   offset: int) -> dict:
    """OpenAI's logprobs object for tokens `ids` (entries[i] None: no log-prob, the first
    prompt token)."""
    block: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, entry in zip(ids, entries):
        text = codec.decode([tok])
        block["tokens"].append(text)
        block["text_offset"].append(offset)
        offset += len(text)
        if entry is None:
            block["token_logprobs"].append(None)
            block["top_logprobs"].append(None)
        else:
            block["token_logprobs"].append(entry.logprob)
            block["top_logprobs"].append({codec.decode([i]): lp for i, lp in entry.top[:k]}
                                         if k else {})
    return block


def _choice(spec: CompletionSpec, index: int, prompt: list[int], tokens: list[Token],
            done: Done, codec: Any) -> dict:
    text = done.text
    kept = _kept(codec, tokens, text) if done.reason == "stop" else tokens
    prefix = codec.decode(prompt) if spec.echo else ""
    choice: dict = {"text": prefix + text, "index": index, "finish_reason":
                    "stop" if done.reason == "stop" else "length", "logprobs": None}
    if spec.logprobs is not None:
        block = _logprob_block(codec, [t.id for t in kept], kept, spec.logprobs, len(prefix))
        if spec.echo:
            head = _logprob_block(codec, prompt, done.prompt or [None] * len(prompt),
                                  spec.logprobs, 0)
            block = {k: head[k] + block[k] for k in block}
        choice["logprobs"] = block
    return choice


def _kept(codec: Any, tokens: list[Token], text: str) -> list[Token]:
    """The tokens whose text lies (at least partly) before the cut of a stop sequence."""
    kept = []
    for i in range(len(tokens)):
        if len(codec.decode([t.id for t in tokens[:i]])) >= len(text):
            break
        kept.append(tokens[i])
    return kept


def _response(spec: CompletionSpec, results: list, codec: Any, model: str) -> dict:
    choices = []
    completion_tokens = 0
    for index, (tokens, done) in enumerate(results):
        prompt = spec.prompts[index // spec.n]
        choices.append(_choice(spec, index, prompt, tokens, done, codec))
        completion_tokens += len(tokens)
    prompt_tokens = sum(len(p) for p in spec.prompts) * spec.n
    return {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": model, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


async def _stream(request: Any, handles: list[Handle], spec: CompletionSpec,
                  codec: Any) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token (its text held back while a character's
    bytes are incomplete or while it could be the start of a stop sequence), a last chunk
    with the rest and finish_reason, then [DONE]. The texts add up to the non-streamed
    completion."""
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    handle, prompt = handles[0], spec.prompts[0]
    hold = max((len(x) for x in handle.request.stop), default=1) - 1

    def chunk(text: str, finish: str | None, logprobs: dict | None = None) -> str:
        return "data: " + json.dumps({
            "id": cid, "object": "text_completion", "created": created, "model": "jaxmp",
            "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                         "finish_reason": finish}]}) + "\n\n"
    sent, ids = "", []
    try:
        if spec.echo:
            yield chunk(codec.decode(prompt), None)
        while True:
            event = await _next(request, handle)
            if isinstance(event, Done):
                if event.reason == "error":
                    yield "data: " + json.dumps({"error": {"message": event.error,
                                                           "type": "server_error"}}) + "\n\n"
                else:
                    yield chunk(event.text[len(sent):],
                                "stop" if event.reason == "stop" else "length")
                break
            ids.append(event.id)
            text = codec.decode(ids)
            hits = [text.find(x) for x in handle.request.stop if x in text]
            # hold back the last `hold` complete characters (a stop may start there), never
            # counting a character whose bytes are still incomplete as one of them
            whole = text.rstrip("\ufffd")
            safe = text[:min(hits)] if hits else whole[:max(0, len(whole) - hold)]
            safe = safe.rstrip("\ufffd")
            delta = safe[len(sent):]
            lp = (_logprob_block(codec, [event.id], [event], spec.logprobs, len(sent))
                  if spec.logprobs is not None else None)
            sent += delta
            yield chunk(delta, None, lp)
        yield "data: [DONE]\n\n"
    except _Gone:
        handle.cancel()
    except asyncio.CancelledError:
        handle.cancel()
        raise


@contextlib.contextmanager
def running(engine: Engine, limits: HTTPLimits = HTTPLimits(),
            host: str = "127.0.0.1") -> Iterator[str]:
    """The app served by uvicorn in a background thread on an ephemeral port of `host`
    (tests and benchmarks); yields its base URL. The engine's loop must be running."""
    import socket
    import threading

    import uvicorn

    sock = socket.socket()
    sock.bind((host, 0))
    web = uvicorn.Server(uvicorn.Config(make_app(engine, limits), log_level="warning"))
    thread = threading.Thread(target=web.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not web.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        web.should_exit = True
        thread.join()
        sock.close()
