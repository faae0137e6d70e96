"""Canary releases on the real thing: live analysis, automatic rollback, manual promote, resume after kill -9.

Steps complete only on judged traffic (requests the router assigned by
weight), so the walks run under a `Load`; pinned previews are shown apart and
never move a step.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from controller.state.records import Event, ReleaseRecord
from controller.state.store import Store
from tests.conftest import ReleaseRepo
from tests.live import (
    DIFFOPS,
    SERVE_URL,
    Controller,
    Load,
    generate,
    healthy_on,
    running_controller,
    serve_client,
    stable_version,
    wait_for,
    wait_ticks,
)

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


def recorded(state_dir: Path, release: str = "demo") -> tuple[ReleaseRecord, list[Event]]:
    """The release's record and events as the controller stored them (read-only)."""
    store = Store(state_dir / "state.db", readonly=True)
    try:
        return store.load().releases[release], store.events(release)
    finally:
        store.close()


def canary_change(repo: ReleaseRepo, pause: str, *extra: tuple[str, str], steps: int = 6) -> str:
    edits = {"    strategy: bluegreen\n": CANARY.format(pause=pause), "steps: 4": f"steps: {steps}"}
    edits.update(dict(extra))
    repo.release(**edits)
    return repo.commit("canary change")


@pytest.fixture
def live(model_repo: ReleaseRepo, warm_serve, tmp_path):
    flags = ("--allow-fault-injection", "--revert-on-abort", "branch")
    with running_controller(model_repo.path, tmp_path / "state", *flags, warm=True) as (controller, release):
        yield model_repo, controller, stable_version(release)


def test_a_failing_canary_rolls_back_automatically(live):
    repo, controller, stable = live
    # every canary request fails: at 0.5 an interval of 3-5 requests passes by chance about one time in ten, which
    # (rightly) completes the weight step and resets the count this test reads
    faults = ("  cost:\n", "  faults:\n    error_rate: 1.0\n  cost:\n")
    with Load() as load, Load(pin=stable) as pinned:
        commit = canary_change(repo, "60s", faults)
        canary_live = controller.wait_release(lambda r: any(v["role"] == "canary" and v["weight"] == 50 for v in r["versions"]), timeout=120)
        release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=60)
    canary = next(v["id"] for v in canary_live["versions"] if v["role"] == "canary")
    events = [e for e in recorded(controller.state_dir)[1] if e.version == canary]
    took_traffic = next(e.at for e in events if e.kind == "step" and e.message.startswith("step 1/3: weight 50%"))
    failed = [e for e in events if e.kind == "analysis-failed"]
    aborted = next(e for e in events if e.kind == "aborted")
    # failure_limit (2) failed intervals in a row abort, in the tick that judged the second one
    assert [e.message.split(" failed")[0] for e in failed] == ["analysis 1/2", "analysis 2/2"], [e.message for e in failed]
    assert aborted.at == failed[-1].at and "analysis failed 2 intervals in a row" in aborted.message, aborted
    # the canary took traffic, then two 2s intervals: 4.4 s measured; a wide bound against a stalled analysis
    assert aborted.at - took_traffic <= 30, aborted.at - took_traffic
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
    with Load() as load:
        canary_change(repo, "")
        paused = controller.wait_release(lambda r: r["phase"] == "Paused", timeout=240)  # gate and replica start: ~2 min here
        canary = next(v["id"] for v in paused["versions"] if v["role"] == "canary")
        assert paused["step"] == "2/3" and {v["id"]: v["weight"] for v in paused["versions"]} == {stable: 50, canary: 50}
        wait_ticks(controller.state_dir, 3)  # three reconciles, more than an analysis interval, with traffic judged
        held = controller.release()
        assert held["phase"] == "Paused" and held["step"] == "2/3", held  # it holds
        served = {generate().headers["X-Diffops-Version"] for _ in range(20)}
        assert served == {stable, canary}
        result = subprocess.run([DIFFOPS, "promote", "demo", "--state-dir", str(controller.state_dir)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        release = controller.wait_release(lambda r: healthy_on()(r) and stable_version(r) == canary, timeout=60)
    assert set(load.codes) == {200}, load.codes
    assert {v["id"]: (v["role"], v["weight"]) for v in release["versions"]} == {canary: ("stable", 100), stable: ("standby", 0)}
    history = subprocess.run([DIFFOPS, "history", "demo", "--state-dir", str(controller.state_dir)], capture_output=True, text=True).stdout
    assert "promoted-manually" in history and "step 3/3: weight 100%" in history


PAUSE_S = 20  # the restarted controller is watching ~1 s after the kill (measured): the pause outlasts its start many times


def test_kill_9_during_a_timed_pause_resumes_at_the_original_deadline(live):
    repo, controller, stable = live
    with Load():
        canary_change(repo, f"{PAUSE_S}s")
        controller.wait_release(lambda r: r["step"] == "2/3", timeout=120)
        pause_started = recorded(controller.state_dir)[0].step_started_at
        controller.stop(signal.SIGKILL)
        killed_at = time.time()
        restarted = Controller(repo.path, controller.state_dir, *controller.extra).start()
        try:
            wait_ticks(controller.state_dir, 1, after=killed_at)  # the new process reconciled (the killed one writes nothing)
            resumed, _ = recorded(controller.state_dir)
            assert (resumed.step, resumed.step_started_at) == (1, pause_started), resumed  # the same pause, with its start
            assert restarted.release()["step"] == "2/3"
            restarted.wait_release(lambda r: healthy_on()(r) and stable_version(r) != stable, timeout=120)
        finally:
            restarted.stop()
    events = [e for e in recorded(controller.state_dir)[1] if e.kind == "step" and "canary" in e.message]
    steps = [e.message.split(":")[0] for e in events]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"], steps  # none applied twice
    ended = events[-1].at - (pause_started + PAUSE_S)
    # never before the original deadline; then at the next tick (0.4 s after it, measured), bounded widely
    assert 0 <= ended <= 15, ended


def test_pinned_previews_are_reported_apart_and_never_complete_a_step(live):
    """Only previews pinned to the canary: its step never completes, status and the router show them as pinned,
    and the rollout fails at its progress deadline saying there was not enough traffic."""
    repo, controller, stable = live
    canary_change(repo, "60s", ("progress_deadline: 5m", "progress_deadline: 45s"))
    walking = controller.wait_release(lambda r: any(v["role"] == "canary" and v["weight"] == 50 for v in r["versions"]), timeout=180)
    canary = next(v["id"] for v in walking["versions"] if v["role"] == "canary")
    with Load(pin=canary) as previews:
        seen = controller.wait_release(lambda r: ((r["analysis"] or {}).get("canary") or {}).get("pinned", {}).get("requests", 0) > 0, timeout=40)
        assert seen["step"] == "1/3" and seen["phase"] == "Progressing", seen["message"]
        assert seen["analysis"]["canary"]["requests"] == 0 and seen["analysis"]["verdict"] == "inconclusive"
        assert "waiting for enough traffic to judge" in seen["message"] and "pinned previews (not counted)" in seen["message"]
        stats = serve_client().router_stats("demo", 0)
        assert stats[canary]["requests"] == 0 and stats[canary]["pinned"]["requests"] > 0, stats
        failed = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=90)
    assert previews.codes[200] >= 3 and set(previews.codes) == {200}, previews.codes  # the canary answered every preview
    assert all(version == canary for _, version in previews.versions)
    assert stable_version(failed) == stable  # never promoted
    message = failed["message"]
    assert "not enough traffic to judge the canary" in message and "min_requests 3 judged requests" in message, message
    assert "progress_deadline 45s" in message and f"canary {canary} rolled back" in message
    assert {v["id"]: v["weight"] for v in failed["versions"]}[stable] == 100


def test_capacity_waits_for_blue_green_and_auto_surges(model_repo: ReleaseRepo, serve, tmp_path):
    """Ray advertises 2 GPUs (the pipeline itself falls back to CPU); the stable version holds both."""
    model_repo.release(**{"gpus: 0": "gpus: 1", "count: 1": "count: 2"})
    model_repo.commit("two GPU replicas")
    controller = Controller(model_repo.path, tmp_path / "state").start()
    try:
        stable = stable_version(controller.wait_release(healthy_on(), timeout=300))
        model_repo.release(**{"gpus: 0": "gpus: 1", "count: 1": "count: 2", "steps: 4": "steps: 7"})
        model_repo.commit("new version, no room for blue/green")
        release = controller.wait_release(lambda r: "waiting for capacity" in r["message"], timeout=60)
        assert release["phase"] == "Progressing" and "needs 1 GPU, 0 free" in release["message"]
        wait_ticks(controller.state_dir, 2)  # reconciles while it waits
        assert "waiting for capacity" in controller.release()["message"]
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


def test_two_router_replicas_report_all_of_the_releases_traffic(live):
    """Routers scale in place (a light change), and whichever router replica answers `GET /demo` counts every
    request: with a window per router replica each would report about half of them."""
    repo, controller, stable = live
    repo.release(**{"  rollout:\n": "  ingress:\n    replicas: 2\n  rollout:\n"})
    repo.commit("two routers")
    client = serve_client()
    wait_for(lambda: client.observe()["demo"].running == 3, 120, "the second router replica (beside the tally)")
    assert stable_version(controller.release()) == stable  # no new version: the same replicas serve
    since = time.time()
    codes = [generate(body={"prompt": "tally", "steps": 2, "seed": i}).status_code for i in range(12)]
    assert codes == [200] * 12

    def judged() -> int:
        answer = httpx.get(f"{SERVE_URL}/demo", params={"since": since}, timeout=10).json()
        return int(answer["stats"].get(stable, {}).get("requests", 0))

    wait_for(lambda: judged() == 12, 10, "the tally to count every request")  # answers reach it without the request waiting
    assert [judged() for _ in range(8)] == [12] * 8  # every router replica reads the one tally
