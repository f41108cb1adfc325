"""The engine's two compiled programs: the grouped prefill (with the prefix pool's block
copies inside it) and `steps` decode steps for every slot. Both sample with the serving
core's sampler, keyed by each request's seed and the position of the logits."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxmp.sampling import TOP, sample
from jaxmp.sharding import activation_sharding

Arrays = tuple[jax.Array, ...]


def decode_program(server: Any, steps: int, max_len: int, rows: Any, rep: Any,
                   cache_sh: Any) -> Any:
    """`steps` decode steps for every slot in one program (a scan): the weights' per-call
    work is paid once per call, and the host syncs once per call. A slot that ends inside
    a call decodes on to the call's end into its own rows (discarded)."""
    last = max_len - 1

    def run(params, cache, tokens, positions, temperature, top_k, top_p, keys):
        with activation_sharding(server.mesh, server.rules):
            _, decode = server.decoder(params)
            keys = jax.random.wrap_key_data(keys)

            def one(carry, _):
                cache, tok, pos = carry
                pos = jnp.minimum(pos, last)
                logits, cache = decode(tok[:, None], cache, pos)
                step_keys = jax.vmap(jax.random.fold_in)(keys, pos)
                out = sample(logits[:, 0], temperature, top_k, top_p, step_keys)
                return (cache, out[0], pos + 1), out
            (cache, _, _), out = jax.lax.scan(one, (cache, tokens, positions), None,
                                              length=steps)
            return (cache, *out)  # each (steps, slots, ...)
    return jax.jit(run, in_shardings=(server.param_shardings, cache_sh) + (rows,) * 6,
                   out_shardings=(cache_sh, rep, rep, rep, rep), donate_argnums=1)


def load_blocks(rows: Arrays, pool: Arrays, loads: jax.Array, n_loads: jax.Array,
                group: int, block: int) -> Arrays:
    """Copy row g's cached prefix blocks (pool blocks loads[g, :n_loads[g]]) into its
    positions [0, n_loads[g] * block)."""
    def row(g, rows):
        def one(j, rows):
            return tuple(jax.lax.dynamic_update_slice(
                r, jax.lax.dynamic_slice_in_dim(p, loads[g, j], 1, axis=1),
                (0, g, j * block, 0, 0)) for r, p in zip(rows, pool))
        return jax.lax.fori_loop(0, n_loads[g], one, rows)
    return jax.lax.fori_loop(0, group, row, rows)


def store_rows(cache: Arrays, pool: Arrays, rows: Arrays, slots: jax.Array, valid: jax.Array,
               saves: jax.Array, n_saves: jax.Array, group: int,
               block: int) -> tuple[Arrays, Arrays]:
    """Write each valid row back into its slot of the cache, and its new full blocks
    (saves[g, j] = (block of the row, pool block)) out to the pool."""
    def row(g, carry):
        cache, pool = carry
        at = (0, slots[g], 0, 0, 0)
        out = []
        for big, r in zip(cache, rows):
            new = jax.lax.dynamic_slice_in_dim(r, g, 1, axis=1)
            old = jax.lax.dynamic_slice(big, at, new.shape)
            out.append(jax.lax.dynamic_update_slice(big, jnp.where(valid[g], new, old), at))

        def save(j, pool):
            src, dst = saves[g, j, 0], saves[g, j, 1]
            return tuple(jax.lax.dynamic_update_slice(
                p, jax.lax.dynamic_slice(r, (0, g, src * block, 0, 0),
                                         (r.shape[0], 1, block, *r.shape[3:])),
                (0, dst, 0, 0, 0)) for p, r in zip(pool, rows))
        pool = jax.lax.fori_loop(0, jnp.where(valid[g], n_saves[g], 0), save, pool)
        return tuple(out), pool
    return jax.lax.fori_loop(0, group, row, (cache, pool))


def prompt_scores(logits: jax.Array, tokens: jax.Array) -> tuple[jax.Array, ...]:
    """Each prompt token's log-probability (logits at i score token i + 1) and the TOP
    alternatives at every position."""
    logp = jax.nn.log_softmax(logits, axis=-1)  # (G, length, V)
    nxt = jnp.roll(tokens, -1, axis=1)
    prompt_lp = jnp.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
    top_lp, top_id = jax.lax.top_k(logp, min(TOP, logp.shape[-1]))
    return prompt_lp, top_id.astype(jnp.int32), top_lp


def prefill_program(server: Any, group: int, scores: bool, block: int, cache_sh: Any,
                    pool_sh: Any, rep: Any) -> Any:
    """The prefill of `group` prompts, each at positions start[g] + [0, length) (padded),
    straight into their slots' rows: each slot's cached prefix blocks are first copied in
    from the pool, then the tokens run through the model attending to everything before
    them, then the prompt's new full blocks are copied out to the pool. Rows marked
    invalid leave their slot and the pool as they were. Samples the first tokens; with
    `scores`, also returns the log-probabilities of the prompts' own tokens (echo)."""
    def run(params, cache, pool, tokens, n, start, slots, valid, loads, n_loads, saves,
            n_saves, temperature, top_k, top_p, keys):
        with activation_sharding(server.mesh, server.rules):
            model = server.module(params)
            rows = tuple(jnp.take(c, slots, axis=1) for c in cache)  # (L, G, S, N, H)
            rows = load_blocks(rows, pool, loads, n_loads, group, block)
            logits, rows = model.decode(tokens, rows, start)
            cache, pool = store_rows(cache, pool, rows, slots, valid, saves, n_saves, group,
                                     block)
            last = jnp.take_along_axis(logits, (n - 1)[:, None, None], axis=1)[:, 0]
            # a draw is keyed by the position of its logits (the last prompt token's)
            keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys),
                                                start + n - 1)
            first = sample(last, temperature, top_k, top_p, keys)
            return cache, pool, first, prompt_scores(logits, tokens) if scores else None
    return jax.jit(run, in_shardings=(server.param_shardings, cache_sh, pool_sh) + (rep,) * 13,
                   out_shardings=(cache_sh, pool_sh, rep, rep), donate_argnums=(1, 2))
