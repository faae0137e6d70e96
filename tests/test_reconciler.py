"""The reconciler shell with real git, real SQLite and real model verification; Ray Serve faked at our boundary."""

from __future__ import annotations

import time

import pytest

from bench.fakes import InstantServe
from controller.reconciler import Reconciler
from controller.records import ObservedApp
from controller.serve_client import ServeError
from controller.serve_config import RenderSettings
from controller.source import ReleaseSource
from controller.store import Store
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


def reconciler(repo: ReleaseRepo, state_dir, serve: FakeServe) -> Reconciler:
    settings = RenderSettings(repo=str(repo.path), cache_dir=str(state_dir / "models"))
    return Reconciler(ReleaseSource.open(repo.path), Store(state_dir / "state.db"), serve, settings)


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


def test_ray_unreachable_is_temporary_and_changes_nothing(model_repo: ReleaseRepo, tmp_path):
    serve = FakeServe()
    rec = reconciler(model_repo, tmp_path / "state", serve)
    tick_until(rec, lambda s: s.releases.get("demo") and s.releases["demo"].phase == "Healthy")
    before = Store(tmp_path / "state" / "state.db").load()
    serve.down = True
    result = rec.reconcile()
    assert not result.ok and result.retry_in == 5.0
    assert Store(tmp_path / "state" / "state.db").load().releases == before.releases


def test_restart_renders_the_same_config(model_repo: ReleaseRepo, tmp_path):
    serve = FakeServe()
    first = reconciler(model_repo, tmp_path / "state", serve)
    tick_until(first, lambda s: s.releases.get("demo") and s.releases["demo"].phase == "Healthy")
    applied = serve.config
    first.close()
    second_serve = FakeServe()
    second_serve.config = applied
    second = reconciler(model_repo, tmp_path / "state", second_serve)
    second.reconcile()
    assert second_serve.config == applied
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
