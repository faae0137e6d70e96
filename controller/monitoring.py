"""Prometheus on one machine for diffops: `diffops monitoring up|down|status` (`make monitoring`).

Sits beside the controller, never in its loop: it reads deploy/prometheus/ (scrape config, alert rules),
renders the config with this machine's targets (the controller's metrics endpoint, the service discovery
file Ray writes into its session dir) into <state dir>/monitoring/, and runs Debian's `prometheus`, which
`make setup` extracts into the virtualenv, on 127.0.0.1. Pure: `render_config`, `default_ray_temp_dir`,
`ray_sd_file`, `prometheus_command`, `listen_address`. Shell: `start`, `stop`, `running`, `targets`.
On Kubernetes the Prometheus Operator does this job (deploy/kubernetes/).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

__all__ = [
    "CONTROLLER_METRICS", "DEFAULT_PORT", "SD_FILE", "MonitoringError", "Running", "Settings", "Target", "binaries",
    "default_ray_temp_dir", "deploy_dir", "listen_address", "prometheus_command", "ray_sd_file", "render_config",
    "running", "start", "stop", "targets", "write_config",
]

log = logging.getLogger("diffops.monitoring")

DEFAULT_PORT = 9090
CONTROLLER_METRICS = "127.0.0.1:9464"  # `diffops controller run`'s default --metrics-host:--metrics-port
SD_FILE = "prom_metrics_service_discovery.json"  # Ray 2.x keeps it, for every node, at the top of its temp dir
CONTROLLER_JOB, RAY_JOB = "diffops-controller", "ray"


class MonitoringError(Exception):
    """Something `diffops monitoring` cannot do; the message says what to do."""


@dataclass(frozen=True)
class Settings:
    state_dir: Path
    ray_temp_dir: str
    port: int = DEFAULT_PORT
    controller: str = CONTROLLER_METRICS
    scrape_interval: str = "15s"

    @property
    def dir(self) -> Path:
        return self.state_dir / "monitoring"

    @property
    def config(self) -> Path:
        return self.dir / "prometheus.yml"

    @property
    def pid_file(self) -> Path:
        return self.dir / "prometheus.pid"

    @property
    def log_file(self) -> Path:
        return self.dir / "prometheus.log"


@dataclass(frozen=True)
class Running:
    pid: int
    address: str  # host:port it listens on

    @property
    def url(self) -> str:
        return f"http://{self.address}"


@dataclass(frozen=True)
class Target:
    job: str
    instance: str
    health: str  # up | down | unknown
    error: str


# --- pure ------------------------------------------------------------------------------------------------------------

def deploy_dir() -> Path:
    """deploy/prometheus/ of this checkout (diffops is installed editable from it by `make setup`)."""
    return Path(__file__).resolve().parent.parent / "deploy" / "prometheus"


def binaries(prefix: Path | None = None) -> tuple[Path, Path]:
    """(prometheus, promtool) as `make setup` extracts them into the virtualenv."""
    folder = (prefix or Path(sys.prefix)) / "prometheus" / "usr" / "bin"
    found = (folder / "prometheus", folder / "promtool")
    if not all(os.access(path, os.X_OK) for path in found):
        raise MonitoringError(f"no prometheus in {folder}; run `make setup` (it extracts Debian's prometheus package there)")
    return found


def default_ray_temp_dir(env: Mapping[str, str]) -> str:
    """Ray's own choice when `ray start` gets no --temp-dir (the local head diffops starts gets none): RAY_TMPDIR,
    else TMPDIR, else /tmp; then `ray` in it."""
    return str(Path(env.get("RAY_TMPDIR") or env.get("TMPDIR") or "/tmp") / "ray")


def ray_sd_file(ray_temp_dir: str) -> str:
    """The targets file of the current Ray session, where Ray's own Prometheus docs point: the top of the temp dir
    (Ray writes it in the session dir and links it here; `session_latest` is not always there)."""
    return str(Path(ray_temp_dir) / SD_FILE)


def render_config(base: Mapping[str, Any], controller: str, sd_file: str, scrape_interval: str) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with this machine's targets; the rules file beside the rendered config."""
    config = copy.deepcopy(dict(base))
    jobs = {job.get("job_name"): job for job in config.get("scrape_configs", [])}
    missing = sorted({CONTROLLER_JOB, RAY_JOB} - set(jobs))
    if missing:
        raise MonitoringError(f"deploy/prometheus/prometheus.yml has no scrape job {', '.join(missing)}; restore it from git")
    config.setdefault("global", {}).update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    config["rule_files"] = ["rules.yaml"]
    jobs[CONTROLLER_JOB]["static_configs"] = [{"targets": [controller]}]
    for sd in jobs[RAY_JOB]["file_sd_configs"]:
        sd["files"] = [sd_file]
    return config


def prometheus_command(binary: Path, settings: Settings) -> list[str]:
    return [str(binary), f"--config.file={settings.config}", f"--storage.tsdb.path={settings.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{settings.port}", "--storage.tsdb.retention.time=15d"]


def listen_address(cmdline: list[str], config: Path) -> str | None:
    """The address of a prometheus started by `prometheus_command` with this config; None for any other process."""
    if not cmdline or Path(cmdline[0]).name != "prometheus" or f"--config.file={config}" not in cmdline:
        return None
    return next((arg.split("=", 1)[1] for arg in cmdline if arg.startswith("--web.listen-address=")), "0.0.0.0:9090")


# --- shell -----------------------------------------------------------------------------------------------------------

def write_config(settings: Settings, source: Path | None = None) -> Path:
    """Render prometheus.yml and copy rules.yaml into <state dir>/monitoring/; returns the config's path."""
    source = source or deploy_dir()
    if not (source / "prometheus.yml").exists():
        raise MonitoringError(f"no {source / 'prometheus.yml'}: `diffops monitoring` runs from a checkout of diffops "
                              "(make setup); on Kubernetes use deploy/kubernetes/ with the Prometheus Operator")
    base = yaml.safe_load((source / "prometheus.yml").read_text())
    config = render_config(base, settings.controller, ray_sd_file(settings.ray_temp_dir), settings.scrape_interval)
    settings.dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "rules.yaml", settings.dir / "rules.yaml")
    settings.config.write_text("# Rendered by `diffops monitoring up` from deploy/prometheus/prometheus.yml; edit that file.\n"
                               + yaml.safe_dump(config, sort_keys=False))
    return settings.config


def running(settings: Settings) -> Running | None:
    """The prometheus the pid file names, if it is still this state dir's (a reused pid is someone else's)."""
    try:
        pid = int(settings.pid_file.read_text().strip())
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        address = listen_address(process.cmdline(), settings.config)
    except (FileNotFoundError, ValueError, psutil.Error):
        return None
    return Running(pid, address) if address else None


def start(settings: Settings, timeout_s: float = 60) -> tuple[Running, bool]:
    """Start prometheus unless it runs; wait until it is ready. Returns (it, whether this call started it)."""
    already = running(settings)
    if already:
        return already, False
    prometheus, _ = binaries()
    if _taken(settings.port):
        raise MonitoringError(f"port {settings.port} on 127.0.0.1 is taken by another program; pass another --port")
    started = time.monotonic()
    write_config(settings)
    with open(settings.log_file, "ab") as out:
        process = subprocess.Popen(prometheus_command(prometheus, settings), stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                   cwd=settings.dir, start_new_session=True)  # outlives this command, as `ray start` does
    settings.pid_file.write_text(f"{process.pid}\n")
    log.info("monitoring: prometheus started (pid %d, config %s); next: wait for it to be ready on 127.0.0.1:%d",
             process.pid, settings.config, settings.port)
    ready = Running(process.pid, f"127.0.0.1:{settings.port}")
    while not _ready(ready.url):
        if process.poll() is not None:
            settings.pid_file.unlink(missing_ok=True)
            raise MonitoringError(f"prometheus exited {process.returncode} before it was ready; the end of its log "
                                  f"({settings.log_file}) says why:\n{_tail(settings.log_file)}")
        if time.monotonic() - started > timeout_s:
            stop(settings)
            raise MonitoringError(f"prometheus was not ready within {timeout_s:.0f}s; stopped it. The end of its log "
                                  f"({settings.log_file}):\n{_tail(settings.log_file)}")
        time.sleep(0.2)
    log.info("monitoring: prometheus ready at %s, scraping the controller at %s and Ray's nodes listed in %s; "
             "next: it runs until `diffops monitoring down` (%.1fs)", ready.url, settings.controller,
             ray_sd_file(settings.ray_temp_dir), time.monotonic() - started)
    return ready, True


def stop(settings: Settings, timeout_s: float = 30) -> int | None:
    """Stop this state dir's prometheus (SIGTERM, then SIGKILL after `timeout_s`); its pid, or None if none ran."""
    current = running(settings)
    settings.pid_file.unlink(missing_ok=True)
    if current is None:
        return None
    started = time.monotonic()
    process = psutil.Process(current.pid)
    process.send_signal(signal.SIGTERM)
    if not _gone(process, timeout_s):
        log.warning("monitoring: prometheus (pid %d) ignored SIGTERM for %.0fs; next: SIGKILL", current.pid, timeout_s)
        process.kill()
        _gone(process, 10)
    log.info("monitoring: prometheus (pid %d) stopped; its data stays in %s (%.1fs)", current.pid, settings.dir / "data",
             time.monotonic() - started)
    return current.pid


def targets(url: str) -> list[Target]:
    """What prometheus scrapes and whether the last scrape worked (/api/v1/targets)."""
    answer = httpx.get(f"{url}/api/v1/targets", params={"state": "active"}, timeout=5)
    answer.raise_for_status()
    return [Target(t["labels"].get("job", ""), t["labels"].get("instance", ""), t["health"], t.get("lastError", ""))
            for t in answer.json()["data"]["activeTargets"]]


def _ready(url: str) -> bool:
    try:
        answer = httpx.get(f"{url}/-/ready", timeout=2)
    except httpx.HTTPError:
        return False
    return answer.status_code == 200 and "Prometheus" in answer.text  # Prometheus's own answer, not a stranger's on the port


def _taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Prometheus binds: a port in TIME_WAIT is free
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _gone(process: psutil.Process, timeout_s: float) -> bool:
    """Whether the process ended within `timeout_s` (a zombie has ended: a parent other than us may never reap it)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                if process.ppid() == os.getpid():
                    process.wait(0)  # reap our own child
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def _tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"
