"""Canary walk paths the main sequences do not reach: a 1% step, a pause before any traffic, inconclusive
intervals between failures, a pause judged then failed, when the next interval starts, manual promotes,
and what an abort or a promotion leaves recorded beside a warm standby.

Driven tick by tick through `step()` as the reconciler does (`tests.test_canary.Driver`); each case asserts
what `diffops status` and `diffops history` show.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from controller.plan.versions import version_id
from controller.rollout.steps import Desired, StepResult
from controller.state.records import Command, ReleaseRecord, VersionRecord
from tests.conftest import make_release
from tests.test_canary import GOOD, NOW, STEPS, V_NEW, V_OLD, Driver, spec, weights

BAD = {V_NEW: {"requests": 20, "errors": 10, "p95_latency_s": 0.2}}
UNSURE = {V_NEW: {"requests": 2, "errors": 0, "p95_latency_s": 0.2}}  # fewer than min_requests 5: inconclusive
PREVIOUS = make_release(("    steps: 4\n", "    steps: 6\n"))  # the version before the serving one, kept warm


def rec(result: StepResult) -> ReleaseRecord:
    """The release's recorded state after a tick (a walk never removes the release)."""
    assert result.release is not None
    return result.release


def analysed(run: Driver) -> dict[str, Any]:
    """The latest analysis as `diffops status --json` shows it (`analysis`)."""
    assert run.record.analysis is not None, "no interval judged yet"
    return run.record.analysis


def with_steps(steps: str, analysis_extra: str = "") -> Desired:
    """The canary release with other `steps:` (same analysis: 10s interval, min_requests 5, failure_limit 2, plus any extra lines)."""
    analysis = STEPS[STEPS.index("    analysis:"):] + analysis_extra
    release = make_release(("    strategy: bluegreen\n", f"    strategy: canary\n    steps:\n{steps}{analysis}"), ("    steps: 4\n", "    steps: 8\n"))
    assert version_id(release) == V_NEW
    return Desired(release, V_NEW, "c2", "f2", "g1")


def with_standby(run: Driver) -> Driver:
    run.versions.append(VersionRecord("demo", version_id(PREVIOUS), "standby", 0, "ready", "c0", spec(PREVIOUS), NOW - 7200,
                                      ready_at=NOW - 7200, standby_since=NOW - 60))
    return run


def test_a_one_percent_step_is_judged_like_any_other() -> None:
    quiet = Driver(with_steps("      - weight: 1\n      - weight: 100\n"))
    quiet.tick()
    held = quiet.tick(advance=10)
    assert (quiet.record.step, weights(held)[V_NEW]) == (0, 1) and "waiting for enough traffic to judge" in rec(held).message
    assert "last interval: 0 judged requests, 0 pinned previews (not counted)" in rec(held).message
    judged = Driver(with_steps("      - weight: 1\n      - weight: 100\n"))
    judged.tick()
    judged.tick(advance=10, stats=GOOD)
    assert analysed(judged)["verdict"] == "passed" and judged.record.step == 1 and weights(judged)[V_NEW] == 100


def test_a_pause_before_any_traffic_is_not_judged_and_ends_on_time() -> None:
    run = Driver(with_steps("      - pause: 10s\n      - weight: 100\n"))
    first = run.tick()
    assert weights(first) == {V_OLD: 100, V_NEW: 0} and run.record.step == 0
    run.tick(advance=10)
    assert run.record.analysis is None  # the canary had no traffic to judge
    assert run.record.step == 1 and weights(run)[V_NEW] == 100 and "unjudged" not in run.events


def test_an_inconclusive_interval_between_two_failures_does_not_reset_the_count() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=BAD)
    run.tick(advance=10, stats=UNSURE)
    assert run.record.failures == 1 and analysed(run)["verdict"] == "inconclusive"
    rolled = run.tick(advance=10, stats=BAD)
    assert rec(rolled).phase == "Degraded" and run.events[-1] == "aborted"


def test_a_pause_that_passed_an_interval_completes_after_a_later_inconclusive_one() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=GOOD)  # step 1 passed: the 30 s pause starts
    run.tick(advance=10, stats=GOOD)  # the pause's own interval passes
    run.tick(advance=10, stats=UNSURE)
    assert analysed(run)["verdict"] == "inconclusive" and run.record.step == 1
    run.tick(advance=10, stats=UNSURE)  # the pause is over
    assert run.record.step == 2


def test_a_pause_whose_last_interval_failed_does_not_complete() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=GOOD)  # the pause starts at +10 s, ends at +40 s
    run.tick(advance=10, stats=GOOD)  # +20 s: passed
    run.tick(advance=11, stats=BAD)  # +31 s: failed, 1 of 2
    held = run.tick(advance=9, stats=GOOD)  # +40 s: the pause is over, but its last interval failed (none since)
    assert run.record.step == 1 and rec(held).phase == "Progressing" and "waiting for enough traffic to judge" in rec(held).message
    run.tick(advance=1, stats=GOOD)  # +41 s: a passing interval of its own
    assert run.record.step == 2


def test_the_next_interval_starts_when_one_is_judged() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=UNSURE)
    judged_at = run.now
    soon = run.tick(advance=5, stats=GOOD)  # 5 s into the next interval: not judged yet
    assert analysed(run)["at"] == judged_at and run.record.step == 0 and rec(soon).phase == "Progressing"
    run.tick(advance=5, stats=GOOD)
    assert analysed(run)["at"] == run.now and run.record.step == 1


def test_a_promote_that_ends_a_pause_starts_the_next_steps_interval_then() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=GOOD)
    run.tick(advance=30, stats=GOOD)  # the indefinite pause
    run.tick(advance=10, stats=GOOD)  # an interval judged during the pause
    ended = run.tick(advance=5, commands=[Command("demo", "promote", "ana@laptop", NOW, id=1)])
    assert [(e.kind, e.message) for e in ended.events if e.kind == "promoted-manually"] == [
        ("promoted-manually", "ana@laptop ended the pause at step 3/4: pause until promoted")]
    assert run.record.step == 3 and weights(run)[V_NEW] == 100
    early = run.tick(advance=5, stats=GOOD)  # 5 s into step 4's own interval
    assert run.record.step == 3 and "promoted" not in [e.kind for e in early.events]
    run.tick(advance=5, stats=GOOD)
    assert run.events[-1] == "promoted"


def test_a_full_promote_after_a_failed_interval_starts_from_no_failures() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=BAD)
    assert run.record.failures == 1
    forced = run.tick(commands=[Command("demo", "promote", "ops@host", NOW, full=True, id=1)])
    assert (run.record.failures, analysed(run)["failures"], analysed(run)["verdict"]) == (0, 0, "waived")
    assert [(e.release, e.kind, e.version, e.commit) for e in forced.events] == [("demo", "promoted-manually", V_NEW, "c2")]


def test_the_analysis_shows_empty_stable_figures_when_the_router_reported_none() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=GOOD)
    assert analysed(run)["stable"] == {}


def test_waiting_for_the_router_is_progressing_and_recorded_when_it_starts() -> None:
    run = Driver()
    run.record = replace(run.record, phase="Healthy", message="x")
    waiting = run.tick(advance=1, router_follows=False)
    assert (rec(waiting).phase, rec(waiting).updated_at) == ("Progressing", run.now)
    assert rec(waiting).message == "step 1/4: weight 25%: waiting for the router to take the weights"


def test_a_walk_leaves_the_warm_standby_alone_and_an_abort_sends_all_traffic_to_stable() -> None:
    run = with_standby(Driver())
    prev = version_id(PREVIOUS)
    run.tick()
    assert weights(run) == {V_OLD: 75, V_NEW: 25, prev: 0}
    run.tick(advance=10, stats=BAD)
    rolled = run.tick(advance=10, stats=BAD)
    assert weights(rolled) == {V_OLD: 100, V_NEW: 0, prev: 0}
    assert {v.version: v.role for v in rolled.versions} == {V_OLD: "stable", V_NEW: "canary", prev: "standby"}
    assert (rec(rolled).step, rec(rolled).step_started_at, rec(rolled).updated_at) == (None, None, run.now)
    [aborted] = [e for e in rolled.events if e.kind == "aborted"]
    assert (aborted.release, aborted.version, aborted.commit, aborted.message) == ("demo", V_NEW, "c2", rec(rolled).message)
    assert rec(rolled).message.startswith(f"canary {V_NEW} rolled back: analysis failed 2 intervals in a row")


def test_a_completed_walk_clears_the_step_so_status_shows_no_step() -> None:
    run = Driver()
    run.tick()
    run.tick(commands=[Command("demo", "promote", "ops@host", NOW, full=True, id=1)])
    done = run.tick()
    assert run.events[-1] == "promoted" and (rec(done).step, rec(done).step_started_at) == (None, None)


def test_a_failed_interval_is_recorded_with_its_reasons_and_count_for_status() -> None:
    run = Driver()
    run.tick()
    slow_and_failing = {V_NEW: {"requests": 6, "errors": 1, "p95_latency_s": 2.5}}
    failed = run.tick(advance=10, stats=slow_and_failing)
    reasons = ["error rate 0.17 > 0.05", "p95 latency 2.50s > 2.0s"]
    assert (analysed(run)["verdict"], analysed(run)["reasons"], analysed(run)["failures"]) == ("failed", reasons, 1)
    assert [e.message for e in failed.events] == ["analysis 1/2 failed: error rate 0.17 > 0.05; p95 latency 2.50s > 2.0s"]
    rolled = run.tick(advance=10, stats=slow_and_failing)
    assert "analysis failed 2 intervals in a row: error rate 0.17 > 0.05; p95 latency 2.50s > 2.0s" in rec(rolled).message


def test_figures_without_an_error_count_are_judged_as_no_errors() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=10, stats={V_NEW: {"requests": 10, "p95_latency_s": 0.5}})
    assert analysed(run)["verdict"] == "passed" and run.record.step == 1


def test_a_full_promote_records_a_waived_analysis_with_empty_figures() -> None:
    run = Driver()
    run.tick()
    run.tick(advance=3, commands=[Command("demo", "promote", "ops@host", NOW, full=True, id=1)])
    assert run.record.analysis == {"at": run.now, "verdict": "waived", "reasons": ["promoted by ops@host"], "failures": 0,
                                   "canary": {}, "stable": {}, "step": 3, "step_passed": True}


def test_a_step_waiting_for_traffic_says_how_long_until_it_aborts() -> None:
    run = Driver()
    run.tick()
    waiting = run.tick(advance=10)
    assert rec(waiting).message.endswith("(last interval: 0 judged requests, 0 pinned previews (not counted)); aborts in 290s (progress_deadline)")


def test_an_unjudged_step_under_on_no_traffic_promote_says_what_it_saw() -> None:
    run = Driver(with_steps("      - weight: 25\n      - weight: 100\n", "      on_no_traffic: promote\n"))
    run.tick()
    moved = run.tick(advance=10, stats={V_NEW: {"requests": 0, "errors": 0, "pinned": {"requests": 50, "errors": 0}}})
    [unjudged] = [e for e in moved.events if e.kind == "unjudged"]
    assert unjudged.message == ("step 1/2: weight 25% completes without a passing analysis (last interval: 0 judged requests, "
                                "50 pinned previews (not counted); min_requests 5); on_no_traffic: promote")
