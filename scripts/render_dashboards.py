"""Screenshots of the Grafana dashboards without Grafana: what an operator sees, for docs/dashboards/.

Serves deploy/grafana/render/ (one HTML page and the vendored uPlot), the dashboard JSON files and a proxy to
Prometheus' /api/v1 from one loopback HTTP server, so the page's queries stay same-origin (no CORS flag on
Prometheus), then opens each dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright),
waits until the page marks every panel finished and saves a full-page PNG. A query Prometheus refuses fails
the run, naming the panel; no screenshot is written for that dashboard.

    python scripts/render_dashboards.py --prometheus http://127.0.0.1:9090 --out docs/dashboards --release demo
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

__all__ = ["CHROMIUM", "RenderError", "dashboard_files", "failures", "main", "page_url", "parse_range", "render", "route", "serve"]

ROOT = Path(__file__).resolve().parents[1]
RENDER_DIR = ROOT / "deploy" / "grafana" / "render"
CHROMIUM = "/usr/bin/chromium"
log = logging.getLogger("diffops.render")


class RenderError(Exception):
    """A dashboard that could not be rendered; the message says what to do."""


def parse_range(text: str) -> str:
    """A time range as Grafana writes it after now- ("30m", "6h", "1h30m"); raises ValueError otherwise."""
    if not re.fullmatch(r"(\d+(ms|[smhdw]))+", text) or not re.search(r"[1-9]", text):
        raise ValueError(f"--range {text!r}: write a duration such as 30m, 2h or 90s")
    return text


def page_url(base: str, dashboard: str, range_: str, scrape: str, variables: dict[str, str]) -> str:
    """The renderer page's address for one dashboard file served under /dashboards/."""
    query = [("dashboard", f"/dashboards/{urllib.parse.quote(dashboard)}"), ("from", f"now-{range_}"), ("to", "now"),
             ("scrape", scrape)] + [(f"var-{name}", value) for name, value in sorted(variables.items())]
    return f"{base}/render/index.html?{urllib.parse.urlencode(query)}"


def route(path: str, dashboards: Path, prometheus: str) -> tuple[str, str] | None:
    """What a request path of the local server reads: ("file", path), ("prometheus", url) or None (404)."""
    parsed = urllib.parse.urlsplit(path)
    if parsed.path.startswith("/api/v1/"):
        return "prometheus", prometheus.rstrip("/") + parsed.path + (f"?{parsed.query}" if parsed.query else "")
    for prefix, folder in (("/render/", RENDER_DIR), ("/dashboards/", dashboards)):
        if parsed.path.startswith(prefix):
            relative = urllib.parse.unquote(parsed.path[len(prefix):])
            target = (folder / relative).resolve()
            if relative and target.is_relative_to(folder.resolve()) and target.is_file():
                return "file", str(target)
    return None


def failures(name: str, source: Path, report: dict[str, Any], page_errors: Sequence[str]) -> list[str]:
    """One message per problem of a rendered page, each naming the panel and what to do."""
    messages = [f"{name}: the renderer page failed ({error}); next: fix deploy/grafana/render/, no screenshot written"
                for error in page_errors]
    if report.get("unfinished"):
        messages.append(f"{name}: the page said ready with panels still loading ({', '.join(report['unfinished'])}); "
                        "next: fix deploy/grafana/render/render.js, no screenshot written")
    for error in report.get("errors", []):
        where = f'panel "{error["panel"]}"' if error.get("panel") is not None else "the dashboard"
        if error.get("refused"):
            messages.append(f"{name}: Prometheus refused a query of {where}: {error['error']}; "
                            f"next: fix that expression in {source}, no screenshot written")
        else:
            messages.append(f"{name}: {where} could not be drawn: {error['error']}; next: no screenshot written")
    return messages


def dashboard_files(folder: Path, only: Sequence[str]) -> list[Path]:
    """The dashboards to render: every *.json in the folder, or the ones --only names."""
    found = sorted(folder.glob("*.json"))
    if not found:
        raise RenderError(f"no dashboard JSON in {folder}; pass --dashboards DIR")
    if only:
        missing = sorted(set(only) - {path.stem for path in found})
        if missing:
            raise RenderError(f"--only {', '.join(missing)}: no such dashboard in {folder} (there: {', '.join(p.stem for p in found)})")
        found = [path for path in found if path.stem in only]
    return found


def scrape_interval(prometheus: str) -> str:
    """The global scrape interval of the running Prometheus ($__rate_interval depends on it)."""
    url = prometheus.rstrip("/") + "/api/v1/status/config"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            config = yaml.safe_load(json.load(response)["data"]["yaml"])
    except (OSError, ValueError, KeyError) as error:
        raise RenderError(f"Prometheus at {prometheus} unreachable ({error}); start it with `make monitoring` "
                          "or pass --prometheus URL") from error
    return str(config.get("global", {}).get("scrape_interval", "1m"))


class _Handler(BaseHTTPRequestHandler):
    dashboards: Path
    prometheus: str

    def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
        target = route(self.path, self.dashboards, self.prometheus)
        if target is None:
            self._send(404, "text/plain", b"not found\n")
        elif target[0] == "file":
            self._send(200, mimetypes.guess_type(target[1])[0] or "application/octet-stream", Path(target[1]).read_bytes())
        else:
            self._proxy(target[1])

    def _proxy(self, url: str) -> None:
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                self._send(response.status, response.headers.get("Content-Type", "application/json"), response.read())
        except urllib.error.HTTPError as error:
            self._send(error.code, error.headers.get("Content-Type", "application/json"), error.read())
        except OSError as error:
            body = {"status": "error", "errorType": "unavailable", "error": f"Prometheus at {self.prometheus} unreachable: {error}"}
            self._send(502, "application/json", json.dumps(body).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("render server: " + format, *args)


@contextmanager
def serve(dashboards: Path, prometheus: str) -> Iterator[str]:
    """A loopback server for the page, the dashboards and the Prometheus proxy; yields its base URL."""
    handler = type("Handler", (_Handler,), {"dashboards": dashboards.resolve(), "prometheus": prometheus.rstrip("/")})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="render-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Rendered:
    report: dict[str, Any]
    problems: list[str]


def render(page: Any, url: str, name: str, source: Path, png: Path, timeout_s: float) -> Rendered:
    """Open one dashboard page, wait for every panel, and save the PNG unless a panel failed."""
    page_errors: list[str] = []

    def on_error(error: Any) -> None:
        page_errors.append(str(error))

    page.on("pageerror", on_error)
    try:
        page.goto(url)
        try:
            page.wait_for_selector("body[data-ready]", state="attached", timeout=timeout_s * 1000)
        except Exception as error:  # Playwright's TimeoutError
            loading = page.eval_on_selector_all('[data-state="loading"] .panel-title', "nodes => nodes.map(n => n.textContent)")
            raise RenderError(f"{name}: panels still loading after {timeout_s:.0f}s: {', '.join(loading) or '(none)'}; "
                              "next: check Prometheus' load, or raise --timeout") from error
        report: dict[str, Any] = page.evaluate("window.renderReport")
        problems = failures(name, source, report, page_errors)
        if not problems:
            png.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(png), full_page=True)
        return Rendered(report, problems)
    finally:
        page.remove_listener("pageerror", on_error)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus base URL (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboards", help="folder for <dashboard>.png")
    parser.add_argument("--dashboards", type=Path, default=ROOT / "deploy" / "grafana", help="folder of dashboard JSON files")
    parser.add_argument("--only", action="append", default=[], metavar="NAME", help="render only this dashboard (repeatable)")
    parser.add_argument("--release", help="value of the dashboards' $release variable (default: the first release)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="any other template variable")
    parser.add_argument("--range", default="30m", type=parse_range, help="time range, ending now (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1600, help="page width in pixels (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for one dashboard (default: %(default)s)")
    args = parser.parse_args(argv)
    if any("=" not in item for item in args.var):
        parser.error("--var takes NAME=VALUE")
    return args


def _run(args: argparse.Namespace) -> list[str]:
    from playwright.sync_api import sync_playwright  # a dev dependency: only this script needs it

    scrape = scrape_interval(args.prometheus)
    variables = dict(item.split("=", 1) for item in args.var) | ({"release": args.release} if args.release else {})
    problems: list[str] = []
    with serve(args.dashboards, args.prometheus) as base, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            for source in dashboard_files(args.dashboards, args.only):
                started = time.monotonic()
                png = args.out / f"{source.stem}.png"
                url = page_url(base, source.name, args.range, scrape, variables)
                rendered = render(page, url, source.stem, source, png, args.timeout)
                took = time.monotonic() - started
                panels = [p for p in rendered.report["panels"] if p["type"] != "row"]
                empty = [p["title"] for p in panels if p["state"] == "nodata"]
                for message in rendered.problems:
                    log.error("%s (%.1fs)", message, took)
                if not rendered.problems:
                    note = f"; {len(empty)} show no data: {', '.join(empty)}" if empty else ""
                    log.info("%s: rendered %d panels from %s over the last %s%s; next: wrote %s (%.1fs)",
                             source.stem, len(panels), args.prometheus, args.range, note, png, took)
                for warning in rendered.report.get("warnings", []):
                    log.warning("%s: %s; next: the screenshot shows it as Grafana would not", source.stem, warning)
                problems += rendered.problems
        finally:
            browser.close()
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    from controller.logs import configure

    args = _arguments(argv)
    configure()
    started = time.monotonic()
    try:
        problems = _run(args)
    except RenderError as error:
        log.error("dashboards: %s (%.1fs)", error, time.monotonic() - started)
        return 1
    if problems:
        log.error("dashboards: %d problem(s) above; next: fix them and run again (%.1fs)", len(problems), time.monotonic() - started)
        return 1
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
