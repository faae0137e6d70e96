"""Monitoring as a user meets it: `diffops monitoring up` starts a real Prometheus (Debian's, from the virtualenv)
that scrapes a real controller metrics endpoint and the Ray nodes listed in Ray's service discovery file, `up`
again is a no-op, `status` shows the targets, `down` stops it. The rendered config passes `promtool check config`
(and a broken one does not); every Grafana panel's PromQL passes promtool and reads only contract metrics.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter, start_http_server

from controller.metrics import ControllerMetrics
from controller.monitoring import (
    MonitoringError,
    Settings,
    binaries,
    default_ray_temp_dir,
    listen_address,
    ray_sd_file,
    render_config,
    write_config,
)
from tests.conftest import free_port
from tests.live import DIFFOPS, wait_for
from tests.test_alert_rules import PROMETHEUS_DIR, SERIES, copy_of_prometheus_dir, metrics_in, promtool

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "deploy" / "grafana").glob("*.json"))
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "${release}": "demo", "$release": "demo",
                     "${version}": "v1", "$version": "v1"}
BASE = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())


# --- the config --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "expected"), [
    ({}, "/tmp/ray"),
    ({"TMPDIR": "/var/tmp"}, "/var/tmp/ray"),
    ({"TMPDIR": "/var/tmp", "RAY_TMPDIR": "/data/rt"}, "/data/rt/ray"),
])
def test_ray_temp_dir_is_found_as_ray_start_finds_it(env, expected, monkeypatch):
    from ray._common.utils import get_default_system_temp_dir

    for name in ("TMPDIR", "RAY_TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_ray_temp_dir(env) == expected == str(Path(get_default_system_temp_dir()) / "ray")


def test_render_puts_this_machines_targets_into_the_committed_config():
    config = render_config(BASE, "127.0.0.1:19464", ray_sd_file("/data/rt/ray"), "5s")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["diffops-controller"]["static_configs"] == [{"targets": ["127.0.0.1:19464"]}]
    assert jobs["ray"]["file_sd_configs"][0]["files"] == ["/data/rt/ray/prom_metrics_service_discovery.json"]
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "5s"
    assert config["rule_files"] == ["rules.yaml"]
    assert BASE["scrape_configs"][0]["static_configs"] == [{"targets": ["127.0.0.1:9464"]}]  # the input is left alone


def test_render_refuses_a_config_without_the_jobs_it_fills_in():
    with pytest.raises(MonitoringError, match="no scrape job ray; restore it from git"):
        render_config({**BASE, "scrape_configs": BASE["scrape_configs"][:1]}, "127.0.0.1:9464", "x.json", "15s")


@pytest.mark.parametrize(("cmdline", "address"), [
    (["/v/prometheus/usr/bin/prometheus", "--config.file=/s/monitoring/prometheus.yml", "--web.listen-address=127.0.0.1:9091"],
     "127.0.0.1:9091"),
    (["/usr/bin/prometheus", "--config.file=/s/monitoring/prometheus.yml"], "0.0.0.0:9090"),
    (["/usr/bin/prometheus", "--config.file=/other/prometheus.yml"], None),  # another state dir's
    (["/usr/bin/python3", "--config.file=/s/monitoring/prometheus.yml"], None),  # a reused pid
    ([], None),
])
def test_a_pid_counts_only_when_it_is_this_state_dirs_prometheus(cmdline, address):
    assert listen_address(cmdline, Path("/s/monitoring/prometheus.yml")) == address


def test_promtool_accepts_the_committed_and_the_rendered_config(tmp_path):
    committed = promtool("check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    assert committed.returncode == 0, committed.stdout + committed.stderr
    config = write_config(Settings(tmp_path / "state", str(tmp_path / "ray"), controller="127.0.0.1:19464"))
    rendered = promtool("check", "config", str(config))
    assert rendered.returncode == 0, rendered.stdout + rendered.stderr
    assert "SUCCESS: 13 rules found" in rendered.stdout and "127.0.0.1:19464" in config.read_text()


@pytest.mark.parametrize(("old", "new", "message"), [
    ("scrape_interval: 15s", "scrape_interval: 15s\n  scrape_intervall: 15s", "field scrape_intervall not found"),
    ("metrics_path: /metrics", "metrics_path: /metrics\n    static_config: []", "field static_config not found"),
    ("scrape_interval: 15s", "scrape_interval: fifteen", "not a valid duration"),
])
def test_promtool_refuses_a_broken_config(tmp_path, old, new, message):
    broken = copy_of_prometheus_dir(tmp_path, {"prometheus.yml": (old, new)})
    checked = promtool("check", "config", str(broken / "prometheus.yml"))
    assert checked.returncode != 0 and message in checked.stdout + checked.stderr, checked.stdout + checked.stderr


def test_without_the_extracted_prometheus_the_error_says_make_setup(tmp_path):
    with pytest.raises(MonitoringError, match=r"no prometheus in .*prometheus/usr/bin; run `make setup`"):
        binaries(tmp_path)
    assert all(path.exists() for path in binaries())  # this virtualenv has them: `make setup` extracted them


# --- the dashboards ----------------------------------------------------------------------------------------------

def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out += [panel, *panel.get("panels", [])]  # a collapsed row keeps its panels inside
    return out


def grafana_to_promql(expr: str) -> str:
    for variable, value in sorted(GRAFANA_VARIABLES.items(), key=lambda item: -len(item[0])):
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"an unknown Grafana variable in {expr}"
    return expr


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target; Grafana's variables replaced by values."""
    return [(f"{p['title']} [{t['refId']}]", grafana_to_promql(t["expr"])) for p in panels(dashboard) for t in p.get("targets", [])]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_query_passes_promtool_and_reads_only_contract_metrics(path, tmp_path):
    dashboard = json.loads(path.read_text())
    found = queries(dashboard)
    assert len(found) >= 10
    rules = {"groups": [{"name": path.stem, "rules": [{"record": f"panel_{i}", "expr": expr} for i, (_, expr) in enumerate(found)]}]}
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump(rules))
    checked = promtool("check", "rules", str(tmp_path / "panels.yaml"))
    assert checked.returncode == 0 and f"SUCCESS: {len(found)} rules found" in checked.stdout, checked.stdout + checked.stderr
    outside = {where: metrics_in(expr) - SERIES for where, expr in found if metrics_in(expr) - SERIES}
    assert outside == {}
    for variable in dashboard["templating"]["list"]:
        metric = re.fullmatch(r"label_values\((\w+)(\{.*\})?, *(\w+)\)", variable["definition"])
        assert metric and metric.group(1) in SERIES, variable["definition"]


def test_a_broken_panel_query_is_refused(tmp_path):
    rules = {"groups": [{"name": "broken", "rules": [{"record": "panel_0", "expr": grafana_to_promql(
        "histogram_quantile(0.95, sum by (le) (rate(ray_diffops_image_seconds_bucket[$__rate_interval]))")}]}]}
    (tmp_path / "panels.yaml").write_text(yaml.safe_dump(rules))
    assert promtool("check", "rules", str(tmp_path / "panels.yaml")).returncode != 0
    with pytest.raises(AssertionError, match="unknown Grafana variable"):
        grafana_to_promql('sum(rate(ray_diffops_requests_total{release="$app"}[5m]))')


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboards_import_with_a_prometheus_datasource_picked_at_import(path):
    dashboard = json.loads(path.read_text())
    assert [(i["name"], i["type"], i["pluginId"]) for i in dashboard["__inputs"]] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    assert dashboard["uid"] == f"diffops-{path.stem}" and "diffops" in dashboard["tags"]
    datasources = {json.dumps(p["datasource"]) for p in panels(dashboard) if p["type"] != "row"}
    datasources |= {json.dumps(t["datasource"]) for p in panels(dashboard) for t in p.get("targets", [])}
    assert datasources == {json.dumps({"type": "prometheus", "uid": "${DS_PROMETHEUS}"})}
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for p in panels(dashboard):  # inside Grafana's 24-column grid
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_the_dashboards_show_what_the_issue_asks_for():
    titles = {path.stem: " | ".join(p["title"] for p in panels(json.loads(path.read_text()))) for path in DASHBOARDS}
    exprs = {path.stem: " ".join(e for _, e in queries(json.loads(path.read_text()))) for path in DASHBOARDS}
    assert set(titles) == {"fleet", "release", "cost"}
    for needed in ("Releases", "Phase by release", "Traffic weight", "5xx ratio", "Cost by release"):
        assert needed in titles["fleet"], needed
    for needed in ("canary vs stable", "Latency", "Images/s", "Queue", "GPU utilization", "GPU memory used / total", "Model load by phase"):
        assert needed in titles["release"], needed
    for metric in ("diffops_cost_usd_total", "diffops_gpu_seconds_total", "diffops_cost_per_image_usd", "diffops_cost_budget_per_image_usd"):
        assert metric in exprs["cost"], metric


# --- the process: a real Prometheus scraping a real endpoint -----------------------------------------------------

def diffops(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DIFFOPS, "monitoring", *args], capture_output=True, text=True, timeout=120)


def query(url: str, promql: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


def test_monitoring_up_scrapes_the_controller_and_rays_nodes_and_down_stops_it(tmp_path):
    controller_port, ray_port, port = free_port(), free_port(), free_port()
    metrics = ControllerMetrics()
    metrics.serve(controller_port)
    metrics.observe_reconcile("ok", 0.02)
    # a Ray node's metrics export, as Ray lists it: in its session dir, linked at the top of its temp dir (as Ray 2.x)
    node = CollectorRegistry()
    Counter("ray_diffops_requests", "Requests.", ["release", "version", "code"], registry=node).labels("demo", "v1", "200").inc(3)
    node_server, _ = start_http_server(ray_port, addr="127.0.0.1", registry=node)
    ray_tmp = tmp_path / "ray"
    (ray_tmp / "session_2026-01-01").mkdir(parents=True)
    (ray_tmp / "session_2026-01-01" / "prom_metrics_service_discovery.json").write_text(
        json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{ray_port}"]}]))
    (ray_tmp / "prom_metrics_service_discovery.json").symlink_to(ray_tmp / "session_2026-01-01" / "prom_metrics_service_discovery.json")
    state = tmp_path / "state"
    common = ["--state-dir", str(state)]

    up = diffops("up", *common, "--port", str(port), "--controller-metrics", f"127.0.0.1:{controller_port}",
                 "--ray-temp-dir", str(ray_tmp), "--scrape-interval", "1s")
    url = f"http://127.0.0.1:{port}"
    try:
        assert up.returncode == 0 and up.stdout.strip() == url, up.stderr
        assert re.search(rf"monitoring: prometheus ready at {url}, .*next: .*\(\d+\.\d+s\)", up.stderr), up.stderr
        pid = int((state / "monitoring" / "prometheus.pid").read_text())
        assert httpx.get(f"{url}/-/ready", timeout=5).status_code == 200

        wait_for(lambda: len(query(url, "up == 1")) == 2, 30, "both targets scraped")
        assert {(r["metric"]["job"], r["metric"]["instance"]) for r in query(url, "up")} == {
            ("diffops-controller", f"127.0.0.1:{controller_port}"), ("ray", f"127.0.0.1:{ray_port}")}
        reconciles = query(url, "diffops_reconciles_total")
        assert [(r["metric"]["result"], r["value"][1]) for r in reconciles] == [("ok", "1")]
        served = query(url, 'ray_diffops_requests_total{release="demo", code="200"}')
        assert [r["value"][1] for r in served] == ["3"]
        metrics.observe_reconcile("error", 1.5)
        wait_for(lambda: query(url, 'diffops_reconciles_total{result="error"}'), 10, "the next scrape")
        rules = httpx.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert {g["name"] for g in rules} == {"diffops-controller", "diffops-serving", "diffops-cost"}

        again = diffops("up", *common, "--port", str(port))
        assert again.returncode == 0 and again.stdout.strip() == url
        assert f"prometheus already runs at {url} (pid {pid}); nothing to do" in again.stderr
        assert psutil.Process(pid).is_running() and len(psutil.Process(pid).children()) == 0

        shown = diffops("status", *common)
        assert shown.returncode == 0 and f"prometheus runs at {url} (pid {pid})" in shown.stdout
        assert re.search(rf"diffops-controller +127\.0\.0\.1:{controller_port} +up", shown.stdout), shown.stdout
        as_json = json.loads(diffops("status", *common, "-o", "json").stdout)
        assert {(t["job"], t["health"]) for t in as_json["targets"]} == {("diffops-controller", "up"), ("ray", "up")}
    finally:
        down = diffops("down", *common)
        node_server.shutdown()
    assert down.returncode == 0 and re.search(r"monitoring: prometheus \(pid \d+\) stopped", down.stderr), down.stderr
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/-/ready", timeout=2)
    assert not (state / "monitoring" / "prometheus.pid").exists() and (state / "monitoring" / "data").is_dir()
    gone = diffops("status", *common)
    assert gone.returncode == 1 and "prometheus is not running" in gone.stdout and "`diffops monitoring up` starts it" in gone.stdout
    again = diffops("down", *common)
    assert again.returncode == 0 and "nothing to stop" in again.stderr


def test_up_on_a_taken_port_says_so_and_leaves_nothing_running(tmp_path):
    port = free_port()
    stranger, _ = start_http_server(port, addr="127.0.0.1", registry=CollectorRegistry())  # answers /-/ready with 200 too
    state = tmp_path / "state"
    try:
        up = diffops("up", "--state-dir", str(state), "--port", str(port), "--ray-temp-dir", str(tmp_path / "ray"))
    finally:
        stranger.shutdown()
    assert up.returncode == 1 and f"port {port} on 127.0.0.1 is taken by another program; pass another --port" in up.stderr
    assert not (state / "monitoring" / "prometheus.pid").exists()
    assert diffops("status", "--state-dir", str(state)).returncode == 1


def test_a_malformed_scrape_interval_is_refused_before_anything_starts(tmp_path):
    up = diffops("up", "--state-dir", str(tmp_path / "state"), "--scrape-interval", "often")
    assert up.returncode == 2 and "'often' is not a duration like 15s or 1m" in up.stderr
    assert not (tmp_path / "state" / "monitoring").exists()


def test_up_when_prometheus_cannot_start_shows_why(tmp_path):
    state = tmp_path / "state"
    (state / "monitoring").mkdir(parents=True)
    (state / "monitoring" / "data").write_text("not a directory")  # where its TSDB must go
    up = diffops("up", "--state-dir", str(state), "--port", str(free_port()), "--ray-temp-dir", str(tmp_path / "ray"))
    assert up.returncode == 1 and re.search(r"prometheus exited \d+ before it was ready; the end of its log", up.stderr), up.stderr
    assert "data/queries.active: not a directory" in up.stderr
    assert not (state / "monitoring" / "prometheus.pid").exists()
