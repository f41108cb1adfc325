"""Serving: restore a checkpoint onto any mesh; batched predict and KV-cache generation.

The serving mesh need not match the training mesh: the model is rebuilt from the
checkpoint's sidecar, its parameters laid out by the same rules on the new mesh, and
Orbax reads each device's slice directly. The whole decode loop (prefill + every new
token) is one jitted program per (batch bucket, prompt bucket, new-token bucket).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmp.checkpoint import Checkpoints
from jaxmp.layers import keeps_float32
from jaxmp.mesh import batch_shards, make_mesh
from jaxmp.models import registry
from jaxmp.pipeline import PipelineSpec
from jaxmp.sampling import SEED_RANGE, ServeError, check_prompt, check_sampling, sample, seed_key_data  # noqa: F401  (ServeError, seed_key_data: re-exported)
from jaxmp.sharding import (
    DEFAULT_RULES,
    Rules,
    activation_sharding,
    logical_axes,
    named,
    param_specs,
    spec_for,
)
from jaxmp.tokenizer import TextCodec


def bucket(n: int, lo: int = 1) -> int:
    """Next power of two >= max(n, lo)."""
    return max(lo, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class Generation:
    prompt: list[int]
    tokens: list[int]  # the new tokens only
    # with return_logits: (new tokens, vocab) float32, the logits each token was chosen from
    logits: np.ndarray | None = None


class Server:
    """A generating model (a family with `generates`, e.g. GPT) laid out on a serving mesh
    ("tensor:4", "data:2", "" = one device): `Server.from_checkpoint(dir, mesh)` restores a
    checkpoint straight into it; `Server(cfg, mesh, params=...)` serves parameters in hand
    (canonical layer order)."""

    def __init__(self, cfg: Any, mesh: str | Mesh = "", *, family: str = registry.DEFAULT,
                 params: Any = None, rules: Rules | None = None,
                 devices: Sequence[jax.Device] | None = None, tokenizer: dict | None = None,
                 chat: dict | None = None):
        self.family = registry.get(family)
        if not self.family.generates:
            raise ServeError(f"a {family!r} model cannot generate; serving needs a token model "
                             f"({', '.join(n for n in registry.names() if registry.get(n).generates)})")
        if getattr(cfg, "attention", None) == "cudnn" and jax.default_backend() != "gpu":
            cfg = dataclasses.replace(cfg, attention="auto")
        self.cfg, self.codec = cfg, TextCodec(cfg.vocab_size, tokenizer)
        self.tokenizer = tokenizer  # the JSON of a tokenizer.json, or None
        self.chat = chat  # the chat template and special tokens (jaxmp.chat), or None
        self.mesh = mesh if isinstance(mesh, Mesh) else serving_mesh(mesh, devices)
        self.rules = rules or DEFAULT_RULES
        pipe = PipelineSpec(self.mesh.shape["pipe"], 1, 1)
        self._abstract = nnx.eval_shape(lambda: self.family.build(cfg, pipe, nnx.Rngs(0)))
        self.graphdef, abs_params = nnx.split(self._abstract, nnx.Param)
        self.abstract_params = nnx.to_pure_dict(abs_params)
        specs = param_specs(self.abstract_params, logical_axes(self._abstract), self.mesh,
                            self.rules)
        self.param_shardings = named(self.mesh, specs)
        self.layer_order = self._abstract.stack.order
        self.step: int | None = None
        self.restore_seconds = 0.0
        self._generate: dict = {}
        self.params = None if params is None else self._hold(jax.device_put(
            params, self.param_shardings))

    @classmethod
    def from_checkpoint(cls, ckpt_dir: str, mesh: str | Mesh = "", *, step: int | None = None,
                        rules: Rules | None = None, devices: Sequence[jax.Device] | None = None,
                        tokenizer: dict | None = None) -> Server:
        """The model of a checkpoint (any training layout), or of a Hugging Face model
        directory, restored onto `mesh`: each device reads its own slice. `tokenizer`
        (the JSON of a tokenizer.json) replaces the one the checkpoint carries."""
        from jaxmp import hf

        if hf.is_hf_directory(ckpt_dir):
            return cls._from_hf(ckpt_dir, mesh, rules, devices, tokenizer)
        ckpts = Checkpoints(ckpt_dir, create=False)
        try:
            step = ckpts.resolve(step)
            record = ckpts.record(step)
            family = registry.get(record.family)
            if not family.generates:
                generating = [n for n in registry.names() if registry.get(n).generates]
                raise ServeError(f"{ckpt_dir} holds a {record.family} model, which does not "
                                 "generate text; serving takes a language model ("
                                 f"{', '.join(generating)})")
            server = cls(family.config_from_json(record.config), mesh, family=record.family,
                         rules=rules or Rules.from_json(record.rules), devices=devices,
                         tokenizer=tokenizer or record.tokenizer, chat=record.chat)
            target = jax.tree_util.tree_map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.dtype(record.param_dtype), sharding=s),
                server.abstract_params, server.param_shardings)
            t0 = time.perf_counter()
            params = ckpts.restore_params(target, step=step, layer_order=server.layer_order)
            server.params = jax.block_until_ready(server._hold(params))
            server.step, server.restore_seconds = step, time.perf_counter() - t0
        finally:
            ckpts.close()
        return server

    @classmethod
    def _from_hf(cls, path: str, mesh: str | Mesh, rules: Rules | None,
                 devices: Sequence[jax.Device] | None, tokenizer: dict | None) -> Server:
        from jaxmp.pretrained import open_source

        source = open_source(path, name="ckpt_dir")
        cfg = source.family.config_from_json(source.config)
        server = cls(cfg, mesh, family=source.family.name, rules=rules, devices=devices,
                     tokenizer=tokenizer or source.tokenizer, chat=source.chat)
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=s),
            server.abstract_params, server.param_shardings)
        t0 = time.perf_counter()
        params = source.load(target, server.layer_order, cfg)
        server.params = jax.block_until_ready(server._hold(params))
        server.restore_seconds = time.perf_counter() - t0
        return server

    # ------------------------------------------------------------ helpers
    def _hold(self, params: Any) -> Any:
        return serving_params(self._abstract, params, self.cfg.dtype)

    def module(self, params: Any) -> nnx.Module:
        """The model with `params` (inside a jitted function: the serving programs')."""
        return nnx.merge(self.graphdef, params)

    def decoder(self, params: Any) -> tuple[nnx.Module, Callable[..., Any]]:
        """(model, decode) for a loop of decode calls: decode(tokens, cache, index) with the
        layer weights split once, before the loop (LayerStack.split). tokens (B, t) go to
        positions index[b] + [0, t) of the cache (model.init_cache(B, length)); returns the
        logits (B, t, V) and the new cache."""
        model = self.module(params)
        layers = model.stack.split(getattr(model, self.family.stack))
        return model, functools.partial(model.decode, layers=layers)

    def _batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
        names = ("batch",) + (None,) * (len(shape) - 1)
        return NamedSharding(self.mesh, spec_for(names, shape, self.mesh,
                                                 self.rules.activations, strict=False))

    def encode(self, text: str) -> list[int]:
        """Byte-level models take text; others take 'ids:1,2,3'."""
        try:
            return self.codec.encode(text)
        except ValueError as e:
            raise ServeError(str(e)) from None

    def decode_text(self, tokens: Sequence[int]) -> str:
        return self.codec.decode(list(tokens))

    # ------------------------------------------------------------ predict
    @functools.cached_property
    def _predict(self):
        def fn(params, tokens):
            with activation_sharding(self.mesh, self.rules):
                return self.module(params)(tokens)
        return jax.jit(fn)

    def predict(self, tokens: Any) -> jax.Array:
        """tokens (B, T) int -> logits (B, T, padded_vocab) float32 (padding at -1e30)."""
        tokens = np.asarray(tokens, np.int32)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ServeError(f"predict takes a (batch, length) token array, got {tokens.shape}")
        self._check_ids(tokens)
        if tokens.shape[1] > self.cfg.seq_len:
            raise ServeError(f"sequence of {tokens.shape[1]} tokens is longer than the context "
                             f"of {self.cfg.seq_len}")
        x = jax.device_put(tokens, self._batch_sharding(tokens.shape))
        return self._predict(self.params, x)

    def _check_ids(self, tokens: np.ndarray) -> None:
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.cfg.vocab_size):
            raise ServeError(f"token ids must be in [0, {self.cfg.vocab_size}); got "
                             f"{int(tokens.min())}..{int(tokens.max())}")

    # ------------------------------------------------------------ generate
    def _compiled_generate(self, batch: int, prompt_len: int, new: int, greedy: bool,
                           return_logits: bool = False):
        """One program: prefill, then `new` decode steps in a scan, sampling with the
        engine's sampler (row b keyed by its seed and the position of its logits)."""
        key = (batch, prompt_len, new, greedy, return_logits)
        if key in self._generate:
            return self._generate[key]
        cache_len = min(self.cfg.seq_len, prompt_len + new)
        rows = NamedSharding(self.mesh, spec_for(("batch",), (batch,), self.mesh,
                                                 self.rules.activations, strict=False))
        replicated = NamedSharding(self.mesh, PartitionSpec())

        def fn(params, tokens, lengths, keys, temperature, top_k, top_p):
            with activation_sharding(self.mesh, self.rules):
                model, decode = self.decoder(params)
                keys = jax.random.wrap_key_data(keys)
                cache = model.init_cache(batch, cache_len)
                zero = jnp.zeros((batch,), jnp.int32)
                logits, cache = decode(tokens, cache, zero)  # prefill (B, P, V)
                last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

                def body(carry, i):
                    logits, cache = carry
                    step_keys = jax.vmap(jax.random.fold_in)(keys, lengths - 1 + i)
                    tok = (jnp.argmax(logits, axis=-1).astype(jnp.int32) if greedy else
                           sample(logits, temperature, top_k, top_p, step_keys)[0])
                    nxt, cache = decode(tok[:, None], cache, lengths + i)
                    return (nxt[:, 0], cache), (tok, logits if return_logits else None)

                _, (toks, seen) = jax.lax.scan(body, (last, cache), jnp.arange(new))
                real = self.cfg.vocab_size
                return toks.T, None if seen is None else seen[..., :real].swapaxes(0, 1)

        compiled = jax.jit(fn, in_shardings=(self.param_shardings, self._batch_sharding(
            (batch, prompt_len)), rows, rows, rows, rows, rows),
            out_shardings=replicated)  # every process gets every completion
        self._generate[key] = compiled
        return compiled

    def generate(self, prompts: Sequence[Sequence[int] | str], max_new_tokens: int,
                 temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                 return_logits: bool = False, top_p: float = 1.0) -> list[Generation]:
        """Continue each prompt by max_new_tokens tokens (temperature 0 = greedy; top_k,
        top_p as the engine's sampler takes them); prompt i samples with seed + i, so it
        draws what the engine draws for it with that seed. With return_logits, each
        Generation also holds the logits its tokens were chosen from."""
        ids = check_request(self.cfg, prompts, max_new_tokens, temperature, top_k, self.codec,
                            top_p)
        seeds = [seed_key_data(seed)] + [seed_key_data((int(seed) + i) % (1 << 64))
                                         for i in range(1, len(ids))]
        limit = self.cfg.seq_len
        shards = batch_shards(self.mesh)[0]
        batch = bucket(len(ids), shards)
        plen = min(bucket(max(map(len, ids)), 8), limit)
        new = min(bucket(max_new_tokens, 8), limit)
        tokens = np.zeros((batch, plen), np.int32)
        lengths = np.ones((batch,), np.int32)
        keys = np.zeros((batch, 2), np.uint32)
        for i, p in enumerate(ids):
            tokens[i, :len(p)] = p
            lengths[i], keys[i] = len(p), seeds[i]
        fn = self._compiled_generate(batch, plen, new, temperature == 0, return_logits)
        full = lambda v, t: np.full((batch,), v, t)
        out, logits = jax.device_get(fn(self.params, tokens, lengths, keys,
                                        full(temperature, np.float32), full(top_k or 0, np.int32),
                                        full(top_p, np.float32)))
        out = np.asarray(out)
        return [Generation(p, out[i, :max_new_tokens].tolist(),
                           None if logits is None else np.asarray(logits[i, :max_new_tokens]))
                for i, p in enumerate(ids)]


def check_request(cfg: Any, prompts: Sequence[Sequence[int] | str], max_new_tokens: int,
                  temperature: float = 0.0, top_k: int | None = None,
                  codec: TextCodec | None = None, top_p: float = 1.0) -> list[list[int]]:
    """The prompts as token ids, after checking a request against a model config (its
    vocabulary and context) and text codec: callable before any weights are loaded. The
    numbers are checked by the engine's own checks (jaxmp.sampling)."""
    codec = codec or TextCodec(cfg.vocab_size)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)):
        raise ServeError(f"prompts must be a list of prompts (texts or token-id lists), not a "
                         f"{type(prompts).__name__}; e.g. [{prompts!r}]"[:300])
    if not _is_int(max_new_tokens):
        raise ServeError(f"max_new_tokens={max_new_tokens!r} must be an integer")
    if max_new_tokens < 1:
        raise ServeError(f"max_new_tokens={max_new_tokens} must be >= 1")
    check_sampling(temperature, top_k, top_p, cfg.vocab_size)
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            try:
                ids.append(codec.encode(p))
            except ValueError as e:
                raise ServeError(str(e)) from None
            continue
        if isinstance(p, bytes) or not isinstance(p, (Sequence, np.ndarray)):
            raise ServeError(f"prompt {i} is a {type(p).__name__}; a prompt is a text or a list "
                             "of token ids")
        bad = [t for t in p if not _is_int(t)]
        if bad:
            raise ServeError(f"prompt {i} holds {bad[0]!r}; token ids are integers")
        ids.append([int(t) for t in p])
    if not ids:
        raise ServeError("no prompts given")
    for i, p in enumerate(ids):
        check_prompt(p, max_new_tokens, cfg.vocab_size, cfg.seq_len, f"prompt {i}",
                     "max_new_tokens")
    return ids


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def serving_params(model: nnx.Module, params: Any, dtype: Any) -> Any:
    """Parameters as a server holds them: every weight the model casts to its compute
    dtype anyway is stored in that dtype (half the bytes read per token in bf16, no cast
    per call); parameters tagged float32 (norm scales and biases: `layers.param`'s
    keep_float32), which the layers use in float32, stay float32. Outputs are the same as
    computing from float32 weights."""
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float32:
        return params
    keep = keeps_float32(nnx.state(model, nnx.Param))
    return jax.tree_util.tree_map(lambda x, f32: x if f32 else x.astype(dtype), params, keep)


def serving_mesh(spec: str, devices: Sequence[jax.Device] | None) -> Mesh:
    devices = list(devices or jax.devices())
    return make_mesh(spec, devices=devices[:mesh_devices(spec, len(devices))])


def mesh_devices(spec: str, available: int) -> int:
    """How many devices a serving mesh string needs (-1 takes all available); a MeshError
    if that is more than `available`."""
    from jaxmp.mesh import parse_mesh

    sizes = [p.partition(":")[2] for p in spec.split(",") if p.strip()]
    if any(s.strip() == "-1" for s in sizes):
        return available
    n = 1
    for s in sizes:
        try:
            n *= int(s)
        except ValueError:
            parse_mesh(spec, available)  # raises the clear error
    if n > available:
        parse_mesh(spec, available)
    return n
