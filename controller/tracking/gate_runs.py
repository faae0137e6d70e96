"""Every gate the controller runs becomes a tracking run (MLflow, W&B or Neptune), logged from the thread that ran it.

Called by `controller.tick.prepare` right after a gate report arrives (off the
reconcile loop) and by `diffops check`. The run lands in the release's
experiment `diffops/<release>`, tagged `diffops.release`, `diffops.version`,
`diffops.commit`, `diffops.kind=gate`; its id and link travel on with the gate
report into the state file, so `diffops status` and `history` show them. A
tracking store that cannot be reached never fails a gate: one warning says so
and the gate's verdict stands.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from checks.report import GateReport
from controller.parse.release import Spec
from controller.tracking.runs import gate_record
from controller.tracking.tracker import NAMES, RunTracker, TrackingError

__all__ = ["GateRuns", "experiment_name"]

log = logging.getLogger("diffops.controller")


def experiment_name(release: str) -> str:
    """The MLflow experiment holding a release's gate runs (W&B: the project `diffops-<release>`)."""
    return f"diffops/{release}"


class GateRuns:
    """Logs gate reports to a tracking store; thread-safe (the store's client is)."""

    def __init__(self, tracker: RunTracker, controller_version: str):
        self.tracker, self.controller_version = tracker, controller_version
        self._pool: ThreadPoolExecutor | None = None
        self._logged: queue.SimpleQueue[tuple[str, str, str, dict[str, Any]]] = queue.SimpleQueue()

    def submit(self, report: GateReport, spec: Spec, commit: str, gate_key: str) -> None:
        """Log the gate in the background: the gate's result never waits for the tracking store (the first run of a
        process imports MLflow and may create its store: seconds). `collect` hands the run to the next tick."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gate-runs")

        def work() -> None:
            run = self.record(report, spec, commit, gate_key=gate_key)
            if run is not None:
                self._logged.put((report.release, report.version, gate_key, run))

        try:
            self._pool.submit(work)
        except RuntimeError:  # the controller is stopping (`close` ran): a gate that ends now is not tracked
            log.info("%s: gate of %s not tracked: the controller is stopping; next: nothing (its verdict stands, recorded)",
                     report.release, report.version)

    def collect(self) -> list[tuple[str, str, str, dict[str, Any]]]:
        """(release, version, gate key, run) of each gate logged since the last call (or handed `back`)."""
        out = []
        while not self._logged.empty():
            out.append(self._logged.get())
        return out

    def back(self, item: tuple[str, str, str, dict[str, Any]]) -> None:
        """A logged run whose gate report is not in the state file yet (the tick that records it comes next)."""
        self._logged.put(item)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    def record(self, report: GateReport, spec: Spec, commit: str, *, gate_key: str | None = None,
               tags: dict[str, str] | None = None, strict: bool = False) -> dict[str, Any] | None:
        """Log the gate as a run; `{"id", "experiment_id", "link", "tracker"}`, or None (logged) when the store refused it
        (`strict`: raise its TrackingError instead)."""
        started = time.monotonic()
        record = gate_record(report.release, report.version, commit, spec, report,
                             controller_version=self.controller_version, gate_key=gate_key)
        if tags:
            record.tags.update(tags)
        try:
            logged = self.tracker.log(record, experiment_name(report.release))
        except TrackingError as err:
            if strict:
                raise
            log.warning("%s: gate of %s not tracked (%s); next: the gate's verdict stands, its report is in the state "
                        "file (%.1fs)", report.release, report.version, err, time.monotonic() - started)
            return None
        log.info("%s: gate of %s tracked as %s run %s (%d params, %d metrics, %d artifacts) in %.1fs; next: %s",
                 report.release, report.version, NAMES[self.tracker.kind], logged.run_id, len(record.params), len(record.metrics),
                 len(record.artifacts),
                 time.monotonic() - started, "nothing (the gate's result was not held for it)")
        return {"id": logged.run_id, "experiment_id": logged.experiment_id, "link": logged.link, "tracker": self.tracker.kind}
