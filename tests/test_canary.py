"""The canary walk as tables and sequences: steps, pauses, analysis, manual control, resuming after a crash."""

from __future__ import annotations


import pytest

from controller.canary import judge
from controller.records import Command, ObservedApp, ReleaseRecord, VersionRecord
from controller.rollout import Desired, step
from controller.versions import version_id
from tests.conftest import make_release

NOW = 2_000_000.0
STEPS = "    strategy: canary\n    steps:\n      - weight: 25\n      - pause: 30s\n      - pause:\n      - weight: 100\n    analysis:\n      interval: 10s\n      min_requests: 5\n      max_error_rate: 0.05\n      max_p95_latency_s: 2\n      failure_limit: 2\n"
OLD = make_release(("    strategy: bluegreen\n", STEPS))
NEW = make_release(("    strategy: bluegreen\n", STEPS), ("    steps: 4\n", "    steps: 8\n"))
V_OLD, V_NEW = version_id(OLD), version_id(NEW)
DESIRED = Desired(NEW, V_NEW, "c2", "f2", "g1")


def spec(release) -> dict:
    return release.model_dump(mode="json")["spec"]


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

    def __init__(self):
        self.record, self.versions = start()
        self.now = NOW
        self.events: list[str] = []

    def tick(self, advance: float = 0.0, stats=None, commands=(), router_follows=True):
        self.now += advance
        live = {v.version: v.weight for v in self.versions if v.status in ("starting", "ready", "retiring")} if router_follows else {}
        result = step("demo", self.now, DESIRED, self.record, self.versions, observed(live), {}, stats, list(commands))
        self.record, self.versions = result.release, result.versions
        self.events += [e.kind for e in result.events]
        return result


@pytest.mark.parametrize("stats,outcome,reason", [
    (None, "inconclusive", "0 requests < min_requests 5"),
    ({"requests": 4, "errors": 4}, "inconclusive", "4 requests < min_requests 5"),
    ({"requests": 20, "errors": 1, "p95_latency_s": 0.5}, "passed", None),
    ({"requests": 20, "errors": 10, "p95_latency_s": 0.5}, "failed", "error rate 0.50 > 0.05"),
    ({"requests": 20, "errors": 0, "p95_latency_s": 3.5}, "failed", "p95 latency 3.50s > 2.0s"),
])
def test_judge(stats, outcome, reason):
    verdict = judge(stats, NEW.spec.rollout.analysis)
    assert verdict.outcome == outcome
    assert (reason in verdict.reasons) if reason else not verdict.reasons


def test_a_healthy_canary_walks_its_steps_and_waits_for_promote():
    run = Driver()
    first = run.tick()  # replicas ready: step 1 sets 25%
    assert weights(first) == {V_OLD: 75, V_NEW: 25} and run.record.step == 0
    run.tick()  # router took 25%: on to the 30s pause
    assert run.record.step == 1 and run.record.step_started_at == run.now
    paused = run.tick(advance=10)
    assert paused.release.phase == "Progressing" and "20s left" in paused.release.message
    run.tick(advance=21)  # the timed pause is over: the indefinite pause
    held = run.tick(advance=3600)
    assert held.release.phase == "Paused" and "diffops promote demo" in held.release.message and weights(held)[V_NEW] == 25
    run.tick(commands=[Command("demo", "promote", "ana@laptop", run.now, id=1)])
    assert run.record.step == 3 and weights(run)[V_NEW] == 100
    done = run.tick()
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
    run.tick()  # pause 30s started at NOW
    assert run.record.step == 1
    resumed = step("demo", NOW + 29, DESIRED, run.record, run.versions, observed({V_OLD: 75, V_NEW: 25}), {})
    assert resumed.release.step == 1 and resumed.events == [] and "1s left" in resumed.release.message
    after = step("demo", NOW + 31, DESIRED, run.record, run.versions, observed({V_OLD: 75, V_NEW: 25}), {})
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
        held = sum((v.replicas if v.replicas is not None else v.spec["replicas"]["count"]) for v in vs if v.status in ("starting", "ready"))
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
