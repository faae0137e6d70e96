"""Post-promotion protection on the real thing: a version that degrades after it took all traffic is switched back.

The drill's version passes its checks and its blue/green switch, then each of
its replicas starts failing after a few requests (`spec.faults.error_after_requests`).
The controller's watch judges it every interval and moves traffic back to the
still-warm standby, while requests pinned to the standby never fail.
"""

from __future__ import annotations

import subprocess

import pytest

from controller.state.store import Store
from tests.conftest import ReleaseRepo
from tests.live import DIFFOPS, WARM, Controller, Load, generate, healthy_on, serve_client, stable_version, wait_for, wait_ticks

pytestmark = pytest.mark.timeout(600)

INTERVAL_S = 3
WATCH = f"""    progress_deadline: 5m
    post_promotion:
      duration: 2m
    analysis:
      interval: {INTERVAL_S}s
      min_requests: 3
      max_error_rate: 0.05
      failure_limit: 1
"""
GOOD_REQUESTS = 8
DEGRADES = f"  faults:\n    error_rate: 1.0\n    error_after_requests: {GOOD_REQUESTS}\n  cost:\n"


def test_a_version_that_degrades_after_promotion_is_switched_back_to_the_warm_standby(model_repo: ReleaseRepo, warm_serve, tmp_path):
    state_dir = tmp_path / "state"
    controller = Controller(model_repo.path, state_dir, "--allow-fault-injection", *WARM).start()
    try:
        stable = stable_version(controller.wait_release(healthy_on(), timeout=300))  # gate and replica start: slow on a busy box
        replicas = warm_serve.observe()[f"demo--{stable}"].replica_ids
        model_repo.release(**{"    progress_deadline: 5m\n": WATCH, "steps: 4": "steps: 5", "  cost:\n": DEGRADES})
        model_repo.commit("a version that degrades after promotion")
        watching = controller.wait_release(lambda r: (r.get("watch") or {}).get("ends_at") is not None, timeout=300)
        new = stable_version(watching)
        assert new != stable and watching["phase"] == "Progressing" and "post-promotion watch" in watching["message"]
        shown = subprocess.run([DIFFOPS, "status", "--state-dir", str(state_dir)], capture_output=True, text=True).stdout
        assert f"post-promotion watch of {new}: " in shown and f"left, standby {stable} warm" in shown, shown
        with Load() as load, Load(pin=stable) as pinned:
            degraded = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=90)
            wait_for(lambda: len(load.versions) > 3 and all(v == stable for _, v in load.versions[-3:]), 30, "traffic back on the standby")
        wait_ticks(state_dir, 3)  # held: git still asks for the failed version, which is not tried again
        held = controller.release()
        wait_for(lambda: f"demo--{new}" not in serve_client().observe(), 60, "the rolled-back version's app to be deleted")
        served = generate().headers["X-Diffops-Version"]
    finally:
        controller.stop()
    store = Store(state_dir / "state.db", readonly=True)
    try:
        events = store.events("demo")
    finally:
        store.close()

    good = [at for at, code, version, _ in load.answers if version == new and code == 200]
    failed = [at for at, code, _, _ in load.answers if code != 200]
    assert len(good) == GOOD_REQUESTS and failed, (load.codes, load.errors[:3])  # it served well, then degraded
    aborted = next(e for e in events if e.kind == "aborted" and e.version == new)
    decided, switched = aborted.at - failed[0], failed[-1] - failed[0]
    print(f"rollback decided {decided:.2f}s after the first failure; last failure {switched:.2f}s after the first "
          f"({len(failed)} failed requests, interval {INTERVAL_S}s)")
    assert decided <= 2 * INTERVAL_S and switched <= 2 * INTERVAL_S, (decided, switched)
    assert set(pinned.codes) == {200} and pinned.codes[200] >= 5, pinned.codes  # the standby never failed a pinned request
    assert {v for _, v in pinned.versions} == {stable}

    message = degraded["message"]
    assert f"{new} rolled back after promotion: post-promotion analysis failed 1 interval(s) in a row: error rate" in message
    assert "> 0.05 (" in message and " requests, " in message and " errors" in message  # the figures
    assert f"{stable} (the warm standby) serves 100% again, no reload" in message
    assert serve_client().observe()[f"demo--{stable}"].replica_ids == replicas  # the same replicas: nothing reloaded
    assert held["phase"] == "Degraded" and stable_version(held) == stable and held["desired_version"] == new
    after = [e.kind for e in events if e.at > aborted.at]
    assert "rollout-started" not in after and "promoted" not in after, after
    assert served == stable
    history = subprocess.run([DIFFOPS, "history", "demo", "--state-dir", str(state_dir)], capture_output=True, text=True).stdout
    assert "rolled back (post-promotion)" in history, history
