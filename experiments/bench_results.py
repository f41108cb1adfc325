"""What a benchmark suite hands back: a typed result that writes its own JSON, renders its
own table and says which targets it meets (the `SuiteResult` protocol), plus the target
check and the plain-text table every result renders with."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

Json = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Target:
    """One target checked at one place: `value` against `limit` at `where` (a layout, a
    mesh, a device); `ok` whether it is met."""

    target: str
    where: str
    value: float
    limit: float
    ok: bool

    @property
    def equal(self) -> bool:
        """An equality target ('=='): its worst value is the one farthest from the limit."""
        return "==" in self.target

    def to_json(self) -> Json:
        return {**dataclasses.asdict(self), "equal": self.equal}


class SuiteResult(Protocol):
    def to_json(self) -> Json:
        """The bench file's keys this suite fills, e.g. {"speed": {...}}."""
        ...

    def table(self) -> str:
        """What the bench prints for this suite."""
        ...

    def targets(self) -> list[Target]:
        """The targets this suite's figures are checked against, each with its value."""
        ...


def table(head: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in r] for r in [head, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(cells[0]), line(["-" * w for w in widths]),
                      *(line(r) for r in cells[1:])])


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def count_mib(d: Json) -> str:
    """'count/MiB' of a {count, bytes} record, '-' when there are none."""
    return f"{d['count']}/{mib(d['bytes'])}" if d["count"] else "-"
