"""The pipeline schedule tables (jaxmp/schedules.py) for every p, m, v in a range: each
micro-batch's forward, input-gradient and weight-gradient exactly once per stage and
chunk, every dependency between stages respected (a result reaches the next stage one
slot later), live stage inputs within each schedule's bound, and the bubble equal to the
published formula.

Bugs these catch: a warm-up one forward too long or short (the 1F1B bound or the bubble
moves), a backward before the next stage's backward (or before its own forward), an
interleaved chunk order that runs a chunk before the previous one, a zero-bubble W
dropped in the cool-down or run before its B, a schedule whose memory grows with m.
"""

from __future__ import annotations

import pytest

from jaxmp import schedules as S

CASES = [(kind, p, m, 1) for kind in ("gpipe", "1f1b", "zb") for p in range(1, 6)
         for m in range(1, 10)]
CASES += [("interleaved", p, m, v) for p in range(1, 5) for v in (2, 3)
          for m in range(p, 3 * p + 1, p)]


def _slots(grid: S.Grid) -> dict[tuple[str, int, int], int]:
    """(op, micro-batch, virtual stage) -> slot, checking each appears once."""
    seen: dict[tuple[str, int, int], int] = {}
    for t, row in enumerate(grid.slots):
        for s, op in enumerate(row):
            if op is not None:
                key = (op[0], op[1], op[2] * grid.p + s)
                assert key not in seen, key
                seen[key] = t
    return seen


@pytest.mark.parametrize("kind,p,m,v", CASES)
def test_every_operation_once_in_dependency_order_within_the_memory_bound(kind, p, m, v):
    grid = S.simulate(kind, p, m, v)
    at = _slots(grid)
    last = p * v - 1
    assert len(at) == 3 * m * p * v  # F, B and W of every micro-batch on every virtual stage
    for i in range(m):
        for vs in range(p * v):
            if vs > 0:
                assert at[("F", i, vs)] > at[("F", i, vs - 1)]
            if vs < last:  # a fused backward sends its input gradient after its W
                prev = at[("B" if kind == "zb" else "W", i, vs + 1)]
                assert at[("B", i, vs)] > prev
            assert at[("B", i, vs)] > at[("F", i, vs)]
            assert at[("W", i, vs)] > at[("B", i, vs)]
    for s in range(p):
        peak = grid.peak_live(s)
        if kind == "gpipe":
            assert peak == m
        elif kind == "1f1b":
            assert peak == min(p - s, m)
        elif kind == "zb":
            assert peak <= min(p, m)
        else:
            assert peak <= min((p - s - 1) * 2 + (v - 1) * p + 1, m * v)


@pytest.mark.parametrize("kind,p,m,v", CASES)
def test_bubble_equals_the_published_formula(kind, p, m, v):
    grid = S.simulate(kind, p, m, v)
    if kind == "zb" and m < p:  # too few micro-batches to defer every W it could
        assert grid.bubble() <= S.simulate("1f1b", p, m).bubble()
        return
    assert grid.bubble() == pytest.approx(S.analytic_bubble(kind, p, m, v), abs=1e-12)
    if p > 1 and kind == "zb":
        assert grid.bubble() < S.simulate("1f1b", p, m).bubble()


def test_one_f_one_b_memory_does_not_grow_with_microbatches():
    """1F1B and ZB-H1 keep p stage inputs on the first stage at m = p, 2p, 4p (GPipe m)."""
    for m in (4, 8, 16):
        assert S.simulate("1f1b", 4, m).peak_live(0) == 4
        assert S.simulate("zb", 4, m).peak_live(0) == 4
        assert S.simulate("gpipe", 4, m).peak_live(0) == m


def test_bad_sizes_are_refused():
    with pytest.raises(S.ScheduleError, match="microbatches divisible by 4"):
        S.orders("interleaved", 4, 6, 2)
    with pytest.raises(S.ScheduleError, match="needs pipeline_repeats >= 2"):
        S.orders("interleaved", 4, 8, 1)
    with pytest.raises(S.ScheduleError, match="interleaved schedule"):
        S.orders("1f1b", 4, 8, 2)
    with pytest.raises(S.ScheduleError, match="choose gpipe"):
        S.orders("pipedream", 4, 8)
