"""`analysis.provider: prometheus`: the judgement as tables, and the read against a real Prometheus.

The server is Debian's `prometheus` (extracted beside the virtualenv), started
on a free loopback port and scraping, every second, a `prometheus_client`
endpoint this test serves with values it controls. Queries go through the
controller's own reader (`controller.tick.prometheus.read_queries`) and
judgement, as the observe phase and the rollout step use them.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from controller.parse.release import PrometheusAnalysis, PrometheusQuery
from controller.rollout.prometheus import judge_queries, render, sample
from controller.state.records import ReleaseRecord
from controller.state.store import ControllerRecord, State
from controller.tick.prometheus import read_queries
from tests.conftest import free_port
from tests.live import wait_for
from tests.test_tick_phases import NOW, CountingServe, Tick, live

PROMETHEUS = Path(sys.prefix) / "prometheus" / "usr" / "bin" / "prometheus"
RATIO = PrometheusQuery(name="error_ratio", query='max(drill_error_ratio{release="{{release}}", version="{{version}}"})', max=0.05)
RATE = PrometheusQuery(name="request_rate", query='sum(drill_request_rate{version="{{version}}"})', min=0, inconclusive_below=0.5)


def reading(name: str, value: float | None = None, error: str | None = None) -> dict:
    return {"name": name, "query": "q", "value": value, "error": error}


JUDGE = [
    ("inside the bounds", [reading("error_ratio", 0.01), reading("request_rate", 3)], "passed", ()),
    ("above max fails", [reading("error_ratio", 0.2), reading("request_rate", 3)], "failed", ("error_ratio 0.2 > max 0.05",)),
    ("no data is inconclusive", [reading("error_ratio"), reading("request_rate", 3)], "inconclusive", ("error_ratio: no data",)),
    ("NaN (0/0) is inconclusive", [reading("error_ratio", float("nan")), reading("request_rate", 3)], "inconclusive",
     ("error_ratio: NaN (nothing to divide by yet?)",)),
    ("a query error is inconclusive with its reason", [reading("error_ratio", error="bad_data: parse error"), reading("request_rate", 3)],
     "inconclusive", ("error_ratio: query failed: bad_data: parse error",)),
    ("too little traffic is inconclusive", [reading("error_ratio", 0.0), reading("request_rate", 0.1)], "inconclusive",
     ("request_rate 0.1 < inconclusive_below 0.5",)),
    ("a failure beats an inconclusive query", [reading("error_ratio", 0.5), reading("request_rate", 0.1)], "failed",
     ("error_ratio 0.5 > max 0.05",)),
    ("a reading never taken is inconclusive", [reading("request_rate", 3)], "inconclusive", ("error_ratio: not read this interval",)),
    ("no readings at all", None, "inconclusive", ("error_ratio: not read this interval", "request_rate: not read this interval")),
]


@pytest.mark.parametrize("case", JUDGE, ids=[c[0] for c in JUDGE])
def test_judge_queries(case):
    _, readings, outcome, reasons = case
    verdict = judge_queries({"requests": 4, "queries": readings} if readings is not None else None, [RATIO, RATE])
    assert (verdict.outcome, verdict.reasons) == (outcome, reasons)


SAMPLES = [
    ({"status": "success", "data": {"resultType": "scalar", "result": [1.0, "0.25"]}}, (0.25, None)),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}, "value": [1.0, "2"]}]}}, (2.0, None)),
    ({"status": "success", "data": {"resultType": "vector", "result": []}}, (None, None)),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"value": [1, "1"]}, {"value": [1, "2"]}]}},
     (None, "2 series answered; aggregate to one (sum, max, avg by nothing)")),
    ({"status": "success", "data": {"resultType": "matrix", "result": []}},
     (None, "result type matrix; the query must answer a scalar or an instant vector of one series")),
    ({"status": "error", "errorType": "bad_data", "error": "parse error"}, (None, "bad_data: parse error")),
    ({"status": "success", "data": {"resultType": "vector", "result": [{"value": [1]}]}}, (None, "unreadable vector sample: list index out of range")),
    ("<html>", (None, "not a Prometheus API answer: <html>")),
]


@pytest.mark.parametrize("payload,expected", SAMPLES)
def test_sample(payload, expected):
    assert sample(payload) == expected


def test_render_substitutes_the_templates():
    assert render("rate(x{r='{{release}}',v='{{version}}'}[{{interval}}])", "demo", "abc123", timedelta(seconds=90)) == \
        "rate(x{r='demo',v='abc123'}[1m30s])"


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """(base URL, gauges) of a real Prometheus scraping this test's exporter every second."""
    registry = CollectorRegistry()
    gauges = {"ratio": Gauge("drill_error_ratio", "test", ["release", "version"], registry=registry),
              "rate": Gauge("drill_request_rate", "test", ["version", "router"], registry=registry)}
    exporter_port, port = free_port(), free_port()
    server, thread = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        f"global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n"
        f"scrape_configs:\n  - job_name: drill\n    static_configs: [{{targets: ['127.0.0.1:{exporter_port}']}}]\n")
    log = open(work / "prometheus.log", "w")
    process = subprocess.Popen([str(PROMETHEUS), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                return sample(httpx.get(f"{url}/api/v1/query", params={"query": "max(up{job='drill'})"}, timeout=1).json())[0] == 1.0
            except (httpx.HTTPError, ValueError):  # not listening yet, or a starting server's 503 text ("Service Unavailable")
                return False

        wait_for(up, 60, f"Prometheus on {url} to scrape the exporter (log: {work / 'prometheus.log'})")
        yield url, gauges
    finally:
        process.terminate()
        process.wait(timeout=30)
        server.shutdown()
        log.close()


def analysis(url: str, *queries: PrometheusQuery, timeout: str = "2s") -> PrometheusAnalysis:
    return PrometheusAnalysis.model_validate({"address": url, "queries": [q.model_dump() for q in queries], "timeout": timeout})


def scraped(url: str, query: str, value: float) -> None:
    """Wait until Prometheus answers `query` with `value` (the exporter was just set; scrapes come every second)."""
    wait_for(lambda: read_queries(analysis(url, PrometheusQuery(name="q", query=query, max=0)), "demo", "v", timedelta(seconds=10))[0]["value"]
             == value, 20, f"Prometheus to scrape {query} = {value}")


def test_a_real_prometheus_passes_fails_and_is_inconclusive(prometheus):
    url, gauges = prometheus
    spec = analysis(url, RATIO, RATE)
    gauges["ratio"].labels("demo", "v1").set(0.01)
    gauges["ratio"].labels("demo", "v2").set(0.4)  # another version's figures never leak into v1's verdict
    gauges["rate"].labels("v1", "a").set(2)
    gauges["rate"].labels("v1", "b").set(1)
    gauges["rate"].labels("v2", "a").set(3)
    scraped(url, 'sum(drill_request_rate{version="v1"})', 3.0)
    scraped(url, 'max(drill_error_ratio{version="v2"})', 0.4)

    readings = read_queries(spec, "demo", "v1", timedelta(seconds=10))
    assert [(r["name"], r["value"], r["error"]) for r in readings] == [("error_ratio", 0.01, None), ("request_rate", 3.0, None)]
    assert readings[0]["query"] == 'max(drill_error_ratio{release="demo", version="v1"})'
    assert judge_queries({"queries": readings}, spec.queries).outcome == "passed"

    failed = judge_queries({"queries": read_queries(spec, "demo", "v2", timedelta(seconds=10))}, spec.queries)
    assert (failed.outcome, failed.reasons) == ("failed", ("error_ratio 0.4 > max 0.05",))

    nothing = judge_queries({"queries": read_queries(spec, "demo", "v9", timedelta(seconds=10))}, spec.queries)
    assert (nothing.outcome, nothing.reasons) == ("inconclusive", ("error_ratio: no data", "request_rate: no data"))

    gauges["rate"].labels("v1", "a").set(0.1)
    gauges["rate"].labels("v1", "b").set(0.1)
    scraped(url, 'sum(drill_request_rate{version="v1"})', 0.2)
    quiet = judge_queries({"queries": read_queries(spec, "demo", "v1", timedelta(seconds=10))}, spec.queries)
    assert (quiet.outcome, quiet.reasons) == ("inconclusive", ("request_rate 0.2 < inconclusive_below 0.5",))


def test_bad_promql_and_several_series_are_inconclusive_with_the_reason(prometheus):
    url, gauges = prometheus
    gauges["rate"].labels("v3", "a").set(1)
    gauges["rate"].labels("v3", "b").set(1)
    scraped(url, 'count(drill_request_rate{version="v3"})', 2.0)
    bad = PrometheusQuery(name="typo", query="sum(rate(drill_request_rate[{{interval}}]", max=1)
    several = PrometheusQuery(name="unaggregated", query='drill_request_rate{version="{{version}}"}', max=10)
    spec = analysis(url, bad, several)
    readings = read_queries(spec, "demo", "v3", timedelta(seconds=10))
    assert readings[0]["query"] == "sum(rate(drill_request_rate[10s]"
    assert readings[0]["value"] is None and readings[0]["error"].startswith("bad_data: "), readings[0]
    assert readings[1]["error"] == "2 series answered; aggregate to one (sum, max, avg by nothing)"
    verdict = judge_queries({"queries": readings}, spec.queries)
    assert verdict.outcome == "inconclusive" and verdict.reasons[0].startswith("typo: query failed: bad_data: ")


def test_an_unreachable_or_silent_prometheus_is_inconclusive_within_the_time_budget():
    refused = analysis(f"http://127.0.0.1:{free_port()}", RATIO)
    [reading_] = read_queries(refused, "demo", "v1", timedelta(seconds=10))
    assert reading_["value"] is None and reading_["error"].startswith("ConnectError asking http://127.0.0.1:"), reading_
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        spec = analysis(f"http://127.0.0.1:{silent.getsockname()[1]}", RATIO, RATE, timeout="500ms")
        started = time.monotonic()
        readings = read_queries(spec, "demo", "v1", timedelta(seconds=10))
        took = time.monotonic() - started
    assert took < 1.5, took  # the tick waits at most the budget, for every query together
    assert readings[0]["error"].startswith("ReadTimeout asking"), readings[0]
    assert readings[1]["error"] == "not asked: the 0.5s budget for this interval's queries was spent"
    verdict = judge_queries({"queries": readings}, spec.queries)
    assert verdict.outcome == "inconclusive" and len(verdict.reasons) == 2


def test_the_observe_phase_reads_the_watched_version_from_prometheus_once_an_interval_is_due(prometheus, model_repo, tmp_path):
    url, gauges = prometheus
    gauges["ratio"].labels("demo", "obs").set(0.02)
    model_repo.release(**{"    progress_deadline: 5m\n": (
        "    progress_deadline: 5m\n    post_promotion: {duration: 1m}\n    analysis:\n      provider: prometheus\n"
        f"      prometheus:\n        address: {url}\n        queries:\n          - name: error_ratio\n"
        "            query: 'max(drill_error_ratio{release=\"{{release}}\", version=\"obs\"})'\n"
        "            max: 0.05\n")})
    model_repo.commit("prometheus analysis")
    scraped(url, 'max(drill_error_ratio{version="obs"})', 0.02)
    stable, version = live(model_repo)
    standby = replace(stable, version="old1", role="standby", weight=0, standby_since=NOW - 20)
    watch = {"kind": "post-promotion", "version": version, "standby": "old1", "duration_s": 60, "started_at": NOW - 20,
             "ends_at": NOW + 40, "intervals": {"passed": 1, "failed": 0, "inconclusive": 0}}
    record = ReleaseRecord("demo", "Progressing", "", "c1", version, stable.spec, NOW - 20, analysis=watch, analysis_at=NOW - 10)

    phases = Tick(model_repo, tmp_path / "state", CountingServe())

    def observed(analysis_at: float) -> dict:
        state = State(ControllerRecord(), {"demo": replace(record, analysis_at=analysis_at)}, [stable, standby], {})
        [demo] = phases.observe(state).tick.releases
        assert demo.unobserved is None, demo.unobserved
        return demo.stats or {}

    try:
        due = observed(NOW - 10)[version]["queries"]
        assert [(r["name"], r["value"], r["error"]) for r in due] == [("error_ratio", 0.02, None)]
        assert due[0]["query"] == 'max(drill_error_ratio{release="demo", version="obs"})'
        assert "queries" not in observed(NOW - 2).get(version, {})  # mid-interval: Prometheus is not asked
    finally:
        phases.preparations.close()
        phases.store.close()
