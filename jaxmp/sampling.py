"""The serving core's sampler and request checks, shared by `Server.generate` and the
continuous-batching engine, so both draw the same way and refuse the same requests.

    token, logprob, top_ids, top_logprobs = sample(logits, temperature, top_k, top_p, keys)

Every argument is per row: greedy where temperature is 0, else top-k, then top-p over the
top-k tokens renormalised (the order of Hugging Face's warpers, vLLM and llama.cpp). A
row's key is its request's seed (`seed_key_data`) folded with the position of the logits
it samples from, so a request draws the same tokens whatever it is batched with, however
its decoding is split into calls, and whether it is served by `generate` or the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TOP = 20  # alternatives reported per token (OpenAI's top_logprobs maximum)
PADDING = -1e30  # the logit of a padding entry of the vocabulary (models.decoder.NEG_INF)
MAX_TEMPERATURE = 1e30  # float32's range, with room
SEED_RANGE = (-(1 << 63), 1 << 64)  # any signed or unsigned 64-bit integer


class ServeError(ValueError):
    """A request the server cannot answer."""


def seed_key_data(seed: int) -> np.ndarray:
    """A PRNG key's raw data (threefry: two uint32 words) from all 64 bits of `seed`
    (negative seeds as their two's complement); equal to jax.random.key(seed)'s for seeds
    in [0, 2^31). ServeError outside SEED_RANGE."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ServeError(f"seed={seed!r} must be an integer")
    seed = int(seed)
    if not SEED_RANGE[0] <= seed < SEED_RANGE[1]:
        raise ServeError(f"seed={seed} is outside the 64-bit range [-2^63, 2^64)")
    seed %= 1 << 64
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


def sample(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
           keys: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """One token per row of logits (B, V) float32 (padding at -1e30); temperature, top_k
    (0: the whole vocabulary), top_p: (B,); keys: (B,) typed PRNG keys. Returns (token, its
    log-probability, the TOP most likely ids, their log-probabilities), all from the
    model's own distribution."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sampled():
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        # padding (-1e30) stays out of reach whatever the temperature (at 1e30 it would
        # divide up to the real tokens' level)
        scaled = jnp.where(logits > PADDING / 2, scaled, -jnp.inf)
        order = jnp.sort(scaled, axis=-1)[:, ::-1]  # descending
        vocab = logits.shape[-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        kth = jnp.take_along_axis(order, (k - 1)[:, None], axis=-1)
        # top-p over the top-k tokens' renormalised distribution: the smallest set whose
        # probability reaches top_p, i.e. the tokens whose preceding mass < p
        probs = jax.nn.softmax(jnp.where(order >= kth, order, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs
        cut = jnp.where(before < top_p[:, None], order, jnp.inf).min(axis=-1, keepdims=True)
        keep = (scaled >= kth) & (scaled >= cut)
        masked = jnp.where(keep, scaled, -jnp.inf)
        return jax.vmap(lambda k_, row: jax.random.categorical(k_, row))(
            keys, masked).astype(jnp.int32)
    token = jax.lax.cond(jnp.any(temperature > 0),
                         lambda: jnp.where(temperature > 0, sampled(), greedy),
                         lambda: greedy)
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    top_lp, top_id = jax.lax.top_k(logp, min(TOP, logp.shape[-1]))
    return token, chosen, top_id.astype(jnp.int32), top_lp


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def check_sampling(temperature: Any, top_k: Any, top_p: Any, vocab: int) -> None:
    """Sampling settings: temperature a number >= 0, top_k an integer in [0, vocab] (0 or
    None: no limit), top_p in (0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.number)):
        raise ServeError(f"temperature={temperature!r} must be a number >= 0 (0 = greedy)")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ServeError(f"temperature={temperature} must be a number >= 0 (0 = greedy)")
    if temperature > MAX_TEMPERATURE:
        raise ServeError(f"temperature={temperature:g} is beyond float32's range; use at most "
                         f"{MAX_TEMPERATURE:g}")
    if top_k is not None and (not _is_int(top_k) or not 0 <= top_k <= vocab):
        raise ServeError(f"top_k={top_k!r} must be an integer in [0, {vocab}] (0: no limit; "
                         "the vocabulary size at most)")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.number)) or not (
            math.isfinite(top_p) and 0 < top_p <= 1):
        raise ServeError(f"top_p={top_p!r} must be in (0, 1]")


def check_prompt(ids: Sequence[int], max_tokens: int, vocab: int, context: int,
                 name: str = "the prompt", tokens_name: str = "max_tokens") -> None:
    """Token ids against the vocabulary, and ids + max_tokens new ones against the context
    (`context`: positions a request may use); `tokens_name` is what the caller calls
    max_tokens (Server.generate: max_new_tokens)."""
    if not _is_int(max_tokens):
        raise ServeError(f"{tokens_name}={max_tokens!r} must be an integer")
    if max_tokens < 0:
        raise ServeError(f"{tokens_name}={max_tokens} must be >= 0")
    if len(ids) == 0:
        raise ServeError(f"{name} is empty; give at least one token")
    if min(ids) < 0 or max(ids) >= vocab:
        raise ServeError(f"token ids must be in [0, {vocab}); {name} has "
                         f"{min(ids)}..{max(ids)}")
    if len(ids) > context:
        raise ServeError(f"{name} has {len(ids)} tokens, longer than the context of {context}")
    over = len(ids) + max_tokens - context
    if over > 0:
        raise ServeError(f"{name} ({len(ids)} tokens) + {tokens_name} ({max_tokens}) exceeds "
                         f"the context of {context} tokens by {over}; use {tokens_name} <= "
                         f"{context - len(ids)}")
