"""Start, find and stop the local Ray head the controller serves on.

`ray start --head` daemonizes, so serving outlives the controller: a restarted
controller finds the running head through its dashboard and adopts it. Its
dashboard (the REST API) listens on 127.0.0.1 only, with token auth on
(`RAY_AUTH_MODE=token`); Serve's HTTP proxy is put on 127.0.0.1 by the
rendered config. Ray's internal ports follow Ray's own choice of address. The token
lives where Ray's own clients read it (`controller.apply.dashboard.token_path`)
and is created, mode 0600, when missing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from controller.apply.dashboard import DashboardClient, ray_token, token_path

__all__ = ["RayHead", "dashboard_url_for", "ensure_token", "is_local", "kill_head", "ray_executable", "start_head", "stop_head"]

log = logging.getLogger("diffops.controller")


@dataclass(frozen=True)
class RayHead:
    gcs_port: int = 6379
    dashboard_port: int = 8265
    metrics_port: int = 8266
    client_port: int = 10001
    agent_port: int = 52365  # the dashboard agent (job API); two heads on one machine need two
    host: str = "127.0.0.1"
    temp_dir: str | None = None  # Ray's session/log root (default /tmp/ray)

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.host}:{self.dashboard_port}"


def ensure_token() -> str:
    """Turn Ray's token auth on for this process and its children; create the token if none exists."""
    os.environ["RAY_AUTH_MODE"] = "token"
    token = ray_token()
    if token:
        return token
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token)
    log.info("ray: created an auth token at %s (mode 0600); next: start the head with token auth", path)
    return token


def ray_executable() -> str:
    return str(Path(sys.executable).with_name("ray"))


def dashboard_url_for(address: str) -> str:
    """`--ray-address`: a dashboard URL as is, or a GCS host:port whose dashboard is on 8265."""
    if address.startswith(("http://", "https://")):
        return address
    host = address.split(":")[0] or "127.0.0.1"
    return f"http://{host}:8265"


def is_local(dashboard_url: str) -> bool:
    """Whether the cluster at this dashboard runs on this machine (a loopback host): then replicas may share the
    controller's model cache and read `file://` models from its repo. Any other host is a cluster of other machines."""
    host = urlsplit(dashboard_url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def start_head(head: RayHead, num_cpus: float | None = None, num_gpus: int | None = None, timeout_s: float = 60) -> str:
    """Reuse a running head with this dashboard, or start one; return the dashboard URL."""
    token = ensure_token()
    client = DashboardClient(head.dashboard_url, token)
    if client.alive():
        log.info("ray: head already running at %s; next: adopt it", head.dashboard_url)
        return head.dashboard_url
    started = time.monotonic()
    command = [
        ray_executable(), "start", "--head", f"--node-ip-address={head.host}", f"--port={head.gcs_port}",
        f"--dashboard-host={head.host}", f"--dashboard-port={head.dashboard_port}",
        f"--metrics-export-port={head.metrics_port}", f"--dashboard-agent-listen-port={head.agent_port}",
        f"--ray-client-server-port={head.client_port}", "--disable-usage-stats",
    ]
    if head.temp_dir:
        command.append(f"--temp-dir={head.temp_dir}")
    if num_cpus is not None:
        command.append(f"--num-cpus={num_cpus:g}")
    if num_gpus is not None:
        command.append(f"--num-gpus={num_gpus}")
    log.info("ray: starting a local head on %s (dashboard :%d, GCS :%d); next: wait for the dashboard",
             head.host, head.dashboard_port, head.gcs_port)
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "token"})
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed (exit {result.returncode}): {result.stderr.strip()[-2000:]}")
    while not client.alive():
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"Ray dashboard at {head.dashboard_url} did not come up within {timeout_s:.0f}s")
        time.sleep(0.5)
    log.info("ray: head up at %s after %.1fs; it keeps serving when the controller stops (`diffops ray stop` ends it)",
             head.dashboard_url, time.monotonic() - started)
    return head.dashboard_url


def stop_head() -> int:
    """`ray stop` for this machine's Ray processes; returns its exit code."""
    return subprocess.run([ray_executable(), "stop"], env={**os.environ, "RAY_AUTH_MODE": "token"}).returncode


def kill_head(head: RayHead) -> int:
    """Kill one head's processes (those naming its temp dir or GCS port, and their children), sparing every other
    Ray on the machine, unlike `ray stop`; for heads started with their own temp dir (tests, benchmarks)."""
    import psutil

    marks = tuple(m for m in (head.temp_dir, f":{head.gcs_port}") if m)
    spared = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    doomed = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if process.pid not in spared and any(mark in part for part in process.info["cmdline"] or [] for mark in marks):
                doomed += [process, *process.children(recursive=True)]  # Ray's workers rename themselves (ray::...)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for process in doomed:
        try:
            process.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    psutil.wait_procs(doomed, timeout=10)
    return len(doomed)

