"""The I/O phases of a tick, each alone: observe, record, apply, annotate, and the background preparations.

Real git repositories (tests/conftest.py ReleaseRepo), real SQLite, real model
verification; Ray Serve is the fake of tests/test_reconciler.py and the gate
passes at once (both at our own boundary). The pure decide phase has its own
tables in tests/test_tick_decide.py.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.fakes import PassingGate
from controller.apply.applier import Applier
from controller.apply.serve_config import RenderSettings
from controller.metrics import ControllerMetrics
from controller.parse.release import Spec
from controller.plan.versions import version_id
from controller.source.git_source import ReleaseSource
from controller.state.records import Command, Event, ReleaseRecord, VersionRecord
from controller.state.store import State, Store
from controller.tick import annotate, apply, record
from controller.tick.decide import Policy, TickInput, decide
from controller.tick.observe import Observation, Observer, free_resources, recorded_apps
from controller.tick.prepare import Preparations
from serving.artifacts import ModelCache
from tests.conftest import ReleaseRepo, respec
from tests.live import wait_for
from tests.test_reconciler import FakeServe, foreign

NOW = 1_000_000.0


class CountingServe(FakeServe):
    """The fake Serve, counting what the observe phase asks of Ray, with a resource report and figures to give."""

    def __init__(self, resources: dict[str, tuple[float, float]] | None = None, stats_error: Exception | None = None) -> None:
        super().__init__()
        self.resources, self.stats_error = resources, stats_error
        self.asked: list[str] = []

    def cluster_resources(self) -> dict[str, tuple[float, float]] | None:
        self.asked.append("resources")
        return self.resources

    def router_weights(self, release: str) -> dict[str, int] | None:
        self.asked.append(f"weights {release}")
        return super().router_weights(release)

    def router_stats(self, release: str, since: float) -> dict[str, dict[str, Any]] | None:
        self.asked.append(f"stats {release}")
        if self.stats_error is not None:
            raise self.stats_error
        return {}


class Tick:
    """One release repo with the parts a tick's phases work on: its source, a store, the fake Serve, preparations."""

    def __init__(self, repo: ReleaseRepo, state_dir: Path, serve: FakeServe, owner: str = "ctl-a"):
        self.repo, self.serve = repo, serve
        self.source = ReleaseSource.open(repo.path)
        self.db = state_dir / "state.db"
        self.store = Store(self.db)
        self.settings = RenderSettings(repo=str(repo.path), cache_dir=str(state_dir / "models"), owner=owner)
        self.cache = ModelCache(Path(self.settings.cache_dir))
        self.preparations = Preparations(self.source, self.store, PassingGate(), self.cache, self.settings.cache_dir, state_dir / "gate")
        self.observer = Observer(self.source, serve, owner, Policy(), clock=lambda: NOW)

    def observe(self, state: State | None = None, applied: set[str] | None = None) -> Observation:
        head = self.source.resolve().hexsha
        return self.observer.observe(head, self.source.snapshot(head), state or State(), applied or set(), self.store, self.preparations)


@pytest.fixture
def tick(model_repo: ReleaseRepo, tmp_path: Path):
    made: list[Tick] = []

    def make(serve: FakeServe | None = None, owner: str = "ctl-a") -> Tick:
        made.append(Tick(model_repo, tmp_path / f"state-{len(made)}", serve or CountingServe(), owner))
        return made[-1]

    yield make
    for t in made:
        t.preparations.close()
        t.store.close()


def demo_spec(repo: ReleaseRepo) -> Spec:
    source = ReleaseSource.open(repo.path)
    return source.snapshot(source.resolve().hexsha).releases["demo"].spec


def live(repo: ReleaseRepo, role: str = "stable", status: str = "ready", count: int = 1, name: str = "demo") -> tuple[VersionRecord, str]:
    spec = respec(demo_spec(repo), replicas={"count": count})
    source = ReleaseSource.open(repo.path)
    version = version_id(source.snapshot(source.resolve().hexsha).releases["demo"])
    weight = 100 if role == "stable" else 0
    return VersionRecord(name, version, role, weight, status, "c1", spec, NOW - 60, ready_at=NOW - 30), version


# --- observe ---------------------------------------------------------------------------------------------------------


def test_observe_reads_each_release_from_the_commit(tick, model_repo: ReleaseRepo):
    model_repo.release("other")
    model_repo.write("releases/broken.yaml", "apiVersion: diffops/v1\nkind: Release\n")
    model_repo.commit("two more releases")
    seen = tick().observe()
    inputs = {i.name: i for i in seen.tick.releases}
    assert list(inputs) == ["broken", "demo", "other"]  # name order: the order of the log lines
    assert inputs["broken"].file is not None and inputs["broken"].file.release is None and inputs["broken"].gate_key is None
    demo = inputs["demo"]
    assert demo.now == NOW and demo.head == model_repo.repo.head.commit.hexsha and demo.record is None
    assert demo.desired_version == version_id(demo.file.release) and len(demo.gate_key or "") == 12
    assert demo.unobserved is None and demo.held_by is None and demo.stats is None


def test_the_gate_key_follows_the_golden_reference_in_git(tick, model_repo: ReleaseRepo):
    before = {i.name: i.gate_key for i in tick().observe().tick.releases}
    model_repo.write("releases/golden/demo.png", b"another reference image")
    model_repo.commit("new golden reference")
    after = {i.name: i.gate_key for i in tick().observe().tick.releases}
    assert before["demo"] != after["demo"]


def test_a_name_another_owner_holds_is_observed_as_held_and_nothing_more_is_read(tick):
    serve = CountingServe(resources={"CPU": (0.0, 4.0)})
    serve.config = {"applications": [foreign("demo", "ctl-b")]}
    seen = tick(serve).observe()
    [demo] = seen.tick.releases
    assert demo.held_by is not None and "belongs to controller 'ctl-b'" in demo.held_by
    assert demo.gate_key is None and set(seen.others) == {"demo"} and seen.tick.apps == {}
    assert "stats demo" not in serve.asked


@pytest.mark.parametrize(("case", "recorded", "asked", "free"), [
    ("nothing runs yet: ask", False, True, {"CPU": 3.0, "GPU": 1.0}),
    ("the desired version runs settled: do not ask", True, False, None),
])
def test_free_resources_are_asked_of_ray_only_while_something_must_start(tick, model_repo, case, recorded, asked, free):
    serve = CountingServe(resources={"CPU": (1.0, 4.0), "GPU": (0.0, 1.0)})
    state = State()
    if recorded:
        version, _ = live(model_repo)
        state = State(versions=[version], releases={"demo": ReleaseRecord("demo", "Healthy", "", "c1", version.version, version.spec, NOW)})
    [demo] = tick(serve).observe(state).tick.releases
    assert ("resources" in serve.asked) == asked
    assert demo.free == free


@pytest.mark.parametrize(("case", "used_cpu", "count", "preparing", "free_cpu"), [
    ("ray's report is fresh", 2.0, 1, 0, 2.0),  # 4 - max(2.0, 0.05 router + 0.5)
    ("ray's report lags what we hold", 0.0, 2, 0, 2.95),  # 4 - (0.05 + 2 x 0.5)
    ("a gate job holds one replica's share", 0.0, 1, 1, 2.95),  # 4 - (0.05 + 0.5 + 0.5)
])
def test_free_resources_table(model_repo, case, used_cpu, count, preparing, free_cpu):
    version, v = live(model_repo, count=count)
    keys = [("demo", v, "g1")] * preparing
    free = free_resources({"CPU": (used_cpu, 4.0), "GPU": (0.0, 1.0)}, [version], keys)
    assert free == pytest.approx({"CPU": free_cpu, "GPU": 1.0})


def test_a_router_is_asked_for_its_weights_until_it_confirms_them(tick, model_repo):
    serve = CountingServe()
    version, v = live(model_repo)
    state = State(versions=[version])
    serve.apply({"applications": [{"name": "demo", "args": {}, "deployments": [{"num_replicas": 1, "user_config": {"weights": {v: 100},
                                                                                                             "owner": "ctl-a"}}]}]})
    t = tick(serve)
    assert t.observe(state).tick.apps["demo"].weights == {v: 100}
    assert t.observe(state).tick.apps["demo"].weights == {v: 100}
    assert serve.asked.count("weights demo") == 1  # confirmed: not asked again
    t.observer.forget("demo")  # its app was re-applied
    t.observe(state)
    assert serve.asked.count("weights demo") == 2


def test_a_failed_read_for_one_release_is_carried_to_decide_for_that_release_only(tick, model_repo):
    model_repo.release("other")
    model_repo.commit("another release")
    canary, v = live(model_repo, role="canary")
    records = {n: ReleaseRecord(n, "Progressing", "", "c1", v, canary.spec, NOW, analysis_at=NOW - 5) for n in ("demo", "other")}
    state = State(releases=records, versions=[canary])  # only demo has a canary under analysis
    serve = CountingServe(stats_error=ValueError("router answered garbage"))
    inputs = {i.name: i for i in tick(serve).observe(state).tick.releases}
    assert isinstance(inputs["demo"].unobserved, ValueError) and inputs["other"].unobserved is None
    plan = decide(TickInput("h", NOW, state.controller, tuple(inputs.values()), {}))
    assert "router answered garbage" in plan.state.releases["demo"].message


def test_recorded_apps_are_ours_while_unmarked(model_repo):
    version, v = live(model_repo)
    preparing = replace(version, version="v2", status="preparing")
    assert recorded_apps([version, preparing], {"gone--v0"}) == {"demo", f"demo--{v}", "gone--v0"}


# --- record ----------------------------------------------------------------------------------------------------------


def test_record_saves_the_plan_in_one_transaction_and_says_which_commands_it_ignored(tick, caplog):
    t = tick()
    stray = Command("gone", "abort", "alice", NOW)
    stray = replace(stray, id=t.store.add_command(stray))
    seen = t.observe()
    plan = decide(replace(seen.tick, commands=(stray,)))
    caplog.set_level(logging.INFO, logger="diffops.controller")
    record.save(t.store, plan, [("demo", "v1", "g1", {"ok": True})], [stray])
    again = Store(t.db)  # what a restarted controller reads
    assert again.load().releases == plan.state.releases
    assert [e.kind for e in again.events("demo")] == ["rollout-started"]
    assert again.pending_commands() == [] and again.passed_gate("demo", "v1", "g1") == {"ok": True}
    assert "gone: `abort` from alice ignored: no such release" in caplog.text


def test_announce_says_each_decision_and_how_long_the_tick_took(caplog):
    import time

    caplog.set_level(logging.INFO, logger="diffops.controller")
    record.announce([Event("demo", "promoted", "v2 ready after 3.0s; traffic switched to it (100%)", "v2")], time.monotonic())
    [line] = caplog.records
    assert line.getMessage().startswith("demo: v2 ready after 3.0s; traffic switched to it (100%) (decided in ")
    assert (line.subject, line.event, line.version) == ("demo", "promoted", "v2")


def test_count_sets_the_state_gauges():
    metrics = ControllerMetrics()
    record.count(metrics, State(releases={"demo": ReleaseRecord("demo", "Healthy", "", None, None, None, NOW)}))
    assert metrics.registry.get_sample_value("diffops_release_phase", {"release": "demo", "phase": "Healthy"}) == 1
    record.count(None, State())  # no metrics: nothing to do


# --- apply -----------------------------------------------------------------------------------------------------------


def test_apply_renders_the_recorded_state_and_puts_it_only_when_it_changed(model_repo, tmp_path):
    serve = FakeServe()
    shop = foreign("shop", "ctl-b")
    serve.config = {"applications": [shop]}
    version, v = live(model_repo)
    state = State(releases={"demo": ReleaseRecord("demo", "Healthy", "", "c1", v, version.spec, NOW)}, versions=[version])
    applier = Applier(serve)
    settings = RenderSettings(repo=str(model_repo.path), cache_dir=str(tmp_path / "models"), owner="ctl-a")
    others = {"shop": serve.observe()["shop"]}
    assert apply.apply(applier, state, settings, others) == []
    assert {a["name"] for a in serve.config["applications"]} == {"demo", f"demo--{v}", "shop"} and serve.applies == 1
    ours = {n: a for n, a in serve.observe().items() if n != "shop"}
    assert apply.apply(applier, replace(state, apps=ours), settings, others) == [] and serve.applies == 1  # unchanged: no PUT
    serve.config = {"applications": [shop]}  # ours deleted behind our back
    healed = apply.apply(applier, replace(state, apps={}), settings, others)
    assert sorted(d.app for d in healed) == ["demo", f"demo--{v}"] and serve.applies == 2


def test_the_cache_is_evicted_only_when_due(model_repo, tmp_path):
    metrics = ControllerMetrics()
    keeper = apply.CacheKeeper(ModelCache(tmp_path / "models"), 1, metrics)
    keeper.evict([])
    assert not keeper.due and metrics.registry.get_sample_value("diffops_cache_bytes") == 0
    metrics.cache_bytes.set(42)
    keeper.evict([])
    assert metrics.registry.get_sample_value("diffops_cache_bytes") == 42  # not due: untouched


# --- annotate --------------------------------------------------------------------------------------------------------


def aborted(repo: ReleaseRepo, message: str = "canary v2 rolled back: error rate 0.5 > 0.05") -> Event:
    return Event("demo", "aborted", message, "v2", repo.repo.head.commit.hexsha)


def test_annotate_notes_each_decision_on_its_commit(model_repo):
    head = model_repo.repo.head.commit.hexsha
    annotate.annotate(model_repo.repo, [Event("demo", "promoted", "v1 ready", "v1", head, NOW), Event("demo", "updated", "light", "v1", head)],
                      head, None, annotate.Reverts())
    note = model_repo.repo.git.notes("--ref=diffops", "show", head)
    assert note == "1970-01-12T13:46:40Z demo v1: live: v1 ready"  # `updated` is not a decision about the commit


def test_an_automatic_rollback_is_reverted_on_a_branch(model_repo):
    good = model_repo.repo.head.commit.hexsha
    model_repo.release(**{"steps: 4": "steps: 8"})
    head = model_repo.commit("steps 8")
    annotate.annotate(model_repo.repo, [aborted(model_repo)], head, good, annotate.Reverts("branch"))
    branch = model_repo.repo.commit(f"diffops/revert-demo-{head[:7]}")
    assert branch.parents[0].hexsha == head
    assert (branch.tree / "releases/demo.yaml").data_stream.read() == (model_repo.repo.commit(good).tree / "releases/demo.yaml").data_stream.read()


@pytest.mark.parametrize(("case", "message", "good", "logged"), [
    ("aborted by a person: git is theirs to change", "canary v2 aborted by alice", "good", None),
    ("nothing was ever fully applied", "canary v2 rolled back: error rate", None, "no fully applied commit to revert to"),
])
def test_no_revert_is_committed_when(model_repo, caplog, case, message, good, logged):
    head = model_repo.repo.head.commit.hexsha
    annotate.annotate(model_repo.repo, [aborted(model_repo, message)], head, head if good else None, annotate.Reverts("branch"))
    assert [r.name for r in model_repo.repo.references if "revert" in r.name] == []
    assert (logged in caplog.text) if logged else "revert" not in caplog.text


# --- prepare ---------------------------------------------------------------------------------------------------------


def test_a_version_deployed_from_a_commit_this_repo_lacks_reads_its_model_at_the_desired_commit(tick, model_repo, caplog):
    """An adopted version carries the commit its app was deployed from; a clone without that commit (a rewritten
    history) still re-checks it: the same version pins the same model, read at the desired commit and verified."""
    t = tick()
    [(version, desired)] = decide(t.observe().tick).prepare
    adopted = replace(version, commit="0" * 40)
    with caplog.at_level(logging.INFO, logger="diffops.controller"):
        t.preparations.start(adopted, desired)
        [(_, result)] = wait_for(t.preparations.collect, 60, "the preparation to finish", every=0.05)
    assert result.ok and result.message.startswith("checks passed"), result.message
    assert f"deployed from commit {'0' * 12}, which this repo does not hold" in caplog.text


def test_a_preparation_verifies_the_model_gates_it_and_is_seen_by_one_tick(tick, model_repo):
    t = tick()
    seen = t.observe()
    plan = decide(seen.tick)
    [(version, desired)] = plan.prepare
    t.preparations.start(version, desired)
    t.preparations.start(version, desired)  # already running: not started twice
    finished = wait_for(t.preparations.collect, 60, "the preparation to finish", every=0.05)
    [(key, result)] = finished
    assert key == ("demo", version.version, desired.gate_key) and result.ok and result.message.startswith("checks passed")
    assert t.cache.lookup(version.spec.model.digest) is not None  # fetched and verified into the cache
    assert t.preparations.preparing == {} and t.preparations.prepared == {key: result}
    [demo] = t.observe().tick.releases
    assert demo.prepared == {version.version: result}
    t.preparations.seen()
    assert t.preparations.prepared == {}
