"""Apply: PUT the rendered Serve config when ours changed or drifted, with other owners' apps carried unchanged.

The last step of a tick (`controller.reconciler`). Ray Serve's REST API takes
the complete set of applications, so every PUT carries the applications of
other owners exactly as Ray reported them a moment ago (`controller.apply.drift`);
an application name another owner holds is never rendered. Our applications
that Ray no longer runs as applied (deleted behind our back, a head restart,
another client's PUT) are re-applied, logged once per occurrence and counted
in `diffops_drift_healed_total{release}`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from controller.apply import drift
from controller.apply.drift import Drift
from controller.apply.serve_client import ServeApi
from controller.metrics import ControllerMetrics
from controller.state.records import ObservedApp

__all__ = ["Applier"]

log = logging.getLogger("diffops.controller")


class Applier:
    """PUTs the rendered config when ours changed or drifted; remembers what it applied to tell drift from change."""

    def __init__(self, serve: ServeApi, metrics: ControllerMetrics | None = None):
        self.serve, self.metrics = serve, metrics
        self.applied: dict[str, dict[str, Any]] | None = None  # our apps as last applied, by name
        self.ever: set[str] = set()  # every app name this process applied: ours while Ray deletes it (config gone)
        self.drifting: dict[str, str] = {}  # app -> what differed, while it keeps differing (logged once)

    def apply(self, config: dict[str, Any], ours: dict[str, ObservedApp], others: dict[str, ObservedApp]) -> list[Drift]:
        """PUT when our apps changed or drifted; return the drift found (healed by this PUT)."""
        started = time.monotonic()
        mine = {app["name"]: app for app in config["applications"] if app["name"] not in others}
        unchanged = [app for name, app in mine.items() if self.applied is not None and self.applied.get(name) == app]
        drifts = drift.find_drift(unchanged, ours)
        if mine == self.applied and not drifts:
            self.drifting = {}
            return []
        self.serve.apply({**config, "applications": [*mine.values(), *drift.carried(others)]})
        self.applied = mine
        self.ever |= set(mine)
        took_ms = (time.monotonic() - started) * 1000
        for found in drifts:
            if self.drifting.get(found.app) == found.what:
                log.debug("%s: still drifting (%s); re-applied again", found.app, found.what)
                continue
            log.warning("%s: drift healed: %s; re-applied the config the controller rendered; next: Ray Serve brings it "
                        "back, traffic follows once it is ready (%.0f ms)", found.app, found.what, took_ms,
                        extra={"subject": found.release, "event": "drift-healed"})
            if self.metrics is not None:
                self.metrics.observe_drift(found.release)
        self.drifting = {found.app: found.what for found in drifts}
        return drifts
