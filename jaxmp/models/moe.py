"""Mixture-of-experts decoder family (`--model=moe`): Llama's attention (grouped-query,
rotary, optionally Qwen3's per-head query/key RMSNorm and a head size of its own) with a
routed MLP of E SwiGLU experts (jaxmp.experts), each token sent to its top-k, plus optional
shared experts (an always-on SwiGLU MLP added to the routed output).

The experts' weights are stacked (E, ...) and stored as Hugging Face stores each expert's
Linear, (out, in): gate and up (E, mlp, embed), down (E, embed, mlp), with logical names
`experts` (-> the `expert` mesh axis), `mlp` (-> tensor) and `embed` (-> fsdp). Every
layout of the Llama family works unchanged (data, fsdp, tensor, pipe with GPipe and
circular schedules, sequence parallelism, ZeRO-1 state), with `expert` added.

The per-sequence routing statistics (load balancing, router z-loss, dropped fraction)
travel through the layer stack as three extra channels of the residual stream, so the
pipeline carries them between stages like the activations; the loss adds
router_aux_loss_coef * aux_loss + router_z_loss_coef * router_z_loss to the next-token
cross-entropy and reports each.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp import fp8
from jaxmp.experts import STATS, moe_mlp, route
from jaxmp.layers import RESIDUAL, KVCache, param
from jaxmp.models.decoder import context_batch, from_preset, head_losses, token_batches
from jaxmp.models.llama import (
    MLP,
    Block,
    Llama,
    LlamaConfig,
    config_from_json,
    config_from_spec,
    rope_frequencies,
)
from jaxmp.models.moe_hf import MIXTRAL, QWEN3_MOE
from jaxmp.models.registry import Family, register
from jaxmp.scheduled import stack_loss
from jaxmp.sharding import constrain
from jaxmp.stack import unstack


@dataclasses.dataclass(frozen=True)
class MoEConfig(LlamaConfig):
    mlp_dim: int = 128             # each expert's SwiGLU width
    num_experts: int = 8
    experts_per_token: int = 2
    shared_mlp_dim: int = 0        # width of the always-on shared experts (0: none)
    norm_topk_prob: bool = True    # renormalise the top-k weights to sum to 1
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.0
    expert_capacity_factor: float = 0.0  # 0: dropless
    head_size: int = 0             # 0: d_model // num_heads
    qk_norm: bool = False          # Qwen3: RMSNorm of each query and key head

    @property
    def head_dim(self) -> int:
        return self.head_size or self.d_model // self.num_heads

    def validate(self) -> None:
        super().validate()
        self.check(("num_experts", "experts_per_token"))
        if self.experts_per_token > self.num_experts:
            raise ValueError(f"experts_per_token={self.experts_per_token} must be <= "
                             f"num_experts={self.num_experts}")
        for name in ("shared_mlp_dim", "head_size", "router_aux_loss_coef",
                     "router_z_loss_coef", "expert_capacity_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be a number >= 0")


# `tiny` for tests and the CPU default run; the published shapes (their config.json files)
# for `inspect` and the planner. OLMoE's query/key norms span all heads, a form this
# family does not implement: its preset counts without them (4,096 parameters a layer).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_layers=4, d_model=128, num_heads=8, num_kv_heads=4, mlp_dim=128,
                 num_experts=8, experts_per_token=2, seq_len=128),
    "mixtral-8x7b": dict(num_layers=32, d_model=4096, num_heads=32, num_kv_heads=8,
                         mlp_dim=14336, num_experts=8, experts_per_token=2, seq_len=32768,
                         vocab_size=32000, rope_theta=1e6),
    "qwen3-30b-a3b": dict(num_layers=48, d_model=2048, num_heads=32, num_kv_heads=4,
                          head_size=128, qk_norm=True, mlp_dim=768, num_experts=128,
                          experts_per_token=8, seq_len=40960, vocab_size=151936,
                          rope_theta=1e6, rms_eps=1e-6),
    "olmoe-1b-7b": dict(num_layers=16, d_model=2048, num_heads=16, num_kv_heads=16,
                        mlp_dim=1024, num_experts=64, experts_per_token=8, seq_len=4096,
                        vocab_size=50304, norm_topk_prob=False),
}


def preset(name: str, **overrides: Any) -> MoEConfig:
    return from_preset(MoEConfig, PRESETS, "moe", name, overrides)


def num_params(cfg: MoEConfig, *, active: bool = False, real: bool = True) -> int:
    """Parameters (active=True: those one token uses, its k experts of each layer)."""
    d, h, m = cfg.d_model, cfg.head_dim, cfg.mlp_dim
    attn = d * cfg.num_heads * h * 2 + d * cfg.num_kv_heads * h * 2 + (2 * h if cfg.qk_norm else 0)
    experts = cfg.experts_per_token if active else cfg.num_experts
    block = attn + experts * 3 * d * m + cfg.num_experts * d + 3 * d * cfg.shared_mlp_dim + 2 * d
    vocab = cfg.vocab_size if real else cfg.padded_vocab
    return vocab * d * (1 if cfg.tie_embeddings else 2) + cfg.num_layers * block + d


# ---------------------------------------------------------------- layers
class MoEMLP(nnx.Module):
    """The router (E, embed), the experts' SwiGLU weights, and the shared experts."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs, out_std: float, dtype: Any):
        e, d, m = cfg.num_experts, cfg.d_model, cfg.mlp_dim
        self.router = param(rngs, (e, d), (None, "embed"), 0.02)
        self.gate = param(rngs, (e, m, d), ("experts", "mlp", "embed"), 0.02)
        self.up = param(rngs, (e, m, d), ("experts", "mlp", "embed"), 0.02)
        self.down = param(rngs, (e, d, m), ("experts", "embed", "mlp"), out_std)
        self.shared = (MLP(dataclasses.replace(cfg, mlp_dim=cfg.shared_mlp_dim), rngs=rngs,
                           out_std=out_std, dtype=dtype) if cfg.shared_mlp_dim else None)
        self.k, self.normalize = cfg.experts_per_token, cfg.norm_topk_prob
        self.capacity_factor, self.dtype = cfg.expert_capacity_factor, dtype

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, d) -> (y (B, T, d), per-sequence statistics (B, 3))."""
        cast = lambda w: w[...].astype(self.dtype)
        y, stats = moe_mlp(x.astype(self.dtype), self.router[...], cast(self.gate),
                           cast(self.up), cast(self.down), k=self.k, normalize=self.normalize,
                           capacity_factor=self.capacity_factor)
        if self.shared is not None:
            y = y + self.shared(x)
        return y, stats


class MoEBlock(Block):
    """Llama's block with the routed MLP: x + attn(norm(x)), then x + moe(norm(x))."""

    mlp_cls = MoEMLP

    def forward(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                cache: KVCache | None = None, index: jax.Array | None = None,
                layer: int | None = None, order: jax.Array | None = None,
                ) -> tuple[jax.Array, KVCache | None, jax.Array]:
        x = constrain(x, RESIDUAL)
        a, cache = self.attn(self.attn_norm(x), positions, inv_freq, cache, index, layer, order)
        x = constrain(x + a, RESIDUAL)
        y, stats = self.mlp(self.mlp_norm(x))
        return constrain(x + y, RESIDUAL), cache, stats

    def __call__(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
                 cache: KVCache | None = None, index: jax.Array | None = None,
                 layer: int | None = None,
                 order: jax.Array | None = None) -> tuple[jax.Array, KVCache | None]:
        return self.forward(x, positions, inv_freq, cache, index, layer, order)[:2]


class MoE(Llama):
    block_cls = MoEBlock

    def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
                ) -> tuple[jax.Array, jax.Array]:
        """tokens (B, T) (at `positions` (T,), as Llama's) -> logits (B, T, V) and the
        routing statistics (B, 3) averaged over the layers (STATS order)."""
        stem, layer = self.trunk(tokens.shape[1], positions)
        x, stats = self.split(self.stack.apply(self.blocks, stem(self, tokens), RESIDUAL, layer))
        return self.head(x), stats

    def trunk(self, t: int, positions: Any = None) -> tuple[Callable, Callable]:
        """Llama's trunk with the routing statistics carried along the residual stream:
        the stack's activations are (B, T, d + 3), the statistics summed so far last."""
        order, rope_pos = self._positions(t, positions)
        inv_freq = rope_frequencies(self.cfg)

        def stem(model: MoE, tokens: jax.Array) -> jax.Array:
            x = model._embed(tokens)
            return jnp.concatenate([x, jnp.zeros((*x.shape[:2], len(STATS)), x.dtype)], -1)

        def layer(block: MoEBlock, h: jax.Array) -> jax.Array:
            d = h.shape[-1] - len(STATS)
            y, _, stats = block.forward(h[..., :d], rope_pos, inv_freq, order=order)
            return jnp.concatenate([y, h[..., d:] + stats[:, None, :].astype(h.dtype)], -1)
        return stem, layer

    def split(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The trunk's output -> (residual stream (B, T, d), statistics (B, 3) averaged
        over the layers)."""
        d = self.cfg.d_model
        return h[..., :d], h[:, 0, d:].astype(jnp.float32) / self.cfg.num_layers

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        return self.forward(tokens, positions)[0]

    def expert_loads(self, tokens: jax.Array) -> jax.Array:
        """(layers, experts): each layer's share of the top-k assignments of `tokens`
        (B, T) per expert (1/E each when balanced), the layers applied one by one in
        canonical order (a planning and benchmark figure, not the training path)."""
        graphdef, state = nnx.split(self.blocks)
        weights = self.stack.to_canonical(nnx.to_pure_dict(state))
        positions = jnp.arange(tokens.shape[1])[None, :]
        inv_freq = rope_frequencies(self.cfg)
        x, loads = self._embed(tokens), []
        for w in unstack(weights, self.cfg.num_layers):
            block = nnx.merge(graphdef, w)
            x = x + block.attn(block.attn_norm(x), positions, inv_freq)[0]
            h = block.mlp_norm(x)
            logits = jnp.einsum("btd,ed->bte", h.astype(jnp.float32),
                                block.mlp.router[...].astype(jnp.float32))
            _, experts, _ = route(logits, self.cfg.experts_per_token, False)
            counts = jnp.sum(jax.nn.one_hot(experts, self.cfg.num_experts), axis=(0, 1, 2))
            loads.append(counts / jnp.sum(counts))
            x = x + block.mlp(h)[0]
        return jnp.stack(loads)


def moe_loss(model: MoE, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy + the router losses; the metrics name each part."""
    cfg = model.cfg
    inputs, targets, positions = context_batch(batch["tokens"])
    stem, layer = model.trunk(inputs.shape[1], positions)

    def tail(m: MoE, h: jax.Array, rows: dict) -> tuple[jax.Array, dict]:
        x, stats = m.split(h)
        lm = head_losses(m, x, rows["targets"])
        metrics = {"lm_loss": lm, "aux_loss": stats[:, 0], "router_z_loss": stats[:, 1]}
        if cfg.expert_capacity_factor > 0:
            metrics["dropped_fraction"] = stats[:, 2]
        return (lm + cfg.router_aux_loss_coef * stats[:, 0]
                + cfg.router_z_loss_coef * stats[:, 1]), metrics
    with fp8.matmuls(cfg.matmul_precision):
        return stack_loss(model, "blocks", lambda m, rows: stem(m, rows["inputs"]), layer, tail,
                          {"inputs": inputs, "targets": targets}, RESIDUAL)


def flops_per_token(cfg: MoEConfig) -> float:
    """Training FLOPs per token: 6 N_active (without the input embedding) + 12 L (n h) T."""
    n = num_params(cfg, active=True) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * cfg.seq_len


FAMILY = register(Family(
    name="moe", config_from_json=functools.partial(config_from_json, cls=MoEConfig),
    make_config=functools.partial(config_from_spec, family="moe", cls=MoEConfig,
                                  presets=PRESETS),
    build=lambda cfg, pipeline, rngs: MoE(cfg, rngs=rngs, pipeline=pipeline), loss=moe_loss,
    batches=token_batches, eval_batches=token_batches, stack="blocks",
    flops_per_token=flops_per_token, generates=True, layers_name="decoder layers",
    hf=(MIXTRAL, QWEN3_MOE)))
