"""The canary walk as tables and sequences: steps, pauses, analysis, manual control, resuming after a crash.

The analysis judges only requests the router assigned by weight: pinned
previews are counted apart and never complete a step; a canary nobody sent
traffic to is never promoted unless the release says `on_no_traffic: promote`.
"""

from __future__ import annotations

import pytest

from controller.parse.release import Analysis, Spec
from controller.plan.versions import version_id
from controller.rollout.canary import judge
from controller.rollout.steps import Desired, step
from controller.state.records import Command, ObservedApp, ReleaseRecord, VersionRecord
from serving.tally import window_stats
from tests.conftest import make_release

NOW = 2_000_000.0
STEPS = "    strategy: canary\n    steps:\n      - weight: 25\n      - pause: 30s\n      - pause:\n      - weight: 100\n    analysis:\n      interval: 10s\n      min_requests: 5\n      max_error_rate: 0.05\n      max_p95_latency_s: 2\n      failure_limit: 2\n"
OLD = make_release(("    strategy: bluegreen\n", STEPS))
NEW = make_release(("    strategy: bluegreen\n", STEPS), ("    steps: 4\n", "    steps: 8\n"))
V_OLD, V_NEW = version_id(OLD), version_id(NEW)
DESIRED = Desired(NEW, V_NEW, "c2", "f2", "g1")
GOOD = {V_NEW: {"requests": 20, "errors": 0, "p95_latency_s": 0.5, "pinned": {"requests": 0, "errors": 0, "p95_latency_s": None}}}
PINNED_ONLY = {V_NEW: {"requests": 0, "errors": 0, "p95_latency_s": None, "pinned": {"requests": 50, "errors": 0, "p95_latency_s": 0.4}}}
FEW = {V_NEW: {"requests": 4, "errors": 0, "p95_latency_s": 0.5, "pinned": {"requests": 30, "errors": 0, "p95_latency_s": 0.4}}}


def spec(release) -> Spec:
    return release.spec


def start() -> tuple[ReleaseRecord, list[VersionRecord]]:
    record = ReleaseRecord("demo", "Progressing", "", "c2", V_NEW, spec(NEW), NOW - 100)
    stable = VersionRecord("demo", V_OLD, "stable", 100, "ready", "c1", spec(OLD), NOW - 3600, ready_at=NOW - 3600, gate_key="g1")
    canary = VersionRecord("demo", V_NEW, "canary", 0, "starting", "c2", spec(NEW), NOW - 10, gate_key="g1")
    return record, [stable, canary]


def observed(weights=None, ready=True) -> dict[str, ObservedApp]:
    apps = {f"demo--{V_NEW}": ObservedApp(f"demo--{V_NEW}", "RUNNING" if ready else "DEPLOYING", "", int(ready), 1)}
    if weights is not None:
        apps["demo"] = ObservedApp("demo", "RUNNING", "", 1, 1, weights=weights)
    return apps


def weights(result) -> dict[str, int]:
    return {v.version: v.weight for v in result.versions}


class Driver:
    """Feeds the step its own output, as the reconciler does tick after tick; the router echoes weights."""

    def __init__(self, desired: Desired = DESIRED):
        self.desired = desired
        self.record, self.versions = start()
        self.now = NOW
        self.events: list[str] = []

    def tick(self, advance: float = 0.0, stats=None, commands=(), router_follows=True):
        self.now += advance
        live = {v.version: v.weight for v in self.versions if v.status in ("starting", "ready", "retiring")} if router_follows else {}
        result = step("demo", self.now, self.desired, self.record, self.versions, observed(live), {}, stats, list(commands))
        self.record, self.versions = result.release, result.versions
        self.events += [e.kind for e in result.events]
        return result


def pinned(requests: int, errors: int = 0) -> dict:
    return {"requests": requests, "errors": errors, "p95_latency_s": 0.4 if requests else None}


@pytest.mark.parametrize("stats,outcome,reason", [
    (None, "inconclusive", "0 judged requests < min_requests 5"),
    ({"requests": 4, "errors": 4}, "inconclusive", "4 judged requests < min_requests 5"),
    ({"requests": 0, "errors": 0, "pinned": pinned(40)}, "inconclusive", "0 judged requests < min_requests 5 (40 pinned previews not counted)"),
    ({"requests": 20, "errors": 1, "p95_latency_s": 0.5}, "passed", None),
    ({"requests": 20, "errors": 0, "p95_latency_s": 0.5, "pinned": pinned(20, errors=20)}, "passed", None),  # pinned errors are not the canary's verdict
    ({"requests": 20, "errors": 10, "p95_latency_s": 0.5, "pinned": pinned(100)}, "failed", "error rate 0.50 > 0.05"),  # nor do pinned successes dilute it
    ({"requests": 20, "errors": 0, "p95_latency_s": 3.5}, "failed", "p95 latency 3.50s > 2.0s"),
])
def test_judge(stats, outcome, reason):
    verdict = judge(stats, NEW.spec.rollout.analysis)
    assert verdict.outcome == outcome
    assert (reason in verdict.reasons) if reason else not verdict.reasons


def test_judge_with_min_requests_zero_passes_an_empty_interval_instead_of_dividing_by_zero():
    assert judge({"requests": 0, "errors": 0}, Analysis(min_requests=0)).outcome == "passed"


# (at, version, ok, seconds, nsfw) answers the router remembered, judged (assigned by weight) and pinned (X-Diffops-Version)
JUDGED = [(100.0, "new", True, 0.2, True), (101.0, "new", False, 0.1, False), (102.0, "old", True, 0.3, False), (50.0, "new", False, 9.0, True)]
PINNED = [(100.5, "new", True, 0.4, True), (100.6, "new", True, 0.6, False), (100.7, "new", False, 0.1, False), (103.0, "new", True, 0.5, False)]
NONE = {"requests": 0, "errors": 0, "p95_latency_s": None, "nsfw": 0}
WINDOW = [
    ("judged and pinned apart", 60.0, {
        "new": {"requests": 2, "errors": 1, "p95_latency_s": 0.2, "nsfw": 1, "pinned": {"requests": 4, "errors": 1, "p95_latency_s": 0.6, "nsfw": 1}},
        "old": {"requests": 1, "errors": 0, "p95_latency_s": 0.3, "nsfw": 0, "pinned": NONE}}),
    ("only pinned answers since: zero judged", 102.5, {"new": {**NONE, "pinned": {"requests": 1, "errors": 0, "p95_latency_s": 0.5, "nsfw": 0}}}),
    ("nothing since", 200.0, {}),
]


@pytest.mark.parametrize("case", WINDOW, ids=[c[0] for c in WINDOW])
def test_router_window_reports_pinned_previews_apart_from_judged_requests(case):
    _, since, expected = case
    assert window_stats(JUDGED, PINNED, since) == expected


def test_a_healthy_canary_walks_its_steps_and_waits_for_promote():
    run = Driver()
    first = run.tick()  # replicas ready: step 1 sets 25%
    assert weights(first) == {V_OLD: 75, V_NEW: 25} and run.record.step == 0
    waiting = run.tick()  # router took 25%, but nothing is judged yet
    assert run.record.step == 0 and "waiting for enough traffic to judge" in waiting.release.message
    run.tick(advance=10, stats=GOOD)  # an interval of the step passed: on to the 30s pause
    assert run.record.step == 1 and run.record.step_started_at == run.now
    paused = run.tick(advance=10, stats=GOOD)
    assert paused.release.phase == "Progressing" and "20s left" in paused.release.message
    run.tick(advance=21, stats=GOOD)  # the timed pause is over and was judged: the indefinite pause
    held = run.tick(advance=3600)
    assert held.release.phase == "Paused" and "diffops promote demo" in held.release.message and weights(held)[V_NEW] == 25
    run.tick(commands=[Command("demo", "promote", "ana@laptop", run.now, id=1)])
    assert run.record.step == 3 and weights(run)[V_NEW] == 100
    assert run.tick().release.phase == "Progressing" and run.record.step == 3  # 100% is judged too before promotion
    done = run.tick(advance=10, stats=GOOD)
    assert {v.version: (v.role, v.weight) for v in done.versions} == {V_NEW: ("stable", 100), V_OLD: ("standby", 0)}
    assert run.events.count("step") == 4 and "promoted-manually" in run.events and run.events[-1] == "promoted"


def test_a_failing_canary_is_rolled_back_after_failure_limit_intervals():
    run = Driver()
    run.tick()
    bad = {V_NEW: {"requests": 20, "errors": 10, "p95_latency_s": 0.2}, V_OLD: {"requests": 60, "errors": 0}}
    once = run.tick(advance=10, stats=bad)
    assert run.record.failures == 1 and once.release.phase != "Degraded"
    rolled = run.tick(advance=10, stats=bad)
    assert weights(rolled) == {V_OLD: 100, V_NEW: 0}
    assert {v.version: v.status for v in rolled.versions}[V_NEW] == "retiring"
    assert rolled.release.phase == "Degraded"
    assert "error rate 0.50 > 0.05" in rolled.release.message and "revert the commit" in rolled.release.message
    assert run.events[-1] == "aborted"
    later = run.tick(advance=11)
    assert [v.version for v in later.versions] == [V_OLD]  # the retired canary's app is gone
    assert run.tick(advance=100).prepare == []  # held: not retried until a new commit or `diffops retry`


def test_inconclusive_intervals_neither_pass_nor_fail():
    run = Driver()
    run.tick()
    for _ in range(5):
        run.tick(advance=10, stats={V_NEW: {"requests": 2, "errors": 2}})
    assert run.record.failures == 0 and run.record.analysis["verdict"] == "inconclusive"


def test_a_restarted_controller_resumes_the_pause_at_its_deadline():
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=GOOD)  # pause 30s started at NOW + 10
    assert run.record.step == 1
    started = run.now
    resumed = step("demo", started + 29, DESIRED, run.record, run.versions, observed({V_OLD: 75, V_NEW: 25}), {}, GOOD)
    assert resumed.release.step == 1 and resumed.events == [] and "1s left" in resumed.release.message
    after = step("demo", started + 31, DESIRED, resumed.release, resumed.versions, observed({V_OLD: 75, V_NEW: 25}), {})
    assert after.release.step == 2 and [e.kind for e in after.events] == ["step"]


def test_no_step_moves_before_the_router_takes_the_weights():
    run = Driver()
    run.tick()
    stuck = run.tick(advance=60, router_follows=False)
    assert run.record.step == 0 and "waiting for the router" in stuck.release.message


def test_manual_abort_and_full_promote():
    aborting = Driver()
    aborting.tick()
    rolled = aborting.tick(commands=[Command("demo", "abort", "ops@host", NOW, id=1)])
    assert weights(rolled)[V_OLD] == 100 and "aborted by ops@host" in rolled.release.message
    retried = aborting.tick(commands=[Command("demo", "retry", "ops@host", NOW, id=2)])
    assert "retry" in aborting.events and any(v.status == "preparing" for v in retried.versions)

    promoting = Driver()
    promoting.tick()
    promoting.tick(commands=[Command("demo", "promote", "ops@host", NOW, full=True, id=3)])
    assert weights(promoting)[V_NEW] == 100
    assert promoting.tick().release.phase == "Progressing" and promoting.events[-1] == "promoted"


def test_auto_surges_when_blue_green_does_not_fit():
    """Two GPUs, the old version holds both: auto shrinks it as the new one grows, one replica at a time."""
    edits = [("    strategy: bluegreen\n", "    strategy: auto\n"), ("gpus: 0", "gpus: 1"), ("count: 1", "count: 2")]
    old, new = make_release(*edits), make_release(*edits, ("    steps: 4\n", "    steps: 8\n"))
    v_old, v_new = version_id(old), version_id(new)
    desired = Desired(new, v_new, "c2", "f2", "g1")
    record = ReleaseRecord("demo", "Progressing", "", "c2", v_new, spec(new), NOW)
    versions = [VersionRecord("demo", v_old, "stable", 100, "ready", "c1", spec(old), NOW - 99, gate_key="g1"),
                VersionRecord("demo", v_new, "canary", 0, "verified", "c2", spec(new), NOW, gate_key="g1")]
    total = 2.0

    def free(vs):
        held = sum((v.replicas if v.replicas is not None else v.spec.replicas.count) for v in vs if v.status in ("starting", "ready"))
        return {"GPU": total - held, "CPU": 8.0}

    seen = []
    for tick in range(30):
        live = {v.version: v.weight for v in versions if v.status in ("starting", "ready", "retiring")}
        apps = {f"demo--{v.version}": ObservedApp(f"demo--{v.version}", "RUNNING", "", v.replicas or 2, v.replicas or 2) for v in versions}
        apps["demo"] = ObservedApp("demo", "RUNNING", "", 1, 1, weights=live)
        result = step("demo", NOW + tick * 20, desired, record, versions, apps, {}, None, [], free(versions))
        record, versions = result.release, result.versions
        assert free(versions)["GPU"] >= 0, f"tick {tick}: GPUs overcommitted"
        seen.append({v.version: (v.role, v.weight, v.replicas, v.status) for v in versions})
        if record.phase == "Healthy" or (len(versions) == 1 and versions[0].role == "stable" and versions[0].version == v_new):
            break
    assert versions[-1].version == v_new and versions[-1].role == "stable" and versions[-1].weight == 100
    assert any(state.get(v_new, (None, 0))[1] not in (0, 100) for state in seen)  # traffic was split on the way
    assert all(state.get(v_old, ("", 0))[1] + state.get(v_new, ("", 0))[1] == 100 for state in seen if v_old in state and v_new in state)


def desired_with(analysis: str) -> Desired:
    """The canary release with extra `analysis:` lines (e.g. on_no_traffic) and a 2-minute progress deadline."""
    edits = (("    strategy: bluegreen\n", STEPS + analysis), ("progress_deadline: 5m", "progress_deadline: 2m"), ("    steps: 4\n", "    steps: 8\n"))
    release = make_release(*edits)
    assert version_id(release) == V_NEW  # rollout settings are policy: the same version
    return Desired(release, V_NEW, "c2", "f2", "g1")


WAIT, PROMOTE = desired_with(""), desired_with("      on_no_traffic: promote\n")

# (case, release, stats every 10s tick, step after 3 ticks (30s), phase, message fragment, events that must appear)
STEP_GATE = [
    ("pinned previews only: the step does not complete", WAIT, PINNED_ONLY, 0, "Progressing",
     "0 judged requests, 50 pinned previews (not counted)", []),
    ("no traffic at all: the step does not complete", WAIT, None, 0, "Progressing",
     "waiting for enough traffic to judge: min_requests 5 judged requests in one 10s interval", []),
    ("too few judged requests: the step does not complete", WAIT, FEW, 0, "Progressing", "4 judged requests, 30 pinned previews", []),
    ("enough judged requests passing: the step completes", WAIT, GOOD, 1, "Progressing", "pause 30s", ["step"]),
    ("on_no_traffic promote: an unjudged step completes, and says so", PROMOTE, PINNED_ONLY, 1, "Progressing", "pause 30s", ["unjudged"]),
    ("on_no_traffic promote still judges traffic that comes", PROMOTE, GOOD, 1, "Progressing", "pause 30s", ["step"]),
]


@pytest.mark.parametrize("case", STEP_GATE, ids=[c[0] for c in STEP_GATE])
def test_a_step_completes_only_once_judged_traffic_passed(case):
    _, desired, stats, step_index, phase, fragment, events = case
    run = Driver(desired)
    run.tick()
    for _ in range(3):
        result = run.tick(advance=10, stats=stats)
    assert run.record.step == step_index
    assert result.release.phase == phase and fragment in result.release.message, result.release.message
    assert set(events) <= set(run.events)
    if step_index == 0:
        assert weights(result) == {V_OLD: 75, V_NEW: 25} and "unjudged" not in run.events


@pytest.mark.parametrize("stats", [None, PINNED_ONLY, FEW], ids=["no traffic", "pinned only", "too few judged"])
def test_without_judged_traffic_the_canary_is_never_promoted_and_fails_at_the_progress_deadline(stats):
    run = Driver(WAIT)
    run.tick()
    deadline = WAIT.release.spec.rollout.progress_deadline.total_seconds()
    while run.now + 10 <= NOW + deadline:
        result = run.tick(advance=10, stats=stats)
        assert run.record.step == 0 and result.release.phase == "Progressing", f"{run.now - NOW:.0f}s: {result.release.message}"
    aborted = run.tick(advance=10, stats=stats)
    assert aborted.release.phase == "Degraded" and "promoted" not in run.events and run.events[-1] == "aborted"
    message = aborted.release.message
    assert "not enough traffic to judge the canary" in message and "min_requests 5 judged requests" in message, message
    assert "progress_deadline 120s" in message and "on_no_traffic: promote" in message
    assert weights(aborted) == {V_OLD: 100, V_NEW: 0} and {v.version: v.status for v in aborted.versions}[V_NEW] == "retiring"


def test_a_timed_pause_without_judged_traffic_waits_past_its_end_then_fails():
    run = Driver(WAIT)
    run.tick()
    run.tick(advance=10, stats=GOOD)  # step 1 passed: the 30s pause
    assert run.record.step == 1
    for _ in range(3 + 12):  # the pause ends at 30s; 2 minutes of progress deadline after that
        held = run.tick(advance=10, stats=PINNED_ONLY)
        assert run.record.step == 1 and held.release.phase == "Progressing"
    failed = run.tick(advance=10, stats=PINNED_ONLY)
    assert failed.release.phase == "Degraded" and "not enough traffic" in failed.release.message
    assert "step 2/4: pause 30s" in failed.release.message


def test_a_full_manual_promote_is_an_explicit_override_of_the_analysis():
    run = Driver(WAIT)
    run.tick()
    forced = run.tick(commands=[Command("demo", "promote", "ops@host", NOW, full=True, id=1)])
    assert any("ops@host" in e.message and "unjudged" in e.message for e in forced.events)
    done = run.tick()
    assert run.events[-1] == "promoted" and {v.version: v.role for v in done.versions}[V_NEW] == "stable"
    assert run.record.analysis["verdict"] == "waived" and run.record.analysis["reasons"] == ["promoted by ops@host"]


# min_requests 5, max_error_rate 0.05, max_p95_latency_s 2 (STEPS above): each threshold at its edge
JUDGE_EDGES = [
    ({"requests": 5, "errors": 0, "p95_latency_s": 0.5}, "passed", [], 0.0),  # exactly min_requests is judged
    ({"requests": 20, "errors": 1, "p95_latency_s": 2.0}, "passed", [], 0.05),  # at both thresholds: not over them
    ({"requests": 20, "errors": 2, "p95_latency_s": None}, "failed", ["error rate 0.10 > 0.05"], 0.1),  # no latency figure: not judged on it
    ({"requests": 3, "errors": 1, "p95_latency_s": 2.01}, "inconclusive", ["3 judged requests < min_requests 5"], None),
    ({"requests": 6, "errors": 1, "p95_latency_s": 2.5}, "failed", ["error rate 0.17 > 0.05", "p95 latency 2.50s > 2.0s"], 0.1667),
]


@pytest.mark.parametrize("stats, outcome, reasons, rate", JUDGE_EDGES)
def test_judge_at_the_thresholds(stats, outcome, reasons, rate):
    verdict = judge(stats, NEW.spec.rollout.analysis)
    assert (verdict.outcome, list(verdict.reasons), verdict.figures.get("error_rate")) == (outcome, reasons, rate)


def test_each_failed_interval_is_an_event_and_the_abort_names_the_count():
    run = Driver()
    run.tick()
    bad = {V_NEW: {"requests": 20, "errors": 10, "p95_latency_s": 0.2}}
    first = run.tick(advance=10, stats=bad)
    assert [e.message for e in first.events] == ["analysis 1/2 failed: error rate 0.50 > 0.05"]
    second = run.tick(advance=10, stats=bad)
    assert [e.kind for e in second.events] == ["analysis-failed", "aborted"]
    assert f"canary {V_NEW} rolled back: analysis failed 2 intervals in a row: error rate 0.50 > 0.05; {V_OLD} serves 100%" in second.release.message
    retiring = next(v for v in second.versions if v.version == V_NEW)
    assert retiring.retire_at == run.now + 10  # in-flight requests get 10 s before its app is deleted


def test_a_passing_interval_resets_the_failure_count():
    run = Driver()
    run.tick()
    bad = {V_NEW: {"requests": 20, "errors": 10, "p95_latency_s": 0.2}}
    run.tick(advance=10, stats=bad)
    assert run.record.failures == 1
    run.tick(advance=10, stats=GOOD)
    assert run.record.failures == 0
    survived = run.tick(advance=10, stats=bad)
    assert run.record.failures == 1 and survived.release.phase != "Degraded"


def test_an_interval_is_judged_when_it_has_lasted_its_full_length_and_not_before():
    run = Driver()
    run.tick()  # step 1 starts; the interval with it
    early = run.tick(advance=9.9, stats=GOOD)
    assert run.record.analysis is None and run.record.step == 0 and "no interval judged yet" in early.release.message
    run.tick(advance=0.1, stats=GOOD)
    assert run.record.analysis["verdict"] == "passed" and run.record.analysis["at"] == run.now and run.record.step == 1


def test_the_step_events_describe_each_step():
    run = Driver()
    run.tick()
    run.tick(advance=10, stats=GOOD)  # to the 30 s pause
    run.tick(advance=30, stats=GOOD)  # to the indefinite pause
    held = run.tick(advance=1)
    assert [e.message for e in Driver().tick().events if e.kind == "step"] == [f"step 1/4: weight 25% ({V_NEW} canary, {V_OLD} stable)"]
    assert held.release.message == (f"step 3/4: pause until promoted; canary {V_NEW} at 25%; `diffops promote demo` to go on")
    timed = Driver()
    timed.tick()
    timed.tick(advance=10, stats=GOOD)
    left = timed.tick(advance=12.4, stats=GOOD)
    assert left.release.message == f"step 2/4: pause 30s: 18s left; canary {V_NEW} at 25%"


def test_every_walk_event_names_the_release_the_canary_and_the_commit():
    run = Driver()
    events = []
    for stats, commands in [(None, ()), (GOOD, ()), ({V_NEW: {"requests": 20, "errors": 10}}, ()), (GOOD, ()),
                            (None, [Command("demo", "promote", "ana@laptop", NOW, id=1)])]:
        events += run.tick(advance=10, stats=stats, commands=commands).events
    walk = [e for e in events if e.kind in ("step", "analysis-failed", "promoted-manually")]
    assert {e.kind for e in walk} == {"step", "analysis-failed", "promoted-manually"}
    assert all((e.release, e.version, e.commit) == ("demo", V_NEW, "c2") for e in walk), walk


def test_the_analysis_records_the_stable_versions_figures_beside_the_canary():
    run = Driver()
    run.tick()
    stable_figures = {"requests": 60, "errors": 0, "p95_latency_s": 0.3}
    run.tick(advance=10, stats={**GOOD, V_OLD: stable_figures})
    assert run.record.analysis["stable"] == stable_figures and run.record.analysis["canary"]["requests"] == 20


def test_promote_during_a_weight_step_changes_nothing_and_a_full_promote_restarts_the_interval():
    run = Driver()
    run.tick()
    before = run.record
    run.tick(commands=[Command("demo", "promote", "ops@host", NOW, id=1)])
    assert run.record.step == 0 and "promoted-manually" not in run.events and run.record.step_started_at == before.step_started_at
    run.tick(advance=4, commands=[Command("demo", "promote", "ops@host", NOW, full=True, id=2)])
    assert (run.record.step, run.record.step_started_at, run.record.analysis_at, run.record.failures) == (3, run.now, run.now, 0)


def test_failures_counted_in_an_earlier_walk_do_not_carry_into_a_new_one():
    from dataclasses import replace

    run = Driver()
    run.record = replace(run.record, failures=1, analysis={"verdict": "failed", "step": 0, "step_passed": False})
    run.tick()  # the walk starts: its own count, its own analysis
    assert (run.record.failures, run.record.analysis, run.record.analysis_at) == (0, None, run.now)
    once = run.tick(advance=10, stats={V_NEW: {"requests": 20, "errors": 10}})
    assert run.record.failures == 1 and once.release.phase == "Progressing"
