"""The post-promotion watch as tables and sequences: switch, watch, pass or switch back to the warm standby.

Each run feeds the rollout step its own output tick after tick (as the
reconciler does), with the router echoing the recorded weights and the
version's live figures per interval; what is asserted is what a user sees:
roles and weights, phase and message, events, `diffops status` and history.
"""

from __future__ import annotations

import pytest

from controller.cli.status_view import history_rows, status_text
from controller.parse.loader import InvalidRelease, parse_release
from controller.plan.versions import version_id
from controller.rollout.analysis import subject
from controller.rollout.steps import Desired, step
from controller.state.records import Command, ObservedApp, ReleaseRecord, VersionRecord
from controller.state.store import ControllerRecord, State
from tests.conftest import DEMO_RELEASE, edit, make_release

NOW = 3_000_000.0
WATCHED = ("    progress_deadline: 5m\n", "    progress_deadline: 5m\n    analysis:\n      interval: 10s\n      min_requests: 5\n"
           "      failure_limit: 2\n    post_promotion:\n      duration: 60s\n")
OLD = make_release(WATCHED)
NEW = make_release(WATCHED, ("    steps: 4\n", "    steps: 8\n"))
NEWER = make_release(WATCHED, ("    steps: 4\n", "    steps: 6\n"))
V_OLD, V_NEW, V_NEWER = version_id(OLD), version_id(NEW), version_id(NEWER)
GOOD = {V_NEW: {"requests": 20, "errors": 0, "p95_latency_s": 0.3}}
BAD = {V_NEW: {"requests": 10, "errors": 5, "p95_latency_s": 0.3}, V_OLD: {"requests": 0, "errors": 0,
                                                                      "pinned": {"requests": 12, "errors": 0}}}
FEW = {V_NEW: {"requests": 2, "errors": 2, "p95_latency_s": 0.3}}


class Driver:
    """A blue/green rollout of NEW over OLD, fed its own output; the router echoes the weights unless told not to."""

    def __init__(self, release=NEW, old=OLD):
        self.desired = Desired(release, version_id(release), "c2", "f2", "g1")
        self.record = ReleaseRecord("demo", "Progressing", "", "c2", self.desired.version, release.spec, NOW - 100)
        self.versions = [
            VersionRecord("demo", version_id(old), "stable", 100, "ready", "c1", old.spec, NOW - 3600, ready_at=NOW - 3600, gate_key="g1"),
            VersionRecord("demo", self.desired.version, "canary", 0, "starting", "c2", release.spec, NOW - 30, gate_key="g1"),
        ]
        self.now, self.events, self.messages = NOW, [], []

    def tick(self, advance=0.0, stats=None, commands=(), router_follows=True, desired=None):
        self.now += advance
        live = {v.version: v.weight for v in self.versions if v.status in ("starting", "ready", "retiring")}
        apps = {f"demo--{v.version}": ObservedApp(f"demo--{v.version}", "RUNNING", "", 1, 1) for v in self.versions}
        if router_follows:
            apps["demo"] = ObservedApp("demo", "RUNNING", "", 1, 1, weights=live)
        result = step("demo", self.now, desired or self.desired, self.record, self.versions, apps, {}, stats, list(commands))
        self.record, self.versions = result.release, result.versions
        self.events += [e.kind for e in result.events]
        self.messages += [e.message for e in result.events]
        return result

    def watching(self):
        """Ticks until the watch's clock runs: the switch, then the router confirming it."""
        self.tick()
        self.tick()
        assert self.record.analysis["started_at"] == self.now, self.record.analysis
        return self

    @property
    def roles(self):
        return {v.version: (v.role, v.weight, v.status) for v in self.versions}


def test_the_switch_starts_a_watch_whose_clock_waits_for_the_router():
    run = Driver()
    switched = run.tick(router_follows=False)
    assert run.roles == {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}
    assert run.events == ["promoted"] and switched.release.phase == "Progressing"
    assert run.record.analysis["version"] == V_NEW and run.record.analysis["started_at"] is None
    waiting = run.tick(advance=5, router_follows=False)
    assert "switching traffic to it" in waiting.release.message and run.record.analysis["started_at"] is None
    started = run.tick()
    assert run.record.analysis["started_at"] == run.now and run.record.analysis["ends_at"] == run.now + 60
    assert run.events[-1] == "post-promotion-watch" and f"warm standby {V_OLD}" in run.messages[-1]
    assert started.release.phase == "Progressing" and "post-promotion watch: 60s left, no interval judged yet" in started.release.message


# (id, per-interval figures (None: no figures), expected roles at the end, phase, message fragment, last event)
CASES = [
    ("healthy intervals pass the watch", [GOOD] * 6,
     {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Healthy", f"{V_NEW} serving 100%", "post-promotion-passed"),
    ("failure_limit failed intervals in a row switch back", [GOOD, BAD, BAD],
     {V_OLD: ("stable", 100, "ready"), V_NEW: ("canary", 0, "retiring")}, "Degraded",
     "post-promotion analysis failed 2 interval(s) in a row: error rate 0.50 > 0.05 (10 requests, 5 errors, error rate 0.50", "aborted"),
    ("failures not in a row never switch back", [BAD, GOOD, BAD, GOOD, BAD, GOOD],
     {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Healthy", f"{V_NEW} serving 100%", "post-promotion-passed"),
    ("too little traffic is inconclusive, never a rollback", [FEW] * 6,
     {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Healthy", f"{V_NEW} serving 100%", "post-promotion-passed"),
    ("no figures at all is inconclusive", [None] * 6,
     {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Healthy", f"{V_NEW} serving 100%", "post-promotion-passed"),
    ("still watching mid-way", [GOOD, FEW],
     {V_NEW: ("stable", 100, "ready"), V_OLD: ("standby", 0, "ready")}, "Progressing",
     "post-promotion watch: 40s left, last verdict inconclusive: 2 judged requests < min_requests 5 (2 requests, 2 errors", "post-promotion-watch"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_watch(case):
    _, intervals, roles, phase, fragment, last = case
    run = Driver().watching()
    for stats in intervals:
        result = run.tick(advance=10, stats=stats)
        if result.release.phase == "Degraded":
            break
    result = run.tick()  # one more tick: what the watch left behind holds
    assert run.roles == roles
    assert result.release.phase == phase and fragment in result.release.message, result.release.message
    assert run.events[-1] == last if phase != "Healthy" else last in run.events


def test_a_rolled_back_version_is_held_says_why_and_keeps_the_standby_warm():
    run = Driver().watching()
    run.tick(advance=10, stats=BAD)
    assert run.events[-1] == "analysis-failed" and "post-promotion analysis 1/2 failed: error rate 0.50 > 0.05" in run.messages[-1]
    rolled = run.tick(advance=10, stats=BAD)
    message = rolled.release.message
    assert f"{V_NEW} rolled back after promotion" in message and f"{V_OLD} (the warm standby) serves 100% again, no reload" in message
    assert "20s into its 60s watch" in message and "revert the commit" in message and "diffops retry demo" in message
    assert rolled.release.failed_version == V_NEW and rolled.release.held_fingerprint == "f2"
    [aborted] = [e for e in rolled.events if e.kind == "aborted"]
    assert aborted.version == V_NEW and aborted.commit == "c2"  # a revert branch and a git note follow, as for a canary
    for _ in range(3):  # held: git still asks for it, and it is not tried again
        held = run.tick(advance=20)
        assert held.release.phase == "Degraded" and "rollout-started" not in [e.kind for e in held.events]
    assert run.roles == {V_OLD: ("stable", 100, "ready")}  # the retired app is gone after it drained
    retried = run.tick(commands=[Command("demo", "retry", "ana", run.now, id=1)])
    assert [e.kind for e in retried.events] == ["retry", "rollout-started"]  # `diffops retry` lifts the hold


def test_the_standby_outlives_scale_down_delay_while_it_is_watched():
    short = ("    scale_down_delay: 10m\n", "    scale_down_delay: 60s\n")
    release = make_release(WATCHED, short, ("    steps: 4\n", "    steps: 8\n"))
    run = Driver(release, make_release(WATCHED, short))
    run.tick(router_follows=False)  # the switch: the standby's scale_down_delay starts now
    run.tick(advance=3)  # the router took it 3 s later: the watch runs until 63 s after the switch
    run.tick(advance=55, stats=GOOD)
    kept = run.tick(advance=4, stats=GOOD)  # 62 s: past scale_down_delay, the watch not over
    assert run.roles[V_OLD] == ("standby", 0, "ready") and "1s left" in kept.release.message
    run.tick(advance=2, stats=GOOD)  # the watch passed
    assert "post-promotion-passed" in run.events
    run.tick()  # no longer kept: scaled down as scale_down_delay says
    assert V_OLD not in run.roles and run.events[-1] == "standby-removed"


def test_abort_switches_back_and_promote_ends_the_watch_early():
    run = Driver().watching()
    aborted = run.tick(commands=[Command("demo", "abort", "ana@laptop", NOW, id=1)])
    assert aborted.release.phase == "Degraded" and "aborted by ana@laptop during its post-promotion watch" in aborted.release.message
    assert run.roles[V_OLD] == ("stable", 100, "ready")
    run = Driver().watching()
    skipped = run.tick(commands=[Command("demo", "promote", "ana@laptop", NOW, id=2)])
    assert skipped.release.phase == "Healthy" and run.events[-1] == "post-promotion-skipped"
    assert run.roles[V_OLD] == ("standby", 0, "ready")


def test_git_moving_on_or_a_lost_standby_ends_the_watch():
    run = Driver().watching()
    moved = run.tick(advance=10, stats=GOOD, desired=Desired(NEWER, V_NEWER, "c3", "f3", "g1"))
    assert [e.kind for e in moved.events][:2] == ["post-promotion-ended", "rollout-started"]
    assert f"git now asks for {V_NEWER}" in moved.events[0].message and subject(run.record, run.versions, NEWER.spec.rollout, run.now) is None
    run = Driver().watching()
    run.versions = [v for v in run.versions if v.version != V_OLD]
    ended = run.tick(advance=10, stats=BAD)
    assert ended.release.phase == "Healthy" and run.events[-1] == "post-promotion-ended" and "nothing is left to roll back to" in run.messages[-1]


def test_a_canary_reaching_100_is_watched_too():
    canary = ("    strategy: bluegreen\n", "    strategy: canary\n    steps:\n      - weight: 50\n      - weight: 100\n")
    release, old = make_release(WATCHED, canary, ("    steps: 4\n", "    steps: 8\n")), make_release(WATCHED, canary)
    run = Driver(release, old)
    run.tick()  # ready
    run.tick()  # step 1: 50%
    stats = {version_id(release): GOOD[V_NEW]}
    for _ in range(4):
        run.tick(advance=10, stats=stats)
    assert "promoted" in run.events and run.record.analysis["kind"] == "post-promotion"
    run.tick()
    assert run.events[-1] == "post-promotion-watch" and run.record.step is None


def test_without_post_promotion_the_switch_is_healthy_at_once():
    plain = make_release(("    steps: 4\n", "    steps: 8\n"))
    run = Driver(plain, make_release())
    run.tick()
    assert run.tick().release.phase == "Healthy" and run.record.analysis is None


def test_observe_reads_the_watched_version_once_an_interval_is_due():
    run = Driver()
    run.tick(router_follows=False)
    assert subject(run.record, run.versions, NEW.spec.rollout, run.now) is None  # the clock has not started
    run.tick()
    now = subject(run.record, run.versions, NEW.spec.rollout, run.now)
    later = subject(run.record, run.versions, NEW.spec.rollout, run.now + 10)
    assert (now.version, now.due, later.due) == (V_NEW, False, True)


def test_status_shows_the_watch_time_left_and_last_verdict_and_history_the_rollback():
    run = Driver().watching()
    run.tick(advance=10, stats=GOOD)
    state = State(ControllerRecord(), {"demo": run.record}, run.versions, {})
    text = status_text(state, now=run.now + 5)
    assert f"post-promotion watch of {V_NEW}: 45s left, standby {V_OLD} warm; last verdict passed" in text
    assert "analysis: passed (0 failed in a row): version 20 requests, error rate 0.0" in text
    from controller.state.records import Event
    events = [Event("demo", "rollout-started", "rolling out", V_NEW, "c2", NOW - 100), Event("demo", "promoted", "switched", V_NEW, "c2", NOW),
              Event("demo", "analysis-failed", "1/1", V_NEW, "c2", NOW + 10), Event("demo", "aborted", "rolled back after promotion", V_NEW, "c2", NOW + 10)]
    [row] = history_rows(events)
    assert row["outcome"] == "rolled back (post-promotion)" and [i["event"] for i in row["timeline"]] == ["promoted", "analysis-failed", "aborted"]


FILE = "releases/demo.yaml"
RULES = [
    ("watch longer than the standby stays warm", "      duration: 60s\n", "      duration: 20m\n", "spec.rollout.post_promotion.duration",
     "20m exceeds rollout.scale_down_delay (10m): the standby must stay warm for the whole watch", "duration: 20m"),
    ("watch shorter than one interval", "      duration: 60s\n", "      duration: 5s\n", "spec.rollout.post_promotion.duration",
     "shorter than one analysis interval (10s)", "duration: 5s"),
    ("prometheus provider without queries", "      failure_limit: 2\n", "      failure_limit: 2\n      provider: prometheus\n",
     "spec.rollout.analysis.prometheus", "provider: prometheus needs prometheus:", "analysis:"),
    ("a query that judges nothing", "      failure_limit: 2\n",
     "      failure_limit: 2\n      provider: prometheus\n      prometheus:\n        address: http://127.0.0.1:9090\n"
     "        queries:\n          - {name: rate, query: 'sum(rate(x[{{interval}}]))'}\n",
     "spec.rollout.analysis.prometheus.queries.0", "query 'rate' judges nothing: give it min, max or both", "- {name: rate"),
]


@pytest.mark.parametrize("case", RULES, ids=[c[0] for c in RULES])
def test_lint_rules_name_the_field_and_line(case):
    _, old, new, field, fragment, marker = case
    text = edit(edit(DEMO_RELEASE, *WATCHED), old, new)
    with pytest.raises(InvalidRelease) as info:
        parse_release(text.encode(), FILE)
    [error] = [e for e in info.value.errors if e.field == field]
    assert fragment in error.message, error.message
    assert marker in text.splitlines()[error.line - 1], (error.line, error)
