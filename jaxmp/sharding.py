"""Logical axis names, the rules that map them onto mesh axes, and the parameter plan.

Layers name every dimension of every parameter with a small fixed vocabulary; a `Rules`
table (data, overridable per experiment) maps names to mesh axes, separately for
parameters and for activations, so FSDP is a change of the parameter rules alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# `length` is the sequence inside attention and the MLP; `sequence` is the sequence of the
# activations between them (the residual stream, norms), which sequence parallelism splits
# over `tensor` (the activation rule sequence=tensor, --sequence_parallel).
LOGICAL_NAMES: tuple[str, ...] = (
    "batch", "length", "embed", "mlp", "heads", "kv", "vocab", "layers", "stage", "sequence",
    "kv_heads", "experts",
)
# Names a mesh axis may fail to divide without an error: the dimension is then replicated
# over it (grouped-query attention's KV heads on a `tensor` axis larger than their count;
# the plan says so).
REPLICABLE: frozenset[str] = frozenset({"kv_heads"})

Names = tuple[str | None, ...]
CONTEXT_ATTENTION: tuple[str, ...] = ("ring", "allgather")
RuleTable = tuple[tuple[str, tuple[str, ...]], ...]


class ShardingError(ValueError):
    """A rule or a parameter that cannot be laid out on the mesh."""


def _table(pairs: Mapping[str, Any] | Iterable[tuple[str, Any]], kind: str) -> RuleTable:
    items = pairs.items() if isinstance(pairs, Mapping) else pairs
    seen: dict[str, tuple[str, ...]] = {}
    for name, axes in items:
        if name not in LOGICAL_NAMES:
            raise ShardingError(f"{kind} rule for unknown logical name {name!r}; "
                                f"names are {', '.join(LOGICAL_NAMES)}")
        if name in seen:
            raise ShardingError(f"two {kind} rules for logical name {name!r}; give one rule per name")
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        from jaxmp.mesh import AXES

        for a in axes:
            if a not in AXES:
                raise ShardingError(f"{kind} rule {name}->{a}: unknown mesh axis {a!r}; "
                                    f"axes are {', '.join(AXES)}")
        seen[name] = axes
    return tuple(seen.items())


@dataclasses.dataclass(frozen=True)
class Rules:
    """Logical name -> mesh axes, one table for parameters and one for activations."""

    params: RuleTable
    activations: RuleTable
    # how attention runs where `length` is split (over `context`): ring | allgather
    context_attention: str = "ring"

    @classmethod
    def create(cls, params: Mapping[str, Any] | Iterable[tuple[str, Any]],
               activations: Mapping[str, Any] | Iterable[tuple[str, Any]],
               context_attention: str = "ring") -> Rules:
        if context_attention not in CONTEXT_ATTENTION:
            raise ShardingError(f"context_attention={context_attention!r}: choose "
                                f"{' or '.join(CONTEXT_ATTENTION)}")
        return cls(_table(params, "parameter"), _table(activations, "activation"),
                   context_attention)

    def override(self, params: Mapping[str, Any] | None = None,
                 activations: Mapping[str, Any] | None = None,
                 context_attention: str | None = None) -> Rules:
        """A copy with some names remapped (None or () makes a name replicated)."""
        p = {**dict(self.params), **dict(params or {})}
        a = {**dict(self.activations), **dict(activations or {})}
        return Rules.create(p, a, context_attention or self.context_attention)

    def to_json(self) -> dict[str, Any]:
        return {"params": {k: list(v) for k, v in self.params},
                "activations": {k: list(v) for k, v in self.activations},
                "context_attention": self.context_attention}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Rules:
        """Rules a checkpoint recorded; names it has no rule for (a record older than the
        name's default rule) take the default."""
        return DEFAULT_RULES.override(d["params"], d["activations"],
                                      d.get("context_attention", "ring"))


# `length` (the sequence inside attention and the MLP) and `sequence` (the residual stream)
# are split over `context` (context parallelism; jaxmp/context.py runs attention across
# it); sequence parallelism adds `tensor` after it (--sequence_parallel).
# A mixture of experts' weights are split over `expert` by their `experts` dimension; outside
# the experts the `expert` axis splits the batch, like `data` (the experts' all-to-all then
# exchanges each device's own tokens).
# The vocabulary is split over pipe as well as tensor: the embedding and LM head run
# outside the pipeline, so on a `pipe` mesh they would otherwise be replicated (memory)
# and computed redundantly on every stage (time). Without a pipe axis this is plain
# vocab-parallelism over `tensor`. The position table (`length` rows) is split the same way.
DEFAULT_RULES = Rules.create(
    params={"embed": "fsdp", "mlp": "tensor", "heads": "tensor", "vocab": ("pipe", "tensor"),
            "length": ("pipe", "tensor"), "layers": "pipe", "stage": "pipe",
            "kv_heads": "tensor", "experts": "expert"},
    activations={"batch": ("data", "fsdp", "expert"), "length": "context",
                 "sequence": "context", "mlp": "tensor", "heads": "tensor",
                 "vocab": ("pipe", "tensor"), "stage": "pipe", "layers": "pipe",
                 "kv_heads": "tensor", "experts": "expert"},
)


def parse_rule_overrides(text: str) -> dict[str, tuple[str, ...]]:
    """'embed=fsdp;mlp=tensor;vocab=' -> {'embed': ('fsdp',), 'mlp': ('tensor',), 'vocab': ()}."""
    out: dict[str, tuple[str, ...]] = {}
    for item in filter(None, (t.strip() for t in text.split(";"))):
        name, sep, axes = item.partition("=")
        if not sep:
            raise ShardingError(f"rule {item!r} must look like 'name=axis[+axis]' (empty = replicate)")
        if name.strip() in out:
            raise ShardingError(f"two rules for logical name {name.strip()!r}; give one rule per name")
        out[name.strip()] = tuple(a for a in axes.strip().split("+") if a)
    return out


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, table: RuleTable,
             *, strict: bool, what: str = "array", exclude: Iterable[str] = ()) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry logical `names`.

    Mesh axes of size 1 are left out (the spec says what is really split); a mesh axis is
    used at most once per array (first dimension wins). With strict=True a mesh axis that
    does not divide its dimension is an error; otherwise that axis is dropped.
    """
    if len(names) != len(shape):
        raise ShardingError(f"{what}: {len(names)} logical names {tuple(names)} for a "
                            f"{len(shape)}-d shape {tuple(shape)}")
    rules = dict(table)
    used: set[str] = set(exclude)  # e.g. an axis an enclosing vmap already maps
    spec: list[Any] = []
    for dim, (name, size) in enumerate(zip(names, shape)):
        axes = []
        for axis in rules.get(name, ()) if name else ():
            n = mesh.shape.get(axis, 1)
            if n == 1 or axis in used:
                continue
            split = math.prod(mesh.shape[a] for a in axes) * n
            if size % split:
                if strict and name not in REPLICABLE:
                    raise ShardingError(
                        f"{what}: dimension {dim} ({name}={size}) is not divisible by mesh axis "
                        f"{axis}={n}{' after ' + '+'.join(axes) if axes else ''}; choose a mesh "
                        f"whose {axis} size divides {size}, or map {name!r} elsewhere in the rules")
                continue
            axes.append(axis)
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while spec and spec[-1] is None:
        spec.pop()
    return PartitionSpec(*spec)


# ---------------------------------------------------------------- activations inside jit
_CONTEXT: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "jaxmp_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules) -> Iterator[None]:
    """While tracing inside this context, `constrain` pins activations to the mesh."""
    token = _CONTEXT.set((mesh, rules))
    try:
        yield
    finally:
        _CONTEXT.reset(token)


_MAPPED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "jaxmp_mapped_axes", default=frozenset())


@contextlib.contextmanager
def mapped_axes(*axes: str) -> Iterator[None]:
    """Inside vmap(..., spmd_axis_name=axes): specs leave these axes to the vmap."""
    token = _MAPPED.set(_MAPPED.get() | frozenset(axes))
    try:
        yield
    finally:
        _MAPPED.reset(token)


def mapped() -> frozenset[str]:
    """The mesh axes an enclosing vmap maps (see `mapped_axes`)."""
    return _MAPPED.get()


def constrain(x: jax.Array, names: Sequence[str | None], kind: str = "activations",
              lead_axis: str | tuple[str, ...] | None = None) -> jax.Array:
    """Constrain an array by logical names (activation rules, or kind="params" for weights
    reshaped inside the step); a no-op outside `activation_sharding`. With `lead_axis`,
    x has one more leading dimension than `names`, split over that mesh axis (or axes)."""
    ctx = _CONTEXT.get()
    if ctx is None or ctx[0].size == 1:
        return x
    lead = (lead_axis,) if isinstance(lead_axis, str) else tuple(lead_axis or ())
    spec = current_spec(names, x.shape[1:] if lead_axis else x.shape, kind, exclude=lead)
    if lead_axis:
        spec = PartitionSpec(lead_axis, *spec)
    return jax.lax.with_sharding_constraint(x, NamedSharding(_traced_mesh(ctx[0]), spec))


def shard_map(body: Any, mesh: Mesh, in_specs: Any, out_specs: Any) -> Any:
    """jax.shard_map manual over every mesh axis (check_vma off); inside the zero-bubble
    pipeline's shard_map (manual over pipe) over the other axes, on its abstract mesh."""
    inner = jax.sharding.get_abstract_mesh()
    if inner.empty or not inner.manual_axes:
        return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                             check_vma=False)
    return jax.shard_map(body, mesh=inner, in_specs=in_specs, out_specs=out_specs,
                         axis_names=set(inner.axis_names) - set(inner.manual_axes),
                         check_vma=False)


def _traced_mesh(mesh: Mesh) -> Any:
    """Inside a shard_map manual over some axes (the zero-bubble pipeline's, over pipe),
    the abstract mesh that says so (a constraint on the concrete mesh is refused there)."""
    inner = jax.sharding.get_abstract_mesh()
    return inner if not inner.empty and inner.manual_axes else mesh


def per_replica(params: Any, param_names: Any, rows: Any, row_names: Any, d: int,
                lead: str | tuple[str, ...]) -> tuple[Any, Any]:
    """For a vmap over `d` replicas split over the mesh axis (or axes) `lead`: a broadcast
    copy of each parameter per replica (each device holds its replica's, so one copy per
    device; the broadcast's transpose sums the replicas' gradients once), and each array
    of `rows` (B, ...) cut into (d, B/d, ...) along the split it already has (no data
    moves). `param_names` / `row_names`: the trees' logical names."""
    copies = jax.tree_util.tree_map(
        lambda a, n: constrain(jnp.broadcast_to(a[None], (d, *a.shape)), n, kind="params",
                               lead_axis=lead), params, param_names)
    split = jax.tree_util.tree_map(
        lambda x, n: constrain(x.reshape(d, x.shape[0] // d, *x.shape[1:]), n, lead_axis=lead),
        rows, row_names)
    return copies, split


def current_spec(names: Sequence[str | None], shape: Sequence[int],
                 kind: str = "activations", exclude: Iterable[str] = ()) -> PartitionSpec | None:
    """The spec `constrain` gives an array (None outside `activation_sharding`): the rules'
    axes for `names`, less those an enclosing vmap maps and `exclude`."""
    ctx = _CONTEXT.get()
    if ctx is None:
        return None
    mesh, rules = ctx
    table = rules.params if kind == "params" else rules.activations
    return spec_for(names, shape, mesh, table, strict=False,
                    exclude=_MAPPED.get() | set(exclude))


def current_mesh() -> Mesh | None:
    ctx = _CONTEXT.get()
    return None if ctx is None else ctx[0]


def current_rules() -> Rules | None:
    ctx = _CONTEXT.get()
    return None if ctx is None else ctx[1]


# ---------------------------------------------------------------- parameters
def logical_axes(state: nnx.State | nnx.Module) -> dict:
    """Pure dict (same structure as the parameters) of each parameter's logical names."""
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)
    is_var = lambda x: isinstance(x, nnx.Variable)
    flat = jax.tree_util.tree_map(
        lambda v: tuple(v.get_metadata().get("logical_axes") or (None,) * np.ndim(v[...])),
        state, is_leaf=is_var)
    return nnx.to_pure_dict(flat) if isinstance(flat, nnx.State) else flat


def _is_names(x: Any) -> bool:
    return isinstance(x, tuple) and all(n is None or isinstance(n, str) for n in x)


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def param_specs(params: Any, axes: Any, mesh: Mesh, rules: Rules) -> Any:
    """PartitionSpec tree for a parameter tree (arrays or ShapeDtypeStructs)."""
    names = jax.tree_util.tree_leaves(axes, is_leaf=_is_names)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    if len(names) != len(leaves):
        raise ShardingError(f"{len(leaves)} parameters but {len(names)} logical-name entries")
    specs = [spec_for(n, np.shape(x), mesh, rules.params, strict=True, what=path_str(p))
             for (p, x), n in zip(leaves, names)]
    return jax.tree_util.tree_unflatten(treedef, specs)


# The axes the train state is spread over at rest (ZeRO-1): those the parameters are
# replicated over while computing. `context` is one: it splits the sequence, not the
# weights, so without it every device of a context group would keep the whole state.
STATE_AXES: tuple[str, ...] = ("data", "fsdp", "context")


def spread_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                axes: Sequence[str] = STATE_AXES) -> PartitionSpec:
    """`spec` with each mesh axis of `axes` it does not use yet added to a dimension it
    divides (the one with the most elements left per device; as the minor part of that
    dimension's split, so gathering the axis back gives `spec` without moving data across
    the other axes). The layout of the optimizer state and master weights at rest (ZeRO-1
    over `data` and `context`; over `fsdp` for the parameters FSDP's rules leave whole,
    e.g. biases).
    An axis that divides no dimension is left out (the array stays replicated over it)."""
    entries: list[tuple[str, ...]] = [
        () if e is None else (e,) if isinstance(e, str) else tuple(e) for e in spec]
    entries += [()] * (len(shape) - len(entries))
    used = {a for e in entries for a in e}
    for axis in axes:
        n = mesh.shape.get(axis, 1)
        if n == 1 or axis in used:
            continue
        local = [size // math.prod(mesh.shape[a] for a in e) for size, e in zip(shape, entries)]
        fits = [d for d, size in enumerate(local) if size % n == 0 and size >= n]
        if not fits:
            continue
        best = max(fits, key=lambda d: (local[d], -d))
        entries[best] = (*entries[best], axis)
        used.add(axis)
    out: list[Any] = [None if not e else e[0] if len(e) == 1 else e for e in entries]
    while out and out[-1] is None:
        out.pop()
    return PartitionSpec(*out)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda s: isinstance(s, PartitionSpec))


def bytes_per_device(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of arrays (or ShapeDtypeStructs) laid out by the
    tree of `shardings` (the largest shard; shards of uneven splits count in full)."""
    total = 0
    for a, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(s.shard_shape(tuple(a.shape))) * np.dtype(a.dtype).itemsize
    return int(total)


def shards_of(spec: PartitionSpec, mesh: Mesh | Mapping[str, int],
              axes: Sequence[str] | None = None) -> int:
    """How many pieces `spec` cuts an array into (over the mesh axes `axes` only, if given)."""
    sizes = mesh.shape if isinstance(mesh, Mesh) else mesh
    n = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            n *= sizes[axis] if axes is None or axis in axes else 1
    return n


@dataclasses.dataclass(frozen=True)
class PlanRow:
    path: str
    shape: tuple[int, ...]
    dtype: str
    names: Names
    spec: PartitionSpec
    bytes_total: int
    bytes_per_device: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where every parameter lives: one row per parameter, plus totals."""

    rows: tuple[PlanRow, ...]
    mesh_shape: dict[str, int]
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)  # params'

    @property
    def total_bytes(self) -> int:
        return sum(r.bytes_total for r in self.rows)

    @property
    def bytes_per_device(self) -> int:
        return sum(r.bytes_per_device for r in self.rows)

    @property
    def total_params(self) -> int:
        return sum(math.prod(r.shape) for r in self.rows)

    def format(self) -> str:
        head = ("parameter", "shape", "dtype", "logical names", "PartitionSpec", "bytes/device")
        body = [(r.path, "x".join(map(str, r.shape)) or "()", r.dtype,
                 "(" + ", ".join(str(n) for n in r.names) + ")", _spec_text(r.spec),
                 f"{r.bytes_per_device:,}") for r in self.rows]
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
        mesh = ",".join(f"{a}:{n}" for a, n in self.mesh_shape.items() if n > 1) or "1 device"
        total = (f"total: {self.total_params:,} parameters, {self.total_bytes:,} bytes; "
                 f"{self.bytes_per_device:,} bytes per device on {mesh}")
        return "\n".join([line(head), *(line(r) for r in body), total, *self.notes])

    @property
    def notes(self) -> list[str]:
        """Dimensions left replicated because their mesh axis does not divide them."""
        found: dict[tuple[str, int, str], list[str]] = {}
        for r in self.rows:
            for name, size in zip(r.names, r.shape):
                if name not in REPLICABLE:
                    continue
                for a in self.rules.get(name, ()):
                    if self.mesh_shape.get(a, 1) > 1 and a not in _spec_axes(r.spec):
                        found.setdefault((name, size, a), []).append(r.path)
        return [f"note: {name}={size} is replicated over {a} ({a}={self.mesh_shape[a]} does not "
                f"divide it): {', '.join(paths)}" for (name, size, a), paths in found.items()]


def _spec_axes(spec: PartitionSpec) -> set[str]:
    return {a for e in spec for a in ((e,) if isinstance(e, str) else (e or ()))}


def _spec_text(spec: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(e) if e is None or isinstance(e, str) else
                            "(" + ",".join(e) + ")" for e in spec) + ")"


def plan(params: Any, axes: Any, mesh: Mesh, rules: Rules) -> Plan:
    """The parameter plan for a tree of arrays or ShapeDtypeStructs."""
    specs = param_specs(params, axes, mesh, rules)
    names = jax.tree_util.tree_leaves(axes, is_leaf=_is_names)
    rows = []
    for ((path, x), spec), n in zip(
            zip(jax.tree_util.tree_flatten_with_path(params)[0],
                jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec))),
            names):
        nbytes = math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
        rows.append(PlanRow(path_str(path), tuple(np.shape(x)), str(np.dtype(x.dtype)), n, spec,
                            nbytes, nbytes // shards_of(spec, mesh)))
    return Plan(tuple(rows), dict(mesh.shape), dict(rules.params))
