"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions:
every field of the current API is accepted or refused by name, and each problem is one
400 that names the field.

How each field is handled:

- used: model (any name; replies carry the served one), prompt / messages, max_tokens
  (chat: also max_completion_tokens), temperature, top_p, top_k (an extension, as in vLLM),
  n, best_of (completions: the n most likely of best_of samples), seed (any 64-bit
  integer), stop (up to MAX_STOPS strings), stream, stream_options.include_usage, logprobs
  (completions: up to TOP alternatives; chat: a boolean with top_logprobs), echo,
  ignore_eos (completions, an extension as in vLLM: go on past the end-of-text token).
- accepted with no effect: user, store, metadata, service_tier, parallel_tool_calls,
  reasoning_effort; modalities only as ["text"].
- accepted only at their neutral value (anything else is a 400 that says so):
  frequency_penalty and presence_penalty (0), logit_bias (empty), suffix (empty),
  tools / functions (empty), tool_choice / function_call ("none" or "auto" with no tools),
  response_format ({"type": "text"}).

Text prompts are text: they are tokenized as given ('ids:1,2' is the text "ids:1,2");
token ids come as JSON integer arrays.
"""

from __future__ import annotations

import dataclasses
import json
import math
import uuid
from typing import Any

from jaxmp.engine import Engine
from jaxmp.openai_responses import ChatSpec, CompletionSpec
from jaxmp.requests import Request, check
from jaxmp.sampling import TOP
from jaxmp.serve import ServeError, seed_key_data

MAX_STOPS = 64


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


async def read_body(request: Any, limit: int) -> dict:
    data = bytearray()
    async for chunk in request.stream():  # a body without Content-Length is counted too
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes")
    try:
        body = json.loads(bytes(data))
    except json.JSONDecodeError as e:
        raise APIError(400, f"the body is not valid JSON ({e.msg} at character {e.pos})") from None
    except UnicodeDecodeError as e:
        raise APIError(400, f"the body is not valid JSON (not UTF-8 at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # an integer of > 4300 digits, deep nesting
        raise APIError(400, f"the body is not valid JSON here ({type(e).__name__}: "
                       f"{str(e)[:80]})") from None
    if not isinstance(body, dict):
        raise APIError(400, "the body must be a JSON object")
    return body


NUM = (int, float)
COMMON: dict[str, tuple[type, ...]] = {
    "model": (str,), "max_tokens": (int,), "temperature": NUM, "top_p": NUM, "top_k": (int,),
    "seed": (int,), "stop": (str, list), "n": (int,), "stream": (bool,),
    "stream_options": (dict,), "user": (str,), "frequency_penalty": NUM,
    "presence_penalty": NUM, "logit_bias": (dict,)}
COMPLETION = {**COMMON, "prompt": (str, list), "logprobs": (int,), "echo": (bool,),
              "best_of": (int,), "suffix": (str,), "ignore_eos": (bool,)}
CHAT = {**COMMON, "messages": (list,), "logprobs": (bool,), "top_logprobs": (int,),
        "max_completion_tokens": (int,), "response_format": (dict,), "tools": (list,),
        "tool_choice": (str, dict), "parallel_tool_calls": (bool,), "store": (bool,),
        "metadata": (dict,), "service_tier": (str,), "modalities": (list,),
        "reasoning_effort": (str,), "functions": (list,), "function_call": (str, dict)}
# fields accepted only at these values (None: left out)
NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "suffix": ("",),
    "tools": ([],), "functions": ([],), "tool_choice": ("none", "auto"),
    "function_call": ("none", "auto"), "response_format": ({"type": "text"},)}
ROLES = ("system", "developer", "user", "assistant", "tool")


def _check_types(body: dict, fields: dict[str, tuple[type, ...]]) -> None:
    for name, value in body.items():
        if name not in fields:
            raise APIError(400, f"unknown field '{name}'; known: {', '.join(sorted(fields))}")
        types = fields[name]
        ok = value is None or (isinstance(value, types) and not (
            isinstance(value, bool) and bool not in types))
        if not ok:
            want = " or ".join(t.__name__ for t in types)
            raise APIError(400, f"'{name}' must be {want}, got {type(value).__name__}")
        if name in NEUTRAL and value is not None and value not in NEUTRAL[name]:
            raise APIError(400, f"'{name}'={json.dumps(value)[:80]} is not supported by this "
                           f"server; leave it out (or send {json.dumps(NEUTRAL[name][0])})")


def text(value: str, where: str) -> str:
    """`value` if it is valid Unicode (JSON can carry a lone surrogate, which no encoder
    takes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(400, f"{where} holds an unpaired surrogate ({value[e.start]!r} at "
                       f"character {e.start}); send valid Unicode") from None
    return value


def encode(codec: Any, value: str, where: str) -> list[int]:
    """Text as token ids (never read as 'ids:...')."""
    text(value, where)
    if not codec.text:
        raise APIError(400, f"this model has no tokenizer, so {where} cannot be text; send "
                       "token ids as a JSON array of integers")
    return codec.encode_text(value)


def _ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value)


def prompts_of(prompt: Any, codec: Any) -> list[list[int]]:
    """str | list[int] | list[str] | list[list[int]] -> token id lists."""
    def one(p: Any, i: int | None) -> list[int]:
        where = "'prompt'" if i is None else f"prompt {i}"
        if isinstance(p, str):
            return encode(codec, p, where)
        if _ids(p):
            return list(p)
        raise APIError(400, "'prompt' must be a string, a list of token ids, or a list of those")
    if isinstance(prompt, str) or _ids(prompt):
        return [one(prompt, None)]
    if isinstance(prompt, list) and prompt:
        return [one(p, i) for i, p in enumerate(prompt)]
    raise APIError(400, "'prompt' is empty")


@dataclasses.dataclass
class Sampling:
    """The fields both endpoints share, checked."""
    n: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool

    @classmethod
    def parse(cls, body: dict, copies: int = 1) -> Sampling:
        get = lambda k, d: d if body.get(k) is None else body[k]
        n = get("n", 1)
        if n < 1:
            raise APIError(400, f"'n'={n} must be >= 1")
        temperature, top_p, top_k = get("temperature", 1.0), get("top_p", 1.0), get("top_k", 0)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise APIError(400, f"'temperature'={temperature} must be a number >= 0")
        if not (math.isfinite(top_p) and 0 < top_p <= 1):
            raise APIError(400, f"'top_p'={top_p} must be in (0, 1]")
        if top_k < 0:
            raise APIError(400, f"'top_k'={top_k} must be >= 0 (0: no limit)")
        stop = get("stop", [])
        stop = [stop] if isinstance(stop, str) else stop
        if not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOPS:
            raise APIError(400, f"'stop' must be a non-empty string or a list of at most "
                           f"{MAX_STOPS} of them")
        for i, s in enumerate(stop):
            text(s, f"stop sequence {i}")
        stream = get("stream", False)
        options = get("stream_options", {})
        if body.get("stream_options") is not None and not stream:
            raise APIError(400, "'stream_options' is only allowed with 'stream': true")
        unknown = set(options) - {"include_usage", "continuous_usage_stats"}
        if unknown:
            raise APIError(400, f"unknown stream_options field {sorted(unknown)[0]!r}; known: "
                           "include_usage")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise APIError(400, "'stream_options.include_usage' must be a boolean")
        if body.get("seed") is not None:
            seed = body["seed"]
            try:
                seed_key_data(seed)
            except ServeError as e:
                raise APIError(400, f"'seed': {e}") from None
            seed %= 1 << 64
        else:  # unseeded: a fresh draw per request (greedy needs none)
            seed = int.from_bytes(uuid.uuid4().bytes[:8], "little")
        return cls(n, float(temperature), top_k, float(top_p), seed, tuple(stop), stream,
                   include_usage)

    def request(self, prompt: list[int], max_tokens: int, j: int, **extra: Any) -> Request:
        """Choice j of a prompt: its own seed (seed + j), the same settings otherwise."""
        return Request(prompt, max_tokens, self.temperature, self.top_k, self.top_p,
                       (self.seed + j) % (1 << 64), self.stop, **extra)


def _checked(engine: Engine, requests: list[Request]) -> list[Request]:
    for r in requests:
        try:
            check(engine.cfg, r, engine.max_len)
        except ServeError as e:
            raise APIError(400, str(e)) from None
    return requests


# ---------------------------------------------------------------- completions
def parse_completion(body: dict, engine: Engine, limits: Any) -> CompletionSpec:
    """Validate an OpenAI completions body: each problem one 400 that names the field."""
    _check_types(body, COMPLETION)
    if body.get("prompt") is None:
        raise APIError(400, "'prompt' is required")
    codec = engine.server.codec
    prompts = prompts_of(body["prompt"], codec)
    sampling = Sampling.parse(body)
    get = lambda k, d: d if body.get(k) is None else body[k]
    n, max_tokens, echo = sampling.n, get("max_tokens", 16), get("echo", False)
    best_of = get("best_of", n)
    if best_of < n:
        raise APIError(400, f"'best_of'={best_of} must be >= n={n}")
    if sampling.stream and best_of > n:
        raise APIError(400, "'best_of' > n cannot stream (the best are known at the end)")
    if len(prompts) * best_of > limits.max_prompts:
        raise APIError(400, f"{len(prompts)} prompts x {'best_of' if best_of > n else 'n'}="
                       f"{best_of} exceeds the limit of {limits.max_prompts} completions per "
                       "request")
    logprobs = body.get("logprobs")
    if logprobs is not None and not 0 <= logprobs <= TOP:
        raise APIError(400, f"'logprobs'={logprobs} must be in [0, {TOP}]")
    if max_tokens == 0 and not echo:
        raise APIError(400, "'max_tokens'=0 needs echo=true (scoring the prompt)")
    ends = () if get("ignore_eos", False) else stop_ids(codec, None)
    requests = _checked(engine, [
        sampling.request(p, max_tokens, j, prompt_logprobs=echo and logprobs is not None,
                         stop_ids=ends)
        for p in prompts for j in range(best_of)])
    return CompletionSpec(prompts, requests, n, best_of, sampling, echo, logprobs, codec)


# ---------------------------------------------------------------- chat
def _content(message: Any, i: int) -> dict:
    if not isinstance(message, dict):
        raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise APIError(400, f"messages[{i}].role={role!r} must be one of {', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise APIError(400, f"messages[{i}].content: only text parts "
                               "({'type': 'text', 'text': ...}) are supported")
            parts.append(part["text"])
        content = "".join(parts)
    if content is None and role != "assistant":
        raise APIError(400, f"messages[{i}] has no content")
    if content is not None and not isinstance(content, str):
        raise APIError(400, f"messages[{i}].content must be a string or a list of text parts")
    out = {k: v for k, v in message.items() if k != "content"}
    out["content"] = text(content, f"messages[{i}].content") if content is not None else ""
    return out


def stop_ids(codec: Any, chat: dict | None) -> tuple[int, ...]:
    """The tokens that end a completion: the chat record's eos_token (the end of an
    assistant turn), else the tokenizer's end-of-text token."""
    tok = codec.tokenizer
    if tok is None:
        return ()
    eos = (chat or {}).get("eos_token")
    if eos is not None and (i := tok.token_to_id(eos)) is not None:
        return (i,)
    end = codec.end_of_text()
    return () if end is None else (end,)


def parse_chat(body: dict, engine: Engine, limits: Any, chat: dict | None) -> ChatSpec:
    """Validate an OpenAI chat completions body and render its messages with the model's
    chat template."""
    from jaxmp.chat import ChatError, ChatTemplate

    _check_types(body, CHAT)
    if body.get("modalities") not in (None, ["text"]):
        raise APIError(400, f"'modalities'={json.dumps(body['modalities'])[:60]}: this server "
                       "answers text only; send [\"text\"] or leave it out")
    messages = body.get("messages")
    if not messages:
        raise APIError(400, "'messages' is required (a non-empty list)")
    messages = [_content(m, i) for i, m in enumerate(messages)]
    if chat is None:
        raise APIError(400, "this model has no chat template (tokenizer_config.json's "
                       "chat_template); serve it with --chat_template=FILE, or use "
                       "/v1/completions")
    codec = engine.server.codec
    try:
        rendered = ChatTemplate(chat).render(messages)
    except (ChatError, ValueError) as e:
        raise APIError(400, f"the chat template refused these messages: {e}") from None
    prompt = encode(codec, rendered, "the rendered conversation")
    sampling = Sampling.parse(body)
    if sampling.n > limits.max_prompts:
        raise APIError(400, f"n={sampling.n} exceeds the limit of {limits.max_prompts} "
                       "completions per request")
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = max(1, engine.max_len - len(prompt))  # the rest of the context
    if max_tokens < 1:
        raise APIError(400, f"'max_tokens'={max_tokens} must be >= 1")
    top = body.get("top_logprobs")
    if top is not None and not 0 <= top <= TOP:
        raise APIError(400, f"'top_logprobs'={top} must be in [0, {TOP}]")
    if top is not None and not body.get("logprobs"):
        raise APIError(400, "'top_logprobs' needs 'logprobs': true")
    logprobs = (top or 0) if body.get("logprobs") else None
    requests = _checked(engine, [sampling.request(prompt, max_tokens, j,
                                                  stop_ids=stop_ids(codec, chat))
                                 for j in range(sampling.n)])
    return ChatSpec(prompt, requests, sampling, logprobs, codec)
