"""The backward pass split at the weight GEMMs, for the zero-bubble pipeline schedule:
B (the input gradient, on the critical path) and W (the weight gradients, deferred).

Every weight GEMM of the layers (`jaxmp.layers.Dense`, Llama's `Linear`) goes through
`dot`. Outside the contexts below it is `lax.dot_general`. Inside them, a stage's layers
run in one of two modes, in the same call order; `weight_grad` is W:

- `record()`: the GEMMs (shapes, dimension numbers, weights), to size the taps.
- `split(taps)`: each GEMM gets a pair of zero "taps" (input-shaped, output-shaped) and a
  custom VJP whose backward pass returns the input gradient g @ W^T, no weight gradient,
  and, as the taps' cotangents, the GEMM's input x and its output gradient g. So a VJP of
  the stage with respect to (its input, the taps, its parameters) is B: the input
  gradient, every GEMM's (x, g), and the gradients of the parameters that are not GEMM
  weights (norms, biases, MoE experts' grouped matmuls), without a weight GEMM.
- `weight_grad`: W for one GEMM from B's (x, g): x^T g, through the parameter's cast.
  `record` names each GEMM's weight (the parameter array the layer gave it), so W needs
  no run of the layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from jaxmp import fp8

Dims = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[()], tuple[()]]]


@dataclasses.dataclass(frozen=True)
class Gemm:
    """One weight GEMM of a layer, as `record` saw it: its input and output shapes, its
    dimension numbers and compute dtype, and the weight array it was given."""
    x: jax.ShapeDtypeStruct
    y: jax.ShapeDtypeStruct
    dims: Dims
    dtype: Any
    weight: Any


class _Record:
    def __init__(self) -> None:
        self.gemms: list[Gemm] = []

    def dot(self, x: jax.Array, w: jax.Array, dims: Dims, dtype: Any) -> jax.Array:
        y = _plain(x, w, dims, dtype)
        self.gemms.append(Gemm(jax.ShapeDtypeStruct(x.shape, dtype),
                               jax.ShapeDtypeStruct(y.shape, y.dtype), dims, dtype, w))
        return y


class _Split:
    def __init__(self, taps: Sequence[tuple[jax.Array, jax.Array]]):
        self.taps, self.used = list(taps), 0

    def dot(self, x: jax.Array, w: jax.Array, dims: Dims, dtype: Any) -> jax.Array:
        if self.used >= len(self.taps):
            raise RuntimeError("the layer ran more weight GEMMs than were recorded for it")
        xt, gt = self.taps[self.used]
        self.used += 1
        return _tapped(x.astype(dtype), w, xt, gt, dims, dtype)


_MODE: contextvars.ContextVar[Any] = contextvars.ContextVar("jaxmp_wgrad", default=None)


def dot(x: jax.Array, w: jax.Array, dims: Dims, dtype: Any) -> jax.Array:
    """A weight GEMM: dot_general(x, w, dims) in `dtype` (x and w cast to it)."""
    mode = _MODE.get()
    return _plain(x, w, dims, dtype) if mode is None else mode.dot(x, w, dims, dtype)


def tapped() -> bool:
    """Inside one of the modes below: a layer that fuses several weights into one GEMM
    (Llama's q/k/v, gate/up) runs them as separate GEMMs, each on its own parameter."""
    return _MODE.get() is not None


def _plain(x: jax.Array, w: jax.Array, dims: Dims, dtype: Any) -> jax.Array:
    if fp8.active():  # --matmul_precision=fp8 (jaxmp.fp8)
        return fp8.dot(x, w, dims, dtype)
    return jax.lax.dot_general(x.astype(dtype), w.astype(dtype), dims)


@contextlib.contextmanager
def _active(mode: Any) -> Iterator[Any]:
    token = _MODE.set(mode)
    try:
        yield mode
    finally:
        _MODE.reset(token)


def record() -> contextlib.AbstractContextManager[_Record]:
    """Run a layer inside: `.gemms` lists its GEMMs in call order."""
    return _active(_Record())


def split(taps: Sequence[tuple[jax.Array, jax.Array]]) -> contextlib.AbstractContextManager:
    """Run a layer inside with one (input-shaped, output-shaped) zero tap pair per GEMM."""
    return _active(_Split(taps))


def weight_grad(gemm: Gemm, w: jax.Array, x: jax.Array, g: jax.Array) -> jax.Array:
    """W for one GEMM: the gradient of its weight `w` (the parameter, before the cast)
    from B's input x and output gradient g: x^T g, one GEMM."""
    return jax.linear_transpose(lambda a: _plain(x, a, gemm.dims, gemm.dtype), w)(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _tapped(x: jax.Array, w: jax.Array, xt: jax.Array, gt: jax.Array, dims: Dims,
            dtype: Any) -> jax.Array:
    return jax.lax.dot_general(x, w.astype(dtype), dims)


def _tapped_fwd(x, w, xt, gt, dims, dtype):  # noqa: ANN001, ANN202 (custom_vjp's signature)
    # the uncast weight is the residual: it is the stage's own parameter, which the
    # zero-bubble executor recognises and does not store per micro-batch
    return _tapped(x, w, xt, gt, dims, dtype), (x, w)


def _tapped_bwd(dims, dtype, res, g):  # noqa: ANN001, ANN202
    x, w = res
    # (linear_transpose: a vjp would also trace the forward product, dead code in B)
    dx = jax.linear_transpose(lambda a: jax.lax.dot_general(a, w.astype(dtype), dims), x)(g)[0]
    return dx, None, x, g


_tapped.defvjp(_tapped_fwd, _tapped_bwd)
