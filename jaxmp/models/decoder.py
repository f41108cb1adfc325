"""What the token-decoder families (GPT-2, Llama) share: the vocabulary padded to a
multiple of 128 (so it splits over `tensor`) and masked out of the logits, the head
dimension, the checks of settings every decoder has, presets, token batches, the
next-token loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxmp import data, fp8, fused_loss
from jaxmp.context import sequence_order
from jaxmp.layers import RESIDUAL
from jaxmp.scheduled import stack_loss

NEG_INF = -1e30


class DecoderShape:
    """Mixed into a decoder's frozen config dataclass (fields vocab_size, d_model,
    num_heads, dtype, attention and the `sizes` it checks are >= 1)."""

    vocab_size: int
    d_model: int
    num_heads: int
    dtype: str
    attention: str
    fused_loss: bool
    loss_chunk: int
    matmul_precision: str

    @property
    def padded_vocab(self) -> int:
        """Vocabulary rounded up to a multiple of 128 so it splits over `tensor`."""
        return -(-self.vocab_size // 128) * 128

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def __post_init__(self) -> None:
        self.validate()  # a config that cannot build a model is an error where it is made

    def validate(self) -> None:
        raise NotImplementedError

    def check(self, sizes: tuple[str, ...]) -> None:
        for name in sizes:
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
            if value < 1:
                raise ValueError(f"--{name}={value} must be >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype={self.dtype!r}: choose float32 or bfloat16")
        chunk = self.loss_chunk
        if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk < 0:
            raise ValueError(f"--loss_chunk={chunk!r} must be an integer >= 0 (tokens per "
                             "chunk of the fused head and loss; 0: chosen from the vocabulary)")
        if self.matmul_precision not in fp8.PRECISIONS:
            raise ValueError(f"--matmul_precision={self.matmul_precision!r}: choose default "
                             "or fp8")
        if self.attention not in ("auto", "xla", "cudnn", "chunked"):
            raise ValueError(f"attention={self.attention!r}: choose auto, xla, cudnn or chunked")


def from_preset(cls: type, presets: Mapping[str, dict], family: str, name: str,
                overrides: Mapping[str, Any]) -> Any:
    """cls(**presets[name] with the overrides that are set), validated."""
    if name not in presets:
        raise ValueError(f"preset={name!r} is not a {family} preset: choose one of "
                         f"{', '.join(presets)}")
    cfg = cls(**{**presets[name], **{k: v for k, v in overrides.items() if v is not None}})
    cfg.validate()
    return cfg


def zero_padding_rows(table: jax.Array, vocab_size: int) -> jax.Array:
    """An embedding table (padded_vocab, d) with the padding rows zeroed."""
    return jnp.where(jnp.arange(table.shape[0])[:, None] < vocab_size, table, 0.0)


def mask_padding(logits: jax.Array, vocab_size: int) -> jax.Array:
    """Logits (..., padded_vocab) with the padding entries at -1e30 (never sampled)."""
    return jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, NEG_INF)


def token_batches(cfg: Any, source: str, batch_size: int, seed: int) -> data.TokenBatches:
    return data.TokenBatches.from_source(source, cfg.vocab_size, batch_size, cfg.seq_len, seed)


def lm_loss(model: Any, batch: dict[str, jax.Array]) -> jax.Array:
    """Mean next-token cross-entropy of a decoder (stem -> layer stack -> head, see
    `trunk`; logits float32, padding masked). batch['tokens']: (B, T+1). With a pipeline
    schedule that runs its own backward pass (1f1b, interleaved) the head and loss run
    inside the schedule, micro-batch by micro-batch (jaxmp.scheduled)."""
    inputs, targets, positions = context_batch(batch["tokens"])
    stem, layer = model.trunk(inputs.shape[1], positions)
    tail = lambda m, h, rows: (head_losses(m, h, rows["targets"]), {})
    with fp8.matmuls(getattr(model.cfg, "matmul_precision", "default")):
        loss, _ = stack_loss(model, "blocks", lambda m, rows: stem(m, rows["inputs"]), layer,
                             tail, {"inputs": inputs, "targets": targets}, RESIDUAL)
    return loss


def context_batch(tokens: jax.Array) -> tuple[jax.Array, jax.Array, np.ndarray | None]:
    """Inputs and targets of a token batch (B, T+1) in the order the current mesh lays a
    sequence out in, and that order (None: natural). With the sequence split over
    `context`, the zig-zag order (context parallelism's causal load balance): the tokens,
    their targets and positions permuted alike, so a mean loss is unchanged."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    order = sequence_order(inputs.shape[1])
    if order is None:
        return inputs, targets, None
    return inputs[:, order], targets[:, order], order


def next_token_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of logits (B, T, V) (float32, vocab-sharded) against targets
    (B, T)."""
    return jnp.mean(row_losses(logits, targets))


def head_losses(model: Any, x: jax.Array, targets: jax.Array) -> jax.Array:
    """Each row's mean next-token cross-entropy (B,) of a decoder's final hidden states
    x (B, T, d): the head and the loss fused and chunked (jaxmp.fused_loss, no (B, T, V)
    logits stored), or, with fused_loss off, `model.head`'s logits then the loss."""
    cfg = model.cfg
    if not getattr(cfg, "fused_loss", False) or not hasattr(model, "head_input"):
        return row_losses(model.head(x), targets)  # (also a family without the fused path)
    h, table = model.head_input(x)
    return fused_loss.row_losses(h, table.embedding[...], targets, cfg.vocab_size, table.dtype,
                                 cfg.loss_chunk)


def row_losses(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Each sequence's mean cross-entropy (B,) (rows of equal length: their mean is the
    batch's mean)."""
    lse = jax.nn.logsumexp(logits, axis=-1)
    onehot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    target_logit = jnp.sum(logits * onehot, axis=-1)
    return jnp.mean(lse - target_logit, axis=-1)
