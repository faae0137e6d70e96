"""Apply: make Ray Serve run what the plan recorded, start the work that takes long, keep the model cache small.

The fourth phase of a reconcile (`controller.tick`), after the plan is
recorded. `apply` renders the complete Serve config (`controller.apply.serve_config`)
and PUTs it when ours changed or drifted (`controller.apply.applier`, which
logs and counts each drift it heals); the plan's preparations start in the
background (`controller.tick.prepare`); `CacheKeeper` evicts unused models past
--cache-max-bytes after a fetch.
"""

from __future__ import annotations

from controller.apply.applier import Applier
from controller.apply.drift import Drift
from controller.apply.serve_config import RenderSettings, render
from controller.metrics import ControllerMetrics
from controller.state.records import ObservedApp, VersionRecord
from controller.state.store import State
from serving.artifacts import ModelCache

__all__ = ["CacheKeeper", "apply"]


def apply(applier: Applier, state: State, settings: RenderSettings, others: dict[str, ObservedApp]) -> list[Drift]:
    """Render the recorded state and apply it; the drift this healed (those routers must confirm their weights again)."""
    return applier.apply(render(state.releases.values(), state.versions, settings), state.apps, others)


class CacheKeeper:
    """Keeps the model cache under --cache-max-bytes; every model a recorded version pins (live, standby, being
    prepared or gated) is kept. Evicts at start and after models were fetched (`due`)."""

    def __init__(self, cache: ModelCache, max_bytes: int | None, metrics: ControllerMetrics | None = None):
        self.cache, self.max_bytes, self.metrics = cache, max_bytes, metrics
        self.due = True

    def evict(self, versions: list[VersionRecord]) -> None:
        """Evict when due; the cache size gauge follows."""
        if not self.due:
            return
        self.due = False
        if self.max_bytes:
            keep = {v.spec.model.digest for v in versions}
            self.cache.evict(self.max_bytes, keep)
        if self.metrics is not None:
            self.metrics.cache_bytes.set(self.cache.size())
