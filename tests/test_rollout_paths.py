"""Rollout paths the main tables do not walk: capacity waits and `strategy: auto` making room, a strategy
changed mid-walk, a surge's promotion, re-checks under a held or standby version, the router's reported
weights, light changes beside a standby, invalid and removed files.

Each case asserts what `diffops status` and `diffops history` show: the phase, its message and when it last
moved, the roles, weights and replica counts, what is asked to be prepared, and each event under its release,
version and commit.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from controller.plan.versions import version_id
from controller.rollout.capacity import effective_replicas
from controller.rollout.steps import Desired, Prepared, StepResult, invalid, removed, step
from controller.state.records import Command, ReleaseRecord, VersionRecord
from tests.conftest import make_release
from tests.test_rollout import NEW, NOW, OLD, V_NEW, V_OLD, app, canary, desired, record, roles, router, spec, stable, standby

AUTO = ("    strategy: bluegreen\n", "    strategy: auto\n")
TWO = ("count: 1", "count: 2")  # two replicas of 0.5 CPU, no GPU
CHANGED = ("    steps: 4\n", "    steps: 8\n")
TAGGED = (("    strategy: bluegreen\n", "    strategy: canary\n    steps:\n      - weight: 25\n      - weight: 100\n"), CHANGED)


def rec(result: StepResult) -> ReleaseRecord:
    """The release's recorded state after the step (a step that keeps the release always returns one)."""
    assert result.release is not None
    return result.release


def said(result: StepResult) -> list[tuple[str, str, str | None, str | None]]:
    """Each event as `diffops history` lists it: release, kind, version, commit."""
    return [(e.release, e.kind, e.version, e.commit) for e in result.events]


def pair(strategy: str) -> tuple[Desired, VersionRecord, VersionRecord]:
    """Two-replica old and new versions under `strategy`: the old one serving, the new one freshly asked for."""
    edits = [TWO] + ([AUTO] if strategy == "auto" else [])
    old, new = make_release(*edits), make_release(*edits, CHANGED)
    serving = VersionRecord("demo", version_id(old), "stable", 100, "ready", "c1", spec(old), NOW - 3600, ready_at=NOW - 3600, gate_key="g1")
    wanted = VersionRecord("demo", version_id(new), "canary", 0, "preparing", "c2", spec(new), NOW - 100, gate_key="g0")
    return Desired(new, version_id(new), "c2", "blob-2", "g1"), serving, wanted


# (case, strategy, canary status, its preparation, free resources, with the old version?) ->
# (phase message (with {old}/{new}), versions prepared, new version (status, replicas), old version's replicas, events (kind, message))
CAPACITY = [
    ("checks wait for capacity under blue/green", "bluegreen", "preparing", None, {"GPU": 0.0, "CPU": 0.25}, True,
     "{new}: waiting for capacity to run its checks: needs 0.5 CPUs, 0.25 free", [], ("preparing", None), None, []),
    ("auto shrinks the old version to make room for the checks", "auto", "preparing", None, {"GPU": 0.0, "CPU": 0.25}, True,
     "{new} (auto, surge-limited): making room: {old} down to 1 replica(s)", [], ("preparing", None), 1,
     [("surge", "{old} shrinks to 1 replica(s) to make room for {new} (its checks needs 0.5 CPUs, 0.25 free)")]),
    ("auto with no old version waits for the checks' capacity", "auto", "preparing", None, {"GPU": 0.0, "CPU": 0.25}, False,
     "{new}: waiting for capacity to run its checks: needs 0.5 CPUs, 0.25 free", [], ("preparing", None), None, []),
    ("checks that fit exactly start", "bluegreen", "preparing", None, {"GPU": 0.0, "CPU": 0.5}, True,
     "{new}: verifying the model and running checks", ["{new}"], ("preparing", None), None, []),
    ("a verified version waits until all its replicas fit", "bluegreen", "preparing", Prepared(True, "checks passed", 3.0),
     {"GPU": 0.0, "CPU": 0.5}, True,
     "{new}: waiting for capacity: 2 replica(s) beside the serving version needs 1 CPU, 0.5 free; free GPUs or lower replicas.count",
     [], ("verified", None), None,
     [("prepared", "model verified, checks passed (3.0s); next: start 2 replica(s) of {new} at weight 0")]),
    ("auto starts what fits of a verified version", "auto", "preparing", Prepared(True, "checks passed", 3.0), {"GPU": 0.0, "CPU": 0.5}, True,
     "{new} (auto, surge-limited): starting 1/2 replica(s)", [], ("starting", 1), None,
     [("prepared", "model verified, checks passed (3.0s); next: start 2 replica(s) of {new} at weight 0"),
      ("surge", "blue/green does not fit; starting 1/2 replica(s) of {new} beside {old}")]),
    ("auto is plain blue/green when both fit", "auto", "preparing", Prepared(True, "checks passed", 3.0), {"GPU": 0.0, "CPU": 8.0}, True,
     "{new}: starting 2 replica(s)", [], ("starting", None), None,
     [("prepared", "model verified, checks passed (3.0s); next: start 2 replica(s) of {new} at weight 0")]),
    ("a verified version starts once room appears, without a second check", "bluegreen", "verified", None, {"GPU": 0.0, "CPU": 1.0}, True,
     "{new}: starting 2 replica(s)", [], ("starting", None), None, []),
    ("free resources unknown: a verified version starts", "auto", "verified", None, None, True,
     "{new}: starting 2 replica(s)", [], ("starting", None), None, []),
]


@pytest.mark.parametrize("case", CAPACITY, ids=[c[0] for c in CAPACITY])
def test_capacity_decides_when_checks_and_replicas_start(case: tuple[Any, ...]) -> None:
    _, strategy, status, prepared, free, with_old, message, prepare, (new_status, new_replicas), old_replicas, events = case
    target, serving, wanted = pair(strategy)
    names = {"old": serving.version, "new": wanted.version}
    versions = [serving, replace(wanted, status=status)] if with_old else [replace(wanted, status=status)]
    result = step("demo", NOW, target, record(), versions, {}, {wanted.version: prepared} if prepared else {}, None, [], free)
    assert rec(result).phase == "Progressing" and rec(result).message == message.format(**names)
    assert rec(result).updated_at == NOW
    assert [v.version for v in result.prepare] == [p.format(**names) for p in prepare]
    new = next(v for v in result.versions if v.version == wanted.version)
    assert (new.role, new.weight, new.status, new.replicas) == ("canary", 0, new_status, new_replicas)
    if prepared is not None:
        assert new.gate_key == "g1"  # the checks it passed are the ones git asks for now
    if with_old:
        old = next(v for v in result.versions if v.version == serving.version)
        assert (old.role, old.weight, old.replicas) == ("stable", 100, old_replicas)
    assert [(e.kind, e.message) for e in result.events] == [(k, m.format(**names)) for k, m in events]
    assert all((e.release, e.version) == ("demo", wanted.version) for e in result.events)


def test_the_progress_deadline_counts_from_the_start_of_the_replicas_not_from_the_checks() -> None:
    target, serving, wanted = pair("bluegreen")
    started = step("demo", NOW, target, record(), [serving, replace(wanted, status="verified")], {}, {}, None, [], {"GPU": 0.0, "CPU": 1.0})
    later = step("demo", NOW + 5, target, started.release, started.versions, {}, {}, None, [], {"GPU": 0.0, "CPU": 0.0})
    assert rec(later).message == f"{wanted.version}: 0 replicas running after 5s (deadline 300s)"


def test_the_progress_deadline_stretches_to_three_times_the_measured_load_time() -> None:
    slow = record(load_seconds=200.0)  # 3 x 200 s + 30 s margin
    result = step("demo", NOW, desired(), slow, [stable(), canary(created=NOW - 400)], {f"demo--{V_NEW}": app(V_NEW, "DEPLOYING", 0, 1)}, {})
    assert roles(result) == {V_OLD: ("stable", 100, "ready"), V_NEW: ("canary", 0, "starting")} and result.events == []
    assert rec(result).message == f"{V_NEW}: 0/1 replicas running after 400s (deadline 630s)"


def test_replicas_ray_has_not_counted_yet_are_shown_against_the_release_count() -> None:
    result = step("demo", NOW, desired(), record(), [stable(), canary()], {f"demo--{V_NEW}": app(V_NEW, "DEPLOYING", 0, 0)}, {})
    assert rec(result).message == f"{V_NEW}: 0/1 replicas running after 5s (deadline 300s)"


def test_a_rollout_starts_naming_version_strategy_and_commit_and_is_prepared_against_the_current_checks() -> None:
    target = Desired(NEW, V_NEW, "0123456789abcdef0123", "blob-2", "g7")
    result = step("demo", NOW, target, None, [], {}, {})
    assert said(result) == [("demo", "rollout-started", V_NEW, "0123456789abcdef0123")]
    assert result.events[0].message == f"rolling out {V_NEW} (bluegreen) from 0123456789ab; next: verify the model and run the checks"
    assert [(v.version, v.gate_key) for v in result.prepare] == [(V_NEW, "g7")]
    assert (rec(result).name, rec(result).phase, rec(result).updated_at) == ("demo", "Progressing", NOW)


def test_a_retried_version_replaces_its_retiring_attempt_and_the_serving_version_stays() -> None:
    held = record(failed_version=V_NEW, held_fingerprint="blob-2", phase="Degraded", message="rolled back")
    versions = [stable(), canary("retiring", retire_at=NOW + 5)]
    result = step("demo", NOW, desired(), held, versions, {}, {}, None, [Command("demo", "retry", "ops@host", NOW, id=1)])
    assert [(v.version, v.role, v.status) for v in result.versions] == [(V_OLD, "stable", "ready"), (V_NEW, "canary", "preparing")]
    assert said(result) == [("demo", "retry", V_NEW, None), ("demo", "rollout-started", V_NEW, "c2")]


def test_an_abort_before_the_canary_is_ready_is_recorded_when_it_happens() -> None:
    result = step("demo", NOW, desired(), record(), [stable(), canary()], {}, {}, None, [Command("demo", "abort", "ops@host", NOW, id=1)])
    assert (rec(result).phase, rec(result).updated_at) == ("Degraded", NOW)
    assert said(result) == [("demo", "failed", V_NEW, "c2")]


def test_a_surge_that_completes_makes_the_new_version_stable_at_its_full_count() -> None:
    target, serving, wanted = pair("auto")
    versions = [replace(serving, role="standby", weight=0, status="retiring", retire_at=NOW + 5, replicas=0),
                replace(wanted, weight=100, status="ready", created_at=NOW - 60, ready_at=NOW - 30, replicas=2)]
    done = step("demo", NOW, target, record(), versions, {"demo": router({wanted.version: 100, serving.version: 0})}, {}, None, [], {"CPU": 0.0})
    promoted = next(v for v in done.versions if v.version == wanted.version)
    assert (promoted.role, promoted.weight, promoted.status) == ("stable", 100, "ready")
    [event] = [e for e in done.events if e.kind == "promoted"]
    assert (event.release, event.version, event.message) == ("demo", wanted.version, f"{wanted.version} ready after 60.0s; traffic switched to it (100%)")
    assert "rolled-back" not in [e.kind for e in done.events]
    three = make_release(TWO, AUTO, CHANGED, ("count: 2", "count: 3"))  # a later light change of the count applies to it
    grown = step("demo", NOW + 1, Desired(three, wanted.version, "c3", "blob-3", "g1"), done.release, done.versions, {}, {})
    assert effective_replicas(next(v for v in grown.versions if v.version == wanted.version)) == 3


def test_a_strategy_changed_mid_walk_switches_the_ready_canary_at_once() -> None:
    walking = record(phase="Progressing", step=0, step_started_at=NOW - 20)
    versions = [replace(stable(), weight=75), replace(canary("ready", created=NOW - 40, ready_at=NOW - 30), weight=25)]
    result = step("demo", NOW, desired(), walking, versions, {"demo": router({V_OLD: 75, V_NEW: 25})}, {})
    assert roles(result) == {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}
    assert (rec(result).step, rec(result).step_started_at, rec(result).updated_at) == (None, None, NOW)
    assert said(result) == [("demo", "promoted", V_NEW, None)]
    assert result.events[0].message == f"{V_NEW} ready after 40.0s; traffic switched to it (100%); {V_OLD} kept warm as standby for 10m"


def test_a_canary_strategy_announces_the_ready_canary_under_its_release() -> None:
    target = Desired(make_release(*TAGGED), V_NEW, "c2", "blob-2", "g1")
    result = step("demo", NOW, target, record(), [stable(), canary(created=NOW - 7)], {f"demo--{V_NEW}": app(V_NEW)}, {})
    assert said(result) == [("demo", "ready", V_NEW, None), ("demo", "step", V_NEW, "c2")]  # ready, then its first step
    assert result.events[0].message == f"{V_NEW} ready after 7.0s; next: walk the canary steps"
    assert roles(result) == {V_OLD: ("stable", 75, "ready"), V_NEW: ("canary", 25, "ready")}


def test_a_promotion_keeps_a_retiring_canary_until_its_time_and_replaces_the_old_standby() -> None:
    third = make_release(("    steps: 4\n", "    steps: 12\n"))
    v3 = version_id(third)
    rolled_back = VersionRecord("demo", "0ldcanary1", "canary", 0, "retiring", "c0", spec(OLD), NOW - 50, retire_at=NOW + 5)
    versions = [stable(V_NEW, NEW), replace(standby(), version=V_OLD, spec=spec(OLD)), rolled_back,
                VersionRecord("demo", v3, "canary", 0, "starting", "c3", spec(third), NOW - 5)]
    held = record(failed_version="0ldcanary1", held_fingerprint="blob-0")
    result = step("demo", NOW, Desired(third, v3, "c3", "blob-3", "g1"), held, versions, {f"demo--{v3}": app(v3)}, {})
    assert roles(result) == {v3: ("stable", 100, "ready"), V_NEW: ("standby", 0, "ready"), "0ldcanary1": ("canary", 0, "retiring")}
    assert said(result) == [("demo", "standby-removed", V_OLD, None), ("demo", "promoted", v3, None)]
    assert result.events[0].message == f"standby {V_OLD} replaced by {V_NEW}"
    assert (rec(result).failed_version, rec(result).held_fingerprint) == (None, None)  # a version went live: nothing is held


def test_a_changed_check_is_rerun_when_the_file_changed_after_it_failed_and_a_pass_lifts_the_hold() -> None:
    serving = stable(V_NEW, NEW, gate_key="g0")
    failed = record(failed_version=V_NEW, held_fingerprint="blob-1", phase="Degraded", message="failed its changed checks")
    rerun = step("demo", NOW, desired(fingerprint="blob-2"), failed, [serving], {"demo": router({V_NEW: 100})}, {})
    assert [v.version for v in rerun.prepare] == [V_NEW]
    assert (rec(rerun).phase, rec(rerun).message, rec(rerun).updated_at) == (
        "Progressing", f"{V_NEW}: checks changed; re-checking the serving version", NOW)
    passed = step("demo", NOW + 1, desired(fingerprint="blob-2"), rerun.release, [serving], {"demo": router({V_NEW: 100})},
                  {V_NEW: Prepared(True, "checks passed: golden, performance", 2.0)})
    assert said(passed) == [("demo", "rechecked", V_NEW, None)]
    assert passed.events[0].message == f"{V_NEW} passed its changed checks: checks passed: golden, performance"
    assert (rec(passed).phase, rec(passed).message, rec(passed).updated_at) == ("Progressing", f"{V_NEW}: checks passed again", NOW + 1)
    assert (rec(passed).failed_version, rec(passed).held_fingerprint) == (None, None)


def test_a_failed_recheck_is_recorded_under_the_serving_version_and_commit() -> None:
    serving = stable(V_NEW, NEW, gate_key="g0")
    result = step("demo", NOW, desired(), record(), [serving], {"demo": router({V_NEW: 100})}, {V_NEW: Prepared(False, "checks failed: ssim", 2.0)})
    message = f"{V_NEW} failed its changed checks: checks failed: ssim; it keeps serving; fix the checks or the reference and commit"
    assert (rec(result).phase, rec(result).message, rec(result).updated_at) == ("Degraded", message, NOW)
    assert said(result) == [("demo", "failed", V_NEW, "c2")] and result.events[0].message == message


def test_a_standby_keeps_its_own_checks_so_a_revert_to_it_is_rechecked() -> None:
    """The serving version passed the changed checks; the warm standby never ran them."""
    versions = [stable(V_NEW, NEW, gate_key="g0"), replace(standby(), version=V_OLD, spec=spec(OLD), gate_key="g0")]
    passed = step("demo", NOW, desired(gate_key="g1"), record(), versions, {"demo": router({V_NEW: 100})}, {V_NEW: Prepared(True, "ok", 1.0)})
    assert {v.version: v.gate_key for v in passed.versions} == {V_NEW: "g1", V_OLD: "g0"}
    revert = Desired(OLD, V_OLD, "c3", "blob-3", "g1")
    back = step("demo", NOW + 1, revert, passed.release, passed.versions, {}, {})
    assert [e.kind for e in back.events] == ["rolled-back"]
    after = step("demo", NOW + 2, revert, back.release, back.versions, {"demo": router({V_OLD: 100, V_NEW: 0})}, {})
    assert [v.version for v in after.prepare] == [V_OLD] and "re-checking the serving version" in rec(after).message


def test_the_router_weights_it_reports_are_shown_until_they_match() -> None:
    result = step("demo", NOW, desired(), record(), [stable(V_NEW, NEW)], {"demo": router({V_NEW: 0, V_OLD: 100})}, {})
    assert rec(result).message == f"{V_NEW}: switching traffic to it (100%); router reports {{'{V_NEW}': 0, '{V_OLD}': 100}}"


def test_a_lost_replica_is_reported_on_the_tick_it_is_seen_and_its_return_too() -> None:
    versions, healthy = [stable(V_NEW, NEW)], record(phase="Healthy", message=f"{V_NEW} serving 100%", updated_at=NOW - 60)
    lost = {"demo": router({V_NEW: 100}), f"demo--{V_NEW}": app(V_NEW, "DEPLOYING", 1, 2)}
    first = step("demo", NOW, desired(), healthy, versions, lost, {})
    assert said(first) == [("demo", "replicas-lost", V_NEW, None)]
    assert first.events[0].message.startswith(f"{V_NEW}: 1/2 replicas running; Ray Serve is replacing the lost ones")
    back = step("demo", NOW + 3, desired(), first.release, versions, {**lost, f"demo--{V_NEW}": app(V_NEW, running=2, target=2)}, {})
    assert said(back) == [("demo", "replicas-restored", V_NEW, None)]
    assert back.events[0].message == f"{V_NEW}: all 2 replicas running again, 3.0s after the last loss was reported; next: nothing"


def test_a_light_change_applies_to_the_serving_version_only() -> None:
    bigger = make_release(("    count: 1\n", "    count: 3\n"))
    versions = [stable(), replace(standby(), spec=spec(NEW))]
    result = step("demo", NOW, Desired(bigger, V_OLD, "c3", "blob-3", "g1"), record(), versions, {"demo": router({V_OLD: 100, V_NEW: 0})}, {})
    assert {v.version: v.spec.replicas.count for v in result.versions} == {V_OLD: 3, V_NEW: 1}
    assert next(v for v in result.versions if v.version == V_NEW).spec == spec(NEW)  # the standby keeps what it runs
    assert said(result) == [("demo", "updated", V_OLD, None)]
    assert result.events[0].message == f"light change applied in place to {V_OLD}; no replica restarts"


def test_invalid_counts_errors_past_three_names_the_release_and_reports_each_new_refusal() -> None:
    four = invalid(record(), "demo", ["a", "b", "c", "d"], [stable()], NOW)
    assert rec(four).message == f"a; b; c (+1 more); {V_OLD} keeps serving"
    assert said(four) == [("demo", "invalid", None, None)] and four.events[0].message == rec(four).message
    other = invalid(four.release, "demo", ["e"], [stable()], NOW + 5)
    assert [e.message for e in other.events] == [f"e; {V_OLD} keeps serving"]  # a different refusal is reported
    first = invalid(None, "demo", ["bad"], [], NOW)
    assert (rec(first).name, rec(first).phase, rec(first).updated_at) == ("demo", "Invalid", NOW)


def test_a_refused_prune_keeps_the_phase_and_a_prune_is_recorded_under_its_release() -> None:
    kept = removed(record(phase="Healthy", message=f"{V_OLD} serving 100%"), [stable()], allowed=False, now=NOW)
    assert (rec(kept).phase, rec(kept).updated_at) == ("Healthy", NOW)
    assert rec(kept).message == "release file removed, but so is every other release: pruning all needs --allow-prune-all; still serving"
    gone = removed(record(), [stable()], allowed=True, now=NOW)
    assert said(gone) == [("demo", "pruned", None, None)]

