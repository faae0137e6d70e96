"""Promises of the README held on the real thing: the controller's own loopback head with a 0600 token, batching
that forms batches, and a graceful shutdown that finishes in-flight requests.

The first test starts its own Ray head the way a user does (`controller run` without `--ray-address`) in an
isolated HOME and Ray temp dir, and kills only that head's processes at the end; the others use the session head.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
import time

import httpx
import psutil
import pytest

from controller.apply.ray_cluster import RayHead, kill_head
from tests.conftest import ReleaseRepo
from tests.live import DIFFOPS, SERVE_URL, generate, healthy_on, send_in_background, serve_client, stable_version, wait_for

pytestmark = pytest.mark.timeout(600)

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def port_taken(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def listeners(port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


# README "The controller / Ray": without --ray-address it starts a local Ray head whose dashboard and Serve HTTP proxy
# listen on 127.0.0.1 only, with token auth (the token ... created mode 0600 if missing).
def test_controller_without_ray_address_starts_a_loopback_head_with_a_private_token(model_repo: ReleaseRepo, tmp_path):
    from tests.conftest import free_port

    defaults = RayHead()  # `controller run` has no flags for these ports: they must be free for this test
    taken = [p for p in (defaults.gcs_port, defaults.dashboard_port, defaults.client_port) if port_taken(p)]
    assert taken == [], f"another Ray head uses the default ports {taken}; stop it (`diffops ray stop`) to run this test"
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="dro-")  # short: Ray's socket paths must stay under 108 bytes
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1")
    log_path = tmp_path / "controller.log"
    with open(log_path, "w") as log:
        controller = subprocess.Popen([DIFFOPS, "controller", "run", "--repo", str(model_repo.path), "--state-dir",
                                       str(tmp_path / "state"), "--http-port", str(http_port), "--interval", "2", "--num-gpus", "0"],
                                      stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def healthy() -> bool:
            assert controller.poll() is None, log_path.read_text()[-3000:]
            result = subprocess.run([DIFFOPS, "status", "--json", "--state-dir", str(tmp_path / "state")], capture_output=True, text=True)
            return result.returncode == 0 and '"phase": "Healthy"' in result.stdout
        wait_for(healthy, 300, "the demo to serve on the controller's own head", every=1)
        answer = httpx.post(f"http://127.0.0.1:{http_port}/demo/generate", json={"prompt": "a red cube"}, timeout=120)
        assert answer.status_code == 200, answer.text

        dashboard, proxy = listeners(defaults.dashboard_port), listeners(http_port)
        assert dashboard and proxy, (dashboard, proxy)
        assert [ip for ip in dashboard + proxy if ip not in LOOPBACK] == [], {"dashboard": dashboard, "Serve HTTP": proxy}
        token = home / ".ray" / "auth_token"
        assert stat.S_IMODE(token.stat().st_mode) == 0o600, oct(token.stat().st_mode)
        assert f"created an auth token at {token} (mode 0600)" in log_path.read_text()
        unauthenticated = httpx.get(f"http://127.0.0.1:{defaults.dashboard_port}/api/serve/applications/", timeout=30)
        assert unauthenticated.status_code in (401, 403), unauthenticated.status_code  # token auth is on
    finally:
        controller.terminate()
        controller.wait(timeout=60)
        assert kill_head(RayHead(temp_dir=ray_tmp)) > 0  # this head only; never `ray stop`
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ~18 s on 2 idle cores: long enough to be in flight when Serve starts deleting, well inside the 60 s graceful window
SLOW_REQUEST = {"prompt": "in flight at the deletion", "steps": 20, "width": 256, "height": 256, "seed": 9}


# README "Serving": each version's replicas shut down gracefully (60 s): a request in flight when its release is
# removed (its apps deleted) is still answered.
def test_a_request_in_flight_when_its_apps_are_deleted_is_still_answered(live_demo):
    repo, controller, _ = live_demo
    repo.release("second")
    repo.commit("second release")
    second = stable_version(controller.wait_release(healthy_on(), name="second", timeout=180))
    sender, slow = send_in_background("/second/generate", SLOW_REQUEST)
    sent_at = time.time()
    wait_for(lambda: time.time() - sent_at > 2, 10, "the slow request to reach the replica")
    assert not slow, "the slow request must still be running when the release is removed"
    repo.remove("releases/second.yaml")
    repo.commit("remove second")
    wait_for(lambda: not controller.release("second"), 60, "second pruned")
    deleting = wait_for(lambda: (lambda apps: time.time() if f"second--{second}" not in apps or not apps[f"second--{second}"].ready
                                 else None)(serve_client().observe()), 60, "Ray Serve to start deleting second's version")
    sender.join(timeout=300)
    [(answered_at, response)] = slow
    assert response.status_code == 200, response.text
    assert answered_at > deleting  # it was still running while its app was being deleted
    assert response.json()["metadata"]["version"] == second
    wait_for(lambda: not any(name.startswith("second") for name in serve_client().observe()), 120, "second's apps deleted")
    assert httpx.post(f"{SERVE_URL}/second/generate", json={"prompt": "x"}, timeout=30).status_code == 404
    assert generate().status_code == 200  # the other release never noticed
