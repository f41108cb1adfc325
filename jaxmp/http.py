"""An OpenAI-compatible API over the continuous-batching engine (FastAPI; the optional
`serve` extra).

    app = make_app(engine, HTTPLimits(api_key="..."))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions, POST /v1/chat/completions (messages rendered with the
model's chat template), GET /v1/models, GET /v1/models/{id}, GET /health. The request
fields are OpenAI's (see `openai_fields.py` for each one's handling); handlers only
validate and queue, the engine's loop owns the device. Every error, whatever its status
(400, 401, 404, 405, 413, 422, 429, 500), is OpenAI's JSON error object for that request
alone, never a stack trace. A client that goes away (streaming or not) has its requests
cancelled at once, and the engine frees their slots at the end of its decode call in
progress; the middleware is plain ASGI, so the disconnect reaches the handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import queue
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from jaxmp.engine import Engine
from jaxmp.openai_fields import APIError, parse_chat, parse_completion, read_body
from jaxmp.openai_responses import ChatSpec, CompletionSpec
from jaxmp.requests import Done, Handle, QueueFull, Token
from jaxmp.serve import ServeError


@dataclasses.dataclass(frozen=True)
class HTTPLimits:
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    max_prompts: int = 64       # prompts x n (or best_of) per request
    model_name: str = "jaxmp"
    chat: dict | None = None    # a chat record (jaxmp.chat) replacing the model's own


def error_body(status: int, message: str, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error object; the message on one line, and encodable whatever a client
    sent (a lone surrogate in a field name is shown escaped)."""
    message = " ".join(str(message).split()).encode("utf-8", "backslashreplace").decode()
    return {"error": {"message": message, "type": kind,
                      "param": None, "code": status}}


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse(error_body(status, message, kind), status_code=status)


KINDS = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class Guard:
    """Plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which hides a client's
    disconnect from the handlers): the API key and the declared body size of /v1/
    requests, and a 500 error object for anything that escapes a handler."""

    def __init__(self, app: Any, limits: HTTPLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refused = self._refuse(scope)
        if refused is not None:
            return await refused(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)
        try:
            await self.app(scope, receive, tracking_send)
        except Exception as e:  # never a stack trace; the response may have begun (a stream)
            if not started:
                await _error(500, f"internal error ({type(e).__name__})",
                             "server_error")(scope, receive, send)

    def _refuse(self, scope: dict) -> JSONResponse | None:
        if not scope["path"].startswith("/v1/"):
            return None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        key = self.limits.api_key
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if key and (scheme.lower() != "bearer" or given.strip() != key):
            return _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                          "authentication_error")
        size = headers.get("content-length")
        if size is not None:
            if not size.strip().isdigit():
                return _error(400, f"Content-Length {size!r} is not a number")
            if int(size) > self.limits.max_body_bytes:
                return _error(413, f"the request body has {size} bytes, over the limit of "
                              f"{self.limits.max_body_bytes} bytes")
        return None


def make_app(engine: Engine, limits: HTTPLimits = HTTPLimits()) -> Any:
    app = FastAPI(title="jaxmp", docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)  # /v1/completions/ is a 404 error object, not a 307
    app.add_middleware(Guard, limits=limits)
    chat = limits.chat or getattr(engine.server, "chat", None)
    _error_handlers(app)
    _info_routes(app, engine, limits)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        return await _serve(request, lambda body: parse_completion(body, engine, limits))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        return await _serve(request, lambda body: parse_chat(body, engine, limits, chat))

    async def _serve(request: HTTPRequest, parse: Any):
        try:
            spec = parse(await read_body(request, limits.max_body_bytes))
            handles: list[Handle] = []
            try:
                for r in spec.requests:
                    handles.append(engine.submit(r))
            except BaseException:
                for h in handles:  # all of a request's completions, or none
                    h.cancel()
                raise
        except APIError as e:
            return _error(e.status, e.message, e.kind)
        except QueueFull as e:
            return _error(429, str(e), "rate_limit_error")
        except ServeError as e:
            return _error(400, str(e))
        if spec.stream:
            return StreamingResponse(_stream(request, handles, spec, limits.model_name),
                                     media_type="text/event-stream")
        watcher = asyncio.create_task(_watch(request, handles))
        try:
            results = await _gather(handles)
        finally:
            watcher.cancel()
        for _, _, done in results:
            if done.reason == "cancelled":
                return _error(499, "client closed the request")
            if done.reason == "error":
                return _error(500, f"generation failed ({done.error})", "server_error")
        return JSONResponse(spec.response(results, limits.model_name))

    return app


def _error_handlers(app: Any) -> None:
    """OpenAI's error object for the statuses FastAPI answers itself (404, 405, 422)."""
    @app.exception_handler(HTTPException)
    async def http_error(request: HTTPRequest, e: HTTPException):
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"
                   }.get(e.status_code, str(e.detail))
        return _error(e.status_code, message, KINDS.get(e.status_code, "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: HTTPRequest, e: RequestValidationError):
        return _error(422, f"invalid request: {e.errors()}")


def _info_routes(app: Any, engine: Engine, limits: HTTPLimits) -> None:
    """/health (the engine's queue, slots and prefix cache) and OpenAI's model routes."""
    created = int(time.time())

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    def model_card() -> dict:
        return {"id": limits.model_name, "object": "model", "created": created,
                "owned_by": "jaxmp", "context_length": engine.max_len,
                "max_model_len": engine.max_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != limits.model_name:
            return _error(404, f"the model '{model_id}' does not exist; this server has "
                          f"'{limits.model_name}'", "not_found_error")
        return model_card()


async def _watch(request: Any, handles: list[Handle]) -> None:
    """Cancel `handles` the moment the client disconnects (ASGI's http.disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for h in handles:
                h.cancel()
            return


async def _next(handle: Handle) -> Token | Done:
    """The handle's next event; the engine wakes this coroutine through the event loop."""
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
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waker.wait(), 1.0)


async def _gather(handles: list[Handle]) -> list[tuple[Handle, list[Token], Done]]:
    out = []
    for h in handles:
        tokens: list[Token] = []
        while not isinstance(event := await _next(h), Done):
            tokens.append(event)
        out.append((h, tokens, event))
    return out


async def _stream(request: Any, handles: list[Handle], spec: CompletionSpec | ChatSpec,
                  model: str) -> AsyncIterator[str]:
    """Server-sent events: per choice, chunks of text as its tokens arrive (held back while
    a character's bytes are incomplete or while the text could be the start of a stop
    sequence), a last chunk with finish_reason; with stream_options.include_usage a usage
    chunk; then [DONE]. Each choice's texts add up to its non-streamed text."""
    cid, created = spec.new_id(), int(time.time())
    events: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, handle: Handle) -> None:
        while True:
            event = await _next(handle)
            await events.put((index, event))
            if isinstance(event, Done):
                return

    def sse(payload: dict) -> str:
        return "data: " + json.dumps({"id": cid, "object": spec.chunk_object,
                                      "created": created, "model": model, **payload}) + "\n\n"
    watcher = asyncio.create_task(_watch(request, handles))
    pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    writers = [spec.writer(i, h) for i, h in enumerate(handles)]
    try:
        for i in range(len(handles)):
            for payload in writers[i].start():
                yield sse(payload)
        left = len(handles)
        while left:
            index, event = await events.get()
            if isinstance(event, Done):
                left -= 1
                if event.reason == "cancelled":
                    return
                if event.reason == "error":
                    yield "data: " + json.dumps(error_body(
                        500, f"generation failed ({event.error})", "server_error")) + "\n\n"
                    return
                for payload in writers[index].finish(event):
                    yield sse(payload)
            else:
                for payload in writers[index].token(event):
                    yield sse(payload)
        if spec.include_usage:
            yield sse({"choices": [], "usage": spec.usage(
                [len(h.tokens) for h in handles], spec.cached(handles))})
        yield "data: [DONE]\n\n"
    finally:
        for h in handles:
            h.cancel()  # a no-op for a finished request; frees the slot of a dropped one
        for task in (watcher, *pumps):
            task.cancel()


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

