"""What a benchmark suite hands back: a typed result that writes its own JSON, renders its
own table and says which targets it meets (the `SuiteResult` protocol), plus the target
check and the plain-text table every result renders with."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from jaxmp.plan.text import table  # noqa: F401  (re-exported: the suites import it from here)

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


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def count_mib(d: Json) -> str:
    """'count/MiB' of a {count, bytes} record, '-' when there are none."""
    return f"{d['count']}/{mib(d['bytes'])}" if d["count"] else "-"
