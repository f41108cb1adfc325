"""A plain JAX + optax GPT-2 train step, written without any jaxmp code: the speed baseline.

Same math as jaxmp's GPT: pre-LayerNorm blocks, tanh-GELU MLP, learned positions, tied
input / output embedding, biases everywhere, layers stacked and scanned; AdamW with
global-norm clipping, warm-up + cosine decay, no weight decay on biases and norms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = dict[str, jax.Array]
MATRICES = ("wte", "wpe", "w_qkv", "w_o", "w_fc", "w_proj")


@dataclasses.dataclass(frozen=True)
class RefConfig:
    num_layers: int
    d_model: int
    num_heads: int
    seq_len: int
    vocab_size: int
    mlp_ratio: int = 4


def init_params(cfg: RefConfig, key: jax.Array) -> Params:
    """GPT-2 initialisation; block tensors stacked on a leading layer axis."""
    L, d, h = cfg.num_layers, cfg.d_model, cfg.mlp_ratio * cfg.d_model
    k = jax.random.split(key, 6)
    normal = lambda key, shape, std: std * jax.random.normal(key, shape, jnp.float32)
    out_std = 0.02 / (2 * L) ** 0.5
    return {
        "wte": normal(k[0], (cfg.vocab_size, d), 0.02),
        "wpe": normal(k[1], (cfg.seq_len, d), 0.01),
        "ln1_g": jnp.ones((L, d)), "ln1_b": jnp.zeros((L, d)),
        "w_qkv": normal(k[2], (L, d, 3 * d), 0.02), "b_qkv": jnp.zeros((L, 3 * d)),
        "w_o": normal(k[3], (L, d, d), out_std), "b_o": jnp.zeros((L, d)),
        "ln2_g": jnp.ones((L, d)), "ln2_b": jnp.zeros((L, d)),
        "w_fc": normal(k[4], (L, d, h), 0.02), "b_fc": jnp.zeros((L, h)),
        "w_proj": normal(k[5], (L, h, d), out_std), "b_proj": jnp.zeros((L, d)),
        "lnf_g": jnp.ones((d,)), "lnf_b": jnp.zeros((d,)),
    }


def layer_norm(x: jax.Array, g: jax.Array, b: jax.Array, eps: float = 1e-5) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * g + b


def block(x: jax.Array, p: Params, num_heads: int) -> jax.Array:
    """One pre-LN decoder block. x: (B, T, d)."""
    B, T, d = x.shape
    qkv = layer_norm(x, p["ln1_g"], p["ln1_b"]) @ p["w_qkv"] + p["b_qkv"]  # (B, T, 3d)
    q, k, v = jnp.split(qkv.reshape(B, T, 3, num_heads, d // num_heads), 3, axis=2)
    y = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], is_causal=True)
    x = x + y.reshape(B, T, d) @ p["w_o"] + p["b_o"]
    h = jax.nn.gelu(layer_norm(x, p["ln2_g"], p["ln2_b"]) @ p["w_fc"] + p["b_fc"],
                    approximate=True)
    return x + h @ p["w_proj"] + p["b_proj"]


BLOCK_KEYS = ("ln1_g", "ln1_b", "w_qkv", "b_qkv", "w_o", "b_o", "ln2_g", "ln2_b",
              "w_fc", "b_fc", "w_proj", "b_proj")


def forward(params: Params, tokens: jax.Array, num_heads: int) -> jax.Array:
    """tokens (B, T) -> logits (B, T, V)."""
    x = params["wte"][tokens] + params["wpe"][: tokens.shape[1]]
    blocks = {k: params[k] for k in BLOCK_KEYS}
    x, _ = jax.lax.scan(lambda h, p: (block(h, p, num_heads), None), x, blocks)
    return layer_norm(x, params["lnf_g"], params["lnf_b"]) @ params["wte"].T


def loss_fn(params: Params, tokens: jax.Array, num_heads: int) -> jax.Array:
    """Mean next-token cross-entropy; tokens (B, T+1)."""
    logits = forward(params, tokens[:, :-1], num_heads)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()


def optimizer(learning_rate: float = 1e-3, warmup_steps: int = 10, total_steps: int = 100,
              weight_decay: float = 0.1, clip_norm: float = 1.0, b1: float = 0.9,
              b2: float = 0.95, eps: float = 1e-8, min_lr_ratio: float = 0.1,
              ) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps,
                                                  total_steps, learning_rate * min_lr_ratio)
    mask = lambda params: {k: k in MATRICES for k in params}
    return optax.chain(optax.clip_by_global_norm(clip_norm),
                       optax.adamw(schedule, b1=b1, b2=b2, eps=eps,
                                   weight_decay=weight_decay, mask=mask))


def make_train_step(cfg: RefConfig, tx: optax.GradientTransformation,
                    ) -> Callable[[Params, Any, jax.Array], tuple[Params, Any, jax.Array]]:
    """jit(params, opt_state, tokens) -> (params, opt_state, loss), state donated."""
    def step(params: Params, opt_state: Any, tokens: jax.Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, cfg.num_heads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss
    return jax.jit(step, donate_argnums=(0, 1))
