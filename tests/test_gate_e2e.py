"""The gate on the real thing: checks as Ray jobs on the release's resources, holding back what fails."""

from __future__ import annotations

import io
import json
import subprocess
import time

import httpx
import pytest
from PIL import Image

from tests.conftest import DEMO_RELEASE, LIVE_P95, ReleaseRepo
from tests.live import DASHBOARD, DIFFOPS, Controller, Load, generate, healthy_on, stable_version, wait_for

pytestmark = pytest.mark.timeout(600)


def gate_jobs() -> list[dict]:
    from controller.apply.serve_client import ray_token

    jobs = httpx.get(f"{DASHBOARD}/api/jobs/", headers={"Authorization": f"Bearer {ray_token()}"}, timeout=10).json()
    return [j for j in jobs if (j.get("submission_id") or "").startswith("diffops-gate-")]


def test_changed_golden_reference_is_held_back_and_stable_keeps_serving(live_demo, tmp_path):
    repo, controller, release = live_demo  # gated by this controller, or adopted from an earlier test's: checked again alike
    version = stable_version(release)
    other = Image.effect_noise((64, 64), 100).convert("RGB")
    buffer = io.BytesIO()
    other.save(buffer, format="PNG")
    with Load() as load:
        repo.write("releases/golden/demo.png", buffer.getvalue())
        repo.commit("a different golden reference")
        release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=120)
    message = release["message"]
    assert f"{version} failed its changed checks" in message and "golden check failed" in message
    assert "phash distance" in message and "> 8" in message and "SSIM" in message and "< 0.9" in message
    assert f"{version} failed its changed checks" in message and "it keeps serving" in message
    assert set(load.codes) == {200} and {v for _, v in load.versions} == {version}
    assert (controller.state_dir / "gate" / "demo" / version / "golden-compare.png").is_file()
    status = controller.status()
    assert status["applied_commit"] != status["commit"]  # the commit is not live


def test_impossible_latency_is_held_back_with_the_measured_p95(live_demo):
    repo, controller, release = live_demo
    version = stable_version(release)
    repo.release(**{LIVE_P95: "max_p95_latency_s: 0.0001", "steps: 4": "steps: 5"})
    repo.commit("impossible latency")
    release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=120)
    assert "performance check failed: p95 latency" in release["message"] and "> 0.0001s" in release["message"]
    assert [(v["id"], v["role"]) for v in release["versions"]] == [(version, "stable")]
    assert generate().headers["X-Diffops-Version"] == version


def test_old_torch_requirement_fails_naming_the_installed_torch(fresh_demo):
    from importlib.metadata import version as installed

    repo, controller, release = fresh_demo
    repo.release(**{'torch: ">=2.4"': 'torch: "<2.0"'})
    repo.commit("impossible torch")
    release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=120)
    assert f"dependency check failed: torch {installed('torch')} is installed; release requires torch<2.0" in release["message"]


def test_revert_to_a_version_that_passed_does_not_run_the_checks_again(fresh_demo):
    repo, controller, release = fresh_demo
    first = stable_version(release)
    repo.release(**{"scale_down_delay: 10m": "scale_down_delay: 1s"})
    repo.commit("short standby")
    repo.release(**{"scale_down_delay: 10m": "scale_down_delay: 1s", "steps: 4": "steps: 6"})
    repo.commit("more steps")
    second = stable_version(controller.wait_release(lambda r: healthy_on()(r) and stable_version(r) != first, timeout=120))
    wait_for(lambda: len(controller.release()["versions"]) == 1, 30, "the standby to be scaled down")
    jobs_before = len(gate_jobs())
    repo.repo.git.revert("--no-edit", "HEAD")
    release = controller.wait_release(lambda r: healthy_on()(r) and stable_version(r) == first, timeout=120)
    assert len(gate_jobs()) == jobs_before
    assert "reusing its passed checks" in controller.logs
    assert second != first


def test_check_command_passes_on_cpu_with_every_figure(model_repo: ReleaseRepo, tmp_path):
    started = time.monotonic()
    result = subprocess.run([DIFFOPS, "check", "demo", "--format", "json", "--state-dir", str(tmp_path / "s")],
                            cwd=model_repo.path, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    assert elapsed < 60
    report = json.loads(result.stdout)
    figures = {c["name"]: c["figures"] for c in report["checks"]}
    assert report["ok"] is True
    assert {"pipeline_class", "files", "total_bytes", "component_bytes", "weight_dtypes"} <= set(figures["artifact"])
    assert {"torch", "diffusers", "transformers"} <= set(figures["dependency"]["packages"])
    assert {"phash_distance", "ssim", "psnr_db"} <= set(figures["golden"])
    assert {"p50_latency_s", "p95_latency_s", "images_per_s", "peak_memory_gb"} <= set(figures["performance"])
    assert figures["load"]["device"] == "cpu"

    model_repo.release(**{'torch: ">=2.4"': 'torch: "<2.0"'})
    model_repo.commit("bad pin")
    failed = subprocess.run([DIFFOPS, "check", "demo", "--state-dir", str(tmp_path / "s")], cwd=model_repo.path, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "✗ dependency" in failed.stdout and "release requires torch<2.0" in failed.stdout


PERFORMANCE_BLOCK = """    performance:
      requests: 4
      concurrency: 2
      max_p95_latency_s: 30.0
      max_peak_memory_gb: 8
"""


@pytest.mark.timeout(1800)
def test_512px_golden_reference_written_by_the_cli_rolls_out_through_the_ray_job_gate(model_repo: ReleaseRepo, serve, tmp_path):
    assert PERFORMANCE_BLOCK in DEMO_RELEASE
    text = DEMO_RELEASE.replace(PERFORMANCE_BLOCK, "")  # golden only: a 512 px image takes minutes per render on CPU
    model_repo.release(text=text, **{"width: 64": "width: 512", "height: 64": "height: 512", "steps: 4": "steps: 1",
                                     "timeout: 2m": "timeout: 10m", "progress_deadline: 5m": "progress_deadline: 30m"})
    model_repo.commit("512 px")
    written = subprocess.run([DIFFOPS, "golden", "demo", "--write", "--state-dir", str(tmp_path / "cli")],
                             cwd=model_repo.path, capture_output=True, text=True, timeout=900)
    assert written.returncode == 0, written.stderr
    reference = (model_repo.path / "releases/golden/demo.png").read_bytes()
    assert Image.open(io.BytesIO(reference)).size == (512, 512)
    assert len(reference) > 128 * 1024  # over what one environment string may hold on Linux
    model_repo.commit("a 512 px golden reference")

    controller = Controller(model_repo.path, tmp_path / "state").start()
    try:
        release = controller.wait_release(healthy_on(), timeout=1500)
    finally:
        controller.stop()
    version = stable_version(release)
    gate = release["versions"][0]["gate"]
    [job] = [j for j in gate_jobs() if j["submission_id"] == gate["job"]]
    assert job["status"] == "SUCCEEDED" and job["metadata"]["version"] == version
    assert job["runtime_env"]["working_dir"].startswith("gcs://_ray_pkg_")
    assert set(job["runtime_env"]) == {"working_dir", "env_vars"} and set(job["runtime_env"]["env_vars"]) == {"DIFFOPS_SERVING_CODE"}
    assert gate["ok"] and gate["checks"]["golden"]["outcome"] == "passed"
    assert gate["checks"]["golden"]["figures"]["phash_distance"] == 0


@pytest.mark.timeout(300)
def test_gate_asking_for_more_gpus_than_the_head_has_fails_with_rays_reason_within_its_deadline(model_repo: ReleaseRepo, ray_head, tmp_path):
    import git

    from controller.apply.serve_client import ray_token
    from controller.gate.runner import RayJobGate, gate_input
    from controller.source.git_source import ReleaseSource
    from tests.conftest import make_release

    release = make_release()
    commit = model_repo.repo.head.commit.hexsha
    gate = gate_input(release, "v-unschedulable", ReleaseSource(git.Repo(model_repo.path)), str(tmp_path / "models"),
                      model_commit=commit, checks_commit=commit)
    started = time.monotonic()
    report = RayJobGate(DASHBOARD, ray_token(), start_base_s=2).run(gate, 0.5, 4)  # the head advertises 2 GPUs
    elapsed = time.monotonic() - started
    assert not report.ok
    message = report.summary()
    assert "gate job did not start within 6s (2s x3 for a GPU gate); it asked for 0.5 CPU, 4 GPU" in message
    assert "Ray says (PENDING): Job has not started yet. It may be waiting for resources" in message
    assert 6 <= elapsed < 30
    [job] = [j for j in gate_jobs() if j["submission_id"] == report.job]
    assert job["status"] != "SUCCEEDED" and job["metadata"]["num_gpus"] == "4"


@pytest.mark.timeout(300)
def test_gate_pinned_to_a_node_pool_the_cluster_lacks_fails_the_release_with_rays_reason(model_repo: ReleaseRepo, serve, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFOPS_GATE_RESOURCES", '{"diffops-absent-pool": 1}')
    monkeypatch.setenv("DIFFOPS_GATE_START_DEADLINE_S", "5")
    controller = Controller(model_repo.path, tmp_path / "state").start()
    try:
        release = controller.wait_release(lambda r: r["phase"] in ("Failed", "Degraded"), timeout=180)
    finally:
        controller.stop()
    message = release["message"]
    assert release["phase"] == "Failed"  # nothing was serving before: nothing serves
    assert "gate job did not start within 5s (5s for a CPU gate); it asked for 0.5 CPU, 0 GPU, 1 diffops-absent-pool" in message
    assert "Ray says (PENDING): Job has not started yet. It may be waiting for resources" in message
    assert "never started" in controller.logs
    assert not serve.observe()  # nothing was deployed for it
