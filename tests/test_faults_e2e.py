"""Faults on the real thing: load through every traffic move, replicas killed or never starting, hostile files, loopback and secrets.

Each test drives the controller process against the session's local Ray
(tests/live.py) and asserts what a user sees: HTTP answers under constant
load, `diffops status`, the controller's log and Ray Serve's replicas.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from controller.parse.loader import parse_release
from controller.plan.versions import version_id
from tests.conftest import ReleaseRepo
from tests.live import (
    DIFFOPS,
    LOAD_REQUEST,
    WARM,
    Controller,
    Load,
    generate,
    healthy_on,
    misattributed,
    running_controller,
    send_in_background,
    serve_client,
    stable_version,
    wait_for,
    wait_ticks,
)
from tests.test_hostile_releases import HOSTILE

pytestmark = pytest.mark.timeout(600)

NEW_GUIDANCE = ("guidance_scale: 7.5", "guidance_scale: 2.0")  # a version change the load request's image shows


def replicas_of(release: str, version: str) -> tuple[str, ...]:
    app = serve_client().observe().get(f"{release}--{version}")
    return app.replica_ids if app is not None and app.ready else ()


def replica_processes(release: str, version: str, head) -> list[psutil.Process]:
    """The replica processes of an app on this session's head (`head.temp_dir`, on its raylet's command line): another
    head on the machine (a demo, the benchmarks', another test session's) may run apps of the same names."""
    mark = f"ServeReplica:{release}--{version}"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if any(mark in part for part in process.info["cmdline"] or []) and \
                    any(head.temp_dir in " ".join(parent.cmdline()) for parent in process.parents()):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def references(*versions: str) -> dict[str, bytes]:
    """The load request's image from each version, asked for by pinning it."""
    out = {}
    for version in versions:
        response = generate(body=LOAD_REQUEST, headers={"X-Diffops-Version": version})
        assert response.status_code == 200 and response.headers["X-Diffops-Version"] == version, response.text
        out[version] = response.content
    assert len(set(out.values())) == len(out), "versions must draw different images for this test to mean anything"
    return out


@pytest.fixture
def drill(model_repo: ReleaseRepo, warm_serve, tmp_path):
    """The demo served by a (warm) controller that allows fault injection: (repo, controller, stable version)."""
    with running_controller(model_repo.path, tmp_path / "state", "--allow-fault-injection", warm=True) as (controller, release):
        yield model_repo, controller, stable_version(release)


def test_load_through_bluegreen_revert_and_canary_abort_never_fails(live_demo):
    repo, controller, release = live_demo
    old = stable_version(release)
    with Load() as load:
        repo.release(**dict([NEW_GUIDANCE]))
        repo.commit("blue/green to a new guidance scale")
        new = stable_version(controller.wait_release(lambda r: healthy_on()(r) and stable_version(r) != old))
        wait_for(lambda: any(v == new for _, v in load.versions[-3:]), 30, "traffic on the new version")
        repo.repo.git.revert("--no-edit", "HEAD")
        controller.wait_release(healthy_on(old))
        wait_for(lambda: all(v == old for _, v in load.versions[-3:]), 30, "traffic back on the old version")

        repo.release(**{"    strategy: bluegreen\n": "    strategy: canary\n    steps:\n      - weight: 50\n      - pause:\n      - weight: 100\n",
                        NEW_GUIDANCE[0]: "guidance_scale: 3.0"})
        repo.commit("canary to another guidance scale")
        paused = controller.wait_release(lambda r: r["phase"] == "Paused", timeout=120)
        canary = next(v["id"] for v in paused["versions"] if v["role"] == "canary")
        wait_for(lambda: any(v == canary for _, v in load.versions[-5:]), 30, "traffic on the canary")
        refs = references(old, new, canary)
        subprocess.run([DIFFOPS, "abort", "demo", "--state-dir", str(controller.state_dir)], check=True, capture_output=True)
        aborted = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=30)
        wait_for(lambda: all(v == old for _, v in load.versions[-3:]), 30, "traffic back on the stable version")
    assert "aborted by" in aborted["message"]
    assert set(load.codes) == {200} and load.codes[200] > 20, (load.codes, load.errors[:3])
    assert {v for _, v in load.versions} == {old, new, canary}
    assert misattributed(load.answers, refs) == []  # every answer came whole from the version that took it


SLOW_REQUEST = {"prompt": "in flight at the kill", "steps": 50, "width": 256, "height": 256, "seed": 5}


def serve_logs_naming(temp_dir: str, text: str) -> list[str]:
    """Lines of Ray Serve's logs (routers and replicas) under the head's temp dir that contain `text`."""
    return [line for path in Path(temp_dir).rglob("serve/*.log") if path.is_file()
            for line in path.read_text(errors="replace").splitlines() if text in line]


def test_kill_9_of_a_replica_under_load_is_replaced_and_reported_once(live_demo, ray_head):
    repo, controller, release = live_demo
    version = stable_version(release)
    before = replicas_of("demo", version)
    [victim] = replica_processes("demo", version, ray_head)
    phases = []
    with Load(timeout=300) as load:  # a request queued behind the slow one waits for the replacement replica
        wait_for(lambda: load.codes[200] >= 3, 30, "load to flow")
        sender, slow = send_in_background("/demo/generate", SLOW_REQUEST)
        sent_at = time.time()
        wait_for(lambda: time.time() - sent_at > 2, 10, "the slow request to reach the only replica")
        assert not slow, "the slow request must still be running on the replica when it is killed"
        victim.kill()  # one replica: the slow request (and the load's current one) are in flight on it
        killed_at = time.time()
        after = wait_for(lambda: (phases.append(controller.release()["phase"]) or True) and (replicas_of("demo", version) or ()) != before
                         and replicas_of("demo", version), 120, "Ray Serve to replace the killed replica")
        wait_for(lambda: slow and sum(1 for t, code, _, _ in load.answers if t > killed_at and code == 200) >= 3, 300,
                 "the slow request's answer and the load's answers again")
    assert len(after) == len(before) and set(after).isdisjoint(before)
    [(answered_at, response)] = slow
    assert answered_at > killed_at and response.status_code == 200, response.text  # retried on the new replica
    assert response.json()["metadata"]["version"] == version
    request_id = response.headers["X-Request-Id"]
    retried = serve_logs_naming(ray_head.temp_dir, f"died during request {request_id}")
    assert len(retried) == 1 and "next: retry it once" in retried[0], retried
    failed = [(round(t - killed_at, 2), code) for t, code, _, _ in load.answers if code != 200]
    assert failed == [] and load.codes["transport"] == 0, (failed, load.errors[:3])  # every in-flight request retried
    stats = serve_client().router_stats("demo", killed_at - 1)
    assert stats.get(version, {}).get("errors", 0) == 0
    assert set(phases) == {"Healthy"}  # no flapping into rollouts or rollbacks
    release = controller.wait_release(lambda r: r["message"] == f"{version} serving 100%", timeout=60)
    assert stable_version(release) == version and release["desired_version"] == version
    log = controller.logs
    assert log.count("Ray Serve is replacing the lost ones") == 1 and log.count("replicas running again") == 1
    assert "rolling out" not in log.split("Ray Serve is replacing the lost ones")[1]


def test_a_version_whose_replicas_fail_to_start_never_gets_traffic(drill):
    repo, controller, stable = drill
    with Load() as load:
        repo.release(**{"steps: 4": "steps: 5", "  cost:\n": "  faults:\n    startup_error: true\n  cost:\n"})
        repo.commit("a version that cannot start")
        release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=180)
    failed, message = release["desired_version"], release["message"]
    assert failed != stable and "replicas failed to start" in message and "failed to start 3 times in a row" in message
    assert "InjectedFault: demo--" in message and "Traceback" not in message and "\n" not in message  # one line
    assert f"{stable} keeps serving" in message
    assert set(load.codes) == {200} and {v for _, v in load.versions} == {stable}
    wait_for(lambda: f"demo--{failed}" not in serve_client().observe(), 60, "the failed version's app to be deleted")
    wait_ticks(controller.state_dir, 3)  # held: the failed version is not retried tick after tick
    assert controller.release()["phase"] == "Degraded" and f"demo--{failed}" not in serve_client().observe()
    assert generate().headers["X-Diffops-Version"] == stable


def test_hostile_release_files_leave_serving_unchanged(live_demo):
    repo, controller, release = live_demo
    version = stable_version(release)
    before = replicas_of("demo", version)
    for name, content, _ in HOSTILE:
        repo.write(f"releases/{name}.yaml", content)
    with Load() as load:
        repo.commit("hostile release files")
        for name, _, fragment in HOSTILE:
            invalid = controller.wait_release(lambda r: r.get("phase") == "Invalid", timeout=30, name=name)
            assert fragment in invalid["message"] and invalid["versions"] == [], invalid
    assert set(load.codes) == {200} and {v for _, v in load.versions} == {version}
    assert controller.release()["phase"] == "Healthy" and replicas_of("demo", version) == before
    assert set(serve_client().observe()) == {"demo", f"demo--{version}"}  # nothing deployed for the hostile files


TIMED_CANARY = "    strategy: canary\n    steps:\n      - weight: 50\n      - pause: 4s\n      - weight: 100\n"


def recorded(db: Path, versions: set[str]) -> tuple:
    """The state a killed controller left: integrity checked, then the invariants every committed tick keeps."""
    with sqlite3.connect(db) as con:  # recovers the WAL as the next controller will
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.row_factory = sqlite3.Row
        release = con.execute("SELECT phase, desired_version, step FROM releases WHERE name = 'demo'").fetchone()
        rows = con.execute("SELECT version, role, weight, status FROM versions WHERE release = 'demo'").fetchall()
    assert release is not None and release["desired_version"] in versions
    assert {r["version"] for r in rows} <= versions and [r["role"] for r in rows].count("stable") == 1, [dict(r) for r in rows]
    assert sum(r["weight"] for r in rows if r["status"] != "retiring") == 100, [dict(r) for r in rows]
    if release["step"] is not None:  # walking steps: a ready canary exists
        assert any(r["role"] == "canary" and r["status"] == "ready" for r in rows), [dict(r) for r in rows]
    return release["phase"], release["step"], tuple(sorted((r["version"], r["role"], r["weight"], r["status"]) for r in rows))


# where the rollout of `new` stands, by its recorded state: (rank, what); kills are aimed at each of these in turn
PHASES = ((0, "start-up"), (1, "the gate (preparing)"), (2, "replicas starting"), (3, "weight steps"))


def phase(db: Path, new: str) -> int:
    """The rank in PHASES the recorded rollout of `new` has reached (read-only, beside the running controller)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            step = con.execute("SELECT step FROM releases WHERE name = 'demo'").fetchone()
            status = con.execute("SELECT status FROM versions WHERE release = 'demo' AND version = ?", (new,)).fetchone()
    except sqlite3.Error:  # not created yet
        return 0
    if step is not None and step[0] is not None:
        return 3
    return {"preparing": 1, "verified": 2, "starting": 2, "ready": 3}.get(status[0], 0) if status else 0


def test_kill_9_of_the_controller_at_random_points_of_a_rollout(model_repo: ReleaseRepo, warm_serve, tmp_path):
    rng = random.Random(2026)
    state = tmp_path / "state"
    controller = Controller(model_repo.path, state, *WARM).start()
    old = stable_version(controller.wait_release(healthy_on()))
    path = model_repo.release(**{"    strategy: bluegreen\n": TIMED_CANARY, NEW_GUIDANCE[0]: NEW_GUIDANCE[1]})
    new = version_id(parse_release(path.read_bytes(), "releases/demo.yaml"))
    model_repo.commit("canary with a timed pause")
    seen: list[tuple] = []

    def points() -> set[tuple]:
        return {(step, next((status for version, _, _, status in rows if version == new), None)) for _, step, rows in seen}

    try:
        with Load() as load:
            # one kill in each phase (aimed by the recorded state, so a slow machine's longer gate cannot crowd the
            # others out), at a seeded random moment 0-3 s into it
            for rank, what in PHASES:
                wait_for(lambda rank=rank: phase(state / "state.db", new) >= rank, 240, f"the rollout to reach {what}")
                time.sleep(rng.uniform(0.0, 3.0))
                controller.stop(signal.SIGKILL)
                seen.append(recorded(state / "state.db", {old, new}))
                controller = Controller(model_repo.path, state, *WARM).start()
            release = controller.wait_release(lambda r: healthy_on(new)(r) and stable_version(r) == new, timeout=240)
    finally:
        controller.stop()
    assert {v["id"]: v["role"] for v in release["versions"]} == {new: "stable", old: "standby"}
    assert len(points()) >= 3, seen  # the kills really landed at different points of the rollout
    assert set(load.codes) == {200}, (load.codes, load.errors[:3])
    kinds = Counter(event.kind for event in controller_events(state) if event.version == new)
    assert kinds["rollout-started"] == 1 and kinds["ready"] == 1 and kinds["promoted"] == 1, kinds  # no step twice
    assert kinds["step"] == 3, kinds


def controller_events(state: Path):
    from controller.state.store import Store

    return Store(state / "state.db", readonly=True).events("demo")


def test_an_unsigned_head_is_refused_while_the_signed_one_keeps_serving(model_repo: ReleaseRepo, warm_serve, tmp_path):
    from tests.test_signed_commits import Keys, ssh_commit

    keys = Keys(tmp_path / "keys")
    signed = ssh_commit(model_repo, keys.alice, "signed release")
    controller = Controller(model_repo.path, tmp_path / "state", "--require-signed-commits", "--allowed-signers", str(keys.allowed),
                            *WARM).start()
    try:
        version = stable_version(controller.wait_release(healthy_on()))
        with Load() as load:
            model_repo.release(**{"steps: 4": "steps: 5"})
            unsigned = model_repo.commit("unsigned change")
            wait_for(lambda: (controller.status().get("refused_commit") or {}).get("commit") == unsigned, 30, "the refusal")
            ssh_commit(model_repo, keys.mallory, "signed by a key nobody allowed")
            refused = wait_for(lambda: (r := controller.status().get("refused_commit")) and r["reason"] == "untrusted-key" and r, 30,
                               "the unknown key's refusal")
            wait_ticks(controller.state_dir, 2)  # held: the refused heads change nothing tick after tick
        status = controller.status()
        assert status["commit"] == signed and controller.release()["desired_version"] == version
        assert "not in the allowed signers file" in refused["message"]
        assert set(load.codes) == {200} and {v for _, v in load.versions} == {version}
        assert "refused (unsigned)" in controller.logs and "refused (untrusted-key)" in controller.logs
    finally:
        controller.stop()
