"""What a rollout step takes and gives back. Pure data.

The reconciler builds a `Desired` per valid release and hands finished model
preparations back as `Prepared`; `controller.rollout.steps.step` returns a
`StepResult` (the next recorded state, the decisions as events, the versions to
prepare). Inside a step, the canary walk (`controller.rollout.canary`) and the
surge-limited rollout (`controller.rollout.surge`) end each tick with an
`Outcome`: keep going (`Continue`), make the new version stable (`Promote`), or
send all traffic back (`Abort`, with the reason shown to people). An analysis
interval's judgement is an `AnalysisVerdict` on a version's `Figures`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from controller.parse.release import Release
from controller.state.records import Event, ReleaseRecord, VersionRecord

__all__ = ["Abort", "AnalysisVerdict", "Continue", "Desired", "Figures", "Outcome", "Prepared", "Promote", "StepResult"]

Figures = dict[str, Any]  # one version's figures as the router reports them (JSON): requests, errors, p95_latency_s, pinned;
# with analysis.provider prometheus also `queries`: [{name, query, value, error}] as read for the interval


@dataclass(frozen=True)
class AnalysisVerdict:
    """One analysis interval's judgement of a version's figures."""

    outcome: Literal["passed", "failed", "inconclusive"]
    reasons: tuple[str, ...]
    figures: Figures


@dataclass(frozen=True)
class Desired:
    """What git asks for one release at a commit."""

    release: Release
    version: str
    commit: str
    fingerprint: str  # changes when the release file or its checks' inputs change
    gate_key: str  # the checks a version must pass: their config and the golden reference


@dataclass(frozen=True)
class Prepared:
    """A finished preparation: model fetched and verified, then the gate run (or its passing result reused)."""

    ok: bool
    message: str
    seconds: float
    report: dict[str, Any] | None = None


@dataclass
class StepResult:
    """One release's step: its next record, its versions, what was decided (events) and what to prepare."""

    release: ReleaseRecord | None  # None: the release is gone
    versions: list[VersionRecord]
    events: list[Event] = field(default_factory=list)
    prepare: list[VersionRecord] = field(default_factory=list)  # versions to prepare + gate against the desired gate key


@dataclass(frozen=True)
class Continue:
    """The walk or surge is not finished; the next tick goes on."""


@dataclass(frozen=True)
class Promote:
    """The new version completed its last step: it becomes stable."""


@dataclass(frozen=True)
class Abort:
    """The canary is rolled back: all traffic to stable at once."""

    reason: str  # for the phase message and the `aborted` event


Outcome = Continue | Promote | Abort
