"""What the continuous-batching engine is asked and answers: a request (prompt ids and
sampling settings), the handle a caller iterates, and its events (a Token per new token,
then one Done); the checks a request passes before it is queued."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from jaxmp.sampling import ServeError, check_prompt, check_sampling


class QueueFull(ServeError):
    """The engine's queue is full: try again later."""


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0          # 0: the whole vocabulary
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    prompt_logprobs: bool = False  # log-probabilities of the prompt's tokens (echo)
    stop_ids: tuple[int, ...] = ()  # tokens that end the completion (not part of it)


@dataclasses.dataclass
class Token:
    id: int
    logprob: float
    top: list[tuple[int, float]]   # the TOP most likely (id, logprob) at this position


@dataclasses.dataclass
class Done:
    reason: str                     # "length" | "stop" | "cancelled" | "error"
    text: str = ""                  # the completion's text, cut before a stop sequence
    prompt: list[Token | None] | None = None  # with prompt_logprobs: per prompt token
    error: str | None = None


class Handle:
    """A submitted request: iterate its events; `cancel()` frees its slot."""

    def __init__(self, request: Request):
        self.request = request
        self.submitted = time.perf_counter()
        self.first_token: float | None = None  # when the first token was emitted
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.prompt_scores: list | None = None  # with prompt_logprobs: set at the prefill
        self.events: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.tokens: list[int] = []
        self.on_event: Any = None  # called (from the engine's thread) after each event

    def put(self, event: Token | Done) -> None:
        self.events.put(event)
        if self.on_event is not None:
            self.on_event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __iter__(self) -> Iterator[Token | Done]:
        while True:
            event = self.events.get()
            yield event
            if isinstance(event, Done):
                return


def check(cfg: Any, r: Request, max_len: int | None = None) -> None:
    """A request against the model's vocabulary and context (`max_len`: the engine's,
    default the model's); one line per problem (the checks `Server.generate` makes too)."""
    check_prompt(r.prompt, r.max_tokens, cfg.vocab_size, max_len or cfg.seq_len)
    check_sampling(r.temperature, r.top_k, r.top_p, cfg.vocab_size)
