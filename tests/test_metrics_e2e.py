"""Every metric family, as a real Prometheus scrapes it from the controller and from Ray, after real requests.

One real Ray head (the session's), the demo release on one of its (advertised) GPUs served by a controller
process, `diffops monitoring up` (Debian's Prometheus, 1 s scrapes), a few generations and one bad request. Then
Ray's metrics export (found the way Prometheus finds it: the session's service discovery file) must hold every
ray_diffops_* family with sane values, no GPU series on a machine without a GPU driver, none of the retired names;
PromQL on the Prometheus must answer every family of the contract (README "Metrics and monitoring") with sane
values (requests counted, latency buckets filled, load phases recorded, cost growing); and `diffops cost` must count
the images the replicas reported to the release's tally.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.live import DIFFOPS, Controller, generate, healthy_on, stable_version, wait_for

pytestmark = pytest.mark.timeout(600)  # a first rollout (gate job, replica start) takes minutes on a busy 2-core machine

REQUESTS = 3
FAMILIES = ("ray_diffops_requests", "ray_diffops_request_latency_seconds", "ray_diffops_image_seconds",
            "ray_diffops_images_generated", "ray_diffops_queue_length", "ray_diffops_requests_in_flight",
            "ray_diffops_model_load_seconds", "ray_diffops_cache_bytes")

Sample = tuple[str, dict[str, str], float]


def export_urls(temp_dir: str) -> list[str]:
    """The metrics export of every node, from the file Ray's dashboard writes for Prometheus' file_sd."""
    path = Path(temp_dir) / "prom_metrics_service_discovery.json"
    if not path.exists():
        return []
    return [f"http://{target}/metrics" for group in json.loads(path.read_text()) for target in group["targets"]]


def scrape(urls: list[str]) -> list[Sample]:
    samples: list[Sample] = []
    for url in urls:
        try:
            text = httpx.get(url, timeout=5).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            if family.name.startswith("ray_diffops_"):
                samples += [(s.name, dict(s.labels), s.value) for s in family.samples]
    return samples


def total(samples: list[Sample], name: str, **labels: str) -> float:
    return sum(value for n, have, value in samples if n == name and all(have.get(k) == v for k, v in labels.items()))


def labelled(samples: list[Sample], name: str, key: str) -> set[str]:
    return {have[key] for n, have, _ in samples if n == name and key in have}


def test_prometheus_scrapes_every_family_and_the_controller_costs_the_images(model_repo: Any, serve: Any, ray_head: Any,
                                                                              tmp_path: Path) -> None:
    model_repo.release(**{"    gpus: 0\n": "    gpus: 1\n",
                          "    gpu_hour_usd: 2.5\n": "    gpu_hour_usd: 2.5\n    storage_usd_per_gb_month: 0.02\n    budget_per_image_usd: 0.5\n"})
    model_repo.commit("the demo on a GPU, with storage prices and a budget")
    port, prometheus_port = free_port(), free_port()
    state = ["--state-dir", str(tmp_path / "monitoring")]
    up = subprocess.run([DIFFOPS, "monitoring", "up", *state, "--port", str(prometheus_port), "--controller-metrics",
                         f"127.0.0.1:{port}", "--ray-temp-dir", ray_head.temp_dir, "--scrape-interval", "1s"],
                        capture_output=True, text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    controller = Controller(model_repo.path, tmp_path / "state", "--metrics-port", str(port)).start()
    try:
        version = stable_version(controller.wait_release(healthy_on(), timeout=300))  # gate + start: minutes on a busy box
        check_exports(controller, version, ray_head.temp_dir)
        check_prometheus(f"http://127.0.0.1:{prometheus_port}", version)
        own = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        samples = [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(own) for s in f.samples]
        assert total(samples, "diffops_model_fetched_bytes_total", store="file") > 0  # the controller fetched the model
        assert labelled(samples, "diffops_gate_seconds_count", "check") >= {"artifact", "golden", "performance"}
        assert total(samples, "diffops_last_reconcile_timestamp_seconds") > 0
        assert total(samples, "diffops_cache_bytes") > 0
    finally:
        controller.stop()
        subprocess.run([DIFFOPS, "monitoring", "down", *state], capture_output=True, timeout=60)


def check_exports(controller: Controller, version: str, temp_dir: str) -> None:
    for n in range(REQUESTS):
        assert generate(body={"prompt": f"a red cube {n}", "steps": 2, "seed": n}).status_code == 200
    assert generate(body={"prompt": "x", "steps": 0}).status_code == 422

    wait_for(lambda: export_urls(temp_dir), 60, "Ray's Prometheus service discovery file")

    def lacking(samples: list[Sample]) -> list[str]:
        names = {name for name, _, _ in samples}
        lack = [f for f in FAMILIES if not any(n.startswith(f) for n in names)]
        if total(samples, "ray_diffops_images_generated_total", release="demo", version=version) < REQUESTS:
            lack.append(f"{REQUESTS} images of {version}")
        if total(samples, "ray_diffops_requests_total", code="200", release="demo", version=version) < REQUESTS:
            lack.append(f"{REQUESTS} answers of {version} counted")  # the router's export may lag the replica's
        return lack + ([] if total(samples, "ray_diffops_requests_total", code="422") >= 1 else ["a 422 counted"])

    def complete() -> list[Sample] | None:
        samples = scrape(export_urls(temp_dir))  # read again: a node may join the file later
        return None if lacking(samples) else samples

    try:
        samples = wait_for(complete, 120, "every ray_diffops_* family in Ray's metrics export", every=2)
    except AssertionError:
        raise AssertionError(f"Ray's export at {export_urls(temp_dir)} still lacks {lacking(scrape(export_urls(temp_dir)))}") from None
    mine = {"release": "demo", "version": version}

    assert total(samples, "ray_diffops_requests_total", code="200", **mine) >= REQUESTS
    assert total(samples, "ray_diffops_requests_total", code="422", release="demo", version="none") >= 1
    ok = total(samples, "ray_diffops_request_latency_seconds_count", outcome="ok", **mine)
    assert ok >= REQUESTS and total(samples, "ray_diffops_request_latency_seconds_sum", outcome="ok", **mine) > 0
    assert total(samples, "ray_diffops_request_latency_seconds_bucket", outcome="ok", le="+Inf", **mine) == ok
    assert total(samples, "ray_diffops_request_latency_seconds_bucket", outcome="ok", le="120.0", **mine) == ok  # all under 2 min
    assert total(samples, "ray_diffops_request_latency_seconds_count", outcome="client_error", release="demo") >= 1

    images = total(samples, "ray_diffops_images_generated_total", **mine)
    assert images >= REQUESTS  # the warm-up generation is not counted: nobody asked for it
    assert total(samples, "ray_diffops_image_seconds_count", **mine) >= 1
    assert 0 < total(samples, "ray_diffops_image_seconds_sum", **mine) < 60 * images

    load = {have["phase"]: value for n, have, value in samples if n == "ray_diffops_model_load_seconds" and have.get("version") == version}
    assert set(load) == {"fetch", "verify", "load", "warmup"}, load
    assert load["load"] > 0 and load["warmup"] > 0 and min(load.values()) >= 0
    assert labelled(samples, "ray_diffops_queue_length", "where") == {"router", "replica"}
    assert labelled(samples, "ray_diffops_requests_in_flight", "where") == {"router", "replica"}
    assert total(samples, "ray_diffops_cache_bytes", **mine) > 0  # the demo model, verified in the node cache
    # a local head's replicas share the controller's cache: the replica's fetch was a hit, nothing transferred
    assert total(samples, "ray_diffops_model_fetched_bytes_total") == 0

    names = {name for name, _, _ in samples}
    assert not [n for n in names if n.startswith("ray_diffops_gpu_")]  # no driver here: absent, never zero
    assert not [n for n in names if "cost" in n]  # cost is the controller's, no longer the replicas'

    def costed() -> dict[str, Any] | None:
        result = subprocess.run([DIFFOPS, "cost", "demo", "-o", "json", "--state-dir", str(controller.state_dir)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        versions = {v["id"]: v for r in report["releases"] for v in r["versions"]}
        return report if versions.get(version, {}).get("images", 0) >= REQUESTS else None

    report = wait_for(costed, 60, "the controller to count the images the replicas reported to the tally", every=1)
    [demo] = report["releases"]
    assert demo["name"] == "demo" and demo["images"] >= REQUESTS
    assert demo["gpu_hours"]["gate"] > 0 and demo["gpu_hours"]["serving"] + demo["gpu_hours"]["idle"] > 0  # one GPU held
    assert demo["usd"]["gpu"] > 0 and demo["budget_per_image_usd"] == 0.5  # storage of a 0.5 MB model rounds to $0 here
    # the replica's start by phase, told to the release's tally and stored by the controller: the gauge's figures
    told = controller.wait_release(lambda r: any(v["id"] == version and v["load"] for v in r["versions"]), timeout=60)
    [row] = [v for v in told["versions"] if v["id"] == version]
    assert row["load"] == pytest.approx(load), (row["load"], load)


CONTROLLER_FAMILIES = ("diffops_reconciles_total", "diffops_reconcile_duration_seconds_bucket", "diffops_release_phase",
                       "diffops_version_weight", "diffops_drift_healed_total", "diffops_gate_seconds_bucket",
                       "diffops_gpu_seconds_total", "diffops_cost_usd_total", "diffops_model_fetched_bytes_total", "diffops_cache_bytes",
                       "diffops_cost_per_image_usd", "diffops_cost_budget_per_image_usd", "diffops_last_reconcile_timestamp_seconds",
                       "diffops_last_applied_commit_timestamp_seconds")
RAY_FAMILIES = ("ray_diffops_requests_total", "ray_diffops_request_latency_seconds_bucket", "ray_diffops_image_seconds_bucket",
                "ray_diffops_images_generated_total", "ray_diffops_queue_length", "ray_diffops_requests_in_flight",
                "ray_diffops_model_load_seconds", "ray_diffops_cache_bytes")


def query(prometheus: str, promql: str) -> dict[str, float]:
    """An instant PromQL query: the value of each series, keyed by its labels."""
    answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert answer["status"] == "success", (promql, answer)
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in answer["data"]["result"]}


def check_prometheus(prometheus: str, version: str) -> None:
    """Every family through PromQL, with the values an operator would read off the dashboards."""
    def missing() -> list[str]:
        return [f for f in CONTROLLER_FAMILIES + RAY_FAMILIES if not query(prometheus, f"count({f})")]

    try:
        wait_for(lambda: not missing(), 120, "Prometheus to have every family", every=2)
    except AssertionError:
        raise AssertionError(f"Prometheus never saw {missing()}") from None
    mine = f'release="demo",version="{version}"'
    assert list(query(prometheus, 'diffops_release_phase{release="demo",phase="Healthy"}').values()) == [1.0]
    assert list(query(prometheus, f'diffops_version_weight{{{mine},role="stable"}}').values()) == [100.0]
    assert sum(query(prometheus, f'ray_diffops_requests_total{{{mine},code="200"}}').values()) >= REQUESTS
    p95 = query(prometheus, f'histogram_quantile(0.95, sum by (le) (ray_diffops_request_latency_seconds_bucket{{{mine},outcome="ok"}}))')
    assert 0 < min(p95.values()) <= 120, p95
    phases = {json.loads(k)["phase"] for k in query(prometheus, f"ray_diffops_model_load_seconds{{{mine}}}")}
    assert phases == {"fetch", "verify", "load", "warmup"}
    assert set(query(prometheus, 'sum by (kind) (diffops_gpu_seconds_total{release="demo"})')) >= {
        json.dumps({"kind": kind}) for kind in ("serving", "idle", "gate")}
    assert list(query(prometheus, 'diffops_cost_budget_per_image_usd{release="demo"}').values()) == [0.5]
    assert not query(prometheus, '{__name__=~"ray_diffops_gpu_.*"}')  # no driver: absent, never zero
    assert sum(query(prometheus, 'diffops_cost_usd_total{release="demo",kind="storage"}').values()) > 0  # tiny, not zero
    gpu_usd = 'sum(diffops_cost_usd_total{release="demo",kind="gpu"})'
    first = sum(query(prometheus, gpu_usd).values())
    wait_for(lambda: sum(query(prometheus, gpu_usd).values()) > first > 0, 30, "the GPU cost to keep growing while the GPU is held")
    # minutes after the replica started, its start phases are still scraped (Ray drops a gauge not set again for a while)
    recent = query(prometheus, f'count_over_time(ray_diffops_model_load_seconds{{{mine},phase="load"}}[15s])')
    assert recent and min(recent.values()) >= 1, recent
    groups = httpx.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert len(groups) == 3 and all(rule["health"] == "ok" for group in groups for rule in group["rules"])
