"""A version's quality in serving, on its gate's tracking run: what users and reviewers said, what the scorer measured.

Run by the reconciler after each tick (`QualityLog.tick`), at most every `interval_s`: for each version whose gate was
tracked (its gate report in the state file names the run) and whose feedback or samples changed since they were last
logged, the per-version summary (`controller.quality.summarize`) is logged on that run as `live.*` metrics, stepped by
the time, in a thread of its own (never on the reconcile loop). MLflow then charts a version's ratings, flag rate,
CLIP score and NSFW rate as they come in, beside the gate figures it was released on. A tracking store that cannot be
reached is said once and tried again at the next interval.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from controller.quality import summarize
from controller.state.feedback import feedback_rows
from controller.state.samples import sample_rows
from controller.state.store import Store
from controller.tracking.mlflow_store import Tracker, TrackingError

__all__ = ["DEFAULT_INTERVAL_S", "QualityLog", "live_metrics"]

log = logging.getLogger("diffops.controller")
DEFAULT_INTERVAL_S = 300.0
Key = tuple[str, str]  # (release, version)


def live_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """A version's quality summary as metrics; a figure with nothing behind it yet (no rating, no score) is left out."""
    feedback = int(summary["feedback"])
    metrics = {"live.feedback": float(feedback), "live.reviews": float(summary["reviews"]),
               "live.ratings": float(summary["ratings"]["count"]), "live.flagged": float(summary["flagged"]),
               "live.samples": float(summary["samples"]["count"])}
    if feedback:
        metrics["live.flag_rate"] = round(summary["flagged"] / feedback, 4)
    for name, value in (("live.mean_rating", summary["ratings"]["mean"]), ("live.mean_clip_score", summary["clip_score"]["mean"]),
                        ("live.nsfw_rate", summary["nsfw"]["rate"])):
        if value is not None:
            metrics[name] = float(value)
    return metrics


class QualityLog:
    """Logs changed per-version quality onto the versions' gate runs, one batch at a time, off the loop."""

    def __init__(self, tracker: Tracker, interval_s: float = DEFAULT_INTERVAL_S):
        self.tracker, self.interval_s = tracker, interval_s
        self.logged: dict[Key, dict[str, float]] = {}  # what each run holds now (read and written by the one worker)
        self._due = 0.0
        self._running: Future[None] | None = None
        self._failing = False
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quality-log")

    def tick(self, store: Store, now: float) -> None:
        """When due and the last batch is done: gather what changed (a read of the state file) and log it in the background."""
        if now < self._due or (self._running is not None and not self._running.done()):
            return
        self._due = now + self.interval_s
        runs = {key: report["run"]["id"] for key, report in store.gate_reports().items()
                if report.get("run") and report["run"].get("tracker", "mlflow") == "mlflow"}  # W&B, Neptune runs: not reopened
        batch = []
        for release in sorted({release for release, _ in runs}):
            for summary in summarize(feedback_rows(store.db, release), sample_rows(store.db, release)):
                key = (release, summary["version"])
                metrics = live_metrics(summary)
                if key in runs and metrics != self.logged.get(key):
                    batch.append((key, runs[key], metrics))
        if batch:
            self._running = self._pool.submit(self._log, batch, now)

    def _log(self, batch: list[tuple[Key, str, dict[str, float]]], now: float) -> None:
        started = time.monotonic()
        for key, run_id, metrics in batch:
            try:
                self.tracker.log_metrics(run_id, metrics, step=int(now))
            except TrackingError as err:
                if not self._failing:
                    log.warning("%s: live quality of %s not tracked (%s); next: try again in %.0fs", key[0], key[1], err, self.interval_s)
                self._failing = True
                return
            self.logged[key] = metrics
        if self._failing:
            log.info("tracking: live quality logged again; next: every %.0fs", self.interval_s)
        self._failing = False
        log.debug("tracking: live quality of %d version(s) logged in %.1fs", len(batch), time.monotonic() - started)

    def flush(self, timeout_s: float) -> None:
        """Wait for the batch in flight, if any (shutdown, tests)."""
        if self._running is not None:
            self._running.result(timeout=timeout_s)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
