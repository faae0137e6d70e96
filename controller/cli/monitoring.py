"""`diffops monitoring up|down|status`: Prometheus on this machine with diffops's scrape config and alerts.

Parses options and prints; `controller.monitoring` renders the config and runs the process.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import click

from controller import logs
from controller.cli.common import fail, state_dir_option
from controller.cli.output import choose, dump, output_option
from controller.monitoring import (
    CONTROLLER_METRICS,
    DEFAULT_PORT,
    MonitoringError,
    Settings,
    default_ray_temp_dir,
    running,
    start,
    stop,
    targets,
)
from controller.source.credentials import private_dir

__all__ = ["monitoring"]

DURATION = re.compile(r"^\d+(ms|s|m|h)$")


def _duration(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not DURATION.match(value):
        raise click.BadParameter(f"{value!r} is not a duration like 15s or 1m")
    return value


def _settings(state_dir: Path, ray_temp_dir: str | None = None, port: int = DEFAULT_PORT, controller: str = CONTROLLER_METRICS,
              scrape_interval: str = "15s") -> Settings:
    return Settings(state_dir.resolve(), ray_temp_dir or default_ray_temp_dir(os.environ), port, controller, scrape_interval)


@click.group()
def monitoring() -> None:
    """Prometheus on this machine (127.0.0.1) with deploy/prometheus/'s scrape config and alerts.

    It scrapes the controller's metrics endpoint and every Ray node's metrics
    export; its config, data and log live in <state dir>/monitoring/. Grafana
    dashboards: deploy/grafana/ (see deploy/README.md).
    """


@monitoring.command("up")
@state_dir_option
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port Prometheus listens on, on 127.0.0.1.")
@click.option("--controller-metrics", default=CONTROLLER_METRICS, show_default=True, metavar="HOST:PORT",
              help="The controller's metrics endpoint (`controller run --metrics-host/--metrics-port`).")
@click.option("--ray-temp-dir", default=None, metavar="DIR",
              help="Ray's temp dir; Ray lists its nodes' metrics endpoints in DIR/prom_metrics_service_discovery.json "
                   "(default: $RAY_TMPDIR/ray, else $TMPDIR/ray, else /tmp/ray, as `ray start` picks it).")
@click.option("--scrape-interval", default="15s", show_default=True, callback=_duration,
              help="How often every target is scraped and the alerts evaluated.")
def up(state_dir: Path, port: int, controller_metrics: str, ray_temp_dir: str | None, scrape_interval: str) -> None:
    """Start Prometheus (a no-op when it runs); print its URL once it is ready."""
    logs.configure()
    private_dir(state_dir)
    settings = _settings(state_dir, ray_temp_dir, port, controller_metrics, scrape_interval)
    try:
        it, started = start(settings)
    except MonitoringError as err:
        fail(str(err))
    if not started:
        click.echo(f"diffops: prometheus already runs at {it.url} (pid {it.pid}); nothing to do "
                   "(`diffops monitoring down` stops it)", err=True)
    click.echo(it.url)


@monitoring.command("down")
@state_dir_option
def down(state_dir: Path) -> None:
    """Stop Prometheus (its data stays, for the next `up`)."""
    logs.configure()
    if stop(_settings(state_dir)) is None:
        click.echo(f"diffops: no prometheus runs for state dir {state_dir}; nothing to stop", err=True)


@monitoring.command("status")
@state_dir_option
@output_option("text", "json", "yaml")
def status(state_dir: Path, output: str) -> None:
    """Whether Prometheus runs, and each target's last scrape; exit 1 when it does not run."""
    it = running(_settings(state_dir))
    fmt = choose(output)
    if it is None:
        if fmt == "text":
            click.echo(f"prometheus is not running for state dir {state_dir}; `diffops monitoring up` starts it")
        else:
            click.echo(dump({"running": False}, fmt))
        sys.exit(1)
    try:
        scraped = targets(it.url)
    except Exception as err:  # httpx's errors and a malformed answer alike: say so and exit 1
        fail(f"prometheus (pid {it.pid}) runs but {it.url}/api/v1/targets did not answer ({type(err).__name__}: {err}); "
             f"read {_settings(state_dir).log_file}")
    if fmt != "text":
        rows = [{"job": t.job, "instance": t.instance, "health": t.health, "error": t.error} for t in scraped]
        click.echo(dump({"running": True, "url": it.url, "pid": it.pid, "targets": rows}, fmt))
        return
    click.echo(f"prometheus runs at {it.url} (pid {it.pid})")
    for t in scraped:
        click.echo(f"  {t.job:<20} {t.instance:<24} {t.health}" + (f": {t.error}" if t.error else ""))
    if not any(t.job == "ray" for t in scraped):
        click.echo("  ray                  (no Ray node listed yet: is Ray running? see --ray-temp-dir)")
