"""Canary releases on the real thing: live analysis, automatic rollback, manual promote, resume after kill -9."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from tests.conftest import ReleaseRepo
from tests.live import DIFFOPS, Controller, Load, generate, healthy_on, running_controller, stable_version, wait_for

pytestmark = pytest.mark.timeout(600)

CANARY = """    strategy: canary
    steps:
      - weight: 50
      - pause: {pause}
      - weight: 100
    analysis:
      interval: 2s
      min_requests: 3
      max_error_rate: 0.05
      failure_limit: 2
"""


def canary_change(repo: ReleaseRepo, pause: str, *extra: tuple[str, str], steps: int = 6) -> str:
    edits = {"    strategy: bluegreen\n": CANARY.format(pause=pause), "steps: 4": f"steps: {steps}"}
    edits.update(dict(extra))
    repo.release(**edits)
    return repo.commit("canary change")


@pytest.fixture
def live(model_repo: ReleaseRepo, serve, tmp_path):
    flags = ("--allow-fault-injection", "--revert-on-abort", "branch")
    with running_controller(model_repo.path, tmp_path / "state", *flags) as (controller, release):
        yield model_repo, controller, stable_version(release)


def test_a_failing_canary_rolls_back_automatically(live):
    repo, controller, stable = live
    faults = ("  cost:\n", "  faults:\n    error_rate: 0.5\n  cost:\n")
    with Load() as load, Load(pin=stable) as pinned:
        commit = canary_change(repo, "60s", faults)
        canary_live = controller.wait_release(lambda r: any(v["role"] == "canary" and v["weight"] == 50 for v in r["versions"]), timeout=120)
        took_traffic = time.monotonic()
        release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=60)
        rolled_back_after = time.monotonic() - took_traffic
    canary = next(v["id"] for v in canary_live["versions"] if v["role"] == "canary")
    assert rolled_back_after <= 2 * 2 + 3, rolled_back_after  # two 2s intervals, plus a tick and the router's reconfigure
    assert "error rate" in release["message"] and "> 0.05" in release["message"]
    assert f"canary {canary} rolled back" in release["message"] and "revert the commit" in release["message"]
    assert {v["id"]: v["weight"] for v in release["versions"]}[stable] == 100
    assert set(pinned.codes) == {200} and pinned.codes[200] > 5  # requests pinned to stable never fail
    assert load.codes[500] > 0  # the drill really failed requests
    notes = repo.repo.git.log("--notes=diffops", "-1", commit)
    assert f"demo {canary}: rolled back" in notes and "error rate" in notes
    branch = f"diffops/revert-demo-{commit[:7]}"
    wait_for(lambda: branch in [h.name for h in repo.repo.heads], 10, "the revert branch")
    reverted = repo.repo.commit(branch)
    assert reverted.parents[0].hexsha == commit and "faults" not in (reverted.tree / "releases/demo.yaml").data_stream.read().decode()
    wait_for(lambda: all(v["id"] == stable for v in controller.release()["versions"]), 30, "the rolled-back canary to be deleted")
    assert generate().headers["X-Diffops-Version"] == stable


def test_a_healthy_canary_walks_to_100_and_an_indefinite_pause_waits_for_promote(live):
    repo, controller, stable = live
    canary_change(repo, "")
    paused = controller.wait_release(lambda r: r["phase"] == "Paused", timeout=120)
    canary = next(v["id"] for v in paused["versions"] if v["role"] == "canary")
    assert paused["step"] == "2/3" and {v["id"]: v["weight"] for v in paused["versions"]} == {stable: 50, canary: 50}
    time.sleep(4)
    assert controller.release()["phase"] == "Paused"  # it holds
    served = {generate().headers["X-Diffops-Version"] for _ in range(20)}
    assert served == {stable, canary}
    result = subprocess.run([DIFFOPS, "promote", "demo", "--state-dir", str(controller.state_dir)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    release = controller.wait_release(lambda r: healthy_on()(r) and stable_version(r) == canary, timeout=60)
    assert {v["id"]: (v["role"], v["weight"]) for v in release["versions"]} == {canary: ("stable", 100), stable: ("standby", 0)}
    history = subprocess.run([DIFFOPS, "history", "demo", "--state-dir", str(controller.state_dir)], capture_output=True, text=True).stdout
    assert "promoted-manually" in history and "step 3/3: weight 100%" in history


def test_kill_9_during_a_timed_pause_resumes_at_the_original_deadline(live):
    repo, controller, stable = live
    canary_change(repo, "12s")
    controller.wait_release(lambda r: r["step"] == "2/3", timeout=120)
    entered = time.time()
    controller.stop(signal.SIGKILL)
    time.sleep(3)
    restarted = Controller(repo.path, controller.state_dir, "--allow-fault-injection").start()
    try:
        restarted.wait_release(lambda r: r["step"] == "3/3" or r["phase"] == "Healthy" and len(r["versions"]) == 2, timeout=60)
        ended = time.time()
        assert 12 - 1 <= ended - entered <= 12 + 4, ended - entered  # the pause kept its start
        restarted.wait_release(lambda r: healthy_on()(r) and stable_version(r) != stable, timeout=60)
    finally:
        restarted.stop()
    from controller.store import Store

    events = [e for e in Store(controller.state_dir / "state.db", readonly=True).events("demo") if e.kind == "step"]
    steps = [e.message.split(":")[0] for e in events if "canary" in e.message]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"], steps  # none applied twice


def test_capacity_waits_for_blue_green_and_auto_surges(model_repo: ReleaseRepo, serve, tmp_path):
    """Ray advertises 2 GPUs (the pipeline itself falls back to CPU); the stable version holds both."""
    model_repo.release(**{"gpus: 0": "gpus: 1", "count: 1": "count: 2"})
    model_repo.commit("two GPU replicas")
    controller = Controller(model_repo.path, tmp_path / "state").start()
    try:
        stable = stable_version(controller.wait_release(healthy_on(), timeout=150))
        model_repo.release(**{"gpus: 0": "gpus: 1", "count: 1": "count: 2", "steps: 4": "steps: 7"})
        model_repo.commit("new version, no room for blue/green")
        release = controller.wait_release(lambda r: "waiting for capacity" in r["message"], timeout=60)
        assert release["phase"] == "Progressing" and "needs 1 GPU, 0 free" in release["message"]
        time.sleep(3)
        assert [name for name in serve.observe() if name.startswith("demo--")] == [f"demo--{stable}"]  # no pending replica
        assert generate().headers["X-Diffops-Version"] == stable

        with Load() as load:
            model_repo.release(**{"gpus: 0": "gpus: 1", "count: 1": "count: 2", "steps: 4": "steps: 7",
                                  "strategy: bluegreen": "strategy: auto"})
            model_repo.commit("auto: surge-limited when blue/green does not fit")
            release = controller.wait_release(lambda r: healthy_on()(r) and stable_version(r) != stable, timeout=240)
        assert [(v["role"], v["weight"], v["ready_replicas"]) for v in release["versions"]] == [("stable", 100, 2)]
        assert load.codes[200] > 10 and set(load.codes) <= {200, 503}, load.codes  # at most brief overload while shrunk
        assert "shrinks to 1 replica(s) to make room" in controller.logs and "traffic by replicas" in controller.logs
    finally:
        controller.stop()
