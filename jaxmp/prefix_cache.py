"""The prefix cache's host side: which blocks of which prompts are in the device pool.

Every full block (`block` tokens) of a prompt is keyed by a SHA-256 chain over its tokens
and every token before it (so a block is only ever reused after the same prefix) and
mapped to a block of the device pool (jaxmp.engine holds the pool and copies blocks in and
out inside its prefill program); least recently used first out. Only the engine's thread
touches it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

from jaxmp.requests import Handle, Token


@dataclasses.dataclass
class Entry:
    index: int                               # its block of the device pool
    scores: list[Token | None] | None = None  # its tokens' prompt log-probabilities, if known


class PrefixIndex:
    """The host side of the prefix cache: full prompt blocks, keyed by a SHA-256 chain over
    the block's tokens and every token before it, mapped to blocks of the device pool;
    least recently used first. Only the engine's thread touches it."""

    def __init__(self, blocks: int, block: int):
        self.block, self.capacity = block, blocks
        self.entries: collections.OrderedDict[bytes, Entry] = collections.OrderedDict()
        self.free = list(range(blocks))
        self.lookups = self.hit_tokens = self.prompt_tokens = 0

    def keys(self, prompt: list[int], count: int | None = None) -> list[bytes]:
        out, h = [], b""
        n = len(prompt) // self.block if count is None else count
        for b in range(n):
            chunk = np.asarray(prompt[b * self.block:(b + 1) * self.block], np.int64)
            h = hashlib.sha256(h + chunk.tobytes()).digest()
            out.append(h)
        return out

    def match(self, keys: list[bytes], scores: bool) -> list[Entry]:
        """The cached blocks the keys start with (with their scores, if `scores`)."""
        out = []
        for k in keys:
            e = self.entries.get(k)
            if e is None or (scores and e.scores is None):
                break
            out.append(e)
        for k in reversed(keys[:len(out)]):  # a block stays longer than the blocks after it
            self.entries.move_to_end(k)
        return out

    def allocate(self, key: bytes, pinned: set[int]) -> int | None:
        """A pool block for `key` (a free one, else the least recently used not pinned)."""
        if self.free:
            index = self.free.pop()
        else:
            victim = next((k for k, e in self.entries.items() if e.index not in pinned), None)
            if victim is None:
                return None
            index = self.entries.pop(victim).index
        self.entries[key] = Entry(index)
        return index

    def stats(self) -> dict:
        return {"blocks": len(self.entries), "capacity_blocks": self.capacity,
                "block_tokens": self.block, "lookups": self.lookups,
                "prompt_tokens": self.prompt_tokens, "hit_tokens": self.hit_tokens}


@dataclasses.dataclass
class Plan:
    """One request's part of a prefill call."""
    handle: Handle
    start: int                 # the first position prefilled (earlier ones come from the pool)
    loads: list[int]           # pool blocks copied into positions [0, len * block)
    saves: list[tuple[int, int]]  # (block of the prompt, pool block) written after the prefill
    matched: list[Entry]
    keys: list[bytes]


def plan_prefills(index: PrefixIndex, handles: list[Handle]) -> list[Plan]:
    """Where each prompt's prefill starts (after its cached blocks) and which of its
    blocks go to the pool afterwards."""
    block = index.block
    plans, pinned, planned = [], set(), set()
    for h in handles:
        r = h.request
        keys = index.keys(r.prompt) if index.capacity else []
        # at least the last prompt token runs (its logits choose the first new token);
        # an echo request re-runs the last cached token too (its logits score the next)
        usable = keys[:(len(r.prompt) - 1) // block]
        matched = index.match(usable, r.prompt_logprobs)
        cached = len(matched) * block
        start = max(0, cached - 1) if r.prompt_logprobs else cached
        pinned.update(e.index for e in matched)
        plans.append(Plan(h, start, [e.index for e in matched], [], matched, keys))
    for p in plans:  # after every lookup, so that no block in use is evicted
        for b in range(len(p.matched), len(p.keys)):
            if p.keys[b] in index.entries or p.keys[b] in planned:
                continue
            dst = index.allocate(p.keys[b], pinned)
            if dst is None:
                break
            pinned.add(dst)
            planned.add(p.keys[b])
            p.saves.append((b, dst))
    return plans
