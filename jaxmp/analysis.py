"""Compiled-program accounting: memory, FLOPs and collectives of an XLA program, and MFU.

Every figure here is read from a compiled program (its optimized HLO text, its memory
analysis, its input shardings), never typed in. The HLO walker follows the call graph
from the ENTRY computation and multiplies what it finds inside a while loop (a scan body)
by the loop's trip count, so a 48-layer scan counts 48 layers, not one.

XLA's own `compiled.cost_analysis()["flops"]` counts a while body once whatever its trip
count (seen with jaxlib 0.10.2: 4 and 8 scanned layers give almost the same figure), so
`hlo_flops` recounts dots and elementwise work with the loop multipliers.

The analytic minima next to the compiled figures:

- Megatron tensor parallelism: per layer 2 all-reduces of the (rows, T, d) activations in
  the forward pass and 2 in the backward pass (the attention output and MLP projections;
  their transposes on the way back).
- The pipeline: per tick one collective-permute of a micro-batch's (rows/m, T, d)
  activations to the next stage, forward and backward.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

# Dense bf16 peak FLOP/s per chip (vendor datasheets). H100 SXM and H200 share 989 TFLOP/s.
PEAK_BF16_FLOPS: dict[str, float] = {"H100": 989e12, "H200": 989e12}
# HBM bandwidth, bytes/s (vendor datasheets: H100 SXM 80 GB HBM3 3.35 TB/s, H200 141 GB
# HBM3e 4.8 TB/s). The decode roofline divides this by the bytes read per token.
HBM_BYTES_PER_S: dict[str, float] = {"H100": 3.35e12, "H200": 4.8e12}


def _by_kind(table: Mapping[str, float], device: jax.Device | None) -> float | None:
    kind = getattr(device or jax.devices()[0], "device_kind", "")
    return next((v for name, v in table.items() if name in kind), None)


def peak_flops(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of `device` (default: the first one), or None if unknown (CPU)."""
    return _by_kind(PEAK_BF16_FLOPS, device)


def memory_bandwidth(device: jax.Device | None = None) -> float | None:
    """Datasheet memory bandwidth of `device` in bytes/s, or None if unknown (CPU)."""
    return _by_kind(HBM_BYTES_PER_S, device)


def mfu(tokens_per_s: float, flops_per_token: float, num_devices: int,
        device: jax.Device | None = None) -> float | None:
    """Model FLOPs utilization: achieved model FLOP/s over the devices' summed peak."""
    peak = peak_flops(device)
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * num_devices)


# ====================================================================== HLO text
COLLECTIVES: tuple[str, ...] = (
    "all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")

DTYPE_BYTES: dict[str, float] = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1,
    "s16": 2, "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8,
    "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1,
    "f8e5m2fnuz": 1, "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1, "token": 0,
}

# One FLOP per output element (HloCostAnalysis counts these the same way).
ELEMENTWISE: frozenset[str] = frozenset({
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "negate", "abs",
    "exponential", "exponential-minus-one", "log", "log-plus-one", "tanh", "logistic",
    "rsqrt", "sqrt", "cbrt", "power", "remainder", "atan2", "sine", "cosine", "tan", "erf",
    "sign", "floor", "ceil", "round-nearest-afz", "round-nearest-even", "compare", "select",
    "clamp", "and", "or", "xor", "not", "is-finite",
})

_SHAPE_RE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
_COMMENT_RE = re.compile(r"/\*.*?\*/")
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR_RE = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_CALLEE_RE = re.compile(
    r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)")
_TRIP_RE = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')


@dataclasses.dataclass(frozen=True)
class HloInstruction:
    name: str
    opcode: str
    shape: str             # result shape text, e.g. "f32[4,32]{1,0}" or a tuple "(f32[], s32[])"
    operands: tuple[str, ...]
    attrs: str             # everything after the operand list
    root: bool = False
    args: str = ""         # the raw operand text (a constant's literal)


@dataclasses.dataclass(frozen=True)
class HloComputation:
    name: str
    instructions: tuple[HloInstruction, ...]

    @functools.cached_property
    def _shapes(self) -> dict[str, str]:
        return {i.name: i.shape for i in self.instructions}

    def shape_of(self, name: str) -> str | None:
        """Result shape of the instruction (or parameter) called `name`."""
        return self._shapes.get(name)


@dataclasses.dataclass(frozen=True)
class HloModule:
    computations: Mapping[str, HloComputation]
    entry: str


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] ('(' or '{')."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text[start:start + 120]!r}")


def _parse_instruction(line: str) -> HloInstruction | None:
    m = _INSTR_RE.match(line)
    if not m:
        return None
    root, name, rest = bool(m.group(1)), m.group(2), m.group(3).strip()
    if rest.startswith("("):
        end = _balanced(rest, 0)
    else:
        end = rest.find(" ")
        if end < 0:
            return None
    shape, rest = rest[:end], rest[end:].strip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _balanced(rest, op.end() - 1)
    operand_text = rest[op.end():close - 1]
    operands = tuple(re.findall(r"%([\w.\-]+)", operand_text))
    attrs = rest[close:].lstrip(", ")
    return HloInstruction(name, op.group(1), shape, operands, attrs, root, operand_text)


def parse_hlo(text: str) -> HloModule:
    """Split HLO text (`compiled.as_text()`) into computations of instructions."""
    comps: dict[str, HloComputation] = {}
    entry = None
    current: str | None = None
    body: list[HloInstruction] = []
    for raw in text.splitlines():
        line = _COMMENT_RE.sub("", raw).rstrip()
        if current is None:
            h = _HEADER_RE.match(line)
            if h:
                current, body = h.group(2), []
                if h.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            comps[current] = HloComputation(current, tuple(body))
            current = None
            continue
        ins = _parse_instruction(line)
        if ins is not None:
            body.append(ins)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return HloModule(comps, entry)


def shape_arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of every array in a (possibly tuple) shape text."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d))
            for dt, dims in _SHAPE_RE.findall(_COMMENT_RE.sub("", shape)) if dt in DTYPE_BYTES]


def shape_bytes(shape: str) -> int:
    """Bytes of a shape text; a tuple counts all its arrays."""
    return int(sum(DTYPE_BYTES[dt] * math.prod(dims) for dt, dims in shape_arrays(shape)))


def shape_elements(shape: str) -> int:
    return sum(math.prod(dims) for _, dims in shape_arrays(shape))


def trip_count(ins: HloInstruction, module: HloModule) -> int | None:
    """Trip count of a while loop: XLA's known_trip_count annotation, else the constant
    bound of an `i < N` condition (induction variable from 0 in steps of 1); else None."""
    m = _TRIP_RE.search(ins.attrs)
    if m:
        return int(m.group(1))
    cond = re.search(r"\bcondition=%([\w.\-]+)", ins.attrs)
    comp = module.computations.get(cond.group(1)) if cond else None
    if comp is None:
        return None
    consts = {i.name: i for i in comp.instructions if i.opcode == "constant"}
    for i in comp.instructions:
        if i.root and i.opcode == "compare" and "direction=LT" in i.attrs:
            for name in i.operands[1:]:
                c = consts.get(name)
                if c is not None and re.fullmatch(r"-?\d+", c.args.strip()):
                    return max(0, int(c.args))
    return None


@dataclasses.dataclass(frozen=True)
class Site:
    """One instruction reached from ENTRY, with how often one run executes it."""

    computation: HloComputation
    instruction: HloInstruction
    multiplier: int
    in_loop: bool


Stats = dict[Hashable, np.ndarray]


def accumulate(module: HloModule, leaf: Callable[[Site], Mapping[Hashable, Sequence[float]]],
               ) -> tuple[Stats, int]:
    """Sum leaf(site) over every instruction reachable from ENTRY, each weighted by how
    often it runs: while bodies x trip count (nested loops multiply), fusions, calls,
    async computations x 1, every conditional branch x 1 (an upper bound). Scalar
    lambdas (to_apply of reduce, all-reduce, sort, ...) are not entered.

    Returns (stats, loops whose trip count could not be read, counted once)."""
    memo: dict[tuple[str, bool], Stats] = {}
    unknown = [0]

    def add(into: Stats, other: Mapping[Hashable, Any], scale: float) -> None:
        for k, v in other.items():
            v = np.asarray(v, dtype=np.float64) * scale
            into[k] = into[k] + v if k in into else v

    def visit(name: str, in_loop: bool) -> Stats:
        key = (name, in_loop)
        if key in memo:
            return memo[key]
        memo[key] = {}  # cycle guard (HLO call graphs are acyclic)
        comp = module.computations[name]
        out: Stats = {}
        for ins in comp.instructions:
            add(out, leaf(Site(comp, ins, 1, in_loop)), 1.0)
            for kind, callee in _callees(ins):
                if callee not in module.computations:
                    continue
                if ins.opcode == "while":
                    n = trip_count(ins, module)
                    if n is None:
                        unknown[0] += 1
                        n = 1
                    if kind == "body":
                        add(out, visit(callee, True), n)
                    continue
                add(out, visit(callee, in_loop), 1.0)
        memo[key] = out
        return out

    return visit(module.entry, False), unknown[0]


def _callees(ins: HloInstruction) -> list[tuple[str, str]]:
    if ins.opcode.endswith("-done") or ins.opcode == "async-update":
        return []  # the computation of an async pair is entered once, at its -start
    found = [(k, c) for k, c in _CALLEE_RE.findall(ins.attrs)]
    found = [(k, c) for k, c in found if k != "to_apply" or ins.opcode == "call"]
    if ins.opcode == "while":
        found = [(k, c) for k, c in found if k == "body"]
    branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
    if branches:
        found += [("branch", c) for c in re.findall(r"%([\w.\-]+)", branches.group(1))]
    calls = re.search(r"\bcalls=\{([^}]*)\}", ins.attrs)
    if calls:
        found += [("calls", c) for c in re.findall(r"%([\w.\-]+)", calls.group(1))]
    return found


# ====================================================================== collectives
def collective_kind(opcode: str) -> str | None:
    """'all-reduce' for all-reduce and all-reduce-start; None for -done halves and others."""
    if opcode.endswith("-done"):
        return None
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in COLLECTIVES else None


def collective_bytes(site: Site, kind: str) -> int:
    """Per-device bytes of the whole buffer a collective spans: the gathered result of an
    all-gather, the unscattered operand of a reduce-scatter, the operand (= result) of an
    all-reduce, collective-permute or all-to-all."""
    ins = site.instruction
    shapes = [site.computation.shape_of(o) for o in ins.operands]
    operand = sum(shape_bytes(s) for s in shapes if s) if all(shapes) else None
    if ins.opcode.endswith("-start"):
        if kind == "all-gather":  # result is (operands, outputs): the largest array
            return max((int(DTYPE_BYTES[d] * math.prod(s)) for d, s in shape_arrays(ins.shape)),
                       default=0)
        return operand if operand is not None else shape_bytes(ins.shape)
    result = shape_bytes(ins.shape)
    if kind == "reduce-scatter" and operand is not None:
        return operand
    return result


def device_groups(attrs: str, num_devices: int) -> list[list[int]] | None:
    """Device groups of a collective from its replica_groups / source_target_pairs
    (explicit lists, iota `[G,S]<=[dims]T(perm)`, and `mesh[...] {axes}` forms)."""
    pairs = _braced(attrs, "source_target_pairs=")
    if pairs is not None:
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", pairs)]
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]"
                  r"(?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,\s]+)\))?\s*\{([^}]*)\}",
                  attrs)
    if m:
        axes = re.findall(r"'([^']+)'\s*=\s*(\d+)", m.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        over = re.findall(r"'([^']+)'", m.group(3))
        if math.prod(sizes) != num_devices or any(a not in names for a in over):
            return None
        ids = _device_order(m.group(2), num_devices).reshape(sizes)
        keep = [names.index(a) for a in over]
        rest = [i for i in range(len(names)) if i not in keep]
        ids = ids.transpose(rest + keep).reshape(-1, math.prod(sizes[i] for i in keep) or 1)
        return ids.tolist()
    m = re.search(r"replica_groups=\[([\d,]+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", attrs)
    if m:
        size = int(m.group(1).split(",")[-1])
        return _device_order(m.group(2), num_devices).reshape(-1, size).tolist()
    explicit = _braced(attrs, "replica_groups=")
    if explicit is not None:
        groups = [[int(x) for x in g.split(",") if x]
                  for g in re.findall(r"\{([\d,]*)\}", explicit)]
        return groups or [list(range(num_devices))]  # {} = one group of every device
    return None


def _device_order(text: str | None, num_devices: int) -> np.ndarray:
    """Device ids in order from an iota list '[2,4]T(1,0)' (arange, reshaped, transposed,
    flattened), an explicit list '0,4,1,5', or None (0..n-1)."""
    if not text:
        return np.arange(num_devices)
    m = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
    if not m:
        return np.array([int(x) for x in text.split(",") if x.strip()])
    dims = [int(x) for x in m.group(1).split(",")]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m.group(2):
        ids = ids.transpose([int(x) for x in m.group(2).split(",")])
    return ids.reshape(-1)


def _braced(attrs: str, key: str) -> str | None:
    """The text inside the {...} group that follows `key` in an attribute list."""
    at = attrs.find(key + "{")
    if at < 0:
        return None
    start = at + len(key)
    return attrs[start + 1:_balanced(attrs, start) - 1]


def group_axes(groups: list[list[int]] | None, mesh_shape: Mapping[str, int]) -> str:
    """Mesh axes a collective runs over ('tensor', 'data+fsdp', ...), from its device
    groups; device ids are positions in the mesh's row-major device order. '?' if unknown."""
    if groups is None:
        return "?"
    names = [a for a in mesh_shape]
    dims = [mesh_shape[a] for a in names]
    n = math.prod(dims)
    varying: set[str] = set()
    for g in groups:
        if any(not 0 <= d < n for d in g):
            return "?"
        coords = np.array(np.unravel_index(g, dims)).T
        for i, a in enumerate(names):
            if len(set(coords[:, i])) > 1:
                varying.add(a)
    return "+".join(a for a in names if a in varying) or "none"


@dataclasses.dataclass(frozen=True)
class CollectiveKey:
    op: str
    axes: str
    in_loop: bool


def collectives(module: HloModule | str, mesh_shape: Mapping[str, int] | None = None,
                ) -> dict[CollectiveKey, tuple[int, int]]:
    """{(op, mesh axes, inside a loop): (count, bytes)} for one run of the program, loop
    bodies multiplied by their trip counts. Bytes are per device (see collective_bytes);
    a collective-permute's are averaged over the devices (a permute in which only 2 of 8
    devices send counts 2/8 of its buffer), given `mesh_shape`."""
    module = parse_hlo(module) if isinstance(module, str) else module
    shape = dict(mesh_shape or {})
    n = math.prod(shape.values()) if shape else 0

    def leaf(site: Site) -> dict[Hashable, tuple[float, float]]:
        kind = collective_kind(site.instruction.opcode)
        if kind is None:
            return {}
        groups = device_groups(site.instruction.attrs, n) if shape else None
        axes = group_axes(groups, shape) if shape else "?"
        nbytes = float(collective_bytes(site, kind))
        if kind == "collective-permute" and groups is not None and n:
            nbytes *= len(groups) / n  # only the devices in a source-target pair send
        return {CollectiveKey(kind, axes, site.in_loop): (1, nbytes)}

    stats, _ = accumulate(module, leaf)
    return {k: (int(round(v[0])), int(round(v[1]))) for k, v in stats.items()}


def collective_totals(found: Mapping[CollectiveKey, tuple[int, int]], *,
                      axes: str | None = None, in_loop: bool | None = None,
                      ) -> dict[str, dict[str, int]]:
    """{op: {count, bytes}} over every collective op (zeros for absent ones), optionally
    only those over exactly `axes` and / or (not) inside loops."""
    out = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    for k, (count, nbytes) in found.items():
        if (axes is None or k.axes == axes) and (in_loop is None or k.in_loop == in_loop):
            out[k.op]["count"] += count
            out[k.op]["bytes"] += nbytes
    return out


def all_gather_shapes(module: HloModule | str) -> dict[tuple[int, ...], int]:
    """{result dims: executions} of every all-gather (the gathered arrays)."""
    module = parse_hlo(module) if isinstance(module, str) else module

    def leaf(site: Site) -> dict[Hashable, tuple[float]]:
        if collective_kind(site.instruction.opcode) != "all-gather":
            return {}
        arrays = shape_arrays(site.instruction.shape)
        if site.instruction.opcode.endswith("-start"):
            arrays = arrays[len(arrays) // 2:]
        return {dims: (1,) for _, dims in arrays}

    stats, _ = accumulate(module, leaf)
    return {k: int(v[0]) for k, v in stats.items()}


def weight_gathers(module: HloModule | str, param_shapes: Iterable[Sequence[int]],
                   ) -> dict[tuple[int, ...], int]:
    """All-gathers whose result is a whole parameter (or one layer of a stacked one),
    size-1 dimensions ignored: {dims: executions}."""
    squeeze = lambda s: tuple(d for d in s if d != 1)
    whole: set[tuple[int, ...]] = set()
    for s in param_shapes:
        s = tuple(s)
        if math.prod(s) > 1:
            whole.add(squeeze(s))
            if len(s) > 1:
                whole.add(squeeze(s[1:]))
    return {d: n for d, n in all_gather_shapes(module).items() if squeeze(d) in whole}


# ====================================================================== FLOPs
def instruction_flops(site: Site) -> float:
    """FLOPs of one execution: 2*M*N*K for a dot, one per output element for elementwise
    ops, one per input element for a reduce (inner instructions of fusions are counted
    where they are, the fusion itself is free)."""
    ins = site.instruction
    if ins.opcode == "dot":
        lhs = site.computation.shape_of(ins.operands[0]) if ins.operands else None
        dims = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", ins.attrs)
        if lhs is None or dims is None:
            return 0.0
        lhs_dims = shape_arrays(lhs)[0][1]
        k = math.prod(lhs_dims[int(i)] for i in dims.group(1).split(",") if i)
        return 2.0 * shape_elements(ins.shape) * k
    if ins.opcode in ELEMENTWISE:
        return float(shape_elements(ins.shape))
    if ins.opcode in ("reduce", "reduce-window") and ins.operands:
        half = max(1, len(ins.operands) // 2)  # variadic reduce: inputs, then init values
        shapes = [site.computation.shape_of(o) for o in ins.operands[:half]]
        return float(sum(shape_elements(s) for s in shapes if s))
    return 0.0


@dataclasses.dataclass(frozen=True)
class FlopCount:
    flops: float          # loop-aware: while bodies x trip count
    dot_flops: float      # of which in dots (matrix multiplies)
    unknown_loops: int    # while loops without a readable trip count (counted once)


def hlo_flops(module: HloModule | str) -> FlopCount:
    """Per-device FLOPs of one run of a compiled program, loop bodies x trip counts."""
    module = parse_hlo(module) if isinstance(module, str) else module

    def leaf(site: Site) -> dict[Hashable, tuple[float, float]]:
        f = instruction_flops(site)
        return {"flops": (f, f if site.instruction.opcode == "dot" else 0.0)} if f else {}

    stats, unknown = accumulate(module, leaf)
    total = stats.get("flops", np.zeros(2))
    return FlopCount(float(total[0]), float(total[1]), unknown)


def has_custom_call(text: str, target_fragment: str) -> bool:
    """Whether the program calls a custom-call target containing `target_fragment`
    (e.g. 'cudnn$fmha' for cuDNN fused attention)."""
    return re.search(r'custom_call_target="[^"]*' + re.escape(target_fragment), text) is not None


# ====================================================================== memory
@dataclasses.dataclass(frozen=True)
class MemoryFigures:
    """Per-device bytes from `compiled.memory_analysis()`."""

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    generated_code_bytes: int

    @property
    def peak_estimate_bytes(self) -> int:
        """Live at once at worst: arguments + temporaries + outputs not aliased to inputs."""
        return self.argument_bytes + self.temp_bytes + self.output_bytes - self.alias_bytes


def memory_figures(compiled: Any) -> MemoryFigures:
    m = compiled.memory_analysis()
    return MemoryFigures(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
                         int(m.alias_size_in_bytes), int(m.temp_size_in_bytes),
                         int(m.generated_code_size_in_bytes))


def sharded_bytes(abstract: Any, shardings: Any) -> int:
    """Bytes one device holds of a tree of arrays laid out by `shardings` (the largest
    shard over devices; shards of uneven splits count in full)."""
    total = 0
    for a, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings)):
        shard = s.shard_shape(tuple(a.shape))
        total += math.prod(shard) * np.dtype(a.dtype).itemsize
    return int(total)


def tree_bytes(abstract: Any) -> int:
    """Bytes of a whole (unsharded) tree of arrays or ShapeDtypeStructs."""
    return int(sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize
                   for a in jax.tree_util.tree_leaves(abstract)))


# ====================================================================== analytic minima
def megatron_allreduce(layers_per_device: float, rows: int, seq_len: int, d_model: int,
                       itemsize: int, microbatches: int = 1) -> tuple[int, int]:
    """(count, bytes) per device of Megatron tensor parallelism's activation all-reduces
    in one train step: 2 per layer forward and 2 backward, per micro-batch, each of a
    (rows/microbatches, T, d) array; `rows` is the batch one data shard holds."""
    count = int(4 * layers_per_device * microbatches)
    return count, int(4 * layers_per_device * rows * seq_len * d_model * itemsize)


def pipeline_permutes(stages: int, microbatches: int, repeats: int, rows: int, seq_len: int,
                      d_model: int, itemsize: int) -> tuple[int, int]:
    """(count, bytes) per device of the pipeline's activation hand-offs in one train step:
    one collective-permute of a (rows/m, T, d) micro-batch per tick, forward and backward."""
    ticks = repeats * microbatches + stages - 1
    per = rows // microbatches * seq_len * d_model * itemsize
    return 2 * ticks, 2 * ticks * per
