"""LayerStack: L equal layers stacked on a leading `layers` axis, and everything about them
that depends on how they are laid out.

The stack is stored in the pipeline's storage order (stage-major, see
`pipeline.storage_order`: the identity without a circular schedule), so splitting the
`layers` axis over `pipe` gives each stage its own layers. Only the stack knows that order:
`apply` runs the layers (pipeline, scan or unrolled loop, remat included), and
`to_canonical` / `from_canonical` / `reorder` convert between storage orders for
checkpoints and serving. Models hold a LayerStack (a frozen, static description) and the
stacked module it builds; parameter paths stay those of the layer (`blocks/attn/...`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmp.pipeline import PipelineSpec, check_driven, pipeline_apply, storage_order
from jaxmp.sharding import logical_axes

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# fn(layer module, h, state, index) -> (h, state): how a layer is called with per-layer
# state (a KV cache); index is the layer's position in the stack when the state is the
# whole stack (unrolled), None when it is this layer's slice (pipeline).
StateFn = Callable[[nnx.Module, jax.Array, Any, int | None], tuple[jax.Array, Any]]


def remat(fn: Callable, policy: str) -> Callable:
    """Wrap a per-layer function in jax.checkpoint according to the remat policy."""
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r}: choose one of {', '.join(REMAT_POLICIES)}")
    if policy == "none":
        return fn
    return jax.checkpoint(fn, policy=REMAT_POLICIES[policy], prevent_cse=False)


@dataclasses.dataclass(frozen=True)
class LayerStack:
    num_layers: int
    pipeline: PipelineSpec = PipelineSpec()
    remat: str = "none"
    scan: bool = True  # lax.scan over the layers, or an unrolled loop (see BUILD_NOTES, GPU)
    what: str = "layers"  # what the layers are called in errors ("decoder layers")

    def __post_init__(self) -> None:
        self.pipeline.validate(self.num_layers, what=self.what)
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}: choose one of {', '.join(REMAT_POLICIES)}")

    # ------------------------------------------------------------ order
    @property
    def order(self) -> list[int]:
        """order[q] = canonical layer stored at position q."""
        return storage_order(self.num_layers, self.pipeline.stages, self.pipeline.repeats)

    def to_canonical(self, stacked: Any) -> Any:
        """Stacked arrays (storage order) -> layer 0 first."""
        return reorder(stacked, self.order, list(range(self.num_layers)))

    def canonical_params(self, params: dict, key: str) -> dict:
        """A parameter (or gradient) tree whose subtree `key` is this stack, canonical order."""
        return {**params, key: self.to_canonical(params[key])}

    def from_canonical(self, stacked: Any) -> Any:
        """Stacked arrays, layer 0 first -> this stack's storage order."""
        return reorder(stacked, list(range(self.num_layers)), self.order)

    # ------------------------------------------------------------ build
    def build(self, make: Callable[[nnx.Rngs], nnx.Module], key: jax.Array) -> nnx.Module:
        """`num_layers` copies of make(rngs) with parameters stacked on a leading `layers`
        axis in storage order. Layer i is initialised from fold_in(key, i) whatever the
        order, so a pipelined model holds exactly the weights of the unpipelined one."""
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(self.order))
        values = jax.vmap(lambda k: nnx.to_pure_dict(nnx.state(make(nnx.Rngs(k)), nnx.Param)))(keys)
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
        stacked = nnx.merge(graphdef, values)
        for _, var in nnx.iter_graph(stacked):
            if isinstance(var, nnx.Param):
                var.set_metadata("logical_axes", ("layers", *var.get_metadata()["logical_axes"]))
        return stacked

    # ------------------------------------------------------------ apply
    def apply(self, stacked: nnx.Module, x: jax.Array, x_names: tuple[str | None, ...],
              fn: Callable[[nnx.Module, jax.Array], jax.Array] | None = None) -> jax.Array:
        """Run x through every layer in canonical order: fn(layer, h) -> h (default: call
        the layer). The pipeline when the stack has stages, else a scan or unrolled loop."""
        graphdef, weights = _split(stacked)
        call = fn or (lambda module, h: module(h))
        layer = remat(lambda w, h: call(nnx.merge(graphdef, w), h), self.remat)
        if self.pipeline.enabled:
            check_driven(self.pipeline)
            return pipeline_apply(layer, weights, x, self.pipeline, logical_axes(stacked), x_names)
        if self.scan:
            return jax.lax.scan(lambda h, w: (layer(w, h), None), x, weights)[0]
        for w in unstack(weights, self.num_layers):
            x = layer(w, x)
        return x

    def split(self, stacked: nnx.Module) -> list[Any] | None:
        """Each layer's weights as arrays of their own, for `apply_with_state(layers=...)`
        (None on a pipe mesh, where each stage keeps its slice of the stack). Call it once,
        outside a token loop: a layer's slice of the stack is a copy on XLA's CPU backend
        (not an operand the matmul reads in place), so slicing inside the loop reads and
        writes every weight once more per token. The barrier keeps XLA from sinking the
        slices back into the loop."""
        if self.pipeline.enabled:
            return None
        return jax.lax.optimization_barrier(unstack(_split(stacked)[1], self.num_layers))

    def apply_with_state(self, stacked: nnx.Module, x: jax.Array, x_names: tuple[str | None, ...],
                         fn: StateFn, state: Any, state_names: Any,
                         layers: list[Any] | None = None) -> tuple[jax.Array, Any]:
        """Run x through every layer with per-layer state stacked like the weights (a KV
        cache; no remat, one micro-batch). On a pipe mesh each stage updates its own layers'
        state; otherwise the layers are unrolled and each writes into the whole stack
        (`layers`: the weights already split by `split`)."""
        graphdef, weights = _split(stacked)
        if not self.pipeline.enabled:
            for i, w in enumerate(layers or unstack(weights, self.num_layers)):
                x, state = fn(nnx.merge(graphdef, w), x, state, i)
            return x, state
        # One micro-batch and one round: a circular stack (r > 1) is stored in another order,
        # so it is viewed in the r = 1 order for the call and the state is put back after.
        plain = dataclasses.replace(self, pipeline=PipelineSpec(self.pipeline.stages))
        weights, state = (reorder(t, self.order, plain.order) for t in (weights, state))
        layer = lambda w, h, st: fn(nnx.merge(graphdef, w), h, st, None)
        x, state = pipeline_apply(layer, weights, x, plain.pipeline, logical_axes(stacked),
                                  x_names, state, state_names)
        return x, reorder(state, plain.order, self.order)


def _split(stacked: nnx.Module) -> tuple[nnx.GraphDef, dict]:
    """(graphdef of one layer, pure dict of the stacked parameters)."""
    graphdef, state = nnx.split(stacked)
    return graphdef, nnx.to_pure_dict(state)


def unstack(stacked: Any, num: int) -> list[Any]:
    """Each layer's arrays from stacked (layers, ...) arrays, for an unrolled loop.
    One split, not `num` indexings: the gradient of a split is one concatenation, while
    the gradient of `a[i]` pads layer i's gradient to the whole stack and the `num` padded
    arrays are summed (seen on an H100: 17 ms of a 107 ms GPT-2 medium step)."""
    parts = jax.tree_util.tree_map(lambda a: jnp.split(a, num, axis=0), stacked)
    return [jax.tree_util.tree_map(lambda p, i=i: p[i][0], parts,
                                   is_leaf=lambda x: isinstance(x, list)) for i in range(num)]


def reorder(tree: Any, saved_order: Sequence[int], target_order: Sequence[int]) -> Any:
    """Stacked arrays (leading `layers` axis) from one storage order to another."""
    if list(saved_order) == list(target_order):
        return tree
    where = {layer: q for q, layer in enumerate(saved_order)}
    idx = jnp.asarray([where[layer] for layer in target_order])
    return jax.tree_util.tree_map(lambda a: jnp.take(a, idx, axis=0), tree)
