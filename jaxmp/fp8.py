"""FP8 weight GEMMs for training (`--matmul_precision=fp8`).

Every weight GEMM of the layers goes through `jaxmp.wgrad.dot`; inside `matmuls("fp8")`
(the decoders' losses enter it when their config asks) it is `dot` below:

- forward: the input and the weight each quantised to E4M3 with a per-tensor scale,
  dequantised (convert, times the scale) right before the dot_general, in the compute
  dtype. That convert-multiply-dot shape is the one XLA's GPU GEMM rewriter turns into a
  cuBLASLt FP8 GEMM with the two scales as its scalars;
- backward: the output gradient quantised to E5M2 (range over resolution), then the two
  GEMMs dx = g W^T and dW = x^T g on the dequantised FP8 operands; the quantised input
  and weight are the residuals (one byte per element, not two or four);
- scaling: current scaling, each tensor's scale computed from itself each time:
  scale = amax(|t|) / max(format) (1 where the tensor is all zeros), q = t / scale
  clipped to the format's range. No state to carry, checkpoint or resume; one amax
  reduction per tensor per GEMM (delayed scaling would read the previous steps' amax
  history instead: not built);
- master weights, optimizer state, norms, attention's own matmuls, the embedding and the
  LM head stay as they are (the head's logits need the range: it is the usual practice).

`check_compiled` is the guard against the silent fallback: on a GPU the compiled step
must contain cuBLASLt FP8 GEMM custom calls, else the run stops with one line.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
PRECISIONS = ("default", "fp8")
# XLA's name for the cuBLASLt FP8 GEMM on NVIDIA GPUs
GPU_FP8_GEMM = "__cublas$lt$matmul$f8"

_PRECISION: contextvars.ContextVar[str] = contextvars.ContextVar("jaxmp_matmul_precision",
                                                                 default="default")


@contextlib.contextmanager
def matmuls(precision: str) -> Iterator[None]:
    """Trace the weight GEMMs inside at this precision ("default" or "fp8")."""
    if precision not in PRECISIONS:
        raise ValueError(f"matmul_precision={precision!r}: choose {' or '.join(PRECISIONS)}")
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def active() -> bool:
    return _PRECISION.get() == "fp8"


def scale_of(x: jax.Array, fmt: Any) -> jax.Array:
    """Current scaling: amax(|x|) / the format's largest finite value (float32 scalar; 1
    for an all-zero tensor)."""
    amax = jnp.max(jnp.abs(jax.lax.stop_gradient(x))).astype(jnp.float32)
    return jnp.where(amax > 0, amax / jnp.finfo(fmt).max.astype(jnp.float32), 1.0)


def quantize(x: jax.Array, fmt: Any) -> tuple[jax.Array, jax.Array]:
    """(x / scale clipped to the format's range, in the format; the scale)."""
    scale = scale_of(x, fmt)
    big = jnp.finfo(fmt).max.astype(jnp.float32)
    return jnp.clip(x.astype(jnp.float32) / scale, -big, big).astype(fmt), scale


def dequantize(q: jax.Array, scale: jax.Array, dtype: Any) -> jax.Array:
    return q.astype(dtype) * scale.astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def dot(x: jax.Array, w: jax.Array, dims: Any, dtype: Any) -> jax.Array:
    """dot_general(x, w, dims) with both operands through E4M3 (result in `dtype`)."""
    return _forward(x, w, dims, dtype)[0]


def _forward(x: jax.Array, w: jax.Array, dims: Any, dtype: Any) -> tuple:
    qx, sx = quantize(x, E4M3)
    qw, sw = quantize(w, E4M3)
    y = jax.lax.dot_general(dequantize(qx, sx, dtype), dequantize(qw, sw, dtype), dims)
    return y, (qx, sx, qw, sw)


def _dot_fwd(x, w, dims, dtype):  # noqa: ANN001, ANN202 (custom_vjp's signature)
    y, res = _forward(x, w, dims, dtype)
    # zero-size markers carry the primal dtypes to the backward pass
    return y, (*res, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _dot_bwd(dims, dtype, res, g):  # noqa: ANN001, ANN202
    qx, sx, qw, sw, x_kind, w_kind = res
    qg, sg = quantize(g, E5M2)
    gd = dequantize(qg, sg, dtype)
    xd, wd = dequantize(qx, sx, dtype), dequantize(qw, sw, dtype)
    dx = jax.linear_transpose(lambda a: jax.lax.dot_general(a, wd, dims), xd)(gd)[0]
    dw = jax.linear_transpose(lambda b: jax.lax.dot_general(xd, b, dims), wd)(gd)[0]
    return dx.astype(x_kind.dtype), dw.astype(w_kind.dtype)


dot.defvjp(_dot_fwd, _dot_bwd)


class Fp8Error(RuntimeError):
    pass


def fp8_gemms(hlo_text: str) -> int:
    """How many cuBLASLt FP8 GEMM custom calls a compiled (optimised) HLO module holds."""
    return hlo_text.count(f'custom_call_target="{GPU_FP8_GEMM}"')


def _gpu(platform: str) -> bool:
    return platform in ("gpu", "cuda")


def check_compiled(hlo_text: str, platform: str, expected: int = 1) -> None:
    """On a GPU: refuse a compiled step with fewer than `expected` FP8 GEMMs (the silent
    fallback to bf16 GEMMs). Elsewhere the FP8 arithmetic is emulated (its values, not
    its speed): nothing to check."""
    if not _gpu(platform):
        return
    n = fp8_gemms(hlo_text)
    if n < expected:
        raise Fp8Error(f"matmul_precision=fp8: the compiled step has {n} FP8 GEMMs "
                       f"({GPU_FP8_GEMM}) where {expected} weight GEMMs asked for FP8: XLA "
                       "fell back to higher precision (an FP8-capable GPU, compute capability "
                       ">= 8.9, and dimensions divisible by 16 are needed); use "
                       "--matmul_precision=default or fix the shapes")


def check_step(trainer: Any, batch: Any) -> str:
    """Before a training run's first step: on a GPU, compile the step and refuse it without
    FP8 GEMMs (`check_compiled`); the line to log either way."""
    platform = jax.devices()[0].platform
    if not _gpu(platform):
        return (f"matmul_precision=fp8 on {platform}: FP8 values (E4M3 / E5M2, current "
                "scaling), emulated in higher precision; FP8 speed needs a GPU")
    text = trainer.lower(batch).compile().as_text()
    check_compiled(text, platform)
    return f"matmul_precision=fp8: {fp8_gemms(text)} cuBLASLt FP8 GEMMs in the compiled step"
