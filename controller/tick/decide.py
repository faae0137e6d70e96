"""Decide: what one tick observed in, one plan of actions out. Pure.

The second phase of a reconcile (`controller.tick`). `StepInput` is everything
one release's step reads, observed before anything is decided; `decide` runs
each release's rollout step (`controller.rollout.steps.step`, or `removed` /
`invalid` for a file that is gone or does not validate) in name order and
gathers the `Plan`: the next recorded state, the decisions as events, the
preparations to start, commands for no release, and what to log, in order.

A release whose step raises takes the phase and message the error taxonomy maps
the error to (`controller.errors.release_outcome`, asked here and nowhere else);
the other releases go on. An error that ends the tick (temporary trouble
outside us) stops the plan: `Halt`, with what was noted until then.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pydantic import ValidationError

from controller import errors
from controller.rollout import steps as rollout
from controller.rollout.canary import Figures
from controller.rollout.capacity import Resources
from controller.rollout.outcomes import Desired, Prepared, StepResult
from controller.source.git_source import ReleaseFile
from controller.state.records import Command, Event, ObservedApp, ReleaseRecord, VersionRecord, app_name, with_phase
from controller.state.store import ControllerRecord, State
from serving.schema import ModelSpec

__all__ = ["Adopted", "Failed", "Halt", "Note", "Plan", "Policy", "StepInput", "Stepped", "TickInput", "adopt", "decide", "step"]


@dataclass(frozen=True)
class Policy:
    """The controller flags every step obeys."""

    allow_prune_all: bool = False  # --allow-prune-all: a commit removing every release file deletes them all
    allow_faults: bool = False  # --allow-fault-injection: a release's spec.faults is accepted


@dataclass(frozen=True)
class StepInput:
    """Everything one release's step reads, observed before anything is decided."""

    name: str
    now: float  # wall clock of the tick
    head: str  # the commit reconciled
    file: ReleaseFile | None  # None: the release file is gone
    record: ReleaseRecord | None  # None: never recorded
    versions: tuple[VersionRecord, ...]  # its recorded versions
    observed: dict[str, ObservedApp]  # our apps as Ray Serve reports them, routers with their live weights (shared)
    policy: Policy = Policy()
    desired_version: str | None = None  # the version id of a valid file
    every_file_gone: bool = False  # the commit removes every release file
    commands: tuple[Command, ...] = ()  # pending `diffops promote|abort|retry` for it
    free: Resources | None = None  # free cluster resources; None: not asked (nothing must start) or unknown
    held_by: str | None = None  # another owner holds one of its application names: the refusal
    gate_key: str | None = None  # the checks its versions must pass (valid files)
    prepared: dict[str, Prepared] = field(default_factory=dict)  # version -> preparation finished since the last tick
    stats: dict[str, Figures] | None = None  # its router's figures per version (a canary under analysis)
    unobserved: Exception | None = None  # reading what its step needs failed: the step fails with it


@dataclass(frozen=True)
class TickInput:
    """One tick's observations: every release's step input and what the whole plan needs."""

    head: str
    now: float
    controller: ControllerRecord  # as recorded before this tick
    releases: tuple[StepInput, ...]  # in name order
    apps: dict[str, ObservedApp]  # our apps as observed, recorded for `diffops status`
    commands: tuple[Command, ...] = ()  # every pending manual command, consumed by this tick


@dataclass(frozen=True)
class Adopted:
    """No record of the release, and Ray Serve already runs its desired version: taken over as it runs."""

    release: str
    app: str
    running: int


@dataclass(frozen=True)
class Stepped:
    """The release's step ran (a failure reported for it before is over)."""

    release: str


@dataclass(frozen=True)
class Failed:
    """The release's step failed: report it (its traceback too when unexpected)."""

    release: str
    message: str
    error: Exception
    traceback: bool


Note = Adopted | Stepped | Failed


@dataclass(frozen=True)
class Plan:
    """What the tick does next, in the order the phases do it."""

    state: State  # the next recorded state
    events: tuple[Event, ...]  # the decisions, stamped with the commit and the tick's time
    prepare: tuple[tuple[VersionRecord, Desired], ...]  # versions whose model to fetch, verify and gate
    ignored: tuple[Command, ...]  # commands for no such release
    notes: tuple[Note, ...]  # per release, in order: what to log
    busy: bool  # some rollout is in progress: tick again soon


@dataclass(frozen=True)
class Halt:
    """A release's step raised an error that ends the whole tick (nothing is recorded or applied)."""

    notes: tuple[Note, ...]
    error: Exception


def decide(tick: TickInput) -> Plan | Halt:
    """Every release's next step, and the tick's next recorded state."""
    notes: list[Note] = []
    releases: dict[str, ReleaseRecord] = {}
    versions: list[VersionRecord] = []
    events: list[Event] = []
    prepare: list[tuple[VersionRecord, Desired]] = []
    for inp in tick.releases:
        desired: Desired | None = None
        try:
            result, desired = step(inp, notes)
            notes.append(Stepped(inp.name))
        except Exception as err:  # a failing release never blocks another
            failed = _failed(inp, err, notes)
            if failed is None:
                return Halt(tuple(notes), err)
            result = failed
        if result.release is not None:
            releases[inp.name] = result.release
        versions += result.versions
        events += [replace(e, commit=e.commit or tick.head, at=tick.now) for e in result.events]
        prepare += [(version, desired) for version in result.prepare if desired is not None]
    controller = replace(tick.controller, last_attempted_commit=tick.head, attempted_at=tick.now)
    if all(r.phase == "Healthy" for r in releases.values()) and controller.last_applied_commit != tick.head:
        controller = replace(controller, last_applied_commit=tick.head, applied_at=tick.now)
    return Plan(
        state=State(controller, releases, versions, tick.apps),
        events=tuple(events),
        prepare=tuple(prepare),
        ignored=tuple(c for c in tick.commands if c.release not in releases),
        notes=tuple(notes),
        busy=any(r.phase == "Progressing" or r.step is not None for r in releases.values()),
    )


def step(inp: StepInput, notes: list[Note]) -> tuple[StepResult, Desired | None]:
    """One release's step, and what git desires of it (valid files only). Raises what the step raises."""
    if inp.unobserved is not None:
        raise inp.unobserved
    if inp.held_by is not None:
        raise errors.ReleaseError(inp.held_by, "Failed")
    name, file, record, now = inp.name, inp.file, inp.record, inp.now
    if file is None:
        assert record is not None  # a name is either recorded or a file
        allowed = inp.policy.allow_prune_all or not inp.every_file_gone
        return rollout.removed(record, list(inp.versions), allowed=allowed, now=now), None
    if file.release is None:
        return rollout.invalid(record, name, [str(e) for e in file.errors], list(inp.versions), now), None
    if file.release.spec.faults is not None and not inp.policy.allow_faults:
        refusal = f"{file.path}: spec.faults is refused: fault injection needs the controller flag --allow-fault-injection"
        return rollout.invalid(record, name, [refusal], list(inp.versions), now), None
    assert inp.gate_key is not None and inp.desired_version is not None  # observed for every valid file
    desired = Desired(file.release, inp.desired_version, inp.head, f"{file.blob}:{inp.gate_key}", inp.gate_key)
    versions = list(inp.versions)
    if record is None and not versions:
        versions, adopted = adopt(desired, inp.observed, now)
        notes += [adopted] if adopted is not None else []
    result = rollout.step(name, now, desired, record, versions, inp.observed, inp.prepared, inp.stats, list(inp.commands), inp.free)
    return result, desired


def adopt(desired: Desired, observed: dict[str, ObservedApp], now: float) -> tuple[list[VersionRecord], Adopted | None]:
    """With no record of a release, take over its desired version if Ray Serve already runs it. It is adopted under
    the checks git has now (`gate_key`), as if it had passed them: a later change of the checks gates it again."""
    app = observed.get(app_name(desired.release.name, desired.version))
    if app is None or not app.ready or not app.args:
        return [], None
    try:  # the app's args are what Ray answers: adopted only when they name a valid model and a commit
        model, commit = ModelSpec.model_validate(app.args.get("model")), app.args["commit"]
    except (ValidationError, KeyError):
        return [], None
    if not isinstance(commit, str):
        return [], None
    spec = desired.release.spec.model_copy(update={"model": model})
    version = VersionRecord(desired.release.name, desired.version, "stable", 100, "ready", commit, spec, now,
                            ready_at=now, deployed_args=app.args, gate_key=desired.gate_key)
    return [version], Adopted(desired.release.name, app.name, app.running)


def _failed(inp: StepInput, err: Exception, notes: list[Note]) -> StepResult | None:
    """The one place a release's error becomes its phase and message; its versions (what serves) are kept.
    None: the error ends the tick."""
    record, versions = inp.record, list(inp.versions)
    serving = any(v.weight > 0 and v.status == "ready" for v in versions)
    outcome = errors.release_outcome(err, serving)
    if outcome.end_tick:
        return None
    if outcome.phase is None:
        return StepResult(record, versions)
    if outcome.traceback or record is None or record.message != outcome.message:
        notes.append(Failed(inp.name, outcome.message, err, outcome.traceback))
    base = record or ReleaseRecord(inp.name, outcome.phase, outcome.message, None, None, None, inp.now)
    return StepResult(with_phase(base, outcome.phase, outcome.message, inp.now), versions)
