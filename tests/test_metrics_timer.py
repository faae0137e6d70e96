"""The metrics timer: gauges set again on a timer so Ray keeps exporting them, even from an idle router."""

from __future__ import annotations

import threading
from typing import Any

from serving.metrics import Ticker
from serving.router import Router


class Gauge:
    """A recording stand-in for a Ray gauge: every value set, with its tags."""

    def __init__(self) -> None:
        self.sets: list[tuple[float, dict[str, str]]] = []

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.sets.append((value, tags))


def test_the_ticker_runs_again_after_a_failing_run_and_stops_when_told() -> None:
    runs: list[int] = []
    again = threading.Event()

    def work() -> None:
        runs.append(1)
        if len(runs) == 1:
            raise OSError("NVML gone for a moment")
        again.set()

    ticker = Ticker("demo--v1", work, every=0.01).start()
    assert again.wait(5), "the ticker stopped after a failing run"
    ticker.stop()
    ticker.thread.join(5)
    assert not ticker.thread.is_alive() and len(runs) >= 2


def test_an_idle_router_sets_its_gauges_again_for_every_live_version() -> None:
    router = Router("demo")
    router.ticker.stop()
    router.reconfigure({"weights": {"v1": 90, "v2": 10}, "limits": {}, "defaults": {}})
    gauges: dict[str, Any] = {"in_flight": Gauge(), "queue_length": Gauge()}
    router.metrics = gauges  # type: ignore[assignment]
    router.awaiting = {"v1": 2}

    router._refresh_gauges()

    assert gauges["in_flight"].sets == [(0, {"release": "demo", "where": "router", "version": "none"})]
    queued = {tags["version"]: value for value, tags in gauges["queue_length"].sets}
    assert queued == {"v1": 2, "v2": 0}
    assert router.awaiting == {"v1": 2}  # read, never written from the timer's thread
