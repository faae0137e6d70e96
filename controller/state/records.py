"""The controller's small fixed-schema records: recorded state, observed state, events.

Plain frozen dataclasses shared by the pure steps (`controller.rollout.steps`,
`controller.apply.serve_config`) and the I/O shells (`controller.state.store`,
`controller.apply.serve_client`). Times are wall-clock epoch seconds so a restarted
controller resumes deadlines and delays where they were. A recorded spec is the
release's validated, frozen `Spec`, read by attribute, never a dict.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from controller.parse.release import Spec

__all__ = ["Command", "Event", "ObservedApp", "Phase", "ReleaseRecord", "Role", "Status", "VersionRecord", "app_name", "with_phase"]

Phase = Literal["Healthy", "Progressing", "Paused", "Degraded", "Failed", "Invalid"]
Role = Literal["stable", "canary", "standby"]
Status = Literal["preparing", "verified", "starting", "ready", "retiring"]


def app_name(release: str, version: str) -> str:
    return f"{release}--{version}"


@dataclass(frozen=True)
class VersionRecord:
    """A live version of a release: its own Serve app, kept while it is stable, canary or standby."""

    release: str
    version: str
    role: Role
    weight: int
    status: Status
    commit: str  # the commit this version was first rolled out from
    spec: Spec  # the validated release spec at that commit (model, generation, resources); frozen
    created_at: float
    ready_at: float | None = None
    standby_since: float | None = None
    deployed_args: dict[str, Any] | None = None  # app args taken over from a running app (adopted), else rendered
    gate_key: str | None = None  # the checks (config + golden reference) this version passed
    retire_at: float | None = None  # an aborted canary's app is deleted then, once in-flight requests drained
    replicas: int | None = None  # replicas running when not spec.replicas.count (surge-limited rollouts)

    @property
    def app(self) -> str:
        return app_name(self.release, self.version)


@dataclass(frozen=True)
class ReleaseRecord:
    name: str
    phase: Phase
    message: str
    desired_commit: str | None
    desired_version: str | None
    spec: Spec | None  # the last valid release spec (what serving follows while the file is invalid)
    updated_at: float
    failed_version: str | None = None  # not retried until the release file or its checks change, or `diffops retry`
    held_fingerprint: str | None = None  # the desired fingerprint it failed under
    load_seconds: float | None = None  # measured start-to-ready time of the last version that came up
    step: int | None = None  # canary: index of the current step in rollout.steps
    step_started_at: float | None = None  # wall clock: a restarted controller resumes a pause at its deadline
    analysis_at: float | None = None  # start of the current analysis interval
    failures: int = 0  # consecutive failed analysis intervals
    analysis: dict[str, Any] | None = None  # the latest analysis figures per version, with the verdict


@dataclass(frozen=True)
class Command:
    """A manual instruction from `diffops promote|abort|retry`, consumed by the next tick."""

    release: str
    action: Literal["promote", "abort", "retry"]
    who: str
    at: float
    full: bool = False
    id: int = 0


def with_phase(record: ReleaseRecord, phase: Phase, message: str, now: float) -> ReleaseRecord:
    """The record in this phase with this message; `updated_at` moves only when either changes."""
    if record.phase == phase and record.message == message:
        return record
    return replace(record, phase=phase, message=message, updated_at=now)


@dataclass(frozen=True)
class Event:
    release: str
    kind: str
    message: str
    version: str | None = None
    commit: str | None = None
    at: float = 0.0


@dataclass(frozen=True)
class ObservedApp:
    """What Ray Serve reports for one application."""

    name: str
    status: str  # NOT_STARTED, DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING
    message: str = ""
    running: int = 0
    target: int = 0
    replica_ids: tuple[str, ...] = field(default_factory=tuple)
    nodes: tuple[str, ...] = field(default_factory=tuple)  # the node address of each running replica, sorted
    user_config: dict[str, Any] | None = None
    args: dict[str, Any] | None = None
    weights: dict[str, int] | None = None  # a router's live weights, as it answers them itself
    config: dict[str, Any] | None = None  # `deployed_app_config`: the app config as submitted (owner mark, drift)

    @property
    def ready(self) -> bool:
        return self.status == "RUNNING" and self.target > 0 and self.running >= self.target

    @property
    def failed(self) -> bool:
        return self.status in ("DEPLOY_FAILED", "UNHEALTHY")
