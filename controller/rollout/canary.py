"""The canary walk and its analysis, one tick at a time. Pure.

`rollout.step` hands a ready canary here. Each `rollout.steps` entry sets the
router weights (`{weight: N}`) or holds (`{pause: 30s}`, or `{pause:}` until
`diffops promote`); a step moves on only once the router reports the weights.
Every `analysis.interval` the canary's live figures since the interval began
(error rate, p95 latency, from the router; or the release's PromQL queries with
`analysis.provider: prometheus`) are judged (`controller.rollout.analysis`). Only requests the router
assigned by weight are judged; pinned previews (`X-Diffops-Version`) are
recorded beside them and never count. Fewer than `min_requests` judged requests
is inconclusive; `failure_limit` failed intervals in a row abort the rollout.
A step that gives the canary traffic completes only after an interval of its
own passed (the analysis records `step` and `step_passed`), unless the release
says `on_no_traffic: promote`; otherwise it waits, and aborts at
`progress_deadline` saying there was not enough traffic. The step index and its
wall-clock start are recorded, so a restarted controller resumes a pause at its
original deadline.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from controller.apply.serve_config import router_weights
from controller.parse.release import Step
from controller.rollout.analysis import assess, judge, pinned_requests
from controller.rollout.outcomes import Abort, AnalysisVerdict, Continue, Desired, Figures, Outcome, Promote, StepResult
from controller.state.records import Command, Event, ObservedApp, Phase, ReleaseRecord, VersionRecord, with_phase

__all__ = ["RETIRE_DELAY_S", "AnalysisVerdict", "Figures", "Walk", "describe", "judge", "pinned_requests", "retire"]

RETIRE_DELAY_S = 10.0  # an aborted canary's app lives this long at weight 0, so in-flight requests finish


def describe(step: Step, index: int, total: int) -> str:
    """`step 2/4: weight 50%`, `step 3/4: pause 30s`, `step 3/4: pause until promoted`."""
    if not step.is_pause:
        return f"step {index + 1}/{total}: weight {step.weight}%"
    return f"step {index + 1}/{total}: pause {'until promoted' if step.pause is None else f'{step.pause.total_seconds():.0f}s'}"


class Walk:
    """One tick of a canary walk; updates the `StepResult` it is given (`out`), returns an `Outcome`."""

    def __init__(self, out: StepResult, canary: VersionRecord, stable: VersionRecord, desired: Desired, now: float):
        self.out, self.canary, self.stable, self.desired, self.now = out, canary, stable, desired, now
        self.rollout = desired.release.spec.rollout
        self.steps = self.rollout.steps

    @property
    def record(self) -> ReleaseRecord:
        assert self.out.release is not None  # a walk runs for a release that exists
        return self.out.release

    @property
    def index(self) -> int:
        """The current step's index (the walk enters step 0 before anything reads it)."""
        assert self.record.step is not None
        return self.record.step

    @property
    def step_started_at(self) -> float:
        assert self.record.step_started_at is not None  # set whenever a step is entered
        return self.record.step_started_at

    def run(self, router: ObservedApp | None, stats: dict[str, Figures] | None, commands: list[Command]) -> Outcome:
        """Advance the walk: `Promote` once the last step is done, `Abort(reason)`, else `Continue`."""
        if self.record.step is None:
            self._set_record(analysis_at=self.now, failures=0, analysis=None)
            self._enter(0)
        for command in commands:
            outcome = self._command(command)
            if not isinstance(outcome, Continue):
                return outcome
        aborted = self._analyse(stats)
        if aborted is not None:
            return aborted
        confirmed = router is not None and router.weights == router_weights(self.out.versions)
        index, step = self.index, self.steps[self.index]
        where = describe(step, index, len(self.steps))
        if not confirmed:
            self._phase("Progressing", f"{where}: waiting for the router to take the weights")
            return Continue()
        if not step.is_pause:
            held = self._unjudged(index, self.step_started_at)
            if held is not None:
                return held
            if index == len(self.steps) - 1:
                return Promote()
            self._enter(index + 1)
            return Continue()
        if step.pause is None:
            self._phase("Paused", f"{where}; canary {self.canary.version} at {self.canary.weight}%; "
                                  f"`diffops promote {self.canary.release}` to go on")
            return Continue()
        remaining = self.step_started_at + step.pause.total_seconds() - self.now
        if remaining <= 0:
            held = self._unjudged(index, self.step_started_at + step.pause.total_seconds())
            if held is not None:
                return held
            self._enter(index + 1)
        else:
            self._phase("Progressing", f"{where}: {remaining:.0f}s left; canary {self.canary.version} at {self.canary.weight}%")
        return Continue()

    def _set_record(self, **changes: Any) -> None:
        self.out.release = replace(self.record, **changes)

    def _event(self, kind: str, message: str) -> None:
        self.out.events.append(Event(self.canary.release, kind, message, self.canary.version, self.desired.commit))

    def _set_weight(self, weight: int) -> None:
        self.canary = replace(self.canary, weight=weight)
        self.stable = replace(self.stable, weight=100 - weight)
        self.out.versions = [self.canary if v.version == self.canary.version else self.stable if v.version == self.stable.version else v
                             for v in self.out.versions]

    def _enter(self, index: int) -> None:
        self._set_record(step=index, step_started_at=self.now, analysis_at=self.now)  # intervals start with the step
        step = self.steps[index]
        if not step.is_pause:
            self._set_weight(step.weight or 0)
        self._event("step", f"{describe(step, index, len(self.steps))} ({self.canary.version} canary, {self.stable.version} stable)")

    def _command(self, command: Command) -> Outcome:
        if command.action == "abort":
            return Abort(f"aborted by {command.who}")
        if command.action != "promote":
            return Continue()
        index = self.index
        if command.full:
            self._event("promoted-manually", f"{command.who} promoted {self.canary.version} to the end of its steps, unjudged")
            self._set_weight(100)
            last = len(self.steps) - 1
            waived = {"at": self.now, "verdict": "waived", "reasons": [f"promoted by {command.who}"], "failures": 0,
                      "canary": {}, "stable": {}, "step": last, "step_passed": True}
            self._set_record(step=last, step_started_at=self.now, analysis_at=self.now, failures=0, analysis=waived)
            return Continue()
        if self.steps[index].is_pause and index + 1 < len(self.steps):
            self._event("promoted-manually", f"{command.who} ended the pause at {describe(self.steps[index], index, len(self.steps))}")
            self._enter(index + 1)
        return Continue()

    def _analyse(self, stats: dict[str, Figures] | None) -> Abort | None:
        """Judge the canary once per interval; an abort after `failure_limit` failures in a row."""
        analysis = self.rollout.analysis
        started = self.record.analysis_at or self.now
        if self.canary.weight == 0 or self.now - started < analysis.interval.total_seconds():
            return None
        verdict = assess((stats or {}).get(self.canary.version), analysis)
        failures = self.record.failures + 1 if verdict.outcome == "failed" else 0 if verdict.outcome == "passed" else self.record.failures
        prior = self.record.analysis or {}
        passed_before = prior.get("step") == self.record.step and bool(prior.get("step_passed"))
        self._set_record(analysis_at=self.now, failures=failures, analysis={
            "at": self.now, "verdict": verdict.outcome, "reasons": list(verdict.reasons), "failures": failures,
            "canary": verdict.figures, "stable": (stats or {}).get(self.stable.version, {}),
            "step": self.record.step, "step_passed": passed_before or verdict.outcome == "passed",
        })
        if verdict.outcome == "failed":
            self._event("analysis-failed", f"analysis {failures}/{analysis.failure_limit} failed: {'; '.join(verdict.reasons)}")
        if failures >= analysis.failure_limit:
            return Abort(f"analysis failed {failures} intervals in a row: {'; '.join(verdict.reasons)}")
        return None

    def _unjudged(self, index: int, due_at: float) -> Continue | Abort | None:
        """None when step `index` (due to complete at `due_at`) may complete; else `Continue` (hold) or a
        not-enough-traffic `Abort`.

        A step that gives the canary no traffic, or had an interval of its own
        pass (and not fail since), completes. Otherwise `on_no_traffic: promote`
        lets it complete unjudged (an event says so); `wait` holds it until
        `progress_deadline` after it was due, then aborts naming the figures.
        """
        analysis, last = self.rollout.analysis, self.record.analysis or {}
        mine = last.get("step") == index
        if self.canary.weight == 0 or (mine and last.get("step_passed") and last.get("verdict") != "failed"):
            return None
        figures = last.get("canary", {}) if mine else {}
        judged, pinned = int(figures.get("requests", 0)), pinned_requests(figures)
        seen = f"last interval: {judged} judged requests, {pinned} pinned previews (not counted)" if mine else "no interval judged yet"
        where = describe(self.steps[index], index, len(self.steps))
        if analysis.on_no_traffic == "promote":
            self._event("unjudged", f"{where} completes without a passing analysis ({seen}; min_requests {analysis.min_requests}); "
                                    "on_no_traffic: promote")
            return None
        waited, deadline = self.now - due_at, self.rollout.progress_deadline.total_seconds()
        interval = f"{analysis.interval.total_seconds():g}s"
        if waited > deadline:
            return Abort(f"not enough traffic to judge the canary: no {interval} interval of {where} reached min_requests "
                         f"{analysis.min_requests} judged requests within progress_deadline {deadline:.0f}s ({seen}); "
                         "send traffic through the router without X-Diffops-Version, lower analysis.min_requests, "
                         "or set analysis.on_no_traffic: promote")
        self._phase("Progressing", f"{where}: waiting for enough traffic to judge: min_requests {analysis.min_requests} judged "
                                   f"requests in one {interval} interval ({seen}); aborts in {deadline - waited:.0f}s (progress_deadline)")
        return Continue()

    def _phase(self, phase: Phase, message: str) -> None:
        self.out.release = with_phase(self.record, phase, message, self.now)


def retire(canary: VersionRecord, now: float) -> VersionRecord:
    """An aborted canary: no traffic now, its app deleted once in-flight requests are done."""
    return replace(canary, weight=0, status="retiring", retire_at=now + RETIRE_DELAY_S)
