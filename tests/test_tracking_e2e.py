"""Gate runs in MLflow for real: a live controller logs each gate to a real `mlflow server` on loopback (and to
the embedded SQLite store by default), found with MLflow's own client by the release and version tags."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from controller.parse.loader import parse_release
from tests.conftest import DEMO_RELEASE, LIVE_P95, ReleaseRepo
from tests.live import DIFFOPS, MLFLOW_QUIET, gate_runs, running_controller, stable_version, wait_for

pytestmark = pytest.mark.timeout(600)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with a SQLite backend and proxied artifacts (what a team runs, minus the database)."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "server-artifacts"),
         "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **MLFLOW_QUIET, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert process.poll() is None, (tmp_path / "mlflow-server.log").read_text()[-2000:]
        try:
            return httpx.get(f"{url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, 90, "mlflow server")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_rollout_logs_its_gate_on_a_tracking_server_and_status_and_history_link_it(model_repo: ReleaseRepo, serve, tmp_path,
                                                                                      mlflow_server):
    from mlflow import MlflowClient

    with running_controller(model_repo.path, tmp_path / "state", "--tracking-uri", mlflow_server) as (controller, release):
        version = stable_version(release)
        [run] = gate_runs(mlflow_server, "demo", version)
        assert run.data.tags["diffops.commit"] == model_repo.repo.head.commit.hexsha and run.data.tags["diffops.ok"] == "true"
        assert run.data.tags["diffops.device"] and run.data.tags["diffops.torch"] and run.data.tags["diffops.diffusers"]
        assert run.data.params["model.digest"] == parse_release(DEMO_RELEASE.encode(), "demo.yaml").spec.model.digest
        assert run.data.params["generation.sampler"] == "ddim" and run.data.params["generation.steps"] == "4"
        metrics = run.data.metrics
        assert metrics["performance.p95_latency_s"] > 0 and metrics["performance.images_per_s"] > 0
        assert metrics["golden.phash_distance"] == 0 and metrics["golden.ssim"] > 0.99 and metrics["gate.ok"] == 1
        client = MlflowClient(mlflow_server)
        names = {a.path for a in client.list_artifacts(run.info.run_id, "gate")}
        assert {"gate/golden-produced.png", "gate/golden-compare.png", "gate/report.json"} <= names
        produced = client.download_artifacts(run.info.run_id, "gate/golden-produced.png", str(tmp_path))
        assert Image.open(produced).size == (64, 64)

        def tracked() -> dict | None:  # the run is logged in the background and named in the report by the next tick
            gate = next(v for v in controller.status()["releases"][0]["versions"] if v["id"] == version)["gate"]
            return gate if gate.get("run") else None

        gate = wait_for(tracked, 30, "the gate's run in the status")
        assert gate["run"]["id"] == run.info.run_id
        assert gate["run"]["link"] == f"{mlflow_server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
        history = subprocess.run([DIFFOPS, "history", "demo", "--state-dir", str(controller.state_dir)], capture_output=True,
                                 text=True, timeout=60)
        assert f"gate tracked: {gate['run']['link']}" in history.stdout, history.stdout

        # a gate that fails is a run too, with its verdict: found by its own version's tag
        model_repo.release(**{LIVE_P95: "max_p95_latency_s: 0.0001", "steps: 4": "steps: 5"})
        model_repo.commit("impossible latency")
        failed = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=180)
        held = failed["desired_version"]
        [bad] = wait_for(lambda: gate_runs(mlflow_server, "demo", held), 60, "the failed gate's run")
        assert bad.data.tags["diffops.ok"] == "false" and bad.data.metrics["gate.ok"] == 0
        assert bad.data.metrics["performance.p95_latency_s"] > 0.0001 and bad.data.params["generation.steps"] == "5"
        assert f"tracked as MLflow run {bad.info.run_id}" in controller.logs


def test_the_embedded_store_is_the_default_and_a_reused_gate_logs_no_second_run(fresh_demo):
    repo, controller, release = fresh_demo
    version = stable_version(release)
    uri = f"sqlite:///{controller.state_dir / 'mlflow.db'}"
    [first] = gate_runs(uri, "demo", version)
    assert Path(controller.state_dir / "mlflow-artifacts").is_dir()
    repo.release(**{"steps: 4": "steps: 5"})
    change = repo.commit("five steps")
    moved = controller.wait_release(lambda r: r["desired_version"] != version and r["phase"] == "Healthy", timeout=240)
    repo.repo.git.revert("--no-edit", change)
    controller.wait_release(lambda r: r["desired_version"] == version and r["phase"] == "Healthy", timeout=120)
    assert [r.info.run_id for r in gate_runs(uri, "demo", version)] == [first.info.run_id]  # passed before: reused, not run
    assert len(gate_runs(uri, "demo", moved["desired_version"])) == 1
