"""Talk to Ray Serve's REST API (the one `serve deploy` and KubeRay use), with Ray's token auth.

The apply step PUTs the whole rendered config; the observe step reads every
application's status, replicas and deployed config back (drift, ownership).
`ServeApi` is the protocol the reconciler depends on, so unit tests can pass
a fake at this boundary.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

import httpx

from controller.errors import TemporaryError
from controller.state.records import ObservedApp

APPLICATIONS_PATH = "/api/serve/applications/"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ServeError(TemporaryError):
    """Ray Serve could not be reached or refused a request (temporary: retried with backoff)."""


def ray_token() -> str | None:
    """The token Ray clients use: $RAY_AUTH_TOKEN, else $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


class ServeApi(Protocol):
    def apply(self, config: dict[str, Any]) -> None: ...
    def observe(self) -> dict[str, ObservedApp]: ...
    def router_weights(self, release: str) -> dict[str, int] | None: ...
    def router_stats(self, release: str, since: float) -> dict[str, dict[str, Any]] | None: ...
    def cluster_resources(self) -> dict[str, tuple[float, float]] | None: ...


def brief(message: str) -> str:
    """Ray's status message in one line: a traceback becomes its summary plus the exception it ended with."""
    text = ANSI.sub("", message).strip()
    if "Traceback" not in text:
        return " ".join(text.split())
    summary = " ".join(text.split("Error:", 1)[0].split()) if "Error:" in text else text.splitlines()[0].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{summary} Error: {lines[-1]}"


def parse_applications(details: dict[str, Any]) -> dict[str, ObservedApp]:
    """Serve's application details -> ObservedApp per application name."""
    observed = {}
    for name, app in (details.get("applications") or {}).items():
        running, target, replica_ids, messages = 0, 0, [], [app.get("message") or ""]
        for deployment in (app.get("deployments") or {}).values():
            replicas = deployment.get("replicas") or []
            running += sum(1 for r in replicas if r.get("state") == "RUNNING")
            replica_ids += [r.get("replica_id", "") for r in replicas if r.get("state") == "RUNNING"]
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
            user_config=deployments[0].get("user_config"),
            args=config.get("args"),
            config=app.get("deployed_app_config"),
        )
    return observed


class ServeClient:
    def __init__(self, dashboard_url: str, token: str | None = None, timeout_s: float = 10.0, serve_url: str = "http://127.0.0.1:8000"):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = dashboard_url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.proxy = httpx.Client(base_url=serve_url.rstrip("/"), timeout=2.0)

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ServeError(f"Ray dashboard at {self.url} unreachable ({type(err).__name__}); is Ray running?") from None
        if response.status_code == 401:
            raise ServeError(f"Ray dashboard at {self.url} refused the auth token; set RAY_AUTH_MODE=token and the same token as the cluster")
        if response.status_code >= 400:
            raise ServeError(f"Ray Serve {method} {path} answered {response.status_code}: {response.text[:500]}")
        return response

    def alive(self) -> bool:
        try:
            self._request("GET", "/api/version")
            return True
        except ServeError:
            return False

    def apply(self, config: dict[str, Any]) -> None:
        self._request("PUT", APPLICATIONS_PATH, json=config)

    def observe(self) -> dict[str, ObservedApp]:
        return parse_applications(self._request("GET", APPLICATIONS_PATH).json())

    def router_weights(self, release: str) -> dict[str, int] | None:
        """Ask a release's router, through the Serve proxy, which weights it is using now."""
        try:
            response = self.proxy.get(f"/{release}")
            return response.json().get("weights") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None

    def cluster_resources(self) -> dict[str, tuple[float, float]] | None:
        """(used, total) logical CPUs and GPUs as Ray's autoscaler last reported them (seconds old), or None."""
        try:
            data = self._request("GET", "/api/cluster_status").json()
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

    def close(self) -> None:
        self.http.close()
        self.proxy.close()
