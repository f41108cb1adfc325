"""Continuous batching: a fixed number of decode slots sharing one KV cache, one engine
loop that owns the device, requests queued by anyone.

    engine = Engine(server, slots=8)
    engine.start()                           # the loop runs in its own thread
    handle = engine.submit(Request(prompt_ids, max_tokens=32))
    for event in handle: ...                 # Token events, then a Done event

Per iteration the loop admits queued requests into free slots (each prompt is prefilled
on its own, its keys and values written into its slot's rows of the shared cache), then
runs one decode step for every slot at once. A request frees its slot the step it ends
(max tokens, a stop sequence, the end of the context, or its client going away). Two
kinds of compiled program, made once: prefill per prompt-length bucket (powers of two),
one decode step; nothing compiles per request.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxmp.serve import ServeError, Server, bucket
from jaxmp.sharding import activation_sharding, spec_for

TOP = 5  # alternatives reported per token (OpenAI's logprobs maximum)


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


@dataclasses.dataclass
class _Slot:
    handle: Handle
    position: int        # where the next token goes
    key: np.ndarray      # raw PRNG key data of the request
    prompt: list[Token | None] | None = None  # the prompt's scores (echo), if asked
    text: str = ""


class Engine:
    """Continuous batching over `server`'s model and mesh (any serving mesh)."""

    def __init__(self, server: Server, *, slots: int = 8, max_queue: int = 64,
                 max_len: int | None = None, decode_steps: int = 8):
        """`max_len`: the cache length of a slot (prompt + new tokens), default the model's
        context. Every decode step reads every slot's whole cache, so a shorter one is
        faster where requests are short. `decode_steps`: decode steps per compiled call
        (more: less per-call overhead; fewer: new requests join sooner)."""
        if decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps} must be >= 1")
        self.decode_steps = decode_steps
        if slots < 1 or max_queue < 1:
            raise ValueError(f"slots={slots} and max_queue={max_queue} must be >= 1")
        max_len = max_len or server.cfg.seq_len
        if not 1 < max_len <= server.cfg.seq_len:
            raise ValueError(f"max_len={max_len} must be in [2, {server.cfg.seq_len}] (the "
                             "model's context)")
        self.max_len = max_len
        shards = server.mesh.shape["data"] * server.mesh.shape["fsdp"]
        if slots % shards:
            raise ValueError(f"slots={slots} must be a multiple of data*fsdp={shards} of the "
                             "serving mesh")
        self.server, self.slots, self.cfg = server, slots, server.cfg
        # waiting requests: up to max_queue beyond those the free slots will take
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue + slots)
        self.active: dict[int, _Slot] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        mesh, rules = server.mesh, server.rules
        self._rows = NamedSharding(mesh, spec_for(("batch",), (slots,), mesh,
                                                  rules.activations, strict=False))
        self._replicated = NamedSharding(mesh, PartitionSpec())
        with activation_sharding(mesh, rules):
            self.cache = jax.jit(lambda: server._model(server.params).init_cache(slots,
                                                                                   max_len))()
        self._prefills: dict[int, Any] = {}
        self._decode = self._compile_decode()
        self.steps = 0

    # ------------------------------------------------------------ programs
    def _sample(self, logits, temperature, top_k, top_p, key):
        """One token per row: greedy where temperature is 0, else top-k / top-p sampling.
        logits (B, V) float32 (padding at -1e30). Returns (token, its log-prob, top ids,
        top log-probs) from the model's own distribution."""
        logp = jax.nn.log_softmax(logits, axis=-1)
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

        def sampled():
            scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
            order = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
            vocab = logits.shape[-1]
            k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
            kth = jnp.take_along_axis(order, (k - 1)[:, None], axis=-1)
            # top-p over the top-k tokens' renormalized distribution (the order of Hugging
            # Face's warpers, vLLM and llama.cpp): the smallest set whose probability reaches
            # top_p, i.e. the tokens whose preceding mass < p
            probs = jax.nn.softmax(jnp.where(order >= kth, order, -jnp.inf), axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            cut = jnp.where(before < top_p[:, None], order, jnp.inf).min(axis=-1, keepdims=True)
            keep = (scaled >= kth) & (scaled >= cut)
            masked = jnp.where(keep, scaled, -jnp.inf)
            return jax.vmap(lambda k_, row: jax.random.categorical(k_, row))(
                key, masked).astype(jnp.int32)
        token = jax.lax.cond(jnp.any(temperature > 0),
                             lambda: jnp.where(temperature > 0, sampled(), greedy),
                             lambda: greedy)
        chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
        top_lp, top_id = jax.lax.top_k(logp, TOP)
        return token, chosen, top_id.astype(jnp.int32), top_lp

    def _compile_decode(self):
        """`decode_steps` decode steps for every slot in one program (a scan): the weights'
        per-call work is paid once per call, and the host syncs once per call. A slot that
        ends inside a call decodes on to the call's end into its own rows (discarded)."""
        server, last = self.server, self.max_len - 1

        def steps(params, cache, tokens, positions, temperature, top_k, top_p, keys):
            with activation_sharding(server.mesh, server.rules):
                _, decode = server._decoder(params)
                keys = jax.random.wrap_key_data(keys)

                def one(carry, _):
                    cache, tok, pos = carry
                    pos = jnp.minimum(pos, last)
                    logits, cache = decode(tok[:, None], cache, pos)
                    step_keys = jax.vmap(jax.random.fold_in)(keys, pos)
                    out = self._sample(logits[:, 0], temperature, top_k, top_p, step_keys)
                    return (cache, out[0], pos + 1), out
                (cache, _, _), out = jax.lax.scan(one, (cache, tokens, positions), None,
                                                  length=self.decode_steps)
                return (cache, *out)  # each (decode_steps, slots, ...)
        rows, rep = self._rows, self._replicated
        cache_sh = jax.tree_util.tree_map(lambda c: c.sharding, self.cache)
        return jax.jit(steps, in_shardings=(server.param_shardings, cache_sh, rows, rows, rows,
                                            rows, rows, rows),
                       out_shardings=(cache_sh, rep, rep, rep, rep), donate_argnums=1)

    def _prefill_fn(self, group: int, length: int, scores: bool):
        """The prefill of `group` prompts padded to `length` tokens: their cache rows
        written into their slots of the shared cache (rows marked invalid leave their slot
        as it was), the first tokens sampled, and with `scores` the log-probabilities of
        the prompts' own tokens (echo). One program per (group, length, scores)."""
        key_ = (group, length, scores)
        if key_ in self._prefills:
            return self._prefills[key_]
        server = self.server

        def prefill(params, cache, tokens, n, slots, valid, temperature, top_k, top_p, keys):
            with activation_sharding(server.mesh, server.rules):
                model = server._model(params)
                small = model.init_cache(group, length, cache[0].dtype)
                logits, small = model.decode(tokens, small, jnp.zeros((group,), jnp.int32))

                def write(g, cache):
                    at = (0, slots[g], 0, 0, 0)
                    out = []
                    for big, part in zip(cache, small):
                        new = jax.lax.dynamic_slice_in_dim(part, g, 1, axis=1)
                        old = jax.lax.dynamic_slice(big, at, new.shape)
                        out.append(jax.lax.dynamic_update_slice(
                            big, jnp.where(valid[g], new, old), at))
                    return tuple(out)
                cache = jax.lax.fori_loop(0, group, write, cache)
                last = jnp.take_along_axis(logits, (n - 1)[:, None, None], axis=1)[:, 0]
                keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), n)
                first = self._sample(last, temperature, top_k, top_p, keys)
                if not scores:
                    return cache, first, None
                logp = jax.nn.log_softmax(logits, axis=-1)  # (G, length, V)
                nxt = jnp.roll(tokens, -1, axis=1)
                prompt_lp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
                top_lp, top_id = jax.lax.top_k(logp, TOP)
                return cache, first, (prompt_lp, top_id.astype(jnp.int32), top_lp)
        cache_sh = jax.tree_util.tree_map(lambda c: c.sharding, self.cache)
        rep = self._replicated
        fn = jax.jit(prefill, in_shardings=(server.param_shardings, cache_sh) + (rep,) * 8,
                     out_shardings=(cache_sh, rep, rep), donate_argnums=1)
        self._prefills[key_] = fn
        return fn

    def groups(self) -> list[int]:
        """Prefill group sizes: 1, 4, 16, ... up to the slots (and the slots)."""
        return _geometric(1, 4, self.slots)

    def lengths(self) -> list[int]:
        """Prompt-length buckets: 8, 16, ... up to max_len."""
        return _geometric(8, 2, self.max_len)

    def warm_up(self) -> None:
        """Compile the decode program and every prefill (group, length) now, not at the
        first request (prompt scoring for echo compiles at its first use)."""
        for group in self.groups():
            for length in self.lengths():
                self._prefill([Handle(Request([0], 1))], group, length, emit=False)
        self._step(emit=False)
        self.active.clear()

    # ------------------------------------------------------------ the loop
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="jaxmp-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Finish: every queued and running request ends ("cancelled") and the loop exits."""
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join()

    def submit(self, request: Request) -> Handle:
        """Queue a request (checked against the model first); QueueFull when full."""
        check(self.cfg, request, self.max_len)
        handle = Handle(request)
        try:
            self.queue.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.queue.qsize()} requests waiting for "
                            f"{self.slots} slots); retry later") from None
        self._wake.set()
        return handle

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._admit_waiting()
                for slot, s in list(self.active.items()):
                    if s.handle.cancelled.is_set():
                        self._finish(slot, "cancelled")
                if self.active:
                    self._step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
            except Exception as e:  # keep serving: the requests in flight end with the error
                for slot in list(self.active):
                    self._finish(slot, "error", f"{type(e).__name__}: {e}")
        for slot in list(self.active):
            self._finish(slot, "cancelled")
        while not self.queue.empty():
            self.queue.get_nowait().put(Done("cancelled"))

    def _admit_waiting(self) -> None:
        """Prefill the waiting requests that fit in the free slots, in groups: echo
        requests (which score their prompt) alone, the others together."""
        batch: list[Handle] = []
        while len(self.active) + len(batch) < self.slots and not self.queue.empty():
            handle = self.queue.get_nowait()
            if handle.cancelled.is_set():
                handle.put(Done("cancelled"))
            elif handle.request.prompt_logprobs:
                self._admit_group([handle])
            else:
                batch.append(handle)
        if batch:
            self._admit_group(batch)

    def _admit_group(self, handles: list[Handle]) -> None:
        try:
            group = next(g for g in self.groups() if g >= len(handles))
            length = bucket(max(len(h.request.prompt) for h in handles), 8)
            self._prefill(handles, group, min(length, self.max_len))
        except Exception as e:
            for h in handles:
                h.put(Done("error", error=f"{type(e).__name__}: {e}"))

    def _prefill(self, handles: list[Handle], group: int, length: int,
                 emit: bool = True) -> None:
        """Prefill `handles` (at most `group`) into free slots and emit their first token."""
        free = [i for i in range(self.slots) if i not in self.active]
        scores = any(h.request.prompt_logprobs for h in handles) and emit
        tokens = np.zeros((group, length), np.int32)
        n, slots = np.ones(group, np.int32), np.zeros(group, np.int32)
        valid = np.zeros(group, bool)
        temperature, top_k = np.zeros(group, np.float32), np.zeros(group, np.int32)
        top_p, keys = np.ones(group, np.float32), np.zeros((group, 2), np.uint32)
        for g, h in enumerate(handles):
            r = h.request
            tokens[g, :len(r.prompt)] = r.prompt
            n[g], slots[g], valid[g] = len(r.prompt), free[g], emit
            temperature[g], top_k[g], top_p[g] = r.temperature, r.top_k, r.top_p
            keys[g] = np.asarray(jax.random.key_data(jax.random.key(r.seed)))
        fn = self._prefill_fn(group, length, scores)
        self.cache, first, prompt = fn(self.server.params, self.cache, tokens, n, slots, valid,
                                       temperature, top_k, top_p, keys)
        if not emit:
            return
        first = jax.device_get(first)
        prompt = jax.device_get(prompt) if scores else None
        for g, h in enumerate(handles):
            r = h.request
            prompt_tokens = None
            if r.prompt_logprobs:
                lp, top_id, top_lp = (x[g] for x in prompt)
                prompt_tokens = [None] + [
                    Token(r.prompt[i + 1], float(lp[i]), list(zip(top_id[i].tolist(),
                                                                    top_lp[i].tolist())))
                    for i in range(len(r.prompt) - 1)]
            if r.max_tokens == 0:
                h.put(Done("length", "", prompt_tokens))
                continue
            slot = free[g]
            self.active[slot] = _Slot(h, len(r.prompt), keys[g], prompt_tokens)
            self._emit(slot, *(np.asarray(x)[g] for x in first))

    def _step(self, emit: bool = True) -> None:
        n = self.slots
        tokens, positions = np.zeros(n, np.int32), np.zeros(n, np.int32)
        temperature, top_k = np.zeros(n, np.float32), np.zeros(n, np.int32)
        top_p, keys = np.ones(n, np.float32), np.zeros((n, 2), np.uint32)
        for i, s in self.active.items():
            r = s.handle.request
            tokens[i], positions[i] = s.handle.tokens[-1], s.position
            temperature[i], top_k[i], top_p[i], keys[i] = r.temperature, r.top_k, r.top_p, s.key
        self.cache, *out = self._decode(self.server.params, self.cache, tokens, positions,
                                        temperature, top_k, top_p, keys)
        self.steps += self.decode_steps
        if not emit:
            return
        token, lp, top_id, top_lp = jax.device_get(out)
        running = dict(self.active)
        for j in range(self.decode_steps):
            for i, s in running.items():
                if self.active.get(i) is s:  # not ended at an earlier step of this call
                    s.position += 1
                    self._emit(i, token[j, i], lp[j, i], top_id[j, i], top_lp[j, i])

    def _emit(self, slot: int, token: Any, lp: Any, top_id: Any, top_lp: Any) -> None:
        s = self.active[slot]
        h, r = s.handle, s.handle.request
        h.tokens.append(int(token))
        h.put(Token(int(token), float(lp), list(zip(np.asarray(top_id).tolist(),
                                                           np.asarray(top_lp).tolist()))))
        if r.stop:
            s.text = self.server.decode_text(h.tokens)
            hits = [s.text.find(x) for x in r.stop if x in s.text]
            if hits:
                return self._finish(slot, "stop", text=s.text[:min(hits)])
        if len(h.tokens) >= r.max_tokens:
            return self._finish(slot, "length")
        if s.position + 1 >= self.max_len:
            return self._finish(slot, "length")  # the end of the context
        if h.cancelled.is_set():
            return self._finish(slot, "cancelled")

    def _finish(self, slot: int, reason: str, error: str | None = None,
                text: str | None = None) -> None:
        s = self.active.pop(slot)
        if text is None:
            text = self.server.decode_text(s.handle.tokens)
        s.handle.put(Done(reason, text, s.prompt, error))


def _geometric(start: int, factor: int, last: int) -> list[int]:
    """start, start * factor, ... below `last`, then `last`."""
    out, n = [], start
    while n < last:
        out.append(n)
        n *= factor
    return out + [last]


def check(cfg: Any, r: Request, max_len: int | None = None) -> None:
    """A request against the model's vocabulary and context (`max_len`: the engine's,
    default the model's); one line per problem."""
    context = max_len or cfg.seq_len
    if not r.prompt:
        raise ServeError("the prompt is empty; give at least one token")
    if min(r.prompt) < 0 or max(r.prompt) >= cfg.vocab_size:
        raise ServeError(f"token ids must be in [0, {cfg.vocab_size}); the prompt has "
                         f"{min(r.prompt)}..{max(r.prompt)}")
    if r.max_tokens < 0:
        raise ServeError(f"max_tokens={r.max_tokens} must be >= 0")
    over = len(r.prompt) + r.max_tokens - context
    if len(r.prompt) > context or over > 0:
        raise ServeError(f"the prompt ({len(r.prompt)} tokens) + max_tokens ({r.max_tokens}) "
                         f"exceeds the context of {context} tokens by {max(over, 1)}")
    if not (np.isfinite(r.temperature) and r.temperature >= 0):
        raise ServeError(f"temperature={r.temperature} must be a number >= 0")
    if not 0 < r.top_p <= 1:
        raise ServeError(f"top_p={r.top_p} must be in (0, 1]")
    if r.top_k < 0:
        raise ServeError(f"top_k={r.top_k} must be >= 0 (0: no limit)")
