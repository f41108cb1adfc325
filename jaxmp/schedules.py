"""Pipeline schedules as tables: which micro-batch each stage runs forward (F), backward
for its input (B) and backward for its weights (W) at each slot.

The model is the one the schedules are published in: a slot is one unit of time (F, B and
W each cost one, so a fused backward B+W costs two), a stage runs at most one operation
per slot, and a result reaches the neighbouring stage for the next slot. Stage s of p holds
model chunks s, s+p, ..., s+(v-1)p (v = 1 except `interleaved`: the circular storage
order); virtual stage c*p + s is chunk c on stage s.

- gpipe: every forward, then every backward (m stage inputs live on each stage).
- 1f1b: p-1-s forwards of warm-up, then one forward and one backward in turn, then the
  remaining backwards: at most p - s stage inputs live on stage s, the same bubble as
  GPipe, (p-1)/(m+p-1).
- interleaved (Megatron-LM's interleaved 1F1B): v chunks per stage, micro-batches in
  groups of p per chunk; bubble (p-1)/(v m + p - 1).
- zb (ZB-H1, Qi et al. 2023): 1F1B's order of F and B, with each W deferred to a slot
  where the stage would otherwise wait (and the rest at the end), but never past p live
  stage inputs (1F1B's peak): the input gradients, on the critical path, go first.
  Bubble (p-1)(F+B-W) instead of 1F1B's (p-1)(F+B+W): (p-1)/(3m+p-1) for m >= p.

`simulate` runs a schedule's per-stage order under those rules (an operation waits for
what it depends on) and returns the slot grid; the tests check every grid's dependencies,
live activations and bubble against the formulas.
"""

from __future__ import annotations

import dataclasses

KINDS = ("gpipe", "1f1b", "interleaved", "zb")
Op = tuple[str, int, int]  # (F | B | W, micro-batch, chunk)


class ScheduleError(ValueError):
    """A schedule that cannot run with these sizes."""


def check(kind: str, p: int, m: int, v: int = 1) -> None:
    if kind not in KINDS:
        raise ScheduleError(f"pipeline_schedule={kind!r}: choose {', '.join(KINDS)}")
    if p < 1 or m < 1 or v < 1:
        raise ScheduleError(f"pipe={p}, microbatches={m}, chunks={v}: all must be >= 1")
    if kind == "interleaved":
        if v < 2:
            raise ScheduleError("the interleaved schedule needs pipeline_repeats >= 2 (model "
                                "chunks per stage): set --pipeline_repeats >= 2, or use 1f1b")
        if m % p:
            raise ScheduleError(f"the interleaved schedule runs micro-batches in groups of "
                                f"pipe={p}: use --microbatches divisible by {p} (not {m})")
    elif v != 1:
        raise ScheduleError(f"the {kind} schedule holds one model chunk per stage, not "
                            f"pipeline_repeats={v}; use --pipeline_schedule=interleaved (the "
                            "interleaved schedule)")


def orders(kind: str, p: int, m: int, v: int = 1) -> list[list[Op]]:
    """Each stage's operations in the order it runs them (W included, except for `zb`,
    whose W's `simulate` places)."""
    check(kind, p, m, v)
    out = []
    for s in range(p):
        if kind == "gpipe":
            seq = [("F", i, 0) for i in range(m)] + [("B", i, 0) for i in range(m)]
        elif kind == "interleaved":
            fwd = [_interleaved_item(k, p, v, backward=False) for k in range(m * v)]
            bwd = [_interleaved_item(k, p, v, backward=True) for k in range(m * v)]
            warm = min((p - s - 1) * 2 + (v - 1) * p, m * v)
            seq = _one_f_one_b([("F", *f) for f in fwd], [("B", *b) for b in bwd], warm)
        else:
            warm = min(p - 1 - s, m)
            seq = _one_f_one_b([("F", i, 0) for i in range(m)], [("B", i, 0) for i in range(m)],
                               warm)
        if kind != "zb":  # the weight gradient right after the input gradient (fused)
            seq = [x for op in seq for x in ([op, ("W", *op[1:])] if op[0] == "B" else [op])]
        out.append(seq)
    return out


def _interleaved_item(k: int, p: int, v: int, backward: bool) -> tuple[int, int]:
    """(micro-batch, chunk) of a stage's k-th forward (or backward) in the interleaved
    schedule: groups of p micro-batches through chunk 0, 1, ... (backwards: v-1 down)."""
    chunk = (k // p) % v
    return (k // (p * v)) * p + k % p, (v - 1 - chunk) if backward else chunk


def _one_f_one_b(fwd: list[Op], bwd: list[Op], warm: int) -> list[Op]:
    seq = fwd[:warm]
    for i in range(len(fwd) - warm):
        seq += [fwd[warm + i], bwd[i]]
    return seq + bwd[len(fwd) - warm:]


@dataclasses.dataclass(frozen=True)
class Grid:
    """slots[t][s]: the operation stage s runs at slot t, or None (idle)."""
    slots: list[list[Op | None]]
    p: int
    m: int
    v: int

    @property
    def length(self) -> int:
        return len(self.slots)

    def bubble(self) -> float:
        """Idle share of all stage-slots."""
        idle = sum(op is None for row in self.slots for op in row)
        return idle / (self.length * self.p)

    def peak_live(self, s: int) -> int:
        """Most (micro-batch, chunk) stage inputs stage s holds at once: from its forward
        until its weight gradient (the last use)."""
        live = peak = 0
        for row in self.slots:
            op = row[s]
            if op and op[0] == "F":
                live += 1
                peak = max(peak, live)
            elif op and op[0] == "W":
                live -= 1
        return peak

    def rows(self) -> list[str]:
        """One line per stage: 'F3' 'B3' 'W3' ('F3.1': chunk 1), '.' idle."""
        cell = lambda op: "." if op is None else f"{op[0]}{op[1]}" + (
            f".{op[2]}" if self.v > 1 else "")
        return [" ".join(cell(row[s]) for row in self.slots) for s in range(self.p)]


def simulate(kind: str, p: int, m: int, v: int = 1) -> Grid:
    """Run the schedule: at each slot every stage runs its next operation if what it needs
    finished in an earlier slot (F: the previous virtual stage's F; B: the next virtual
    stage's B, or its own F on the last; W: its B); for `zb` a stage that must wait runs
    its oldest deferred W instead."""
    seq = orders(kind, p, m, v)
    done: dict[tuple[str, int, int, int], int] = {}  # (op, mb, virtual stage) -> slot
    nxt = [0] * p
    pending: list[list[Op]] = [[] for _ in range(p)]
    last = p * v - 1
    slots: list[list[Op | None]] = []
    t = 0
    live = [0] * p
    fused = kind != "zb"  # a backward's input gradient leaves once its W is done too
    while any(nxt[s] < len(seq[s]) or pending[s] for s in range(p)):
        row: list[Op | None] = []
        for s in range(p):
            op = seq[s][nxt[s]] if nxt[s] < len(seq[s]) else None
            # zb defers a W while it can: a stage keeps at most p inputs (until their W),
            # 1F1B's peak (its first stage's), so a deferred W goes before a new F
            full = op is not None and op[0] == "F" and live[s] >= p and pending[s]
            if op is not None and not full and _ready(op, s, p, last, done, t, fused):
                nxt[s] += 1
                if kind == "zb" and op[0] == "B":
                    pending[s].append(("W", *op[1:]))
            elif pending[s]:
                op = pending[s].pop(0)
            else:
                op = None
            live[s] += {"F": 1, "W": -1}.get(op[0], 0) if op else 0
            row.append(op)
        for s, op in enumerate(row):
            if op is not None:
                done[(op[0], op[1], op[2] * p + s)] = t
        slots.append(row)
        t += 1
        if t > 10 * (3 * m * v + 3 * p):
            raise ScheduleError(f"{kind} p={p} m={m} v={v} deadlocks")  # (a bug, not an input)
    return Grid(slots, p, m, v)


def _ready(op: Op, s: int, p: int, last: int, done: dict, t: int, fused: bool) -> bool:
    kind, i, chunk = op
    vs = chunk * p + s
    need = {"F": ("F", i, vs - 1) if vs > 0 else None,
            "B": ("W" if fused else "B", i, vs + 1) if vs < last else ("F", i, vs),
            "W": ("B", i, vs)}[kind]
    if kind == "B" and vs < last and ("F", i, vs) not in done:
        return False
    return need is None or done.get(need, t) < t


def analytic_bubble(kind: str, p: int, m: int, v: int = 1) -> float:
    """The published bubble shares with F = B = W = 1: GPipe and 1F1B (p-1)/(m+p-1),
    interleaved (p-1)/(v m + p - 1), ZB-H1 (p-1)/(3m + p - 1) (its bubble (p-1)(F+B-W))."""
    check(kind, p, m, v)
    if kind == "interleaved":
        return (p - 1) / (v * m + p - 1)
    if kind == "zb":
        return (p - 1) / (3 * m + p - 1)
    return (p - 1) / (m + p - 1)
