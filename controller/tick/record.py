"""Record: the plan written down before anything is acted on, then said and counted.

The third phase of a reconcile (`controller.tick`). `save` writes the plan's
state, its events, the finished gate reports and the consumed manual commands
in one SQLite transaction (`controller.state.store`): a killed controller
resumes from what was decided, never from half of it. Once the tick has
applied and annotated, `announce` logs one line per decision (subject, what
happened, what happens next, how long the tick took to get there) and `count`
sets the state gauges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

from controller.metrics import ControllerMetrics
from controller.state.records import Command, Event
from controller.state.store import GateRecord, State, Store
from controller.tick.decide import Plan

__all__ = ["announce", "count", "save"]

log = logging.getLogger("diffops.controller")


def save(store: Store, plan: Plan, gates: Sequence[GateRecord], consumed: Sequence[Command]) -> None:
    """Record the plan (commands for no release are said to be ignored, and consumed all the same)."""
    for command in plan.ignored:
        log.warning("%s: `%s` from %s ignored: no such release", command.release, command.action, command.who)
    store.save(plan.state, plan.events, gates, consumed=consumed)


def announce(events: Iterable[Event], started: float) -> None:
    """One log line per decision, timed from `started` (time.monotonic() when the tick began deciding)."""
    took_ms = (time.monotonic() - started) * 1000
    for event in events:
        log.info("%s: %s (decided in %.0f ms)", event.release, event.message, took_ms,
                 extra={"subject": event.release, "event": event.kind, "version": event.version})


def count(metrics: ControllerMetrics | None, state: State) -> None:
    """The state gauges: each release's phase, each version's weight, when the last commit became live."""
    if metrics is not None:
        metrics.observe_state(state)
