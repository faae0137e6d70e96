"""The dashboard screenshots (scripts/render_dashboards.py): a real Prometheus scrapes series this test sets, and the
real dashboards of deploy/grafana/ are drawn by the page in deploy/grafana/render/ in headless Chromium. What is
checked is what a reader of docs/dashboards/ sees: every panel title, the values the test set, a full-size PNG that
is not blank, and a refused query named by its panel."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from playwright.sync_api import Browser, Page, sync_playwright
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from scripts import render_dashboards

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "deploy" / "grafana"
PROMETHEUS = Path(sys.prefix) / "prometheus" / "usr" / "bin" / "prometheus"
SCRIPT = ROOT / "scripts" / "render_dashboards.py"
PHASES = {"demo": "Healthy", "shop": "Healthy", "canary-demo": "Progressing"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def poll(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(0.2)


def instant(prometheus: str, query: str) -> list[dict[str, Any]]:
    url = f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': query})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return list(json.load(response)["data"]["result"])
    except OSError:
        return []


@pytest.fixture(scope="module")
def exporter() -> Iterator[int]:
    """The controller's contract series with values this test controls, served the way the controller serves them."""
    registry = CollectorRegistry()
    phase = Gauge("diffops_release_phase", "phase", ["release", "phase"], registry=registry)
    weight = Gauge("diffops_version_weight", "weight", ["release", "version", "role"], registry=registry)
    cost = Counter("diffops_cost_usd", "cost", ["release", "kind"], registry=registry)
    per_image = Gauge("diffops_cost_per_image_usd", "cost per image", ["release", "version"], registry=registry)
    for release, current in PHASES.items():
        for name in ("Healthy", "Progressing"):
            phase.labels(release, name).set(1 if name == current else 0)
        weight.labels(release, "v1", "stable").set(90 if release == "canary-demo" else 100)
        cost.labels(release, "gpu").inc(2.5)
        per_image.labels(release, "v1").set(0.002)
    weight.labels("canary-demo", "v2", "canary").set(10)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    yield int(server.server_port)
    server.shutdown()


@pytest.fixture(scope="module")
def prometheus(exporter: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Debian's Prometheus on a free loopback port, scraping the exporter every second, once it holds a few samples."""
    folder = tmp_path_factory.mktemp("prometheus")
    config = folder / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"
                      f"  - job_name: diffops-controller\n    static_configs:\n      - targets: ['127.0.0.1:{exporter}']\n")
    port = free_port()
    process = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=(folder / "log").open("w"))
    url = f"http://127.0.0.1:{port}"
    try:
        poll("Prometheus holds 4 samples of diffops_version_weight",
             lambda: any(float(row["value"][1]) >= 4 for row in instant(url, "count_over_time(diffops_version_weight[1m])")))
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=render_dashboards.CHROMIUM, headless=True)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    opened = browser.new_page(viewport={"width": 1600, "height": 900})
    yield opened
    opened.close()


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def grid_height(dashboard: Path) -> int:
    """The pixels Grafana's grid takes for a dashboard: 30 px rows with 8 px gaps."""
    panels = json.loads(dashboard.read_text())["panels"]
    return 38 * max(int(p["gridPos"]["y"]) + int(p["gridPos"]["h"]) for p in panels)


def titles(dashboard: Path) -> list[str]:
    panels = json.loads(dashboard.read_text())["panels"]
    return sorted(p["title"] for p in panels)


def test_every_dashboard_becomes_a_full_size_png_that_is_not_blank(prometheus: str, tmp_path: Path) -> None:
    done = run_script("--prometheus", prometheus, "--out", str(tmp_path), "--dashboards", str(DASHBOARDS),
                      "--release", "canary-demo", "--range", "2m")
    assert done.returncode == 0, done.stderr
    for dashboard in sorted(DASHBOARDS.glob("*.json")):
        png = tmp_path / f"{dashboard.stem}.png"
        assert f"INFO {dashboard.stem}: rendered " in done.stderr and f"next: wrote {png}" in done.stderr
        with Image.open(png) as image:
            width, height = image.size
            colours = [(count, tuple(rgb)) for count, rgb in image.convert("RGB").getcolors(maxcolors=1 << 20) or [] if isinstance(rgb, tuple)]
        assert width == 1600 and grid_height(dashboard) <= height <= grid_height(dashboard) + 200, (dashboard.stem, image.size)
        assert len(colours) > 50, f"{png} looks blank: {len(colours)} colours"
        green = sum(count for count, (r, g, b) in colours if abs(r - 0x7E) + abs(g - 0xB2) + abs(b - 0x6D) < 40)
        assert green > 100, f"{png}: nothing drawn in the first series colour"


def test_the_fleet_page_shows_every_title_and_the_values_prometheus_holds(prometheus: str, page: Page, tmp_path: Path) -> None:
    fleet = DASHBOARDS / "fleet.json"
    with render_dashboards.serve(DASHBOARDS, prometheus) as base:
        url = render_dashboards.page_url(base, "fleet.json", "2m", "1s", {})
        rendered = render_dashboards.render(page, url, "fleet", fleet, tmp_path / "fleet.png", 30)
    assert rendered.problems == []
    shown = page.locator(".panel-title, .row-title").all_inner_texts()
    assert sorted(shown) == titles(fleet)

    def stat(title: str) -> str:
        return page.locator(".panel", has=page.get_by_role("heading", name=title, exact=True)).locator(".stat .value").inner_text()

    assert (stat("Releases"), stat("Not Healthy"), stat("Controller scraped")) == ("3", "1", "1")
    rows = page.locator(".panel", has=page.get_by_role("heading", name="Phase by release")).locator("tr").all_inner_texts()
    assert rows[0] == "phase\trelease"
    assert sorted(rows[1:]) == sorted(f"{phase}\t{release}" for release, phase in PHASES.items())
    legend = page.locator(".panel", has=page.get_by_role("heading", name="Traffic weight by version")).locator(".legend td.name").all_inner_texts()
    assert sorted(legend) == ["canary-demo v1 (stable)", "canary-demo v2 (canary)", "demo v1 (stable)", "shop v1 (stable)"]
    states = {panel["title"]: panel["state"] for panel in rendered.report["panels"]}
    assert states["Cost by release ($/h)"] == "ok" and states["Images/s by release"] == "nodata"
    assert page.locator(".panel", has=page.get_by_role("heading", name="Images/s by release")).inner_text().endswith("No data")


def test_a_query_prometheus_refuses_fails_the_dashboard_naming_its_panel(prometheus: str, page: Page, tmp_path: Path) -> None:
    broken = json.loads((DASHBOARDS / "fleet.json").read_text())
    panel = next(p for p in broken["panels"] if p["type"] == "stat")
    panel["targets"][0]["expr"] = "sum(rate(diffops_cost_usd_total[$__rate_interval])"
    source = tmp_path / "fleet.json"
    source.write_text(json.dumps(broken))
    with render_dashboards.serve(tmp_path, prometheus) as base:
        url = render_dashboards.page_url(base, "fleet.json", "2m", "1s", {})
        rendered = render_dashboards.render(page, url, "fleet", source, tmp_path / "fleet.png", 30)
    assert rendered.problems == [f'fleet: Prometheus refused a query of panel "{panel["title"]}": query A (sum(rate(diffops_cost_usd_total[4s])): '
                                 "bad_data: 1:37: parse error: unclosed left parenthesis; "
                                 f"next: fix that expression in {source}, no screenshot written"]
    assert not (tmp_path / "fleet.png").exists()
    assert page.locator(f'.panel[data-panel-id="{panel["id"]}"]').get_attribute("data-state") == "error"


def test_an_unreachable_prometheus_says_how_to_start_one(tmp_path: Path) -> None:
    done = run_script("--prometheus", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path))
    assert done.returncode == 1 and "unreachable" in done.stderr and "start it with `make monitoring`" in done.stderr


@pytest.mark.parametrize("path, expected", [
    ("/render/index.html", ("file", str(render_dashboards.RENDER_DIR / "index.html"))),
    ("/render/vendor/uPlot.iife.min.js", ("file", str(render_dashboards.RENDER_DIR / "vendor" / "uPlot.iife.min.js"))),
    ("/dashboards/fleet.json", ("file", str(DASHBOARDS / "fleet.json"))),
    ("/api/v1/query_range?query=up&step=1", ("prometheus", "http://prom:9090/api/v1/query_range?query=up&step=1")),
    ("/render/../../../README.md", None),
    ("/dashboards/../render/index.html", None),
    ("/dashboards/missing.json", None),
    ("/api/v2/alerts", None),
])
def test_the_local_server_serves_the_page_the_dashboards_and_prometheus_only(path: str, expected: tuple[str, str] | None) -> None:
    assert render_dashboards.route(path, DASHBOARDS, "http://prom:9090/") == expected


@pytest.mark.parametrize("text, ok", [("30m", True), ("1h30m", True), ("90s", True), ("0m", False), ("30", False), ("now-30m", False)])
def test_the_range_is_a_duration(text: str, ok: bool) -> None:
    if ok:
        assert render_dashboards.parse_range(text) == text
    else:
        with pytest.raises(ValueError, match="write a duration"):
            render_dashboards.parse_range(text)


@pytest.fixture(scope="module")
def helpers(browser: Browser) -> Iterator[Callable[[str], Any]]:
    """The page's pure helpers (grafana.js), loaded alone into a blank page."""
    blank = browser.new_page()
    blank.add_script_tag(content=(render_dashboards.RENDER_DIR / "grafana.js").read_text())
    yield lambda expression: blank.evaluate(f"(() => {{ const G = window.GrafanaLite; return {expression}; }})()")
    blank.close()


@pytest.mark.parametrize("expression, expected", [
    # Grafana's variables: a single value as is, All as allValue, several values as a regex group.
    ("G.interpolate('x{release=\"$release\"}', {release: {value: ['demo'], multi: false}})", 'x{release="demo"}'),
    ("G.interpolate('x{v=~\"$version\"}', {version: {value: ['$__all'], multi: true, includeAll: true, allValue: '.+'}})", 'x{v=~".+"}'),
    ("G.interpolate('x{v=~\"${version}\"}', {version: {value: ['v1', 'v2.1'], multi: true}})", 'x{v=~"(v1|v2\\\\.1)"}'),
    ("G.interpolate('x{v=~\"$version\"}', {version: {value: ['$__all'], multi: true, includeAll: true, options: ['a', 'b']}})", 'x{v=~"(a|b)"}'),
    ("G.interpolate('rate(x[$__rate_interval]) $unknown', G.builtins(0, 1800000, G.intervals(0, 1800000, 800, 15000)))", "rate(x[1m]) $unknown"),
    ("G.builtins(0, 1800000, G.intervals(0, 1800000, 800, 1000)).__range", "1800s"),
    ("G.intervals(0, 7200000, 500, 15000)", {"intervalMs": 15000, "rateIntervalMs": 60000}),
    ("G.intervals(0, 21600000, 200, 15000)", {"intervalMs": 120000, "rateIntervalMs": 135000}),
    ("G.parseLabelValues('label_values(diffops_version_weight{release=\"demo\"}, version)')", {"selector": 'diffops_version_weight{release="demo"}', "label": "version"}),
    ("G.parseLabelValues('query_result(up)')", None),
    # Series names: the legend format, else Grafana's automatic name.
    ("G.seriesName('{{release}} {{ version }} ({{role}})', {release: 'demo', version: 'v1', role: 'stable'}, 'e')", "demo v1 (stable)"),
    ("G.seriesName('__auto', {__name__: 'up', job: 'c'}, 'e')", 'up{job="c"}'),
    ("G.seriesName('', {}, 'sum(up)')", "sum(up)"),
    # Units as Grafana writes them.
    ("['short', 'percent', 'percentunit', 's', 's', 'reqps', 'currencyUSD', 'bytes', 'Bps', 'h'].map((u, i) => G.formatValue(u, [3, 90, 0.051, 0.25, 95, 1500, 0.0021, 3145728, 2000, 0.5][i]))",
     ["3", "90%", "5.1%", "250 ms", "1.58 min", "1.5K req/s", "$0.0021", "3 MiB", "2 kB/s", "30 min"]),
    ("G.formatValue('short', null)", "No data"),
    ("[G.reduce('lastNotNull', [1, 2, null]), G.reduce('max', [1, 5, null]), G.reduce('mean', [1, 3])]", [2, 5, 2]),
    ("[G.thresholdColor(undefined, 3), G.thresholdColor(undefined, 80), G.thresholdColor({steps: [{color: 'green', value: null}, {color: 'orange', value: 1}]}, 1)]",
     ["#73BF69", "#F2495C", "#FF9830"]),
    ("[G.sampleValue('NaN'), G.sampleValue('+Inf'), G.sampleValue('1.5')]", [None, None, 1.5]),
])
def test_the_page_decides_as_grafana_does(helpers: Callable[[str], Any], expression: str, expected: Any) -> None:
    assert helpers(expression) == expected
