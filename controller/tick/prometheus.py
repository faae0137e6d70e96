"""Read an analysis interval's PromQL queries from Prometheus: the I/O half of `analysis.provider: prometheus`.

Called by the observe phase (`controller.tick.observe`) once per analysis
interval, for the version under analysis (a canary, or a promoted version under
its post-promotion watch). Each query is rendered (`controller.rollout.prometheus.render`),
sent to `<address>/api/v1/query`, and its answer read (`...prometheus.sample`)
into a `Reading`; the judgement is `controller.rollout.prometheus.judge_queries`.
The queries share one time budget (`prometheus.timeout`, capped at
`MAX_BUDGET_S`) so the tick never waits long; whatever goes wrong (refused
connection, timeout, bad PromQL, an HTML page) becomes that reading's error,
an inconclusive interval, never an exception.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

import httpx

from controller.parse.release import PrometheusAnalysis
from controller.rollout.prometheus import Reading, not_read, render, sample

__all__ = ["MAX_BUDGET_S", "read_queries"]

log = logging.getLogger("diffops.controller")
MAX_BUDGET_S = 5.0  # the most one tick waits on Prometheus, whatever the release says


def read_queries(spec: PrometheusAnalysis, release: str, version: str, interval: timedelta,
                 client: httpx.Client | None = None) -> list[Reading]:
    """One reading per query, in order, within the shared time budget."""
    budget = min(spec.timeout.total_seconds(), MAX_BUDGET_S)
    deadline = time.monotonic() + budget
    readings: list[Reading] = []
    url = spec.address.rstrip("/") + "/api/v1/query"
    own = client is None
    http = client or httpx.Client()
    try:
        for query in spec.queries:
            promql = render(query.query, release, version, interval)
            left = deadline - time.monotonic()
            if left <= 0.01:
                readings.append(not_read(query.name, promql, f"not asked: the {budget:g}s budget for this interval's queries was spent"))
                continue
            readings.append(_read_one(http, url, query.name, promql, left))
    finally:
        if own:
            http.close()
    failed = [r for r in readings if r["error"]]
    if failed:
        log.warning("%s: %d of %d Prometheus queries for %s gave no answer (first: %s: %s); next: the interval is inconclusive",
                    release, len(failed), len(readings), version, failed[0]["name"], failed[0]["error"],
                    extra={"subject": release, "event": "prometheus-query-failed", "version": version})
    return readings


def _read_one(http: httpx.Client, url: str, name: str, promql: str, timeout: float) -> Reading:
    try:
        response = http.get(url, params={"query": promql}, timeout=timeout)
    except httpx.HTTPError as err:
        return not_read(name, promql, f"{type(err).__name__} asking {url}: {err or 'no detail'}")
    try:
        payload = response.json()
    except ValueError:
        return not_read(name, promql, f"HTTP {response.status_code} from {url}, not JSON: {response.text[:120]!r}")
    value, error = sample(payload)
    if error is None and response.status_code != 200:
        error = f"HTTP {response.status_code} from {url}"
    return {"name": name, "query": promql, "value": value, "error": error}
