"""Prometheus analysis: PromQL templates in, one interval's verdict out. Pure.

`analysis.provider: prometheus` (Argo Rollouts AnalysisTemplate / Flagger
MetricTemplate style). The observe phase renders each query (`render`), asks
Prometheus's instant-query API and reads its answer with `sample`
(`controller.tick.prometheus` is that I/O); the readings ride in the version's
figures as `queries`. `judge_queries` turns them into the interval's verdict:
a value outside `min`/`max` fails; no data, NaN, a query error, more than one
series or a value inside an inconclusive range is inconclusive with its reason.
Failed beats inconclusive beats passed; nothing here raises on what Prometheus
answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypedDict, cast

from controller.parse.release import PrometheusQuery
from controller.rollout.outcomes import AnalysisVerdict, Figures
from serving.fields import format_duration

__all__ = ["Reading", "judge_queries", "not_read", "render", "sample"]


class Reading(TypedDict):
    """One query's answer for one interval, as recorded in the version's figures."""

    name: str
    query: str  # as sent, templates substituted
    value: float | None  # None: no data (or an error)
    error: str | None


def render(query: str, release: str, version: str, interval: timedelta) -> str:
    """The PromQL with `{{release}}`, `{{version}}` and `{{interval}}` (a Prometheus duration such as 10s) substituted."""
    return (query.replace("{{release}}", release).replace("{{version}}", version)
            .replace("{{interval}}", format_duration(interval)))


def sample(payload: Any) -> tuple[float | None, str | None]:
    """(value, error) from an /api/v1/query answer: one scalar, or an instant vector of one series; an empty vector is
    (None, None): no data."""
    if not isinstance(payload, dict):
        return None, f"not a Prometheus API answer: {str(payload)[:120]}"
    if payload.get("status") != "success":
        return None, f"{payload.get('errorType') or 'error'}: {payload.get('error') or 'no reason given'}"
    data = payload.get("data")
    kind, result = (data.get("resultType"), data.get("result")) if isinstance(data, dict) else (None, None)
    try:
        if kind == "scalar" and isinstance(result, list):
            return float(result[1]), None
        if kind == "vector" and isinstance(result, list):
            if not result:
                return None, None
            if len(result) > 1:
                return None, f"{len(result)} series answered; aggregate to one (sum, max, avg by nothing)"
            return float(result[0]["value"][1]), None
    except (TypeError, ValueError, KeyError, IndexError) as err:
        return None, f"unreadable {kind} sample: {err}"
    return None, f"result type {kind}; the query must answer a scalar or an instant vector of one series"


def not_read(name: str, query: str, why: str) -> Reading:
    return {"name": name, "query": query, "value": None, "error": why}


def _judge_one(spec: PrometheusQuery, reading: Reading | None) -> tuple[str, str | None]:
    """('passed' | 'failed' | 'inconclusive', reason) for one query."""
    if reading is None:
        return "inconclusive", f"{spec.name}: not read this interval"
    if reading.get("error"):
        return "inconclusive", f"{spec.name}: query failed: {reading['error']}"
    value = reading.get("value")
    if value is None:
        return "inconclusive", f"{spec.name}: no data"
    if math.isnan(value):
        return "inconclusive", f"{spec.name}: NaN (nothing to divide by yet?)"
    if spec.inconclusive_below is not None and value < spec.inconclusive_below:
        return "inconclusive", f"{spec.name} {value:.4g} < inconclusive_below {spec.inconclusive_below:g}"
    if spec.inconclusive_above is not None and value > spec.inconclusive_above:
        return "inconclusive", f"{spec.name} {value:.4g} > inconclusive_above {spec.inconclusive_above:g}"
    if spec.min is not None and value < spec.min:
        return "failed", f"{spec.name} {value:.4g} < min {spec.min:g}"
    if spec.max is not None and value > spec.max:
        return "failed", f"{spec.name} {value:.4g} > max {spec.max:g}"
    return "passed", None


def judge_queries(stats: Figures | None, queries: Sequence[PrometheusQuery]) -> AnalysisVerdict:
    """The interval's verdict on its readings (`stats["queries"]`): any failed query fails it, else any inconclusive
    one makes it inconclusive, else it passed."""
    figures = dict(stats or {})
    readings = {str(r.get("name")): cast(Reading, r) for r in figures.get("queries") or [] if isinstance(r, dict)}
    judged = [_judge_one(spec, readings.get(spec.name)) for spec in queries]
    failed = tuple(reason for verdict, reason in judged if verdict == "failed" and reason)
    if failed:
        return AnalysisVerdict("failed", failed, figures)
    inconclusive = tuple(reason for verdict, reason in judged if verdict == "inconclusive" and reason)
    if inconclusive:
        return AnalysisVerdict("inconclusive", inconclusive, figures)
    return AnalysisVerdict("passed", (), figures)
