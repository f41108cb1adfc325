"""Continuous batching: a fixed number of decode slots sharing one KV cache, one engine
loop that owns the device, requests queued by anyone.

    engine = Engine(server, slots=8)
    engine.start()                           # the loop runs in its own thread
    handle = engine.submit(Request(prompt_ids, max_tokens=32))
    for event in handle: ...                 # Token events, then a Done event

Per iteration the loop admits queued requests into free slots (a group of prompts
prefilled together, their keys and values written into their slots' rows of the shared
cache), then runs `decode_steps` decode steps for every slot at once. A request frees its
slot the step it ends (max tokens, a stop sequence or stop token, the end of the context,
or its client going away: a cancel is seen at the end of the decode call in progress).

Prefix caching: the keys and values of every full block (`prefix_block` tokens) of a
prompt are kept in a pool on the device (`prefix_cache_tokens` tokens, least recently
used evicted), indexed on the host by a hash chain of the block's tokens and all before
it. A prompt that starts with cached blocks has them copied into its slot and only the
rest prefilled (at least its last token, whose logits choose the first new token); an
echo request (prompt log-probabilities) hits only blocks whose scores are kept too.

Two kinds of compiled program, made once by `warm_up`: prefill per (group, length
bucket, scores), the block copies inside it; one decode step. Nothing compiles per
request.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxmp.engine_programs import decode_program, prefill_program
from jaxmp.mesh import batch_shards
from jaxmp.prefix_cache import Plan, PrefixIndex, plan_prefills
from jaxmp.requests import Done, Handle, QueueFull, Request, Token, check
from jaxmp.sampling import TOP, seed_key_data
from jaxmp.serve import Server, bucket
from jaxmp.sharding import activation_sharding, spec_for

MIN_BUCKET = 16  # the shortest prefill (one prefix-cache block)

__all__ = ["TOP", "Done", "Engine", "Handle", "QueueFull", "Request", "Token", "check"]


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
                 max_len: int | None = None, decode_steps: int = 8,
                 prefix_cache_tokens: int | None = None, prefix_block: int = 16):
        """`max_len`: the cache length of a slot (prompt + new tokens), default the model's
        context. Every decode step reads every slot's whole cache, so a shorter one is
        faster where requests are short. `decode_steps`: decode steps per compiled call
        (more: less per-call overhead; fewer: new requests join sooner).
        `prefix_cache_tokens`: the prefix cache's size in tokens (default 4 x max_len; 0:
        off), in blocks of `prefix_block` tokens."""
        if decode_steps < 1:
            raise ValueError(f"decode_steps={decode_steps} must be >= 1")
        self.decode_steps = decode_steps
        if slots < 1 or max_queue < 1:
            raise ValueError(f"slots={slots} and max_queue={max_queue} must be >= 1")
        max_len = max_len or server.cfg.seq_len
        if not 1 < max_len <= server.cfg.seq_len:
            raise ValueError(f"max_len={max_len} must be in [2, {server.cfg.seq_len}] (the "
                             "model's context)")
        if prefix_block < 1:
            raise ValueError(f"prefix_block={prefix_block} must be >= 1")
        if prefix_cache_tokens is None:
            prefix_cache_tokens = 4 * max_len
        if prefix_cache_tokens < 0:
            raise ValueError(f"prefix_cache_tokens={prefix_cache_tokens} must be >= 0 (0: off)")
        self.max_len = max_len
        shards, label = batch_shards(server.mesh)
        if slots % shards:
            raise ValueError(f"slots={slots} must be a multiple of {label}={shards} of the "
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
            self.cache = jax.jit(lambda: server.module(server.params).init_cache(slots,
                                                                                   max_len))()
        self.prefix = PrefixIndex(prefix_cache_tokens // prefix_block, prefix_block)
        self._max_blocks = max_len // prefix_block
        self.pool = self._make_pool(max(1, self.prefix.capacity), prefix_block)
        self._prefills: dict[tuple[int, int, bool], Any] = {}
        self._decode = self._compile_decode()
        self.steps = 0

    def _make_pool(self, blocks: int, block: int) -> tuple[jax.Array, ...]:
        """The device pool of cached prefix blocks: per cache array (layers, blocks, block,
        heads, head_dim), laid out like the cache with its batch and length axes whole."""
        def one(c):
            spec = tuple(getattr(c.sharding, "spec", ()))
            spec = spec + (None,) * (c.ndim - len(spec))
            sh = NamedSharding(self.server.mesh, PartitionSpec(spec[0], None, None, *spec[3:]))
            shape = (c.shape[0], blocks, block, *c.shape[3:])
            return jax.jit(lambda: jnp.zeros(shape, c.dtype), out_shardings=sh)()
        return tuple(one(c) for c in self.cache)

    # ------------------------------------------------------------ programs
    def _compile_decode(self):
        cache_sh = jax.tree_util.tree_map(lambda c: c.sharding, self.cache)
        return decode_program(self.server, self.decode_steps, self.max_len, self._rows,
                              self._replicated, cache_sh)

    def _prefill_fn(self, group: int, length: int, scores: bool):
        """The prefill program of (group, length, scores), compiled at its first use
        (warm_up uses every one)."""
        key = (group, length, scores)
        if key not in self._prefills:
            shardings = lambda tree: jax.tree_util.tree_map(lambda c: c.sharding, tree)
            self._prefills[key] = prefill_program(
                self.server, group, scores, self.prefix.block, shardings(self.cache),
                shardings(self.pool), self._replicated)
        return self._prefills[key]

    def groups(self) -> list[int]:
        """Prefill group sizes: 1, 4, 16, ... up to the slots (and the slots)."""
        return _geometric(1, 4, self.slots)

    def lengths(self) -> list[int]:
        """Prompt-length buckets: 16, 32, ... up to max_len (what a prefill computes is
        padded to one of them)."""
        return _geometric(MIN_BUCKET, 2, self.max_len)

    def warm_up(self) -> None:
        """Compile the decode program and every prefill program now (each group size and
        length bucket; prompt scoring, which runs alone, for every length), so that no
        request ever waits for a compile."""
        for group in self.groups():
            for length in self.lengths():
                self._run_prefill([], group, length, False)
        for length in self.lengths():
            self._run_prefill([], 1, length, True)
        self._step(emit=False)
        jax.block_until_ready(self.cache)

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
                self._admit([handle])
            else:
                batch.append(handle)
        if batch:
            self._admit(batch)

    def _admit(self, handles: list[Handle]) -> None:
        """Prefill a group; if the group fails, each request alone, so that one request's
        failure is its own."""
        try:
            self._prefill(handles)
        except Exception as e:
            if len(handles) == 1:
                handles[0].put(Done("error", error=f"{type(e).__name__}: {e}"))
                return
            for h in handles:
                self._admit([h])

    def _prefill(self, handles: list[Handle]) -> None:
        """Prefill `handles` into free slots and emit their first tokens."""
        plans = plan_prefills(self.prefix, handles)
        group = next(g for g in self.groups() if g >= len(handles))
        length = min(bucket(max(len(p.handle.request.prompt) - p.start for p in plans),
                            MIN_BUCKET),
                     self.max_len)
        for p in plans:  # the window [start, start + length) stays inside the slot's rows
            p.start = min(p.start, self.max_len - length)
        scores = any(h.request.prompt_logprobs for h in handles)
        try:
            out = self._run_prefill(plans, group, length, scores)
        except Exception:
            for p in plans:  # blocks planned for the pool were never written
                for b, dst in p.saves:
                    self.prefix.entries.pop(p.keys[b], None)
                    self.prefix.free.append(dst)
            raise
        first, prompt = jax.device_get(out)
        free = [i for i in range(self.slots) if i not in self.active]
        for g, p in enumerate(plans):
            h, r = p.handle, p.handle.request
            self.prefix.lookups += 1
            self.prefix.prompt_tokens += len(r.prompt)
            self.prefix.hit_tokens += p.start
            h.cached_tokens = p.start
            prompt_tokens = self._prompt_scores(p, [x[g] for x in prompt]) if r.prompt_logprobs \
                else None
            h.prompt_scores = prompt_tokens
            if r.max_tokens == 0:
                h.put(Done("length", "", prompt_tokens))
                continue
            slot = free[g]
            self.active[slot] = _Slot(h, len(r.prompt), seed_key_data(r.seed), prompt_tokens)
            self._emit(slot, *(np.asarray(x)[g] for x in first))

    def _run_prefill(self, plans: list[Plan], group: int, length: int, scores: bool):
        """Run the prefill program of (group, length, scores) for `plans` (none: warm-up)."""
        free = [i for i in range(self.slots) if i not in self.active]
        mb = max(1, self._max_blocks)
        tokens = np.zeros((group, length), np.int32)
        n, start, slots = np.ones(group, np.int32), np.zeros(group, np.int32), np.zeros(group, np.int32)
        valid = np.zeros(group, bool)
        loads, n_loads = np.zeros((group, mb), np.int32), np.zeros(group, np.int32)
        saves, n_saves = np.zeros((group, mb, 2), np.int32), np.zeros(group, np.int32)
        temperature, top_k = np.zeros(group, np.float32), np.zeros(group, np.int32)
        top_p, keys = np.ones(group, np.float32), np.zeros((group, 2), np.uint32)
        for g, p in enumerate(plans):
            r = p.handle.request
            part = r.prompt[p.start:]
            tokens[g, :len(part)] = part
            n[g], start[g], slots[g], valid[g] = len(part), p.start, free[g], True
            loads[g, :len(p.loads)], n_loads[g] = p.loads, len(p.loads)
            if p.saves:
                saves[g, :len(p.saves)] = p.saves
            n_saves[g] = len(p.saves)
            temperature[g], top_k[g], top_p[g] = r.temperature, r.top_k, r.top_p
            keys[g] = seed_key_data(r.seed)
        fn = self._prefill_fn(group, length, scores)
        self.cache, self.pool, first, prompt = fn(
            self.server.params, self.cache, self.pool, tokens, n, start, slots, valid, loads,
            n_loads, saves, n_saves, temperature, top_k, top_p, keys)
        return first, prompt

    def _prompt_scores(self, p: Plan, computed: list[np.ndarray]) -> list[Token | None]:
        """Every prompt token's log-probability (None for the first): those before the
        prefill's start from the cached blocks, the rest from this prefill; kept with the
        prompt's blocks for later echo requests."""
        r, block = p.handle.request, self.prefix.block
        kept = [t for e in p.matched for t in e.scores or []]
        out: list[Token | None] = kept[:p.start + 1] if p.matched else [None]
        lp, top_id, top_lp = computed
        for i in range(p.start, len(r.prompt) - 1):  # logits at i score token i + 1
            j = i - p.start
            out.append(Token(r.prompt[i + 1], float(lp[j]),
                             list(zip(top_id[j].tolist(), top_lp[j].tolist()))))
        for b, key in enumerate(p.keys):
            e = self.prefix.entries.get(key)
            if e is not None and e.scores is None:
                e.scores = out[b * block:(b + 1) * block]
        return out

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
        if h.first_token is None:
            h.first_token = time.perf_counter()
        if int(token) in r.stop_ids:
            return self._finish(slot, "stop")
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

    def stats(self) -> dict:
        """What /health reports: the queue, the slots, the prefix cache's use."""
        return {"queued": self.queue.qsize(), "active": len(self.active), "slots": self.slots,
                "decode_steps": self.steps, "prefix_cache": self.prefix.stats()}


def _geometric(start: int, factor: int, last: int) -> list[int]:
    """start, start * factor, ... below `last`, then `last`."""
    out, n = [], start
    while n < last:
        out.append(n)
        n *= factor
    return out + [last]


