"""The reconciler shell with real git, real SQLite and real model verification; Ray Serve and the gate faked at our boundary.

The gate itself (a real pipeline run) is tested in tests/test_gate_e2e.py; here it passes at once so
the tests are about the shell: errors, drift, ownership, restarts.
"""

from __future__ import annotations

import copy
import logging
import time

import pytest

from bench.fakes import InstantServe, PassingGate
from controller.apply.serve_client import ServeError
from controller.apply.serve_config import RenderSettings
from controller.metrics import ControllerMetrics
from controller.reconciler import Reconciler
from controller.rollout import steps as rollout
from controller.source.git_source import ReleaseSource
from controller.state.records import ObservedApp
from controller.state.store import Store
from tests.conftest import ReleaseRepo


class FakeServe(InstantServe):
    """Applies configs instantly (every app RUNNING, every router confirms its weights); `down` makes Ray unreachable."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def observe(self) -> dict[str, ObservedApp]:
        if self.down:
            raise ServeError("Ray dashboard at http://127.0.0.1:1 unreachable (ConnectError); is Ray running?")
        return super().observe()


def reconciler(repo: ReleaseRepo, state_dir, serve: FakeServe, owner: str = "ctl-a", **kwargs) -> Reconciler:
    settings = RenderSettings(repo=str(repo.path), cache_dir=str(state_dir / "models"), owner=owner)
    kwargs.setdefault("gate", PassingGate())
    return Reconciler(ReleaseSource.open(repo.path), Store(state_dir / "state.db"), serve, settings, **kwargs)


def healthy(name: str = "demo"):
    return lambda s: s.releases.get(name) is not None and s.releases[name].phase == "Healthy"


def tick_until(rec: Reconciler, check, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec.reconcile()
        if check(rec.state):
            return rec.state
        time.sleep(0.05)
    raise AssertionError(f"not reached: {[(r.name, r.phase, r.message) for r in rec.state.releases.values()]}")


def test_a_failing_release_never_blocks_another(model_repo: ReleaseRepo, tmp_path):
    model_repo.release("broken", **{"2b30c6ef7b43": "2b30c6ef7b44"})
    model_repo.commit("second release with a wrong digest")
    rec = reconciler(model_repo, tmp_path / "state", FakeServe())
    state = tick_until(rec, lambda s: {r.phase for r in s.releases.values()} == {"Healthy", "Failed"})
    assert state.releases["demo"].phase == "Healthy"
    assert "model refused" in state.releases["broken"].message and "nothing is serving" in state.releases["broken"].message
    assert {v.release for v in state.versions} == {"demo"}
    assert state.controller.last_attempted_commit == model_repo.repo.head.commit.hexsha
    assert state.controller.last_applied_commit is None  # not every release is live


def test_ray_unreachable_is_temporary_backs_off_and_changes_nothing(model_repo: ReleaseRepo, tmp_path, caplog):
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, rand=lambda: 1.0)  # jitter at its top: the plain doubling
    tick_until(rec, healthy())
    before = Store(tmp_path / "state" / "state.db").load()
    serve.down = True
    delays = [rec.reconcile() for _ in range(7)]
    assert [r.ok for r in delays] == [False] * 7
    assert [r.retry_in for r in delays] == [2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]  # ServeError's 2 s, doubled, capped at 60 s
    assert Store(tmp_path / "state" / "state.db").load().releases == before.releases
    assert not any(r.exc_info for r in caplog.records)  # expected trouble: no traceback
    serve.down = False
    again = rec.reconcile()
    assert again.ok and again.retry_in is None
    serve.down = True
    assert rec.reconcile().retry_in == 2.0  # the backoff starts over after a tick that worked


def test_an_unexpected_exception_marks_only_that_release_and_is_logged_once(model_repo: ReleaseRepo, tmp_path, monkeypatch, caplog):
    model_repo.release("other")
    model_repo.commit("a second release")
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve)
    state = tick_until(rec, lambda s: healthy("demo")(s) and healthy("other")(s))
    real_step = rollout.step

    def buggy(name, *args, **kwargs):
        if name == "other":
            raise KeyError("spec\nwith a second line")
        return real_step(name, *args, **kwargs)

    monkeypatch.setattr(rollout, "step", buggy)
    config = copy.deepcopy(serve.config)
    caplog.set_level(logging.DEBUG, logger="diffops.controller")
    results = [rec.reconcile() for _ in range(4)]
    assert all(r.ok for r in results)  # the loop goes on
    other = rec.state.releases["other"]
    assert other.phase == "Degraded"  # its version still serves
    assert other.message.startswith("reconcile step failed: KeyError: 'spec") and "what serves is unchanged" in other.message
    assert rec.state.releases["demo"].phase == "Healthy"
    assert [v for v in rec.state.versions if v.release == "other"] == [v for v in state.versions if v.release == "other"]
    assert serve.config == config  # nothing that serves changed
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and tracebacks[0].getMessage().startswith("other: reconcile step failed: KeyError")
    assert Store(tmp_path / "state" / "state.db").load().releases["other"].phase == "Degraded"  # recorded

    monkeypatch.setattr(rollout, "step", real_step)
    state = tick_until(rec, healthy("other"))
    assert state.releases["other"].message.endswith("serving 100%")
    assert any(r.getMessage() == "other: reconcile step works again; next: reconcile it as usual" for r in caplog.records)


def test_an_unexpected_exception_outside_any_release_never_ends_the_loop(model_repo: ReleaseRepo, tmp_path, monkeypatch, caplog):
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve, rand=lambda: 1.0)
    tick_until(rec, healthy())

    def broken_render(*args, **kwargs):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("controller.tick.apply.render", broken_render)
    results = [rec.reconcile() for _ in range(3)]
    assert [(r.ok, r.retry_in) for r in results] == [(False, 2.0), (False, 4.0), (False, 8.0)]
    assert len([r for r in caplog.records if r.exc_info]) == 1
    assert "reconcile failed unexpectedly: ZeroDivisionError: division by zero" in caplog.text


def test_restart_renders_the_same_config(model_repo: ReleaseRepo, tmp_path):
    serve = FakeServe()
    first = reconciler(model_repo, tmp_path / "state", serve)
    tick_until(first, lambda s: s.releases.get("demo") and s.releases["demo"].phase == "Healthy")
    applied = serve.config
    first.close()
    second_serve = FakeServe()
    second_serve.config = applied
    second = reconciler(model_repo, tmp_path / "state", second_serve)
    result = second.reconcile()
    assert result.ok and not result.busy
    assert second_serve.config == applied and second_serve.applies == 1  # the same config: Ray Serve restarts nothing
    assert second.state.releases["demo"].phase == "Healthy"


@pytest.mark.parametrize("edit", [{"count: 1": "count: 2"}, {"max_images: 4": "max_images: 1"}])
def test_light_change_keeps_the_version(model_repo: ReleaseRepo, tmp_path, edit):
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve)
    state = tick_until(rec, lambda s: s.releases.get("demo") and s.releases["demo"].phase == "Healthy")
    [version] = state.versions
    model_repo.release(**edit)
    model_repo.commit("light change")
    state = tick_until(rec, lambda s: s.controller.last_applied_commit == model_repo.repo.head.commit.hexsha)
    assert [v.version for v in state.versions] == [version.version]
    model_app = next(a for a in serve.config["applications"] if a["name"].startswith("demo--"))
    assert model_app["args"]["commit"] == version.commit


def drift_healed(metrics: ControllerMetrics, release: str) -> float:
    return metrics.registry.get_sample_value("diffops_drift_healed_total", {"release": release}) or 0.0


def test_apps_deleted_behind_the_controllers_back_are_reapplied_once(model_repo: ReleaseRepo, tmp_path, caplog):
    serve, metrics = FakeServe(), ControllerMetrics()
    rec = reconciler(model_repo, tmp_path / "state", serve, metrics=metrics)
    state = tick_until(rec, healthy())
    applied, applies = copy.deepcopy(serve.config), serve.applies
    version_app = f"demo--{state.versions[0].version}"
    assert rec.reconcile().ok and serve.applies == applies  # nothing changed, nothing drifted: no PUT
    serve.config = {"applications": []}  # `serve shutdown`, a head restart, another client's PUT
    caplog.set_level(logging.INFO, logger="diffops.controller")
    assert rec.reconcile().ok
    assert serve.config["applications"] == applied["applications"] and serve.applies == applies + 1
    healed = [r.getMessage() for r in caplog.records if "drift healed" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in healed) == ["demo", version_app]
    assert all("missing from Ray Serve" in m for m in healed)
    assert drift_healed(metrics, "demo") == 2
    second = rec.reconcile()  # healed: the next tick finds nothing to do
    assert second.ok and serve.applies == applies + 1 and drift_healed(metrics, "demo") == 2
    assert len([r for r in caplog.records if "drift healed" in r.getMessage()]) == 2
    tick_until(rec, healthy())


def test_a_changed_app_is_reapplied_naming_what_differed(model_repo: ReleaseRepo, tmp_path, caplog):
    serve, metrics = FakeServe(), ControllerMetrics()
    rec = reconciler(model_repo, tmp_path / "state", serve, metrics=metrics)
    state = tick_until(rec, healthy())
    version = state.versions[0].version
    applied = copy.deepcopy(serve.config)
    tampered = copy.deepcopy(applied)
    model = next(a for a in tampered["applications"] if a["name"] == f"demo--{version}")
    model["deployments"][0]["num_replicas"] = 0  # someone scaled it to zero
    serve.config = tampered
    caplog.set_level(logging.INFO, logger="diffops.controller")
    assert rec.reconcile().ok
    assert serve.config["applications"] == applied["applications"]
    assert f"demo--{version}: drift healed: changed: deployments.Model.num_replicas: 1.0 -> 0.0" in caplog.text
    assert drift_healed(metrics, "demo") == 1


def foreign(name: str, owner: str | None) -> dict:
    user_config = {"owner": owner} if owner else {}
    return {"name": name, "route_prefix": f"/{name}", "import_path": "shop.app:build", "args": {"k": 1},
            "deployments": [{"name": "Shop", "num_replicas": 1, "user_config": user_config}]}


def test_apps_of_other_owners_are_carried_unchanged(model_repo: ReleaseRepo, tmp_path):
    serve = FakeServe()
    shop, loose = foreign("shop", "ctl-b"), foreign("loose", None)
    serve.config = {"applications": [shop, loose]}
    rec = reconciler(model_repo, tmp_path / "state", serve)
    state = tick_until(rec, healthy())
    apps = {a["name"]: a for a in serve.config["applications"]}
    assert apps["shop"] == shop and apps["loose"] == loose
    assert {a["name"] for a in serve.config["applications"]} == {"shop", "loose", "demo", f"demo--{state.versions[0].version}"}
    assert all(d["user_config"]["owner"] == "ctl-a" for name, a in apps.items() if name.startswith("demo") for d in a["deployments"])
    assert set(state.apps) == {"demo", f"demo--{state.versions[0].version}"}  # status shows only ours
    serve.config = {"applications": [a for a in serve.config["applications"] if a["name"] != "shop"]}  # its owner removed it
    assert rec.reconcile().ok
    assert "shop" not in {a["name"] for a in serve.config["applications"]}  # never resurrected


def test_a_name_held_by_another_controller_is_a_release_error_not_a_takeover(model_repo: ReleaseRepo, tmp_path):
    serve = FakeServe()
    first = reconciler(model_repo, tmp_path / "a", serve, owner="ctl-a")
    tick_until(first, healthy())
    theirs = copy.deepcopy(serve.config["applications"])
    first.close()
    second = reconciler(model_repo, tmp_path / "b", serve, owner="ctl-b")
    results = [second.reconcile() for _ in range(3)]
    assert all(r.ok for r in results)
    demo = second.state.releases["demo"]
    assert demo.phase == "Failed" and "Ray Serve application 'demo' belongs to controller 'ctl-a'" in demo.message
    assert second.state.versions == [] and second.gate.runs == 0  # not adopted, nothing prepared
    assert serve.config["applications"] == theirs  # untouched


def test_adoption_takes_over_only_our_own_running_apps(model_repo: ReleaseRepo, tmp_path):
    serve = FakeServe()
    first = reconciler(model_repo, tmp_path / "lost", serve, owner="ctl-a")
    state = tick_until(first, healthy())
    first.close()
    applied = copy.deepcopy(serve.config)
    again = reconciler(model_repo, tmp_path / "fresh", serve, owner="ctl-a")  # the state dir was lost; same id
    adopted = tick_until(again, healthy())
    version = state.versions[0].version
    running = next(a for a in applied["applications"] if a["name"] == f"demo--{version}")
    assert [(v.version, v.role, v.deployed_args) for v in adopted.versions] == [(version, "stable", running["args"])]
    assert again.gate.runs == 0 and serve.config == applied  # taken over as it runs: no gate, no redeploy


def test_cache_is_kept_under_its_cap_without_evicting_a_pinned_model(model_repo: ReleaseRepo, tmp_path):
    """--cache-max-bytes: an old model nobody pins is evicted after a fetch; the serving version's model stays."""
    import shutil

    from serving.artifacts import ModelCache, fetch
    from serving.manifest import manifest_of

    old = tmp_path / "old-model"
    shutil.copytree(model_repo.path / "models" / "tiny-sd", old)
    (old / "model_index.json").write_text((old / "model_index.json").read_text() + "\n")  # another digest
    cache = ModelCache(tmp_path / "state" / "models")
    old_digest = manifest_of(old).digest
    fetch(f"file://{old}", old_digest, cache, allowed_roots=(tmp_path,))
    one_model = cache.size()
    metrics = ControllerMetrics()
    rec = reconciler(model_repo, tmp_path / "state", FakeServe(), cache_max_bytes=one_model + one_model // 2, metrics=metrics)
    state = tick_until(rec, healthy())
    pinned = state.releases["demo"].spec.model.digest if state.releases["demo"].spec else None
    assert pinned is not None and pinned != old_digest
    assert cache.lookup(pinned) is not None, "the serving version's model was evicted"
    assert cache.lookup(old_digest) is None, "the unpinned model was kept past the cap"
    assert cache.size() <= one_model + one_model // 2
    assert metrics.registry.get_sample_value("diffops_cache_bytes") == cache.size()
