"""Which all-gathers gather a weight, whatever their shapes (a stage's slice of the layer
stack, a bf16 cast, a reshaped kernel): a dataflow ("taint") analysis from the ENTRY
parameters that are weights (`jax_entry_parameters` numbers a jitted function's) through
casts, slices, tuples, fusions and loops, stopping at computed values.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax

from jaxmp.plan.hlo import (
    ELEMENTWISE,
    HloInstruction,
    HloModule,
    Site,
    accumulate,
    collective_bytes,
    collective_kind,
    parse_hlo,
)

# Which all-gathers gather a weight, whatever its shape: a dataflow ("taint") analysis from
# the ENTRY parameters that are model weights through the call graph. See
# `weight_derived_gathers` for what counts as "a weight" and what does not.


@dataclasses.dataclass(frozen=True)
class Flow:
    """What one array of a program may hold.

    weights: labels of the weight parameters it may be (a piece, reshaping or cast of);
    data: whether it may instead derive from the program's other inputs or be computed (a
    dot, a reduction, ...). A tuple-shaped value has a tuple of these (`Taint`); a lone Flow
    where a tuple is expected stands for every element alike."""

    weights: frozenset[str] = frozenset()
    data: bool = False

    @property
    def pure_data(self) -> bool:
        return self.data and not self.weights


Taint = Flow | tuple["Taint", ...]
NEUTRAL = Flow()           # constants, iotas, the partition id: neither weight nor data
DATA = Flow(data=True)

# Produced from nothing the program is given.
_NEUTRAL_OPS = frozenset({"constant", "iota", "partition-id", "replica-id", "after-all",
                          "get-dimension-size"})
# The result is the first operand's elements moved, re-typed or copied; any other operand
# is a size or a token. Data-moving collectives included (variadic ones: one per operand).
_MOVES = frozenset({
    "convert", "bitcast", "bitcast-convert", "reshape", "dynamic-reshape", "transpose", "copy",
    "copy-start", "slice", "broadcast", "reverse", "reduce-precision", "domain",
    "add-dependency", "all-gather", "collective-permute", "all-to-all", "collective-broadcast",
    "all-gather-start", "collective-permute-start"})
# Elementwise beyond ELEMENTWISE (which counts FLOPs), and ops that join arrays.
_COMBINES = (ELEMENTWISE | {"real", "imag", "complex", "popcnt", "count-leading-zeros",
                            "shift-left", "shift-right-arithmetic", "shift-right-logical",
                            "stochastic-convert", "concatenate", "pad", "map"}) - {"select"}
# Ops that pick pieces of some operands (these positions) by the others (indices, a mask).
_CHOOSES: dict[str, tuple[int, ...]] = {
    "dynamic-slice": (0,), "dynamic-update-slice": (0, 1), "gather": (0,), "select": (1, 2)}


def _flat(t: Taint) -> Flow:
    """Everything a (possibly tuple) value may hold, as one Flow."""
    if isinstance(t, Flow):
        return t
    parts = [_flat(e) for e in t]
    return Flow(frozenset().union(*(p.weights for p in parts)), any(p.data for p in parts))


def _join(a: Taint, b: Taint) -> Taint:
    """What a value may hold if it is either a or b (a loop-carried value, a branch result)."""
    if isinstance(a, Flow) and isinstance(b, Flow):
        return Flow(a.weights | b.weights, a.data or b.data)
    if isinstance(a, tuple) and isinstance(b, tuple):
        if len(a) == len(b):
            return tuple(_join(x, y) for x, y in zip(a, b))
        return _join(_flat(a), _flat(b))
    whole, each = (a, b) if isinstance(a, tuple) else (b, a)
    return tuple(_join(e, each) for e in whole)


def _element(t: Taint, i: int) -> Taint:
    if isinstance(t, Flow):
        return t
    return t[i] if i < len(t) else _flat(t)


def _mix(operands: Iterable[Taint]) -> Flow:
    """An elementwise combination: a weight cast, scaled by a constant or added to another
    weight is still a weight; combined with data (a bias added to a dot's output, a norm's
    scale times activations) the result is data."""
    parts = [_flat(t) for t in operands]
    if any(p.pure_data for p in parts):
        return DATA
    return Flow(frozenset().union(*(p.weights for p in parts)), any(p.data for p in parts))


def _choose(operands: Sequence[Taint], kept: tuple[int, ...]) -> Flow:
    """A piece of a weight chosen by the program's own counters (a loop index, the partition
    id) is a piece of the weight; chosen by the data (token ids: an embedding lookup, a
    data-dependent mask) it is data."""
    if any(_flat(t).data for i, t in enumerate(operands) if i not in kept):
        return DATA
    return _mix(operands[i] for i in kept if i < len(operands))


def _local(opcode: str, operands: Sequence[Taint]) -> Taint:
    """The taint of an instruction that calls no computation."""
    if opcode in _NEUTRAL_OPS:
        return NEUTRAL
    if opcode in _MOVES:
        if opcode.endswith("-start"):  # (operands, results) tuples
            return _flat(tuple(operands))
        many = opcode in ("all-gather", "collective-permute", "all-to-all") and len(operands) > 1
        return tuple(operands) if many else (operands[0] if operands else NEUTRAL)
    if opcode.endswith("-done"):  # the async pair's result is what its -start carried
        return _flat(operands[0]) if operands else NEUTRAL
    if opcode in _CHOOSES:
        return _choose(operands, _CHOOSES[opcode])
    if opcode in _COMBINES:
        return _mix(operands)
    return DATA  # dot, convolution, reduce, all-reduce, reduce-scatter, custom-call, ...


def _callee(ins: HloInstruction, key: str) -> str:
    m = re.search(rf"\b{key}=%([\w.\-]+)", ins.attrs)
    if not m:
        raise ValueError(f"%{ins.name} ({ins.opcode}) names no {key}= computation")
    return m.group(1)


class _WeightFlow:
    """The dataflow over a module's call graph: each computation is analysed per distinct
    tuple of parameter taints (memoized), loops to a fixed point; `gathered` collects, per
    (computation, all-gather), the weights its operand may be, over every context."""

    def __init__(self, module: HloModule):
        self.module = module
        self.memo: dict[tuple[str, tuple[Taint, ...]], Taint] = {}
        self.gathered: dict[tuple[str, str], frozenset[str]] = {}

    def run(self, name: str, params: tuple[Taint, ...]) -> Taint:
        """The root's taint of computation `name` called with parameter taints `params`."""
        key = (name, params)
        if key in self.memo:
            return self.memo[key]
        self.memo[key] = NEUTRAL  # cycle guard (HLO call graphs are acyclic)
        env: dict[str, Taint] = {}
        root: Taint = NEUTRAL
        for ins in self.module.computations[name].instructions:
            missing = [o for o in ins.operands if o not in env]
            if missing:  # XLA prints operands first; anything else would be silently wrong
                raise ValueError(f"%{ins.name} in {name} uses {missing} before their definition")
            operands = [env[o] for o in ins.operands]
            env[ins.name] = self.instruction(ins, operands, params)
            if collective_kind(ins.opcode) == "all-gather":
                weights = _flat(tuple(operands)).weights
                if weights:
                    k = (name, ins.name)
                    self.gathered[k] = self.gathered.get(k, frozenset()) | weights
            if ins.root:
                root = env[ins.name]
        self.memo[key] = root
        return root

    def instruction(self, ins: HloInstruction, operands: list[Taint],
                    params: tuple[Taint, ...]) -> Taint:
        op = ins.opcode
        if op == "parameter":
            n = int(ins.args.strip())
            return params[n] if n < len(params) else NEUTRAL
        if op == "tuple":
            return tuple(operands)
        if op == "get-tuple-element":
            m = re.search(r"\bindex=(\d+)", ins.attrs)
            return _element(operands[0], int(m.group(1))) if m else _flat(operands[0])
        if op in ("optimization-barrier", "async-update"):
            return operands[0]
        if op == "fusion":
            return self.run(_callee(ins, "calls"), tuple(operands))
        if op == "call":
            return self.run(_callee(ins, "to_apply"), tuple(operands))
        if op == "async-start":  # ((operands), result, context)
            return (tuple(operands), self.run(_callee(ins, "calls"), tuple(operands)), NEUTRAL)
        if op == "async-done":
            return _element(operands[0], 1)
        if op == "while":
            return self.loop(ins, operands[0])
        if op == "conditional":
            return self.branches(ins, operands)
        return _local(op, operands)

    def loop(self, ins: HloInstruction, init: Taint) -> Taint:
        """The loop tuple's taint: the init tuple joined with the body's root, iterated until
        nothing changes (values flow around the loop: a weight fed in at element 2 may come
        out at element 3 and be gathered on the next trip)."""
        body, carried = _callee(ins, "body"), init
        while True:
            after = _join(carried, self.run(body, (carried,)))
            if after == carried:
                break
            carried = after
        self.run(_callee(ins, "condition"), (carried,))
        return carried

    def branches(self, ins: HloInstruction, operands: list[Taint]) -> Taint:
        """A conditional's result may be any branch's root; branch k gets operand k + 1."""
        listed = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        names = (re.findall(r"%([\w.\-]+)", listed.group(1)) if listed else
                 [_callee(ins, "true_computation"), _callee(ins, "false_computation")])
        roots = [self.run(n, (operands[k + 1],) if k + 1 < len(operands) else ())
                 for k, n in enumerate(names)]
        return functools.reduce(_join, roots) if roots else NEUTRAL


@dataclasses.dataclass(frozen=True)
class EntryParameter:
    """A parameter of the ENTRY computation: an argument of the program."""

    number: int
    name: str          # the instruction's name ("param.8", "state_params__wte__.1", ...)
    path: str | None   # jax's name for the argument (metadata op_name), "state.params['wte']"
    shape: str         # per device in a compiled SPMD program

    @property
    def label(self) -> str:
        return self.path or self.name


_OP_NAME_RE = re.compile(r'\bop_name="((?:[^"\\]|\\.)*)"')


def entry_parameters(module: HloModule | str) -> dict[int, EntryParameter]:
    """{number: parameter} of the ENTRY computation."""
    module = parse_hlo(module) if isinstance(module, str) else module
    out = {}
    for ins in module.computations[module.entry].instructions:
        if ins.opcode == "parameter":
            m = _OP_NAME_RE.search(ins.attrs)
            path = re.sub(r"\\(.)", r"\1", m.group(1)) if m else None
            n = int(ins.args.strip())
            out[n] = EntryParameter(n, ins.name, path, ins.shape)
    return out


WeightSelector = Mapping[int, str] | Iterable[int] | Callable[[str], bool]


def _weight_labels(params: Mapping[int, EntryParameter], weights: WeightSelector,
                   ) -> dict[int, str]:
    """{ENTRY parameter number: label} of the weights `weights` selects."""
    if callable(weights):
        return {n: p.label for n, p in params.items()
                if weights(p.name) or (p.path is not None and weights(p.path))}
    labels = ({int(n): str(v) for n, v in weights.items()} if isinstance(weights, Mapping)
              else {int(n): params[n].label if n in params else str(n) for n in weights})
    unknown = sorted(set(labels) - set(params))
    if unknown:
        raise ValueError(f"the ENTRY computation has no parameter(s) {unknown} "
                         f"(it has {len(params)})")
    return labels


@dataclasses.dataclass(frozen=True)
class WeightGather:
    """An all-gather whose operand may be (a piece, reshaping or cast of) a weight."""

    computation: str
    name: str                    # the all-gather (or all-gather-start) instruction
    weights: tuple[str, ...]     # labels of the weight parameters it may gather
    shape: str                   # its result shape text
    executions: int              # per run: loop bodies x trip counts
    bytes: int                   # per device over all executions (see collective_bytes)


def weight_derived_gathers(module: HloModule | str, weights: WeightSelector,
                           ) -> list[WeightGather]:
    """Every all-gather whose operand derives from a weight, whatever the shapes.

    `weights` picks the ENTRY parameters that are weights: {number: label}, numbers (see
    `jax_entry_parameters` for a jitted function's), or a predicate called with each
    parameter's instruction name and, where the HLO keeps it, jax's argument path
    (e.g. `lambda s: s.startswith("state.params")`).

    A value "is a weight" when it is a weight parameter moved, cut or re-typed: the taint
    flows through convert, bitcast, reshape, transpose, copy, slice, broadcast, reverse, pad,
    concatenate, data-moving collectives (all-gather, collective-permute, all-to-all),
    tuples and get-tuple-element (per element), fusions and calls (operands to the callee's
    parameters, its root to the result), while loops (the init tuple to the body's and
    condition's parameter, the body's root back, to a fixed point), conditionals (any
    branch's root) and async -start / -done pairs; and through elementwise ops whose other
    operands are weights or constants (a cast, a scale by a constant, the sum of two
    weights). dynamic-slice, dynamic-update-slice, gather and select keep it when the
    indices / mask come from the program's own counters (a loop index, the partition id),
    not from the data.

    Not a weight (the legitimately gathered activations of sequence or tensor parallelism):
    the output of a dot, convolution, reduction, all-reduce, reduce-scatter, custom-call or
    any other computing op; an elementwise combination with data (a bias added to a dot's
    output, a norm's scale times activations); a piece picked by data (an embedding
    lookup). Data are the other ENTRY parameters (the batch, the optimizer state, so the
    updated weights of a train step are data too) and everything computed.

    A computation called from several places is analysed per distinct context; an all-gather
    in it counts with the union of its contexts' weights and all its executions."""
    module = parse_hlo(module) if isinstance(module, str) else module
    params = entry_parameters(module)
    labels = _weight_labels(params, weights)
    entry = tuple(Flow(frozenset({labels[n]})) if n in labels else DATA
                  for n in range(max(params, default=-1) + 1))
    flow = _WeightFlow(module)
    flow.run(module.entry, entry)

    def leaf(site: Site) -> dict[Hashable, tuple[float, float]]:
        key = (site.computation.name, site.instruction.name)
        if key not in flow.gathered:
            return {}
        return {key: (1, collective_bytes(site, "all-gather"))}

    stats, _ = accumulate(module, leaf)
    found = []
    for (comp, name), (count, nbytes) in stats.items():
        ins = next(i for i in module.computations[comp].instructions if i.name == name)
        found.append(WeightGather(comp, name, tuple(sorted(flow.gathered[(comp, name)])),
                                  ins.shape, int(round(count)), int(round(nbytes))))
    return sorted(found, key=lambda g: (g.computation, g.name))


def jax_entry_parameters(stage: Any, module: HloModule | str | None = None) -> dict[int, str]:
    """{ENTRY parameter number: argument path} of a jitted function's `Lowered` or `Compiled`
    (`jax.jit(f).lower(...)` / `.compile()`). Paths read "args[0].params['wte']['embedding']"
    (the first positional argument's .params['wte']['embedding']) or "kwargs['x']".

    jax numbers the ENTRY parameters in the order of the flattened (args, kwargs) leaves,
    after any constants it hoists into parameters, leaving out the arguments the function
    does not use (jit's default keep_unused=False). Which were left out and how many
    constants there are is read from private attributes (jax 0.10); the numbering is then
    checked against the HLO (`module`, default: the stage's own text): the parameter count,
    and each parameter's metadata op_name (jax's name for the argument, as
    "state.params['wte']['embedding']"), where kept, must end with the same path. A
    mismatch raises ValueError rather than mislabel the weights."""
    leaves = jax.tree_util.tree_flatten_with_path(stage.args_info)[0]
    paths = [("args" if p[0].idx == 0 else "kwargs") + jax.tree_util.keystr(p[1:])
             for p, _ in leaves]
    tails = [jax.tree_util.keystr(p[2:]) for p, _ in leaves]
    kept, consts = _kept_arguments(stage, len(paths))
    numbering = {consts + rank: leaf for rank, leaf in enumerate(kept)}
    if module is None:
        compiled = isinstance(stage, jax.stages.Compiled)
        module = stage.as_text() if compiled else stage.as_text(dialect="hlo", debug_info=True)
    params = entry_parameters(module)
    if len(params) != consts + len(kept) or set(numbering) - set(params):
        raise ValueError(f"the program has {len(params)} parameters, but jax's input tree gives "
                         f"{consts} constants and {len(kept)} kept arguments")
    for n, leaf in numbering.items():
        path = params[n].path
        if path is not None and not path.endswith(tails[leaf]):
            raise ValueError(f"ENTRY parameter {n} is {path!r} in the HLO, not {paths[leaf]!r}")
    return {n: paths[leaf] for n, leaf in numbering.items()}


def _kept_arguments(stage: Any, leaves: int) -> tuple[list[int], int]:
    """(the argument leaves the program takes, in order; how many hoisted constants come
    first), from jax's private kept_var_idx (which counts the constants first) and
    const_args; all leaves and no constants where those are missing."""
    if isinstance(stage, jax.stages.Compiled):
        kept = getattr(getattr(stage, "_executable", None), "_kept_var_idx", None)
        consts = len(getattr(getattr(stage, "_params", None), "const_args", ()) or ())
    else:
        lowering = getattr(stage, "_lowering", None)
        kept = getattr(lowering, "compile_args", {}).get("kept_var_idx")
        consts = len(getattr(lowering, "const_args", ()) or ())
    if kept is None:
        return list(range(leaves)), consts
    return sorted(i - consts for i in kept if i >= consts), consts


