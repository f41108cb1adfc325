"""OpenAI's response shapes: completions and chat completions, whole or streamed as
server-sent events, with their logprobs objects and usage (jaxmp.openai_fields parses the
requests that produce them)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from jaxmp.requests import Done, Handle, Request, Token


def _usage(prompt_tokens: int, completion_tokens: int, cached: int | None = None) -> dict:
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    return out


def kept_tokens(codec: Any, tokens: list[Token], text: str) -> list[Token]:
    """The tokens whose text lies (at least partly) before the cut of a stop sequence."""
    kept = []
    for i in range(len(tokens)):
        if len(codec.decode([t.id for t in tokens[:i]])) >= len(text):
            break
        kept.append(tokens[i])
    return kept


class TextStream:
    """One choice's streamed text: each token's new text, held back while a character's
    bytes are incomplete or while it could be the start of a stop sequence; the texts
    add up to the choice's non-streamed text."""

    def __init__(self, codec: Any, handle: Handle):
        self.codec, self.handle, self.sent, self.ids = codec, handle, "", []
        stops = handle.request.stop
        self.hold = max((len(x) for x in stops), default=1) - 1
        self.before = ""  # the text of the tokens before the newest
        self.kept = True  # whether the newest token starts before a stop's cut

    def token(self, event: Token) -> str:
        self.ids.append(event.id)
        text = self.codec.decode(self.ids)
        hits = [text.find(x) for x in self.handle.request.stop if x in text]
        # the plain answer keeps a token's log-probability if its text starts before the cut
        self.kept, self.before = not hits or len(self.before) < min(hits), text
        # hold back the last `hold` complete characters (a stop may start there), never
        # counting a character whose bytes are still incomplete as one of them
        whole = text.rstrip("\ufffd")
        safe = text[:min(hits)] if hits else whole[:max(0, len(whole) - self.hold)]
        delta = safe.rstrip("\ufffd")[len(self.sent):]
        self.sent += delta
        return delta

    def rest(self, done: Done) -> str:
        return done.text[len(self.sent):]


def logprob_block(codec: Any, ids: list[int], entries: list[Token | None], k: int,
                  offset: int) -> dict:
    """OpenAI's completions logprobs object for tokens `ids` (entries[i] None: no
    log-prob, the first prompt token)."""
    block: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tok, entry in zip(ids, entries):
        piece = codec.decode([tok])
        block["tokens"].append(piece)
        block["text_offset"].append(offset)
        offset += len(piece)
        if entry is None:
            block["token_logprobs"].append(None)
            block["top_logprobs"].append(None)
        else:
            block["token_logprobs"].append(entry.logprob)
            top: dict = {}
            for i, lp in entry.top[:k]:  # tokens with the same text: the likelier one
                top.setdefault(codec.decode([i]), lp)
            block["top_logprobs"].append(top)
    return block


@dataclasses.dataclass
class CompletionSpec:
    prompts: list[list[int]]
    requests: list[Request]   # prompt-major: prompt i, sample j at i * best_of + j
    n: int
    best_of: int
    sampling: Any          # openai_fields.Sampling
    echo: bool
    logprobs: int | None
    codec: Any
    chunk_object = "text_completion"

    @property
    def stream(self) -> bool:
        return self.sampling.stream

    @property
    def include_usage(self) -> bool:
        return self.sampling.include_usage

    @staticmethod
    def new_id() -> str:
        return f"cmpl-{uuid.uuid4().hex[:24]}"

    def usage(self, completion_tokens: list[int], cached: int | None = None) -> dict:
        """Each prompt counted once (however many samples it has), every sample's tokens."""
        return _usage(sum(len(p) for p in self.prompts), sum(completion_tokens), cached)

    def cached(self, handles: list[Handle]) -> int:
        """Prompt tokens that came from the prefix cache, once per prompt (its samples'
        most)."""
        k = self.best_of
        return sum(max(h.cached_tokens for h in handles[i * k:(i + 1) * k])
                   for i in range(len(handles) // k))

    def _choice(self, index: int, prompt: list[int], tokens: list[Token], done: Done) -> dict:
        codec = self.codec
        kept = kept_tokens(codec, tokens, done.text) if done.reason == "stop" else tokens
        prefix = codec.decode(prompt) if self.echo else ""
        choice: dict = {"text": prefix + done.text, "index": index, "finish_reason":
                        "stop" if done.reason == "stop" else "length", "logprobs": None}
        if self.logprobs is not None:
            block = logprob_block(codec, [t.id for t in kept], kept, self.logprobs, len(prefix))
            if self.echo:
                head = logprob_block(codec, prompt, done.prompt or [None] * len(prompt),
                                     self.logprobs, 0)
                block = {k: head[k] + block[k] for k in block}
            choice["logprobs"] = block
        return choice

    def response(self, results: list[tuple[Handle, list[Token], Done]], model: str) -> dict:
        choices = []
        for i, prompt in enumerate(self.prompts):
            mine = results[i * self.best_of:(i + 1) * self.best_of]
            if self.best_of > self.n:  # the n samples the model finds most likely
                mine = sorted(mine, key=lambda r: -sum(t.logprob for t in r[1]))[:self.n]
            for _, tokens, done in mine:
                choices.append(self._choice(len(choices), prompt, tokens, done))
        return {"id": self.new_id(), "object": "text_completion", "created": int(time.time()),
                "model": model, "choices": choices, "system_fingerprint": None,
                "usage": self.usage([len(t) for _, t, _ in results],
                                    self.cached([h for h, _, _ in results]))}

    def writer(self, index: int, handle: Handle) -> CompletionWriter:
        return CompletionWriter(self, index, handle)


class CompletionWriter:
    def __init__(self, spec: CompletionSpec, index: int, handle: Handle):
        self.spec, self.index, self.handle = spec, index, handle
        self.text = TextStream(spec.codec, handle)
        self.prefix: str | None = None  # the echoed prompt's text, once sent
        self.offset = 0  # the completion's text_offset so far (the plain answer's count)

    def _chunk(self, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
        out = {"choices": [{"text": text, "index": self.index, "logprobs": logprobs,
                            "finish_reason": finish}]}
        return {**out, "usage": None} if self.spec.include_usage else out

    def start(self) -> list[dict]:
        return []

    def _echo(self) -> list[dict]:
        """The echoed prompt, once, before the first token (with its tokens' scores, which
        the engine has by then)."""
        if not self.spec.echo or self.prefix is not None:
            return []
        prompt, spec = self.handle.request.prompt, self.spec
        self.prefix = spec.codec.decode(prompt)
        lp = None
        if spec.logprobs is not None:
            scores = self.handle.prompt_scores or [None] * len(prompt)
            lp = logprob_block(spec.codec, prompt, scores, spec.logprobs, 0)
        return [self._chunk(self.prefix, None, lp)]

    def token(self, event: Token) -> list[dict]:
        out = self._echo()
        delta = self.text.token(event)
        lp = None
        if self.spec.logprobs is not None and self.text.kept:
            lp = logprob_block(self.spec.codec, [event.id], [event], self.spec.logprobs,
                               len(self.prefix or "") + self.offset)
        self.offset += len(self.spec.codec.decode([event.id]))
        return out + [self._chunk(delta, None, lp)]

    def finish(self, done: Done) -> list[dict]:
        return self._echo() + [self._chunk(self.text.rest(done),
                                           "stop" if done.reason == "stop" else "length")]


@dataclasses.dataclass
class ChatSpec:
    prompt: list[int]
    requests: list[Request]
    sampling: Any          # openai_fields.Sampling
    logprobs: int | None     # top_logprobs when logprobs is true, else None
    codec: Any
    chunk_object = "chat.completion.chunk"

    @property
    def stream(self) -> bool:
        return self.sampling.stream

    @property
    def include_usage(self) -> bool:
        return self.sampling.include_usage

    @staticmethod
    def new_id() -> str:
        return f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def usage(self, completion_tokens: list[int], cached: int | None = None) -> dict:
        return _usage(len(self.prompt), sum(completion_tokens), cached)

    def cached(self, handles: list[Handle]) -> int:
        """Prompt tokens from the prefix cache (the one prompt: its samples' most)."""
        return max(h.cached_tokens for h in handles)

    def logprob_content(self, tokens: list[Token]) -> list[dict]:
        def entry(i: int, lp: float) -> dict:
            piece = self.codec.decode([i])
            return {"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8"))}
        return [{**entry(t.id, t.logprob),
                 "top_logprobs": [entry(i, lp) for i, lp in t.top[:self.logprobs]]}
                for t in tokens]

    def response(self, results: list[tuple[Handle, list[Token], Done]], model: str) -> dict:
        choices = []
        for index, (_, tokens, done) in enumerate(results):
            kept = kept_tokens(self.codec, tokens, done.text) if done.reason == "stop" else tokens
            choices.append({
                "index": index, "finish_reason": "stop" if done.reason == "stop" else "length",
                "message": {"role": "assistant", "content": done.text, "refusal": None},
                "logprobs": None if self.logprobs is None else {
                    "content": self.logprob_content(kept), "refusal": None}})
        return {"id": self.new_id(), "object": "chat.completion", "created": int(time.time()),
                "model": model, "choices": choices, "system_fingerprint": None,
                "usage": self.usage([len(t) for _, t, _ in results],
                                    self.cached([h for h, _, _ in results]))}

    def writer(self, index: int, handle: Handle) -> ChatWriter:
        return ChatWriter(self, index, handle)


class ChatWriter:
    def __init__(self, spec: ChatSpec, index: int, handle: Handle):
        self.spec, self.index, self.handle = spec, index, handle
        self.text = TextStream(spec.codec, handle)

    def _chunk(self, delta: dict, finish: str | None, tokens: list[Token] | None = None) -> dict:
        lp = None if tokens is None or self.spec.logprobs is None else {
            "content": self.spec.logprob_content(tokens), "refusal": None}
        out = {"choices": [{"index": self.index, "delta": delta, "logprobs": lp,
                            "finish_reason": finish}]}
        return {**out, "usage": None} if self.spec.include_usage else out

    def start(self) -> list[dict]:
        return [self._chunk({"role": "assistant", "content": ""}, None)]

    def token(self, event: Token) -> list[dict]:
        delta = self.text.token(event)
        return [self._chunk({"content": delta}, None, [event] if self.text.kept else [])]

    def finish(self, done: Done) -> list[dict]:
        rest = self.text.rest(done)
        out = [self._chunk({"content": rest}, None)] if rest else []
        return out + [self._chunk({}, "stop" if done.reason == "stop" else "length")]
