"""Talk to Ray Serve's REST API (the one `serve deploy` and KubeRay use), through the dashboard client.

The apply step PUTs the whole rendered config; the observe step reads every
application's status, replicas and deployed config back (drift, ownership).
`ServeApi` is the protocol the reconciler depends on, so unit tests can pass
a fake at this boundary. Requests, the token and error mapping are
`controller.apply.dashboard`'s; the routers are asked through the Serve proxy.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

import httpx

from controller.apply.dashboard import DashboardClient, DashboardError, ray_token
from controller.state.records import ObservedApp

__all__ = ["APPLICATIONS_PATH", "ServeApi", "ServeClient", "ServeError", "brief", "parse_applications", "ray_token"]

APPLICATIONS_PATH = "/api/serve/applications/"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

ServeError = DashboardError  # Ray Serve could not be reached or refused a request (temporary: retried with backoff)


class ServeApi(Protocol):
    def apply(self, config: dict[str, Any]) -> None: ...
    def observe(self) -> dict[str, ObservedApp]: ...
    def router_weights(self, release: str) -> dict[str, int] | None: ...
    def router_stats(self, release: str, since: float) -> dict[str, dict[str, Any]] | None: ...
    def cluster_resources(self) -> dict[str, tuple[float, float]] | None: ...


def brief(message: str) -> str:
    """Ray's status message in one line: a traceback becomes its summary plus the exception it ended with."""
    text = _ANSI.sub("", message).strip()
    if "Traceback" not in text:
        return " ".join(text.split())
    summary = " ".join(text.split("Error:", 1)[0].split()) if "Error:" in text else text.splitlines()[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{summary} Error: {lines[-1]}"


def parse_applications(details: dict[str, Any]) -> dict[str, ObservedApp]:
    """Serve's application details -> ObservedApp per application name."""
    observed = {}
    for name, app in (details.get("applications") or {}).items():
        running, target, replica_ids, nodes, messages = 0, 0, [], [], [app.get("message") or ""]
        for deployment in (app.get("deployments") or {}).values():
            replicas = deployment.get("replicas") or []
            running += sum(1 for r in replicas if r.get("state") == "RUNNING")
            replica_ids += [r.get("replica_id", "") for r in replicas if r.get("state") == "RUNNING"]
            nodes += [str(r.get("node_ip") or "?") for r in replicas if r.get("state") == "RUNNING"]
            target += int(deployment.get("target_num_replicas") or (deployment.get("deployment_config") or {}).get("num_replicas") or 0)
            messages.append(deployment.get("message") or "")
        config = app.get("deployed_app_config") or {}
        deployments = config.get("deployments") or [{}]
        observed[name] = ObservedApp(
            name=name,
            status=app.get("status", "UNKNOWN"),
            message=" ".join(dict.fromkeys(brief(m) for m in messages if m.strip())),
            running=running,
            target=target,
            replica_ids=tuple(sorted(replica_ids)),
            nodes=tuple(sorted(nodes)),
            user_config=deployments[0].get("user_config"),
            args=config.get("args"),
            config=app.get("deployed_app_config"),
        )
    return observed


class ServeClient:
    """`ServeApi` over HTTP: the Serve REST API through the dashboard, the routers through the Serve proxy."""

    def __init__(self, dashboard_url: str, token: str | None = None, timeout_s: float = 10.0, serve_url: str = "http://127.0.0.1:8000"):
        self.dashboard = DashboardClient(dashboard_url, token, timeout_s)
        self.url = self.dashboard.url
        self.proxy = httpx.Client(base_url=serve_url.rstrip("/"), timeout=2.0)

    def alive(self) -> bool:
        return self.dashboard.alive()

    def apply(self, config: dict[str, Any]) -> None:
        self.dashboard.request("PUT", APPLICATIONS_PATH, json=config)

    def observe(self) -> dict[str, ObservedApp]:
        return parse_applications(self.dashboard.request("GET", APPLICATIONS_PATH).json())

    def router_weights(self, release: str) -> dict[str, int] | None:
        """Ask a release's router, through the Serve proxy, which weights it is using now."""
        try:
            response = self.proxy.get(f"/{release}")
            return response.json().get("weights") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def router_work(self, release: str) -> dict[str, Any] | None:
        """The release's replicas' busy seconds and images per version, from its tally (cost accounting), or None."""
        try:
            response = self.proxy.get(f"/{release}/work")
            answer: dict[str, Any] | None = response.json() if response.status_code == 200 else None
            return answer
        except (httpx.HTTPError, ValueError):
            return None

    def cluster_resources(self) -> dict[str, tuple[float, float]] | None:
        """(used, total) logical CPUs and GPUs as Ray's autoscaler last reported them (seconds old), or None."""
        try:
            data = self.dashboard.request("GET", "/api/cluster_status").json()
            usage = data["data"]["clusterStatus"]["loadMetricsReport"]["usage"]
        except (ServeError, KeyError, TypeError, ValueError):
            return None
        return {name: (float(usage[name][0]), float(usage[name][1])) for name in ("CPU", "GPU") if name in usage} or None

    def router_stats(self, release: str, since: float) -> dict[str, dict[str, Any]] | None:
        """Per-version requests, errors and p95 latency the router saw since `since` (canary analysis)."""
        try:
            response = self.proxy.get(f"/{release}", params={"since": f"{since:.3f}"})
            return response.json().get("stats") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def router_feedback(self, release: str, epoch: str | None, after: int, limit: int) -> dict[str, Any] | None:
        """The feedback the release's tally holds past (epoch, after), oldest first (`controller.quality.drain`)."""
        return self._page(f"/{release}/feedback", epoch, after, limit)

    def router_samples(self, release: str, epoch: str | None, after: int, limit: int) -> dict[str, Any] | None:
        """The sampled outputs the release's scorer holds past (epoch, after), oldest first (`controller.quality.drain_samples`)."""
        return self._page(f"/{release}/samples", epoch, after, limit)

    def _page(self, path: str, epoch: str | None, after: int, limit: int) -> dict[str, Any] | None:
        """One page of a router's cursor read, or None when the router does not answer it."""
        try:
            response = self.proxy.get(path, params={"epoch": epoch or "", "after": after, "limit": limit})
            page: dict[str, Any] | None = response.json() if response.status_code == 200 else None
            return page
        except (httpx.HTTPError, ValueError):
            return None

    def close(self) -> None:
        self.dashboard.close()
        self.proxy.close()
