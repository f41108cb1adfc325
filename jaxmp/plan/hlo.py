"""Optimized HLO text, parsed: computations of instructions, shapes and bytes, loop trip
counts, and a walker that visits every instruction reachable from ENTRY with how many
times it runs per program run (while bodies x trip count). The accounting in
jaxmp.plan.analysis and the weight dataflow in jaxmp.plan.weightflow read programs
through it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import numpy as np

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
# A computation opens with "%name (params) -> result {" (optimized text) or "name {"
# (the unoptimized text of `Lowered.as_text(dialect="hlo")`).
_HEADER_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{\s*$")
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
    """Split HLO text (`compiled.as_text()`) into computations of instructions. Operands
    are read in the `%name` form of optimized text; the unoptimized text of a `Lowered`
    names them bare, so only its parameters are read right."""
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
               root: str | None = None) -> tuple[Stats, int]:
    """Sum leaf(site) over every instruction reachable from ENTRY, each weighted by how
    often it runs: while bodies x trip count (nested loops multiply), fusions, calls,
    async computations x 1, every conditional branch x 1 (an upper bound). Scalar
    lambdas (to_apply of reduce, all-reduce, sort, ...) are not entered.

    From the computation `root` instead of ENTRY if given (one conditional branch, say).
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

    return visit(root or module.entry, False), unknown[0]


def branch_names(ins: HloInstruction) -> list[str]:
    """A conditional's branch computations, in branch-index order."""
    found = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
    return re.findall(r"%([\w.\-]+)", found.group(1)) if found else []


def _callees(ins: HloInstruction) -> list[tuple[str, str]]:
    if ins.opcode.endswith("-done") or ins.opcode == "async-update":
        return []  # the computation of an async pair is entered once, at its -start
    found = [(k, c) for k, c in _CALLEE_RE.findall(ins.attrs)]
    found = [(k, c) for k, c in found if k != "to_apply" or ins.opcode == "call"]
    if ins.opcode == "while":
        found = [(k, c) for k, c in found if k == "body"]
    found += [("branch", c) for c in branch_names(ins)]
    calls = re.search(r"\bcalls=\{([^}]*)\}", ins.attrs)
    if calls:
        found += [("calls", c) for c in re.findall(r"%([\w.\-]+)", calls.group(1))]
    return found


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
