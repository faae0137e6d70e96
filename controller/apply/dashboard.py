"""The one HTTP client to Ray's dashboard, and the one place Ray's auth token is found. I/O.

Everything the controller asks of a Ray cluster goes through the dashboard's
REST API: Serve applications (`controller.apply.serve_client`), cluster
resources, and gate jobs with their input packages (`controller.gate.runner`).
`DashboardClient` sends each request with Ray's token (`Authorization:
Bearer`), under a timeout, and maps failures to the error taxonomy
(`controller.errors`): an unreachable dashboard or a refused token is a
`DashboardError`, a `TemporaryError` the reconciler retries with backoff.

The token lives where Ray's own clients read it: $RAY_AUTH_TOKEN, else the
file at $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (`token_path`). Over an
`https://` dashboard URL it travels only inside TLS to a server whose
certificate verifies (the system CAs, or the bundle in $SSL_CERT_FILE);
`cleartext_warning` names an `http://` URL that would carry it off this machine.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from controller.errors import TemporaryError

__all__ = ["DEFAULT_TIMEOUT_S", "DashboardClient", "DashboardError", "cleartext_warning", "ray_token", "token_path"]

DEFAULT_TIMEOUT_S = 10.0


class DashboardError(TemporaryError):
    """Ray's dashboard could not be reached or refused a request (temporary: retried with backoff)."""


def token_path() -> Path:
    """Where Ray's token file is: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def ray_token() -> str | None:
    """The token Ray clients use: $RAY_AUTH_TOKEN, else the file at `token_path()`; None when there is none."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = token_path()
    return path.read_text().strip() if path.is_file() else None


def cleartext_warning(url: str, token: str | None) -> str | None:
    """What to say when the token would cross the network unencrypted: an `http://` URL whose host is not loopback."""
    parts = urlsplit(url)
    if token is None or parts.scheme != "http":
        return None
    host = parts.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return (f"Ray dashboard at {url}: the auth token travels unencrypted to {host}; put TLS in front of the dashboard "
            "(an https:// ingress) and pass that URL as --ray-address, with its CA in SSL_CERT_FILE if it is private")


class DashboardClient:
    """Requests to one Ray dashboard with its token; transport failures and a refused token raise `DashboardError`."""

    def __init__(self, url: str, token: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s, transport=transport)

    def send(self, method: str, path: str, *, json: Any = None, content: bytes | None = None,
             params: Mapping[str, str] | None = None) -> httpx.Response:
        """The dashboard's answer, whatever its status, except 401 (a refused token), which raises like a failed connection."""
        try:
            response = self._http.request(method, path, json=json, content=content, params=params)
        except httpx.HTTPError as err:
            if "CERTIFICATE_VERIFY_FAILED" in str(err):
                raise DashboardError(f"Ray dashboard at {self.url}: its TLS certificate does not verify ({err}); nothing was sent. "
                                     "Trust its CA with SSL_CERT_FILE=<bundle> or fix the certificate") from None
            raise DashboardError(f"Ray dashboard at {self.url} unreachable ({type(err).__name__}); is Ray running?") from None
        if response.status_code == 401:
            raise DashboardError(f"Ray dashboard at {self.url} refused the auth token; "
                                 "set RAY_AUTH_MODE=token and the same token as the cluster")
        return response

    def request(self, method: str, path: str, *, json: Any = None, content: bytes | None = None,
                params: Mapping[str, str] | None = None) -> httpx.Response:
        """Like `send`, and an answer of 400 or above raises `DashboardError` naming the request and Ray's reply."""
        response = self.send(method, path, json=json, content=content, params=params)
        if response.status_code >= 400:
            raise DashboardError(f"Ray dashboard {method} {path} answered {response.status_code}: {response.text[:500]}")
        return response

    def alive(self) -> bool:
        """Whether the dashboard answers and accepts the token."""
        try:
            self.request("GET", "/api/version")
            return True
        except DashboardError:
            return False

    def close(self) -> None:
        self._http.close()
