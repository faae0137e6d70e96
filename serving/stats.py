"""Latency percentiles, defined once. Pure.

The canary analysis (figures the router reports per version, `serving.router`)
and the gate's performance check (`checks.performance`) both judge a p95
latency against a release's `max_p95_latency_s`; both compute it here, so the
same latencies give the same p95 wherever they are judged.

The definition is the nearest rank: the p-th percentile of n values is the
value at rank ceil(p/100 * n) in ascending order (1-based), an actual observed
latency, never an interpolation. At least p% of the values are at or below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["p95", "percentile"]


def percentile(values: Iterable[float], p: float) -> float | None:
    """The nearest-rank p-th percentile (0 < p <= 100) of `values`, or None when there are none."""
    if not 0 < p <= 100:
        raise ValueError(f"percentile {p!r}: give a number in (0, 100]")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = math.ceil(round(p / 100 * len(ordered), 9))  # rounded first: 0.95 * 20 is 19.000000000000004 in floats
    return ordered[max(1, rank) - 1]


def p95(values: Iterable[float]) -> float | None:
    """The nearest-rank 95th percentile of `values`, or None when there are none."""
    return percentile(values, 95)
