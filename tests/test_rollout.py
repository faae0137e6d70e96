"""The blue/green rollout step as tables of situations: recorded x observed x prepared -> next state."""

from __future__ import annotations

from dataclasses import replace

import pytest

from controller.parse.release import Spec
from controller.plan.versions import version_id
from controller.rollout.steps import Desired, Prepared, deadline_s, invalid, removed, step
from controller.state.records import ObservedApp, ReleaseRecord, VersionRecord
from tests.conftest import make_release

NOW = 1_000_000.0
OLD = make_release()
NEW = make_release(("    steps: 4\n", "    steps: 8\n"))
V_OLD, V_NEW = version_id(OLD), version_id(NEW)


def spec(release=OLD) -> Spec:
    return release.spec


def desired(release=NEW, fingerprint="blob-2", gate_key="g1") -> Desired:
    return Desired(release, version_id(release), "c2", fingerprint, gate_key)


def stable(version=V_OLD, release=OLD, **kw) -> VersionRecord:
    return VersionRecord("demo", version, "stable", 100, "ready", "c1", spec(release), NOW - 3600, ready_at=NOW - 3600, **kw)


def canary(status="starting", created=NOW - 5, **kw) -> VersionRecord:
    return VersionRecord("demo", V_NEW, "canary", 0, status, "c2", spec(NEW), created, **kw)


def standby(since=NOW - 60) -> VersionRecord:
    return VersionRecord("demo", V_NEW, "standby", 0, "ready", "c2", spec(NEW), NOW - 3600, ready_at=NOW - 3000, standby_since=since)


def record(**kw) -> ReleaseRecord:
    return replace(ReleaseRecord("demo", "Healthy", "", "c1", V_OLD, spec(), NOW - 3600), **kw)


def app(version, status="RUNNING", running=1, target=1, message="") -> ObservedApp:
    return ObservedApp(f"demo--{version}", status, message, running, target)


def router(weights) -> ObservedApp:
    return ObservedApp("demo", "RUNNING", "", 1, 1, weights=weights)


def roles(result) -> dict[str, tuple[str, int, str]]:
    return {v.version: (v.role, v.weight, v.status) for v in result.versions}


def test_first_deploy_prepares_the_model():
    result = step("demo", NOW, desired(OLD, "b1"), None, [], {}, {})
    assert roles(result) == {V_OLD: ("canary", 0, "preparing")}
    assert [v.version for v in result.prepare] == [V_OLD]
    assert result.release.phase == "Progressing" and "verifying the model and running checks" in result.release.message
    assert [e.kind for e in result.events] == ["rollout-started"]


CASES = [
    # (id, versions, observed, prepared, expected roles, phase, message fragment, event kinds)
    ("verified model starts replicas", [stable(), canary("preparing")], {}, {V_NEW: Prepared(True, "checks passed: all", 0.1)},
     {V_OLD: ("stable", 100, "ready"), V_NEW: ("canary", 0, "starting")}, "Progressing", "starting 1 replica", ["prepared"]),
    ("refused model degrades, stable serves", [stable(), canary("preparing")], {}, {V_NEW: Prepared(False, "model refused: digest mismatch: unet/x: sha256", 0.1)},
     {V_OLD: ("stable", 100, "ready")}, "Degraded", f"{V_NEW} failed: model refused: digest mismatch: unet/x", ["failed"]),
    ("refused first version fails", [canary("preparing")], {}, {V_NEW: Prepared(False, "model refused: digest mismatch", 0.1)},
     {}, "Failed", "nothing is serving", ["failed"]),
    ("waiting on preparation", [stable(), canary("preparing")], {}, {},
     {V_OLD: ("stable", 100, "ready"), V_NEW: ("canary", 0, "preparing")}, "Progressing", "running checks", []),
    ("replicas still starting", [stable(), canary()], {f"demo--{V_NEW}": app(V_NEW, "DEPLOYING", 0, 1)}, {},
     {V_OLD: ("stable", 100, "ready"), V_NEW: ("canary", 0, "starting")}, "Progressing", "0/1 replicas running after 5s", []),
    ("ready replicas switch traffic", [stable(), canary()], {f"demo--{V_NEW}": app(V_NEW)}, {},
     {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Progressing", "switching traffic", ["promoted"]),
    ("replicas that fail to construct", [stable(), canary()], {f"demo--{V_NEW}": app(V_NEW, "DEPLOY_FAILED", 0, 1, "ValueError: boom")}, {},
     {V_OLD: ("stable", 100, "ready")}, "Degraded", "replicas failed to start: ValueError: boom", ["failed"]),
    ("past the progress deadline", [stable(), canary(created=NOW - 301)], {f"demo--{V_NEW}": app(V_NEW, "DEPLOYING", 0, 1)}, {},
     {V_OLD: ("stable", 100, "ready")}, "Degraded", "not ready after 301s (progress deadline 300s)", ["failed"]),
    ("revert to the warm standby is instant", [stable(), standby()], {}, {},
     {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Progressing", "switching traffic", ["rolled-back"]),
    ("an abandoned canary is dropped", [stable(V_NEW, NEW), replace(canary(), version="abcdef0123")], {"demo": router({V_NEW: 100})}, {},
     {V_NEW: ("stable", 100, "ready")}, "Healthy", "serving 100%", ["abandoned"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rollout_step(case):
    _, versions, observed, prepared, expected, phase, fragment, kinds = case
    result = step("demo", NOW, desired(), record(), versions, observed, prepared)
    assert roles(result) == expected
    assert result.release.phase == phase
    assert fragment in result.release.message
    assert [e.kind for e in result.events] == kinds


def test_switch_keeps_one_standby_and_no_reload():
    third = make_release(("    steps: 4\n", "    steps: 12\n"))
    versions = [stable(V_NEW, NEW), replace(standby(), version=V_OLD, spec=spec(OLD)),
                VersionRecord("demo", version_id(third), "canary", 0, "starting", "c3", spec(third), NOW - 5)]
    result = step("demo", NOW, desired(third, "b3"), record(), versions, {f"demo--{version_id(third)}": app(version_id(third))}, {})
    assert roles(result) == {version_id(third): ("stable", 100, "ready"), V_NEW: ("standby", 0, "ready")}
    assert "standby-removed" in [e.kind for e in result.events]
    assert result.prepare == []


def test_healthy_only_when_the_router_confirms():
    versions = [stable(V_NEW, NEW)]
    unconfirmed = step("demo", NOW, desired(), record(), versions, {"demo": router({V_NEW: 0})}, {})
    assert unconfirmed.release.phase == "Progressing" and "router reports" in unconfirmed.release.message
    confirmed = step("demo", NOW, desired(), record(), versions, {"demo": router({V_NEW: 100})}, {})
    assert confirmed.release.phase == "Healthy"


def test_losing_every_replica_is_reported_once_and_fails_the_release_only_if_none_is_back_within_a_minute():
    versions, observed = [stable(V_NEW, NEW)], {"demo": router({V_NEW: 100}), f"demo--{V_NEW}": app(V_NEW)}
    healthy = step("demo", NOW, desired(), record(phase="Healthy"), versions, observed, {})
    assert healthy.release.message == f"{V_NEW} serving 100%" and healthy.events == []
    lost = {**observed, f"demo--{V_NEW}": app(V_NEW, status="DEPLOYING", running=0)}
    ticks = [step("demo", NOW + 1, desired(), healthy.release, versions, lost, {})]
    for at in (NOW + 2, NOW + 60, NOW + 61, NOW + 70):  # replaced in time it stays Healthy; past 60 s nothing serves: Failed
        ticks.append(step("demo", at, desired(), ticks[-1].release, versions, lost, {}))
    assert [e.kind for t in ticks for e in t.events] == ["replicas-lost"]  # once, not every tick
    assert [t.release.phase for t in ticks] == ["Healthy", "Healthy", "Healthy", "Failed", "Failed"]
    assert all(roles(t) == {V_NEW: ("stable", 100, "ready")} and not t.prepare for t in ticks)  # never rolled back or re-gated
    assert ticks[-1].release.message == (f"{V_NEW} serving 100% (0/1 replicas running; Ray Serve is starting or replacing "
                                         "replicas); none for over 60s: requests get 503 until one is back")
    back = step("demo", NOW + 77, desired(), ticks[-1].release, versions, observed, {})
    assert [e.kind for e in back.events] == ["replicas-restored"]
    assert (back.release.phase, back.release.message) == ("Healthy", f"{V_NEW} serving 100%")


def test_standby_expires_after_scale_down_delay():
    versions = [stable(V_NEW, NEW), replace(standby(since=NOW - 601), version=V_OLD)]
    result = step("demo", NOW, desired(), record(), versions, {"demo": router({V_NEW: 100})}, {})
    assert roles(result) == {V_NEW: ("stable", 100, "ready")}
    assert [e.kind for e in result.events] == ["standby-removed"]


def test_failed_version_is_held_until_the_file_changes():
    held = record(failed_version=V_NEW, held_fingerprint="blob-2", phase="Degraded", message="failed")
    again = step("demo", NOW, desired(fingerprint="blob-2"), held, [stable()], {}, {})
    assert roles(again) == {V_OLD: ("stable", 100, "ready")} and again.prepare == [] and again.events == []
    changed = step("demo", NOW, desired(fingerprint="blob-3"), held, [stable()], {}, {})
    assert roles(changed)[V_NEW] == ("canary", 0, "preparing")


def test_light_change_follows_git_but_keeps_the_loaded_model():
    moved = make_release(("    count: 1\n", "    count: 3\n"), ("file://models/tiny-sd", "s3://bucket/tiny-sd"))
    result = step("demo", NOW, Desired(moved, version_id(moved), "c2", "b", "g1"), record(), [stable()], {"demo": router({V_OLD: 100})}, {})
    [version] = result.versions
    assert version.version == V_OLD and version.spec.replicas.count == 3
    assert version.spec.model.uri == "file://models/tiny-sd"
    assert [e.kind for e in result.events] == ["updated"]


def test_deadline_stretches_with_measured_load_time():
    assert deadline_s(OLD, None) == 300
    assert deadline_s(OLD, 50) == 300
    assert deadline_s(OLD, 200) == 630


def test_invalid_file_changes_nothing_that_serves():
    versions = [stable()]
    result = invalid(record(), "demo", ["releases/demo.yaml:3:1: bad"], versions, NOW)
    assert result.versions == versions and result.release.phase == "Invalid"
    assert result.release.message == f"releases/demo.yaml:3:1: bad; {V_OLD} keeps serving"
    assert result.release.spec == spec()  # the last good spec keeps driving the router


def test_removed_release_is_pruned_unless_everything_goes():
    gone = removed(record(), [stable()], allowed=True, now=NOW)
    assert gone.release is None and gone.versions == [] and gone.events[0].kind == "pruned"
    kept = removed(record(), [stable()], allowed=False, now=NOW)
    assert kept.release is not None and kept.versions == [stable()] and "--allow-prune-all" in kept.release.message


def test_changed_checks_recheck_the_serving_version_in_place():
    serving = stable(V_NEW, NEW, gate_key="g0")
    first = step("demo", NOW, desired(), record(), [serving], {"demo": router({V_NEW: 100})}, {})
    assert [v.version for v in first.prepare] == [V_NEW] and first.release.phase == "Progressing"
    assert "re-checking the serving version" in first.release.message

    failing = Prepared(False, "checks failed: golden check failed: phash distance 30 > 8; SSIM 0.100 < 0.9", 2.0)
    failed = step("demo", NOW, desired(), record(), [serving], {"demo": router({V_NEW: 100})}, {V_NEW: failing})
    assert roles(failed) == {V_NEW: ("stable", 100, "ready")}  # it keeps serving
    assert failed.release.phase == "Degraded" and "phash distance 30 > 8" in failed.release.message
    held = step("demo", NOW, desired(), failed.release, failed.versions, {"demo": router({V_NEW: 100})}, {})
    assert held.prepare == [] and held.release.phase == "Degraded"

    passed = step("demo", NOW, desired(), record(), [serving], {"demo": router({V_NEW: 100})}, {V_NEW: Prepared(True, "checks passed", 2.0)})
    assert passed.versions[0].gate_key == "g1" and [e.kind for e in passed.events] == ["rechecked"]
    healthy = step("demo", NOW, desired(), passed.release, passed.versions, {"demo": router({V_NEW: 100})}, {})
    assert healthy.release.phase == "Healthy"


# (case, versions, observed, expected roles, phase, message fragment, event kinds): the edges of each wait, one tick
EDGES = [
    ("exactly at the progress deadline: still waiting", [stable(), canary(created=NOW - 300)], {f"demo--{V_NEW}": app(V_NEW, "DEPLOYING", 0, 1)},
     {V_OLD: ("stable", 100, "ready"), V_NEW: ("canary", 0, "starting")}, "Progressing", "0/1 replicas running after 300s (deadline 300s)", []),
    ("no app reported yet", [stable(), canary()], {},
     {V_OLD: ("stable", 100, "ready"), V_NEW: ("canary", 0, "starting")}, "Progressing", "0 replicas running after 5s", []),
    ("a standby exactly scale_down_delay old is removed", [stable(V_NEW, NEW), replace(standby(since=NOW - 600), version=V_OLD)],
     {"demo": router({V_NEW: 100})}, {V_NEW: ("stable", 100, "ready")}, "Healthy", "serving 100%", ["standby-removed"]),
    ("a standby younger than scale_down_delay stays", [stable(V_NEW, NEW), replace(standby(since=NOW - 599), version=V_OLD)],
     {"demo": router({V_NEW: 100, V_OLD: 0})}, {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Healthy", "serving 100%", []),
    ("a rolled-back canary is deleted at its retire time", [stable(V_NEW, NEW), replace(canary("retiring"), version=V_OLD, retire_at=NOW)],
     {"demo": router({V_NEW: 100})}, {V_NEW: ("stable", 100, "ready")}, "Healthy", "serving 100%", ["retired"]),
    ("a rolled-back canary stays until then", [stable(V_NEW, NEW), replace(canary("retiring"), version=V_OLD, retire_at=NOW + 1)],
     {"demo": router({V_NEW: 100, V_OLD: 0})}, {V_NEW: ("stable", 100, "ready"), V_OLD: ("canary", 0, "retiring")}, "Healthy", "serving 100%", []),
    ("no router reported yet", [stable(V_NEW, NEW)], {},
     {V_NEW: ("stable", 100, "ready")}, "Progressing", "switching traffic to it (100%); router reports nothing yet", []),
    ("the router behind while the replicas are lost: both are said", [stable(V_NEW, NEW)],
     {"demo": router({V_NEW: 100, V_OLD: 0}), f"demo--{V_NEW}": app(V_NEW, "DEPLOYING", 0, 1)}, {V_NEW: ("stable", 100, "ready")},
     "Progressing", "switching traffic to it (100%) (0/1 replicas running; Ray Serve is starting or replacing replicas); router reports", []),
]


@pytest.mark.parametrize("case", EDGES, ids=[c[0] for c in EDGES])
def test_rollout_edges(case):
    _, versions, observed, expected, phase, fragment, kinds = case
    result = step("demo", NOW, desired(), record(phase="Healthy", message="x"), versions, observed, {})
    assert roles(result) == expected
    assert result.release.phase == phase
    assert fragment in result.release.message, result.release.message
    assert [e.kind for e in result.events] == kinds


def test_a_promotion_records_the_load_time_and_says_what_stays_warm():
    result = step("demo", NOW, desired(), record(), [stable(), canary(created=NOW - 42)], {f"demo--{V_NEW}": app(V_NEW)}, {})
    [event] = result.events
    assert event.message == f"{V_NEW} ready after 42.0s; traffic switched to it (100%); {V_OLD} kept warm as standby for 10m"
    assert result.release.load_seconds == 42 and result.release.failed_version is None
    promoted, kept = (next(v for v in result.versions if v.version == version) for version in (V_NEW, V_OLD))
    assert (promoted.ready_at, kept.standby_since) == (NOW, NOW)


def test_a_revert_to_the_standby_keeps_its_ready_time_and_says_no_reload():
    result = step("demo", NOW, desired(), record(), [stable(), standby()], {}, {})
    [event] = result.events
    assert event.kind == "rolled-back" and "traffic switched back to it at once, no reload" in event.message
    switched = next(v for v in result.versions if v.version == V_NEW)
    assert (switched.ready_at, switched.standby_since) == (NOW - 3000, None)


def test_retry_lifts_the_hold_and_says_who_asked():
    from controller.state.records import Command

    held = record(failed_version=V_NEW, held_fingerprint="blob-2", phase="Degraded", message="failed")
    result = step("demo", NOW, desired(fingerprint="blob-2"), held, [stable()], {}, {}, None, [Command("demo", "retry", "ops@host", NOW, id=1)])
    assert roles(result)[V_NEW] == ("canary", 0, "preparing") and [v.version for v in result.prepare] == [V_NEW]
    assert result.events[0].kind == "retry" and result.events[0].message == f"ops@host asked to retry {V_NEW}; its hold is lifted"
    assert (result.release.failed_version, result.release.held_fingerprint) == (None, None)
    nothing_held = step("demo", NOW, desired(), record(), [stable()], {}, {}, None, [Command("demo", "retry", "ops@host", NOW, id=2)])
    assert "retry" not in [e.kind for e in nothing_held.events]


@pytest.mark.parametrize("errors, message", [
    (["a"], f"a; {V_OLD} keeps serving"),
    (["a", "b", "c"], f"a; b; c; {V_OLD} keeps serving"),
    (["a", "b", "c", "d", "e"], f"a; b; c (+2 more); {V_OLD} keeps serving"),
])
def test_invalid_names_three_errors_and_counts_the_rest(errors, message):
    result = invalid(record(), "demo", errors, [stable()], NOW)
    assert result.release.message == message and [e.kind for e in result.events] == ["invalid"]
    again = invalid(result.release, "demo", errors, [stable()], NOW + 2)
    assert again.events == [] and again.release.updated_at == NOW  # the same refusal is not reported twice


def test_an_invalid_first_file_says_nothing_was_serving():
    result = invalid(None, "demo", ["bad"], [], NOW)
    assert (result.release.phase, result.release.message, result.release.spec) == ("Invalid", "bad; nothing was serving", None)


def test_a_pruned_release_names_its_versions():
    gone = removed(record(), [stable(), standby()], allowed=True, now=NOW)
    assert gone.events[0].message == f"release file removed; deleting its apps (versions: {V_OLD}, {V_NEW})"
    assert removed(record(), [], allowed=True, now=NOW).events[0].message.endswith("(versions: none)")


@pytest.mark.parametrize("replicas, free, lacking", [
    (1, None, None),  # free resources unknown: never blocks
    (2, {"GPU": 0.0, "CPU": 8.0}, None),  # the demo asks 0 GPUs, 0.5 CPU per replica
    (2, {"GPU": 0.0, "CPU": 1.0}, None),  # exactly enough
    (3, {"GPU": 0.0, "CPU": 1.0}, "needs 1.5 CPUs, 1 free"),
    (2, {"GPU": 0.0}, "needs 1 CPU, 0 free"),  # a resource not reported is not free; one CPU is singular
])
def test_shortfall(replicas, free, lacking):
    from controller.rollout.capacity import per_replica, shortfall

    assert shortfall(per_replica(spec()), replicas, free) == lacking


def test_shortfall_names_every_resource_short():
    from controller.rollout.capacity import per_replica, shortfall

    gpu = per_replica(spec(make_release(("    gpus: 0\n", "    gpus: 1\n"))))
    assert shortfall(gpu, 2, {"GPU": 1.0, "CPU": 0.5}) == "needs 2 GPUs, 1 free; needs 1 CPU, 0.5 free"
    assert shortfall(gpu, 1, {"GPU": 0.0, "CPU": 4.0}) == "needs 1 GPU, 0 free"


@pytest.mark.parametrize("case", CASES + EDGES, ids=[c[0] for c in CASES + EDGES])
def test_every_decision_is_recorded_under_its_release_version_and_commit(case):
    """What `diffops status` and `diffops history` show: the desired commit and version, when the phase last moved,
    and each event under its release and version (the commit on the ones git notes are written for)."""
    versions, observed = case[1], case[2]
    prepared = case[3] if len(case) == 8 else {}
    result = step("demo", NOW, desired(), record(phase="Healthy", message="x"), versions, observed, prepared)
    assert (result.release.desired_commit, result.release.desired_version, result.release.spec) == ("c2", V_NEW, spec(NEW))
    assert result.release.updated_at == NOW  # every case moves the phase or the message
    for event in result.events:
        assert event.release == "demo" and event.version in {v.version for v in versions} and event.message, event
        if event.kind in ("failed", "aborted", "rollout-started"):
            assert event.commit == "c2", event


def test_a_manual_abort_before_the_canary_is_ready_fails_it_naming_who():
    from controller.state.records import Command

    abort = [Command("demo", "abort", "ops@host", NOW, id=1), Command("demo", "promote", "other@host", NOW, id=2)]
    result = step("demo", NOW, desired(), record(), [stable(), canary("preparing")], {}, {}, None, abort)
    assert roles(result) == {V_OLD: ("stable", 100, "ready")} and result.prepare == []
    assert result.release.phase == "Degraded" and result.release.message.startswith(f"{V_NEW} failed: aborted by ops@host; {V_OLD} keeps serving")
    assert (result.release.failed_version, result.release.held_fingerprint) == (V_NEW, "blob-2")


def test_a_ready_canary_under_the_canary_strategy_waits_for_its_steps():
    canary_release = make_release(("    strategy: bluegreen\n", "    strategy: canary\n    steps:\n      - weight: 50\n      - weight: 100\n"),
                                  ("    steps: 4\n", "    steps: 8\n"))
    target = Desired(canary_release, V_NEW, "c2", "blob-2", "g1")
    result = step("demo", NOW, target, record(), [stable(), canary(created=NOW - 7)], {f"demo--{V_NEW}": app(V_NEW)}, {})
    ready = next(v for v in result.versions if v.version == V_NEW)
    assert (ready.status, ready.ready_at, result.release.load_seconds) == ("ready", NOW, 7)
    assert result.events[0].message == f"{V_NEW} ready after 7.0s; next: walk the canary steps"
