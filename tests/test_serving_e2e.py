"""End to end on the real thing: a temporary git repo, the controller process, a local Ray Serve, the tiny model."""

from __future__ import annotations

import re
import signal
import subprocess
import time

import httpx
import pytest

from tests.live import DIFFOPS, SERVE_URL, Controller, Load, generate, healthy_on, stable_version, wait_for, wait_ticks

pytestmark = pytest.mark.timeout(600)


def model_replicas(serve, release: str, version: str) -> tuple[str, ...]:
    return serve.observe()[f"{release}--{version}"].replica_ids


def test_bluegreen_under_load_then_revert_is_instant(live_demo, warm_serve):
    repo, controller, release = live_demo
    old = stable_version(release)
    old_replicas = model_replicas(warm_serve, "demo", old)
    with Load() as load:
        wait_for(lambda: load.codes[200] >= 2, 30, "load to flow")
        repo.release(**{"steps: 4": "steps: 6"})
        change = repo.commit("more steps")
        release = controller.wait_release(lambda r: healthy_on()(r) and stable_version(r) != old)
        new = stable_version(release)
        wait_for(lambda: any(v == new for _, v in load.versions[-3:]), 30, "traffic on the new version")
    assert load.codes[200] > 5 and set(load.codes) == {200}, (load.codes, load.errors[:3])
    assert {v["id"]: v["role"] for v in release["versions"]} == {new: "stable", old: "standby"}
    assert {v["id"]: v["weight"] for v in release["versions"]} == {new: 100, old: 0}
    assert release["desired_commit"] == change

    with Load() as load:
        wait_for(lambda: load.codes[200] >= 2, 30, "load to flow")
        repo.repo.git.revert("--no-edit", "HEAD")
        reverted_at = time.time()
        wait_for(lambda: any(v == old and t > reverted_at for t, v in load.versions), 30, "traffic back on the old version", every=0.05)
        switched = min(t for t, v in load.versions if v == old and t > reverted_at)
        wait_for(lambda: sum(1 for t, _ in load.versions if t > switched + 0.5) >= 3, 30, "answers after the switch")
    # Instant: a router reconfigure onto the warm standby (typically ~1-2s after the commit on a busy 2-core box); a
    # reload would take the model's load time plus the gate, far longer. The limit is the promise, with a wide margin.
    assert switched - reverted_at < 10.0, f"revert took {switched - reverted_at:.2f}s"
    assert set(load.codes) == {200}, (load.codes, load.errors[:3])
    assert all(v == old for t, v in load.versions if t > switched + 0.5)
    assert model_replicas(warm_serve, "demo", old) == old_replicas  # no reload, no restart
    release = controller.wait_release(healthy_on(old))
    assert {v["id"]: v["role"] for v in release["versions"]} == {old: "stable", new: "standby"}
    assert "was the warm standby" in controller.logs


def test_broken_file_is_invalid_and_serving_is_unchanged(live_demo):
    repo, controller, release = live_demo
    version = stable_version(release)
    repo.release(**{"    count: 1\n": "    count: 1\n    count: 2\n"})
    repo.commit("duplicate key")
    release = controller.wait_release(lambda r: r["phase"] == "Invalid", timeout=30)
    assert "releases/demo.yaml:32:5: duplicate key 'count'" in release["message"]
    assert f"{version} keeps serving" in release["message"]
    response = generate()
    assert response.status_code == 200 and response.headers["X-Diffops-Version"] == version


def test_wrong_digest_is_degraded_and_old_version_keeps_serving(live_demo):
    repo, controller, release = live_demo
    version = stable_version(release)
    with Load() as load:
        repo.release(**{"2b30c6ef7b43": "2b30c6ef7b44", "steps: 4": "steps: 5"})
        repo.commit("wrong digest")
        release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=60)
    assert "model refused" in release["message"] and "digest mismatch" in release["message"]
    assert f"{version} keeps serving" in release["message"]
    assert [(v["id"], v["role"], v["weight"]) for v in release["versions"]] == [(version, "stable", 100)]
    assert set(load.codes) == {200} and {v for _, v in load.versions} == {version}


def test_light_change_applies_in_place_without_restart(live_demo, warm_serve):
    repo, controller, release = live_demo
    version = stable_version(release)
    before = model_replicas(warm_serve, "demo", version)
    repo.release(**{"count: 1": "count: 2", "max_queued_requests: 16": "max_queued_requests: 32"})
    repo.commit("scale out")
    release = controller.wait_release(lambda r: r["versions"][0]["ready_replicas"] == 2 and r["versions"][0]["replicas"] == 2)
    assert stable_version(release) == version
    after = model_replicas(warm_serve, "demo", version)
    assert set(before) < set(after)  # the existing replica kept running; one was added
    assert "light change applied in place" in controller.logs


def test_controller_restart_never_interrupts_serving_and_adopts(live_demo, warm_serve, tmp_path):
    repo, controller, release = live_demo
    version = stable_version(release)
    before = model_replicas(warm_serve, "demo", version)
    with Load() as load:
        controller.stop(signal.SIGKILL)
        killed_at = time.time()
        wait_for(lambda: load.codes[200] >= 5, 60, "answers while no controller runs")
        restarted = Controller(repo.path, controller.state_dir, *controller.extra).start()
        try:
            wait_ticks(controller.state_dir, 2, timeout=120, after=killed_at)  # the new process reconciled, twice
            assert "controller: watching" in restarted.logs
            again = restarted.wait_release(healthy_on(version))
            assert restarted.release()["versions"][0]["ready_replicas"] >= 1
        finally:
            restarted.stop()
    assert set(load.codes) == {200} and load.codes[200] > 5, (load.codes, load.errors[:3])
    assert model_replicas(warm_serve, "demo", version) == before
    assert stable_version(again) == version
    assert "rolling out" not in restarted.logs  # nothing was redeployed

    # even without the state dir: a controller with the same id (printed at start) adopts the running apps
    owner = re.search(r", id (\S+)\)", controller.logs).group(1)
    fresh_state = Controller(repo.path, tmp_path / "fresh-state", "--controller-id", owner).start()
    try:
        fresh_state.wait_release(healthy_on(version))
        assert "adopted running app demo--" in fresh_state.logs
        assert model_replicas(warm_serve, "demo", version) == before
    finally:
        fresh_state.stop()


def test_second_controller_on_the_same_state_dir_exits(live_demo):
    repo, controller, _ = live_demo
    second = Controller(repo.path, controller.state_dir).start()
    assert second.process.wait(timeout=30) == 1
    assert f"another controller (pid {controller.process.pid}) is running on state dir" in second.logs


def test_removed_release_is_pruned_but_not_all_at_once(live_demo, warm_serve):
    repo, controller, release = live_demo
    repo.release("second")
    repo.commit("second release")
    controller.wait_release(healthy_on(), name="second")
    repo.remove("releases/second.yaml")
    repo.commit("remove second")
    wait_for(lambda: not controller.release("second"), 30, "second pruned")
    wait_for(lambda: not any(name.startswith("second") for name in warm_serve.observe()), 30, "second's apps deleted")
    repo.remove("releases/demo.yaml")
    repo.commit("remove everything")
    controller.wait_release(lambda r: "pruning all needs --allow-prune-all" in r["message"], timeout=30)
    assert generate().status_code == 200


def test_status_history_and_generate_commands(fresh_demo, tmp_path):
    repo, controller, release = fresh_demo
    out = tmp_path / "out.png"
    result = subprocess.run([DIFFOPS, "generate", "demo", "a red cube", "-o", str(out), "--url", SERVE_URL, "--seed", "1"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(b"\x89PNG") and stable_version(release) in result.stdout
    bad = subprocess.run([DIFFOPS, "generate", "demo", "x", "-o", str(out), "--url", SERVE_URL, "--width", "100000"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "HTTP 422: width:" in bad.stderr
    text = subprocess.run([DIFFOPS, "status", "--state-dir", str(controller.state_dir)], capture_output=True, text=True).stdout
    assert "demo" in text and "Healthy" in text and "stable" in text
    history = subprocess.run([DIFFOPS, "history", "demo", "--state-dir", str(controller.state_dir)], capture_output=True, text=True).stdout
    assert stable_version(release) in history and "promoted" in history


def test_prometheus_metrics_from_controller_and_serving(model_repo, serve, tmp_path):
    from tests.conftest import free_port
    from tests.live import METRICS_PORT

    port = free_port()
    controller = Controller(model_repo.path, tmp_path / "state", "--metrics-port", str(port)).start()
    try:
        release = controller.wait_release(healthy_on())
        version = stable_version(release)
        assert generate().status_code == 200 and generate(body={"prompt": "x", "steps": 0}).status_code == 422

        def scrape(url: str) -> str:
            try:
                return httpx.get(url, timeout=5).text
            except httpx.HTTPError:
                return ""

        own = wait_for(lambda: (lambda t: t if "diffops_version_weight" in t else None)(scrape(f"http://127.0.0.1:{port}/metrics")), 30, "controller metrics")
        assert 'diffops_release_phase{phase="Healthy",release="demo"} 1.0' in own
        assert f'diffops_version_weight{{release="demo",role="stable",version="{version}"}} 100.0' in own
        assert 'diffops_reconciles_total{result="ok"}' in own
        assert "diffops_last_applied_commit_timestamp_seconds" in own

        wanted = ['code="200"', 'code="422"', "ray_diffops_images_generated_total", "ray_diffops_model_load_seconds",
                  "ray_diffops_request_latency_seconds_bucket"]
        ray_text = wait_for(lambda: (lambda t: t if all(w in t for w in wanted) else None)(scrape(f"http://127.0.0.1:{METRICS_PORT}/metrics")),
                            90, "serving metrics in Ray's Prometheus export", every=2)
        assert f'version="{version}"' in ray_text and 'release="demo"' in ray_text
    finally:
        controller.stop()


def test_overload_gets_503_with_retry_after(model_repo, serve, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    model_repo.release(**{"max_batch_size: 4": "max_batch_size: 1", "max_ongoing_requests: 4": "max_ongoing_requests: 1",
                          "max_queued_requests: 16": "max_queued_requests: 1"})
    model_repo.commit("tiny queue")
    controller = Controller(model_repo.path, tmp_path / "state").start()
    try:
        version = stable_version(controller.wait_release(healthy_on()))
        replicas = model_replicas(serve, "demo", version)
        heavy = {"prompt": "x", "steps": 40}
        alone = min(generate(body=heavy).elapsed.total_seconds() for _ in range(2))
        with ThreadPoolExecutor(20) as pool:  # ten times what one replica holds (1 running + 1 queued)
            responses = list(pool.map(lambda _: generate(body=heavy), range(20)))
        codes = sorted({r.status_code for r in responses})
        assert codes == [200, 503], codes
        shed = [r for r in responses if r.status_code == 503]
        served = [r for r in responses if r.status_code == 200]
        assert all(r.headers.get("Retry-After") == "1" and r.json()["title"] == "overloaded" for r in shed)
        slowest_shed = max(r.elapsed.total_seconds() for r in shed)
        slowest_served = max(r.elapsed.total_seconds() for r in served)
        assert slowest_shed < alone, (slowest_shed, alone)  # refused at once, not after waiting for room
        assert slowest_served < (len(served) + 2) * alone + 2, (slowest_served, alone)  # admitted: bounded by the queue
        assert generate().status_code == 200
        assert model_replicas(serve, "demo", version) == replicas  # overload restarted nothing
    finally:
        controller.stop()
