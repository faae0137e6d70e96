"""Benchmark figures and how they are shown. Pure.

Every family returns `Figure`s: a measured value, the baseline measured in the
same run, their ratio and an optional `Goal`. `table()` prints them aligned
for a terminal, `markdown()` for docs/benchmarks.md, `document()` is the JSON
that `python -m bench` writes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

COLUMNS = ("benchmark", "figure", "baseline", "ratio", "goal", "met")


@dataclass(frozen=True)
class Goal:
    """A target on the figure's value or on its ratio to the baseline."""

    text: str  # as the goals table states it, e.g. "≤ 3 ms p50"
    on: Literal["value", "ratio"]
    at_most: float | None = None
    at_least: float | None = None

    def met(self, value: float, ratio: float | None) -> bool | None:
        measured = value if self.on == "value" else ratio
        if measured is None:
            return None
        if self.at_most is not None and measured > self.at_most:
            return False
        return not (self.at_least is not None and measured < self.at_least)


@dataclass(frozen=True)
class Figure:
    family: str
    benchmark: str  # what was measured, e.g. "revert to traffic, warm standby"
    value: float
    unit: str  # s, ms, B, GB/s, images/s
    baseline: str  # what the baseline is, e.g. "cold rollback of the same version"
    baseline_value: float
    ratio: float | None  # how the family defines it (value / baseline unless its docstring says otherwise)
    goal: Goal | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        return self.goal.met(self.value, self.ratio) if self.goal else None


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


def show(value: float, unit: str) -> str:
    """A value with its unit, in a precision that fits its size."""
    if unit == "B":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if abs(value) >= scale:
                return f"{value / scale:.2f} {name}"
        return f"{value:.0f} B"
    if abs(value) >= 100:
        return f"{value:.0f} {unit}"
    if abs(value) >= 10:
        return f"{value:.1f} {unit}"
    return f"{value:.2f} {unit}" if abs(value) >= 0.1 or value == 0 else f"{value:.3f} {unit}"


def show_ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.0f}×" if value >= 100 else f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


def row(figure: Figure) -> tuple[str, ...]:
    met = {True: "yes", False: "NO", None: "—"}[figure.met]
    return (figure.benchmark, show(figure.value, figure.unit), f"{figure.baseline} {show(figure.baseline_value, figure.unit)}",
            show_ratio(figure.ratio), figure.goal.text if figure.goal else "—", met)


def table(figures: list[Figure]) -> str:
    rows = [COLUMNS, *(row(f) for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown(figures: list[Figure]) -> str:
    rows = [COLUMNS, tuple("---" for _ in COLUMNS), *(row(f) for f in figures)]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in r) + " |" for r in rows)


def document(figures: list[Figure], failures: dict[str, str], about: dict[str, Any]) -> dict[str, Any]:
    """The JSON written by `python -m bench`: the run's context, every figure with its detail, and failed families."""
    return {**about, "figures": [{**asdict(f), "met": f.met} for f in figures], "failures": failures}
