"""Drift and ownership on the real thing: Ray Serve loses every app behind the controller's back; two controllers share one head.

Against the session's local Ray (tests/live.py): the controller process heals
what Ray Serve lost without a restart, and two controllers with their own
state dirs (their own owner ids) never touch each other's applications.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.conftest import ReleaseRepo, free_port
from tests.conftest import demo_repo as repo_with
from tests.live import HTTP_PORT, WARM, Controller, generate, healthy_on, serve_client, stable_version, wait_for

pytestmark = pytest.mark.timeout(600)


def owner_marks(app_config: dict | None) -> set[str]:
    return {(d.get("user_config") or {}).get("owner") for d in (app_config or {}).get("deployments") or []}


@pytest.fixture
def controller(model_repo: ReleaseRepo, warm_serve, tmp_path):
    """The demo release's (warm) controller process (given time for a loaded machine), stopped after the test."""
    process = Controller(model_repo.path, tmp_path / "state", *WARM).start()
    yield process
    if process.process and process.process.poll() is None:
        process.stop()


def answers() -> bool:
    """A 200 from /demo/generate; False while Serve holds the request past the client's timeout (no replica yet)."""
    try:
        return generate().status_code == 200
    except httpx.TimeoutException:
        return False


def test_every_app_deleted_behind_the_controllers_back_is_healed_without_a_restart(controller):
    version = stable_version(controller.wait_release(healthy_on(), timeout=300))
    assert generate().status_code == 200
    pid = controller.process.pid
    serve_client().apply({"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": HTTP_PORT}, "applications": []})
    healed = lambda: re.findall(r" (\S+): drift healed: ", controller.logs)  # noqa: E731
    wait_for(lambda: set(healed()) == {"demo", f"demo--{version}"}, 60, "drift healed in the log")
    wait_for(answers, 180, "/demo/generate to answer 200 again", every=1.0)
    assert controller.process.pid == pid and controller.process.poll() is None  # the same process, never restarted
    assert sorted(healed()) == ["demo", f"demo--{version}"], controller.logs[-3000:]  # one line per app, logged once
    controller.wait_release(healthy_on(version), timeout=120)
    assert set(serve_client().observe()) == {"demo", f"demo--{version}"}




def reconciles(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("diffops_reconciles_total{"))


def test_two_controllers_on_one_head_keep_each_others_apps(serve, tmp_path):
    demo_repo, other_repo = repo_with(tmp_path / "demo-repo", "demo"), repo_with(tmp_path / "other-repo", "other")
    ports = free_port(), free_port()
    a = Controller(demo_repo.path, tmp_path / "a", "--metrics-port", str(ports[0])).start()
    b = None
    try:
        demo = a.wait_release(healthy_on(), timeout=240)
        b = Controller(other_repo.path, tmp_path / "b", "--metrics-port", str(ports[1])).start()
        other = b.wait_release(healthy_on(), timeout=240, name="other")
        both = {"demo", f"demo--{stable_version(demo)}", "other", f"other--{stable_version(other)}"}
        wait_for(lambda: set(serve_client().observe()) == both, 60, "both controllers' apps in Ray Serve")
        start = reconciles(ports[0]), reconciles(ports[1])
        wait_for(lambda: reconciles(ports[0]) >= start[0] + 3 and reconciles(ports[1]) >= start[1] + 3, 60, "several ticks each")
        apps = serve_client().observe()
        assert set(apps) == both
        marks = {name: owner_marks(apps[name].config) for name in both}
        assert marks["demo"] == marks[f"demo--{stable_version(demo)}"] and len(marks["demo"]) == 1
        assert marks["other"] == marks[f"other--{stable_version(other)}"] and len(marks["other"]) == 1
        assert marks["demo"] != marks["other"]  # one owner id per state dir
        assert generate("demo").status_code == 200 and generate("other").status_code == 200

        other_repo.release("other", **{"max_images: 4": "max_images: 1"})
        other_repo.commit("other: at most one image per request")
        wait_for(lambda: (serve_client().observe()["other"].user_config or {}).get("limits", {}).get("max_images") == 1,
                 120, "the change applied to other's router")
        before = reconciles(ports[0])
        wait_for(lambda: reconciles(ports[0]) >= before + 3, 60, "demo's controller to tick after the change")
        assert set(serve_client().observe()) == both
        assert generate("demo").status_code == 200 and generate("other").status_code == 200
        a.wait_release(healthy_on(stable_version(demo)), timeout=30)
        b.wait_release(healthy_on(stable_version(other)), timeout=30, name="other")
        for controller in (a, b):
            assert "drift healed" not in controller.logs and "belongs to" not in controller.logs, controller.logs[-3000:]
    finally:
        for controller in (a, b):
            if controller is not None and controller.process and controller.process.poll() is None:
                controller.stop()
