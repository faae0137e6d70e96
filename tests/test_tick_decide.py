"""The decide phase as tables: one release's observed input -> its next record, versions, events and notes. Pure.

Inputs are built the way the observe phase builds them (real parsed releases,
real version ids); the rollout step itself is tested in tests/test_rollout.py.
"""

from __future__ import annotations

import pytest

from controller.apply.serve_client import ServeError
from controller.errors import ReleaseError, WaitingError
from controller.parse.loader import ReleaseError as FileError
from controller.plan.versions import version_id
from controller.source.git_source import ReleaseFile
from controller.state.records import Command, ObservedApp, ReleaseRecord, VersionRecord
from controller.state.store import ControllerRecord
from controller.tick.decide import Adopted, Failed, Halt, Plan, Policy, StepInput, Stepped, TickInput, decide
from tests.conftest import make_release

NOW, HEAD = 1_000_000.0, "c" * 40
DEMO = make_release()
V1 = version_id(DEMO)
SPEC = DEMO.spec
FAULTY = make_release(("  cost:\n", "  faults:\n    error_rate: 0.5\n  cost:\n"))


def valid(release=DEMO) -> ReleaseFile:
    return ReleaseFile(f"releases/{release.name}.yaml", "blob-1", release)


def serving(name: str = "demo") -> VersionRecord:
    return VersionRecord(name, V1, "stable", 100, "ready", "c1", SPEC, NOW - 3600, ready_at=NOW - 3600)


def recorded(name: str = "demo", phase="Healthy", message=f"{V1} serving 100%") -> ReleaseRecord:
    return ReleaseRecord(name, phase, message, "c1", V1, SPEC, NOW - 3600)


def running(version: str = V1) -> dict[str, ObservedApp]:
    app = ObservedApp(f"demo--{version}", "RUNNING", "", 1, 1, args={"model": SPEC.model.model_dump(mode="json"), "commit": "c0"})
    return {app.name: app, "demo": ObservedApp("demo", "RUNNING", "", 1, 1, weights={version: 100})}


def one(name="demo", file: ReleaseFile | None = None, record=None, versions=(), observed=None, **kw) -> StepInput:
    if file is not None and file.release is not None:
        kw.setdefault("desired_version", version_id(file.release))
        kw.setdefault("gate_key", "g1")
    return StepInput(name, NOW, HEAD, file, record, tuple(versions), observed or {}, **kw)


def plan_of(*releases: StepInput, commands=(), controller: ControllerRecord | None = None) -> Plan:
    plan = decide(TickInput(HEAD, NOW, controller or ControllerRecord(), releases, {}, tuple(commands)))
    assert isinstance(plan, Plan)
    return plan


REFUSAL = "Ray Serve application 'demo' belongs to controller 'ctl-b'; ..."
INVALID = ReleaseFile("releases/demo.yaml", "blob-2", None, (FileError("releases/demo.yaml", 7, 3, "unknown field", "spec.modle"),))

# (case, input) -> (phase, message contains, event kinds, versions kept)
SITUATIONS = [
    ("held by another owner", one(file=valid(), held_by=REFUSAL), ("Failed", REFUSAL, [], [])),
    ("held, while serving", one(file=valid(), held_by=REFUSAL, record=recorded(), versions=[serving()]),
     ("Failed", REFUSAL, [], [V1])),
    ("file does not validate", one(file=INVALID, record=recorded(), versions=[serving()]),
     ("Invalid", f"releases/demo.yaml:7:3: spec.modle: unknown field; {V1} keeps serving", ["invalid"], [V1])),
    ("faults without the flag", one(file=valid(FAULTY)),
     ("Invalid", "spec.faults is refused: fault injection needs the controller flag --allow-fault-injection", ["invalid"], [])),
    ("file removed, others remain", one(record=recorded(), versions=[serving()]), (None, "", ["pruned"], [])),
    ("every file removed", one(record=recorded(), versions=[serving()], every_file_gone=True),
     ("Healthy", "pruning all needs --allow-prune-all; still serving", [], [V1])),
    ("every file removed, allowed", one(record=recorded(), versions=[serving()], every_file_gone=True, policy=Policy(allow_prune_all=True)),
     (None, "", ["pruned"], [])),
    ("a new release", one(file=valid()), ("Progressing", "verifying the model and running checks", ["rollout-started"], [V1])),
    ("serving what git asks", one(file=valid(), record=recorded(), versions=[serving()], observed=running()),
     ("Healthy", f"{V1} serving 100%", [], [V1])),
    ("git reference unreadable", one(file=valid(), unobserved=KeyError("golden")),
     ("Failed", "reconcile step failed: KeyError: 'golden'; nothing is serving", [], [])),
    ("router stats unreadable while serving", one(file=valid(), record=recorded(), versions=[serving()], unobserved=ValueError("bad json")),
     ("Degraded", "reconcile step failed: ValueError: bad json; what serves is unchanged", [], [V1])),
    ("a release error", one(file=valid(), unobserved=ReleaseError("model refused", "Failed")), ("Failed", "model refused", [], [])),
]


@pytest.mark.parametrize(("case", "inp", "expected"), SITUATIONS, ids=[s[0] for s in SITUATIONS])
def test_one_release_situations(case, inp, expected):
    phase, message, kinds, kept = expected
    plan = plan_of(inp)
    release = plan.state.releases.get("demo")
    assert (release.phase if release else None) == phase
    assert message in (release.message if release else "")
    assert [e.kind for e in plan.events] == kinds
    assert [v.version for v in plan.state.versions] == kept


def test_a_new_release_asks_for_its_preparation_against_its_gate_key():
    plan = plan_of(one(file=valid()))
    [(version, desired)] = plan.prepare
    assert (version.version, version.status) == (V1, "preparing")
    assert (desired.version, desired.commit, desired.gate_key, desired.fingerprint) == (V1, HEAD, "g1", "blob-1:g1")
    assert plan.busy


def test_events_are_stamped_with_the_commit_and_the_ticks_time():
    [event] = plan_of(one(file=valid())).events
    assert (event.commit, event.at) == (HEAD, NOW)


def test_a_running_app_with_no_record_is_adopted_not_redeployed():
    plan = plan_of(one(file=valid(), observed=running()))
    [version] = plan.state.versions
    assert (version.version, version.role, version.weight, version.deployed_args) == (V1, "stable", 100, running()[f"demo--{V1}"].args)
    assert plan.notes == (Adopted("demo", f"demo--{V1}", 1), Stepped("demo"))
    assert plan.prepare == ()


def test_an_adopted_version_is_checked_again_when_its_checks_change():
    """Adopted under the checks git has (no gate of its own); a commit that changes only the checks (a new golden
    reference: another gate key) gates it again in place, like a version this controller gated."""
    adopted = plan_of(one(file=valid(), observed=running()))
    [version] = adopted.state.versions
    assert version.gate_key == "g1"
    same = plan_of(one(file=valid(), record=adopted.state.releases["demo"], versions=[version], observed=running()))
    assert same.prepare == () and same.state.releases["demo"].phase == "Healthy"
    changed = plan_of(one(file=valid(), record=adopted.state.releases["demo"], versions=[version], observed=running(), gate_key="g2"))
    [(rechecked, desired)] = changed.prepare
    assert (rechecked.version, desired.gate_key) == (V1, "g2")
    assert changed.state.releases["demo"].message == f"{V1}: checks changed; re-checking the serving version"


def test_an_unexpected_error_is_noted_with_its_traceback_a_known_one_without():
    bug, known = KeyError("spec"), ReleaseError("model refused", "Failed")
    plan = plan_of(one("a", file=valid(make_release(name="a")), unobserved=bug), one("b", file=valid(make_release(name="b")), unobserved=known))
    assert plan.notes == (Failed("a", "reconcile step failed: KeyError: 'spec'; nothing is serving; next: retried every tick "
                                      "(traceback in the controller log)", bug, True),
                          Failed("b", "model refused", known, False))


def test_a_failure_already_recorded_is_not_noted_again_unless_unexpected():
    known = ReleaseError("model refused", "Failed")
    plan = plan_of(one(file=valid(), record=recorded(phase="Failed", message="model refused"), unobserved=known))
    assert plan.notes == ()
    assert plan.state.releases["demo"].updated_at == NOW - 3600  # unchanged


def test_waiting_keeps_the_release_as_it_was():
    plan = plan_of(one(file=valid(), record=recorded(), versions=[serving()], unobserved=WaitingError("router starting")))
    assert plan.state.releases["demo"] == recorded() and [v.version for v in plan.state.versions] == [V1]


def test_a_temporary_error_halts_the_plan_after_what_was_noted_before_it():
    outage = ServeError("Ray dashboard unreachable")
    halt = decide(TickInput(HEAD, NOW, ControllerRecord(), (
        one("a", file=valid(make_release(name="a"))),
        one("b", file=valid(make_release(name="b")), unobserved=outage),
        one("c", file=valid(make_release(name="c"))),
    ), {}))
    assert halt == Halt((Stepped("a"),), outage)


def test_a_failing_release_never_blocks_another():
    plan = plan_of(one("a", file=valid(make_release(name="a")), unobserved=KeyError("x")), one("b", file=valid(make_release(name="b"))))
    assert plan.state.releases["a"].phase == "Failed" and plan.state.releases["b"].phase == "Progressing"
    assert [v.release for v, _ in plan.prepare] == ["b"]


HEALTHY = one(file=valid(), record=recorded(), versions=[serving()], observed=running())
STARTING = one("other", file=valid(make_release(name="other")))


@pytest.mark.parametrize(("case", "releases", "before", "applied"), [
    ("every release live", [HEALTHY], "c1", HEAD),
    ("one still progressing", [HEALTHY, STARTING], "c1", "c1"),
    ("one failed", [HEALTHY, one("other", file=valid(make_release(name="other")), unobserved=KeyError("x"))], None, None),
    ("no releases left", [], "c1", HEAD),
])
def test_the_commit_is_applied_once_every_release_is_healthy(case, releases, before, applied):
    plan = plan_of(*releases, controller=ControllerRecord(last_applied_commit=before, applied_at=1.0 if before else None))
    controller = plan.state.controller
    assert (controller.last_attempted_commit, controller.attempted_at) == (HEAD, NOW)
    assert controller.last_applied_commit == applied
    assert controller.applied_at == (NOW if applied == HEAD else 1.0 if before else None)


def test_commands_for_no_release_are_ignored_and_consumed():
    stray, retry = Command("gone", "abort", "alice", NOW), Command("demo", "retry", "bob", NOW)
    plan = plan_of(one(file=valid(), commands=(retry,)), commands=(stray, retry))
    assert plan.ignored == (stray,)
