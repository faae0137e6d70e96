"""The post-promotion watch: a promoted version judged at 100% while the old one is still warm. Pure.

`rollout.step` starts a watch (`begin`) when a blue/green switch or the last
canary step puts a new version at 100% and the previous version stays warm as
standby, if the release says `rollout.post_promotion`. Once the router
confirms the weights the clock starts: for `post_promotion.duration` the
version's live figures are judged every `analysis.interval` by the same
machinery as a canary (`controller.rollout.analysis`; `post_promotion.analysis`,
else `rollout.analysis`). `failure_limit` failed intervals in a row end the
tick with `Abort`: `rollout.step` moves all traffic back to the standby at once
and holds the version like an aborted canary. Inconclusive intervals (too little
traffic, no data) never roll back. The watch ends (`Promote`) when the duration
passed, when `diffops promote` skips it, or when the standby is gone (nothing
left to roll back to); `diffops abort` rolls back at once. The watch is
recorded in the release's `analysis` (`kind: post-promotion`) with wall-clock
times, so a restarted controller resumes it where it was.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from controller.apply.serve_config import router_weights
from controller.rollout.analysis import WATCH, assess, pinned_requests
from controller.rollout.canary import retire
from controller.rollout.outcomes import Abort, Continue, Desired, Figures, Outcome, Promote, StepResult
from controller.state.records import Command, Event, ObservedApp, ReleaseRecord, VersionRecord, with_phase
from serving.fields import format_duration

__all__ = ["Watch", "begin", "end_stale", "figures_text", "kept_standby", "unpromote", "watched"]


def begin(record: ReleaseRecord, version: str, standby: str, duration_s: float) -> ReleaseRecord:
    """The record with a watch of `version` set up; its clock starts once the router confirms the switch."""
    watch = {"kind": WATCH, "version": version, "standby": standby, "duration_s": duration_s, "started_at": None,
             "ends_at": None, "intervals": {"passed": 0, "failed": 0, "inconclusive": 0}}
    return replace(record, analysis=watch, analysis_at=None, failures=0, step=None, step_started_at=None)


def watched(record: ReleaseRecord | None) -> str | None:
    """The version under a post-promotion watch, if any."""
    watch = (record.analysis if record is not None else None) or {}
    return str(watch["version"]) if watch.get("kind") == WATCH else None


def kept_standby(record: ReleaseRecord | None) -> str | None:
    """The standby a watch may roll back to: it stays warm until the watch ends, whatever scale_down_delay says."""
    watch = (record.analysis if record is not None else None) or {}
    return str(watch["standby"]) if watch.get("kind") == WATCH else None


def figures_text(figures: Figures) -> str:
    """'12 requests, 9 errors, error rate 0.75, p95 0.31s' (+ pinned previews, + PromQL readings)."""
    parts = [f"{int(figures.get('requests', 0))} requests", f"{int(figures.get('errors', 0))} errors"]
    if figures.get("error_rate") is not None:
        parts.append(f"error rate {figures['error_rate']:.2f}")
    if figures.get("p95_latency_s") is not None:
        parts.append(f"p95 {figures['p95_latency_s']:.2f}s")
    if pinned_requests(figures):
        parts.append(f"{pinned_requests(figures)} pinned previews not judged")
    for reading in figures.get("queries") or []:
        value = reading.get("value")
        parts.append(f"{reading.get('name')}={'no data' if value is None else f'{value:.4g}'}")
    return ", ".join(parts)


class Watch:
    """One tick of a post-promotion watch; updates the `StepResult` it is given (`out`), returns an `Outcome`:
    `Continue` (still watching), `Promote` (the watch is over, the version stays), `Abort(reason)` (roll back)."""

    def __init__(self, out: StepResult, stable: VersionRecord, desired: Desired, now: float):
        self.out, self.stable, self.desired, self.now = out, stable, desired, now
        self.analysis = desired.release.spec.rollout.watch_analysis

    @property
    def record(self) -> ReleaseRecord:
        assert self.out.release is not None  # a watch runs for a release that exists
        return self.out.release

    @property
    def watch(self) -> dict[str, Any]:
        return dict(self.record.analysis or {})

    def run(self, router: ObservedApp | None, stats: dict[str, Figures] | None, commands: list[Command]) -> Outcome:
        watch, version = self.watch, self.stable.version
        standby = next((v for v in self.out.versions if v.version == watch.get("standby") and v.role == "standby"), None)
        for command in commands:
            if command.action == "abort":
                return Abort(f"aborted by {command.who} during its post-promotion watch")
            if command.action == "promote":
                return self._end("post-promotion-skipped", f"{command.who} ended the post-promotion watch of {version} early")
        if standby is None or standby.status != "ready":
            return self._end("post-promotion-ended", f"post-promotion watch of {version} ended: standby {watch.get('standby')} "
                                                     "is gone, nothing is left to roll back to")
        if router is None or router.weights != router_weights(self.out.versions):
            live = router.weights if router is not None else None
            self._phase(f"{version}: switching traffic to it (100%); router reports {live if live is not None else 'nothing yet'}")
            return Continue()
        if watch.get("started_at") is None:
            ends = self.now + float(watch["duration_s"])
            self._set(analysis={**watch, "started_at": self.now, "ends_at": ends}, analysis_at=self.now, failures=0)
            self._event("post-promotion-watch", f"{version} serves 100%; watching it for {self._duration()} (analysis every "
                                                f"{format_duration(self.analysis.interval)}, failure_limit "
                                                f"{self.analysis.failure_limit}); next: a failure switches back to warm standby "
                                                f"{standby.version}")
            return self._watching(standby)
        aborted = self._analyse(stats)
        if aborted is not None:
            return aborted
        if self.now >= float(self.watch["ends_at"]):
            counts = self.watch["intervals"]
            return self._end("post-promotion-passed", f"{version} passed its {self._duration()} post-promotion watch "
                                                      f"({counts['passed']} intervals passed, {counts['inconclusive']} "
                                                      f"inconclusive, {counts['failed']} failed); next: standby {standby.version} "
                                                      "is scaled down after scale_down_delay")
        return self._watching(standby)

    def _duration(self) -> str:
        return f"{float(self.watch['duration_s']):g}s"

    def _analyse(self, stats: dict[str, Figures] | None) -> Abort | None:
        """Judge the version once per interval; `Abort` after `failure_limit` failed intervals in a row."""
        started = self.record.analysis_at if self.record.analysis_at is not None else self.now
        if self.now - started < self.analysis.interval.total_seconds():
            return None
        verdict = assess((stats or {}).get(self.stable.version), self.analysis)
        failures = self.record.failures + 1 if verdict.outcome == "failed" else 0 if verdict.outcome == "passed" else self.record.failures
        watch = self.watch
        counts = {**watch["intervals"], verdict.outcome: watch["intervals"][verdict.outcome] + 1}
        self._set(analysis_at=self.now, failures=failures, analysis={
            **watch, "intervals": counts, "at": self.now, "verdict": verdict.outcome, "reasons": list(verdict.reasons),
            "failures": failures, "figures": verdict.figures,
        })
        limit = self.analysis.failure_limit
        if verdict.outcome == "failed":
            self._event("analysis-failed", f"post-promotion analysis {failures}/{limit} failed: {'; '.join(verdict.reasons)} "
                                           f"({figures_text(verdict.figures)})")
        if failures >= limit:
            return Abort(f"post-promotion analysis failed {failures} interval(s) in a row: {'; '.join(verdict.reasons)} "
                         f"({figures_text(verdict.figures)}, {self.now - float(watch['started_at']):.0f}s into its "
                         f"{self._duration()} watch)")
        return None

    def _watching(self, standby: VersionRecord) -> Continue:
        watch = self.watch
        left = max(0.0, float(watch["ends_at"]) - self.now)
        last = watch.get("verdict")
        why = f": {'; '.join(watch['reasons'])}" if watch.get("reasons") else ""
        seen = f"last verdict {last}{why} ({figures_text(watch.get('figures') or {})})" if last else "no interval judged yet"
        self._phase(f"{self.stable.version} serving 100%; post-promotion watch: {left:.0f}s left, {seen}; "
                    f"standby {standby.version} warm for an instant rollback")
        return Continue()

    def _end(self, kind: str, message: str) -> Promote:
        self._event(kind, message)
        last = {key: value for key, value in self.watch.items() if key not in ("started_at", "ends_at")}
        self._set(analysis={**last, "kind": "post-promotion-ended"}, analysis_at=None, failures=0)
        return Promote()

    def _set(self, **changes: Any) -> None:
        self.out.release = replace(self.record, **changes)

    def _event(self, kind: str, message: str) -> None:
        self.out.events.append(Event(self.stable.release, kind, message, self.stable.version, self.desired.commit))

    def _phase(self, message: str) -> None:
        self.out.release = with_phase(self.record, "Progressing", message, self.now)


def unpromote(out: StepResult, failed: VersionRecord, reason: str, desired: Desired, now: float) -> StepResult:
    """A failed post-promotion watch: all traffic back to the warm standby at once; the version retires and is held."""
    assert out.release is not None
    standby = kept_standby(out.release)
    out.versions = [replace(retire(v, now), role="canary") if v.version == failed.version
                    else replace(v, role="stable", weight=100, standby_since=None) if v.version == standby else v
                    for v in out.versions]
    message = (f"{failed.version} rolled back after promotion: {reason}; {standby} (the warm standby) serves 100% again, "
               f"no reload; git still asks for {failed.version}: revert the commit "
               f"(it is held until a new commit or `diffops retry {failed.release}`)")
    watch = {**(out.release.analysis or {}), "kind": "post-promotion-ended", "rolled_back": True}
    out.release = replace(out.release, failed_version=failed.version, held_fingerprint=desired.fingerprint, analysis=watch,
                          analysis_at=None, failures=0)
    out.release = with_phase(out.release, "Degraded", message, now)
    out.events.append(Event(failed.release, "aborted", message, failed.version, desired.commit))
    return out


def end_stale(out: StepResult, stable: VersionRecord | None, target: str, desired: Desired) -> None:
    """Git moved on (or the watched version stopped serving) during a watch: the watch ends, its standby is no longer kept."""
    assert out.release is not None
    version = watched(out.release)
    if version is None or (stable is not None and stable.version == version == target):
        return
    out.release = replace(out.release, analysis={**(out.release.analysis or {}), "kind": "post-promotion-ended"}, analysis_at=None,
                          failures=0)
    why = f"git now asks for {target}" if target != version else f"{version} no longer serves"
    out.events.append(Event(out.release.name, "post-promotion-ended", f"post-promotion watch of {version} ended: {why}", version,
                            desired.commit))
