"""Promises the README makes that no other test held: fault injection needs its flag, `golden --write` feeds `check`,
`status --watch` redraws, `retry` lifts a hold, `model fetch --reverify` re-hashes the cache.

Real git, real SQLite, the real CLI and the tiny model; Ray Serve and the gate are faked at our own boundary
(bench/fakes.py) where a test is about the controller's decision, not about serving.
"""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path

import pytest

from bench.fakes import InstantServe, PassingGate
from controller.apply.serve_config import RenderSettings
from controller.reconciler import Reconciler
from controller.source.git_source import ReleaseSource
from controller.state.store import Store
from tests.conftest import ReleaseRepo
from tests.live import DIFFOPS, wait_for

FAULTS = ("  cost:\n", "  faults:\n    error_rate: 0.5\n  cost:\n")


def reconciler(repo: ReleaseRepo, state_dir: Path, allow_faults: bool = False) -> Reconciler:
    settings = RenderSettings(repo=str(repo.path), cache_dir=str(state_dir / "models"))
    return Reconciler(ReleaseSource.open(repo.path), Store(state_dir / "state.db"), InstantServe(), settings,
                      gate=PassingGate(), allow_faults=allow_faults)


def tick_until(rec: Reconciler, check, what: str, timeout: float = 60):
    def ticked():
        rec.reconcile()
        return rec.state if check(rec.state) else None
    return wait_for(ticked, timeout, what, every=0.05)


def phase(state, name: str = "demo") -> str | None:
    record = state.releases.get(name)
    return record.phase if record else None


def diffops(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([DIFFOPS, *args], capture_output=True, text=True, timeout=timeout)


# README "Drills": "It is refused (`Invalid`) unless the controller runs with `--allow-fault-injection`."
@pytest.mark.parametrize("allow, expected", [(False, "Invalid"), (True, "Healthy")])
def test_spec_faults_is_refused_without_the_flag(model_repo: ReleaseRepo, tmp_path, allow, expected):
    model_repo.release(**{FAULTS[0].replace(" ", "__"): FAULTS[1]})
    model_repo.commit("a drill")
    rec = reconciler(model_repo, tmp_path / "state", allow_faults=allow)
    try:
        state = tick_until(rec, lambda s: phase(s) in ("Invalid", "Healthy"), "a verdict on the drill")
        assert phase(state) == expected, state.releases["demo"].message
        apps = {app["name"] for app in rec.serve.config["applications"]}
        if expected == "Invalid":
            assert "--allow-fault-injection" in state.releases["demo"].message
            assert "spec.faults" in state.releases["demo"].message
            assert apps == set()  # nothing deployed
        else:
            [model_app] = [a for a in rec.serve.config["applications"] if a["name"].startswith("demo--")]
            assert model_app["args"]["faults"]["error_rate"] == 0.5, model_app["args"]
    finally:
        rec.close()


# README "Analysis": "The version is held: not retried until a new commit or `diffops retry`."
def test_retry_lets_a_degraded_release_be_tried_again(model_repo: ReleaseRepo, tmp_path):
    state_dir = tmp_path / "state"
    rec = reconciler(model_repo, state_dir)
    try:
        tick_until(rec, lambda s: phase(s) == "Healthy", "the demo to serve")
        model_repo.release(**{"2b30c6ef7b43": "2b30c6ef7b44", "steps: 4": "steps: 5"})
        model_repo.commit("wrong digest")
        degraded = tick_until(rec, lambda s: phase(s) == "Degraded", "the wrong digest to be refused")
        failed = degraded.releases["demo"].desired_version
        refusals = lambda: [e for e in Store(state_dir / "state.db", readonly=True).events("demo")  # noqa: E731
                            if e.version == failed and e.kind == "failed"]
        assert len(refusals()) == 1
        for _ in range(20):  # held: ticks do not try it again
            rec.reconcile()
        assert len(refusals()) == 1 and phase(rec.state) == "Degraded"

        result = diffops("retry", "demo", "--state-dir", str(state_dir))
        assert result.returncode == 0, result.stderr
        assert "retry recorded" in result.stdout
        tick_until(rec, lambda s: len(refusals()) == 2, "the version to be tried again")
        kinds = [e.kind for e in Store(state_dir / "state.db", readonly=True).events("demo") if e.version == failed]
        assert "retry" in kinds and kinds.index("retry") < len(kinds) - 1 - kinds[::-1].index("failed")
        assert phase(rec.state) == "Degraded"  # tried again, refused again (the digest is still wrong)
    finally:
        rec.close()


# README "The gate": "`diffops golden RELEASE --write` renders the golden image ..." and `diffops check` compares with it.
def test_golden_write_makes_a_reference_that_check_then_passes(model_repo: ReleaseRepo, tmp_path):
    from PIL import Image

    reference = model_repo.path / "releases" / "golden" / "demo.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(reference)  # a reference the model does not draw
    model_repo.commit("a stale reference")
    state = ["--repo", str(model_repo.path), "--state-dir", str(tmp_path / "state")]
    stale = diffops("check", "demo", *state, "--format", "json")
    assert stale.returncode == 1 and "golden" in {c["name"] for c in json.loads(stale.stdout)["checks"] if c["outcome"] == "failed"}

    written = diffops("golden", "demo", "--write", *state)
    assert written.returncode == 0, written.stderr
    assert f"wrote {reference}" in written.stdout
    assert reference.read_bytes().startswith(b"\x89PNG")
    model_repo.commit("golden reference from diffops golden --write")
    checked = diffops("check", "demo", *state, "--format", "json")
    golden = next(c for c in json.loads(checked.stdout)["checks"] if c["name"] == "golden")
    assert golden["outcome"] == "passed", golden  # (the timing checks depend on how busy the machine is; not this promise)
    assert golden["figures"]["phash_distance"] == 0 and golden["figures"]["ssim"] >= 0.99, golden  # the image it wrote


# README: "`diffops status --watch` shows ..." (redraws every second until interrupted).
def test_status_watch_prints_each_change(model_repo: ReleaseRepo, tmp_path):
    state_dir = tmp_path / "state"
    rec = reconciler(model_repo, state_dir)
    lines: list[str] = []
    try:
        tick_until(rec, lambda s: phase(s) == "Healthy", "the demo to serve")
        watch = subprocess.Popen([DIFFOPS, "status", "--watch", "--json", "--state-dir", str(state_dir)],
                                 stdout=subprocess.PIPE, text=True)
        reader = threading.Thread(target=lambda: lines.extend(iter(watch.stdout.readline, "")), daemon=True)
        reader.start()
        try:
            phases = lambda: [[r["phase"] for r in json.loads(line)["releases"]] for line in list(lines)]  # noqa: E731
            wait_for(lambda: ["Healthy"] in phases(), 30, "the first drawing")
            model_repo.release(**{"    count: 1\n": "    count: 1\n    count: 2\n"})
            model_repo.commit("duplicate key")
            tick_until(rec, lambda s: phase(s) == "Invalid", "the broken file")
            wait_for(lambda: ["Invalid"] in phases(), 30, "a redraw showing the change")
            assert watch.poll() is None  # still watching
        finally:
            watch.terminate()
            watch.wait(timeout=30)
        seen = phases()
        assert seen.index(["Healthy"]) < seen.index(["Invalid"]) and len(seen) >= 2
    finally:
        rec.close()


# README "Model artifacts": "A second fetch of a cached digest transfers nothing (`--reverify` re-hashes the cached copy)."
def test_reverify_rehashes_the_cache_and_finds_a_flipped_byte(model_repo: ReleaseRepo, tmp_path):
    args = ["model", "fetch", "demo", "--repo", str(model_repo.path), "--state-dir", str(tmp_path / "state")]
    first = diffops(*args)
    assert first.returncode == 0, first.stderr
    cached = Path(first.stdout.strip())
    assert "transferred" in first.stderr and "cache hit" not in first.stderr
    again = diffops(*args, "--reverify")
    assert again.returncode == 0 and "cache hit" in again.stderr, again.stderr  # an intact copy passes a re-hash

    weights = max((p for p in cached.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
    weights.parent.chmod(0o755)
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))

    trusted = diffops(*args)
    assert trusted.returncode == 0 and "cache hit" in trusted.stderr  # without --reverify the cache is trusted
    rehashed = diffops(*args, "--reverify")
    assert rehashed.returncode == 1, rehashed.stderr
    assert "model refused" in rehashed.stderr and str(weights.relative_to(cached)) in rehashed.stderr, rehashed.stderr
