"""HTTP traffic for the live benchmarks: requests one at a time, concurrent load, and a watch for the first
answer that shows a change took effect. All against the bench's Serve proxy (`bench.ray_head.SERVE_URL`)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from bench.ray_head import SERVE_URL

GENERATE = f"{SERVE_URL}/demo/generate"
JSON = {"Accept": "application/json"}


def percentile_ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(seconds, q)) * 1000


def timed_post(client: httpx.Client, body: dict[str, Any],
               headers: dict[str, str] | None = None) -> tuple[float, httpx.Response]:
    started = time.perf_counter()
    response = client.post(GENERATE, json=body, headers=headers or {})
    return time.perf_counter() - started, response


def expect_ok(response: httpx.Response) -> httpx.Response:
    if response.status_code != 200:
        raise RuntimeError(f"POST /demo/generate answered {response.status_code}: {response.text[:300]}")
    return response


def sequential(bodies: list[dict[str, Any]], client: httpx.Client) -> list[float]:
    """Latency of each request, sent one at a time over the client's keep-alive connection."""
    latencies = []
    for body in bodies:
        seconds, response = timed_post(client, body)
        expect_ok(response)
        latencies.append(seconds)
    return latencies


def concurrent(bodies: list[dict[str, Any]], concurrency: int) -> tuple[float, list[dict[str, Any]]]:
    """Send every body with `concurrency` clients in flight; (wall seconds, each answer's JSON metadata)."""
    local, clients = threading.local(), []

    def send(body: dict[str, Any]) -> dict[str, Any]:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=120)
            clients.append(local.client)
        metadata: dict[str, Any] = expect_ok(local.client.post(GENERATE, json=body, headers=JSON)).json()["metadata"]
        return metadata

    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            metadata = list(pool.map(send, bodies))
        return time.perf_counter() - started, metadata
    finally:
        for client in clients:
            client.close()


@dataclass
class Watch:
    """Clients sending `body` back to back (with `pause_s` between), recording when each answer arrived and
    whether it shows the change; `seconds_since(t)` is the time from `t` to the first answer that does."""

    body: dict[str, Any]
    shows_change: Callable[[httpx.Response], bool]
    clients: int = 2
    pause_s: float = 0.0
    url: str = GENERATE  # the release's generate endpoint
    answers: list[tuple[float, bool, int]] = field(default_factory=list)  # (monotonic time, changed, status)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> Watch:
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.post(self.url, json=self.body)
                    self.answers.append((time.monotonic(), self.shows_change(response), response.status_code))
                except httpx.HTTPError:
                    self.answers.append((time.monotonic(), False, 0))
                if self.pause_s:
                    time.sleep(self.pause_s)

    def seconds_since(self, since: float, timeout_s: float) -> float:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            changed = [at for at, shows, _ in list(self.answers) if shows and at >= since]
            if changed:
                return min(changed) - since
            time.sleep(0.01)
        codes = sorted({status for _, _, status in self.answers})
        raise RuntimeError(f"no answer showed the change within {timeout_s:.0f}s (status codes seen: {codes})")

    def failures(self, since: float) -> int:
        """Answers after `since` that were neither 2xx nor the expected 4xx of a probe."""
        return sum(1 for at, _, status in self.answers if at >= since and (status == 0 or status >= 500))
