"""Compiled-program accounting for the benchmarks: memory, FLOPs and collectives of an XLA
program, next to the analytic minima.

Every figure here is read from a compiled program (its optimized HLO text, its memory
analysis, its input shardings), never typed in. The HLO walker follows the call graph
from the ENTRY computation and multiplies what it finds inside a while loop (a scan body)
by the loop's trip count, so a 48-layer scan counts 48 layers, not one.

XLA's own `compiled.cost_analysis()["flops"]` counts a while body once whatever its trip
count (seen with jaxlib 0.10.2: 4 and 8 scanned layers give almost the same figure), so
`hlo_flops` recounts dots and elementwise work with the loop multipliers.

HLO parsing lives in jaxmp.plan.hlo (the names the accounting needs are re-exported
here), the weight dataflow (which all-gathers gather a weight) in
jaxmp.plan.weightflow; device peaks and MFU in the library (jaxmp.throughput).

The analytic minima next to the compiled figures:

- Megatron tensor parallelism: per layer 2 all-reduces of the (rows, T, d) activations in
  the forward pass and 2 in the backward pass (the attention output and MLP projections;
  their transposes on the way back).
- The pipeline: per tick one collective-permute of a micro-batch's (rows/m, T, d)
  activations to the next stage, forward and backward.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import numpy as np

from jaxmp.plan.hlo import (
    COLLECTIVES,
    ELEMENTWISE,
    HloInstruction,
    HloModule,
    Site,
    _balanced,
    accumulate,
    branch_names,
    collective_bytes,
    collective_kind,
    parse_hlo,
    shape_arrays,
    shape_bytes,
    shape_elements,
)
from jaxmp.sharding import bytes_per_device as sharded_bytes  # noqa: F401 (re-exported)


# ====================================================================== collectives
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
        if kind == "all-reduce" and groups:
            scattered = _scattered_bytes(site, module, len(groups[0]))
            if scattered:  # (a combined all-reduce may be partly a reduce-scatter)
                main = "reduce-scatter" if 2 * scattered >= nbytes else "all-reduce"
                return {CollectiveKey(k, axes, site.in_loop): (float(k == main), b)
                        for k, b in (("reduce-scatter", scattered),
                                     ("all-reduce", nbytes - scattered)) if b or k == main}
        return {CollectiveKey(kind, axes, site.in_loop): (1, nbytes)}

    stats, _ = accumulate(module, leaf)
    return {k: (int(round(v[0])), int(round(v[1]))) for k, v in stats.items()}


def _scattered_bytes(site: Site, module: HloModule, group_size: int) -> float:
    """Bytes of an all-reduce that are a reduce-scatter in effect: arrays of which every use
    keeps only its own 1/group_size share (results of that size; a dynamic-slice, alone or
    in fusions, takes it). XLA's CPU backend lowers a reduce-scatter that way; its GPU and
    TPU pipelines turn the pair back into one reduce-scatter (ReduceScatterCreator), so
    it is counted as one. For a combined (tuple) all-reduce, each array is judged by the
    uses of its get-tuple-element."""
    ins, comp = site.instruction, site.computation
    if group_size < 2:
        return 0.0

    def users(name: str) -> list[HloInstruction]:
        return [u for u in comp.instructions if name in u.operands]

    def slices(u: HloInstruction) -> bool:
        if u.opcode == "dynamic-slice":
            return True
        callee = re.search(r"\bcalls=%([\w.\-]+)", u.attrs)
        body = module.computations.get(callee.group(1)) if callee else None
        return (u.opcode == "fusion" and body is not None
                and any(i.opcode == "dynamic-slice" for i in body.instructions))

    def sliced_inside(u: HloInstruction, name: str, share: float) -> bool:
        """A fusion that reads only its own share of operand `name`: the fusion parameter
        bound to it feeds dynamic-slices of that size alone (a scan's backward body keeps
        its slice of a reduced layer gradient and writes it into the stacked gradients,
        so the fusion's own result is the whole stack)."""
        callee = re.search(r"\bcalls=%([\w.\-]+)", u.attrs)
        body = module.computations.get(callee.group(1)) if callee else None
        if u.opcode != "fusion" or body is None:
            return False
        index = [str(k) for k, o in enumerate(u.operands) if o == name]
        params = [i.name for i in body.instructions
                  if i.opcode == "parameter" and i.args.strip() in index]
        reads = [i for i in body.instructions if any(p in i.operands for p in params)]
        return bool(reads) and all(i.opcode == "dynamic-slice" and shape_bytes(i.shape) == share
                                   for i in reads)

    def scattered(name: str, shape: str) -> bool:
        share = shape_bytes(shape) / group_size
        uses = users(name)
        inside = [sliced_inside(u, name, share) for u in uses]
        return (bool(uses) and all(shape_bytes(u.shape) == share or i for u, i in zip(uses, inside))
                and any(slices(u) or i for u, i in zip(uses, inside)))

    if not ins.shape.startswith("("):
        return float(shape_bytes(ins.shape)) if scattered(ins.name, ins.shape) else 0.0
    total = 0.0
    for u in users(ins.name):
        if u.opcode == "get-tuple-element" and scattered(u.name, u.shape):
            total += shape_bytes(u.shape)
    return total


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


def axis_bytes(found: Mapping[CollectiveKey, tuple[int, int]], axis: str,
               ops: tuple[str, ...]) -> int:
    """Bytes of the collectives `ops` over mesh axis `axis` (alone or with others)."""
    return sum(b for k, (_, b) in found.items() if k.op in ops and axis in k.axes.split("+"))


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


def branch_flops(module: HloModule | str) -> list[float]:
    """FLOPs of one run of each branch of the program's conditional with the most branches
    (the zero-bubble pipeline's per-device switch), in branch-index order."""
    module = parse_hlo(module) if isinstance(module, str) else module
    conds = [ins for comp in module.computations.values() for ins in comp.instructions
             if ins.opcode == "conditional"]
    if not conds:
        return []
    names = branch_names(max(conds, key=lambda ins: len(branch_names(ins))))

    def leaf(site: Site) -> dict[Hashable, tuple[float]]:
        f = instruction_flops(site)
        return {"flops": (f,)} if f else {}
    return [float(accumulate(module, leaf, root=n)[0].get("flops", np.zeros(1))[0])
            for n in names]


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
