"""`diffops experiment run --ray-address`: the cells drawn as Ray jobs on the session's Ray head, one per model,
logged to MLflow like an in-process run, and drawing exactly what the release would serve."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from click.testing import CliRunner

from controller.apply.dashboard import DashboardClient, ray_token
from controller.apply.ray_cluster import RayHead
from controller.cli.experiment import experiment
from controller.tracking.mlflow_store import Tracker, default_uri
from serving.manifest import manifest_of
from tests.conftest import ROOT, demo_repo

EXPERIMENT = """\
apiVersion: diffops/v1
kind: Experiment
metadata: {{name: on-ray}}
spec:
  release: demo
  models:
    - {{uri: file://models/tiny-sd, digest: "{digest}"}}
    - {{uri: file://models/tiny-sd-copy, digest: "{digest}"}}
  grid: {{sampler: [ddim, euler], steps: [2], seed: [5]}}
  prompts: [a red cube, a blue sphere]
  sort: performance.images_per_s
"""


def test_cells_are_drawn_by_one_ray_job_per_model_and_logged(ray_head: RayHead, tmp_path: Path):
    import torch
    from mlflow import MlflowClient

    from serving.generator import PipelineRunner, resolve
    from serving.pipeline import load_pipeline

    repo = demo_repo(tmp_path / "repo")
    shutil.copytree(ROOT / "models" / "tiny-sd", repo.path / "models" / "tiny-sd-copy")
    digest = manifest_of(ROOT / "models" / "tiny-sd").digest
    repo.write("experiments/on-ray.yaml", EXPERIMENT.format(digest=digest))
    repo.commit("experiment")
    state = tmp_path / "state"
    dashboard = DashboardClient(ray_head.dashboard_url, ray_token())
    before = {job["submission_id"] for job in dashboard.send("GET", "/api/jobs/").json()}
    result = CliRunner().invoke(experiment, ["run", str(repo.path / "experiments" / "on-ray.yaml"), "--repo", str(repo.path),
                                             "--state-dir", str(state), "--ray-address", ray_head.dashboard_url, "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "2 Ray job(s), one per model" in result.stderr
    jobs = dashboard.send("GET", "/api/jobs/").json()
    ours = [job for job in jobs if job["submission_id"] not in before]
    assert len(ours) == 2 and {job["status"] for job in ours} == {"SUCCEEDED"}
    assert all(job["submission_id"].startswith("diffops-experiment-demo-") for job in ours)
    assert sorted(job["metadata"]["experiment_cells"] for job in ours) == ["2", "2"]
    cells = [r for r in Tracker(default_uri(state)).runs("diffops-experiment/on-ray") if "diffops.cell" in r.data.tags]
    assert sorted(r.data.tags["diffops.cell"] for r in cells) == [
        "m0-ddim-2-cfg7.5-seed5", "m0-euler-2-cfg7.5-seed5", "m1-ddim-2-cfg7.5-seed5", "m1-euler-2-cfg7.5-seed5"]
    for run in cells:
        assert {"performance.p50_latency_s", "performance.images_per_s", "baseline.phash_distance", "baseline.ssim"} <= set(run.data.metrics)
        assert run.data.tags["diffops.device"] and run.data.tags["diffops.torch"], "the job's node says where it drew"
    same_model = {r.data.tags["diffops.cell"]: r for r in cells}
    assert same_model["m1-ddim-2-cfg7.5-seed5"].data.metrics["baseline.phash_distance"] == 0, "the same weights draw the same"
    run = same_model["m0-euler-2-cfg7.5-seed5"]
    recorded = Path(MlflowClient(default_uri(state)).download_artifacts(run.info.run_id, "images/0.png", str(tmp_path))).read_bytes()
    generation = {"sampler": "euler", "steps": 2, "guidance_scale": 7.5, "width": 64, "height": 64, "negative_prompt": "", "seed": 5}
    runner = PipelineRunner(load_pipeline(ROOT / "models" / "tiny-sd", sampler="euler", device="cpu"), "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # Ray runs a job asking under one CPU with one thread (OMP_NUM_THREADS=1), as it runs such replicas
    try:
        assert runner.run([resolve({"prompt": "a red cube"}, generation)])[0]["images"][0] == recorded
    finally:
        torch.set_num_threads(threads)
    rates = [row["metrics"]["performance.images_per_s"] for row in json.loads((tmp_path / "out" / "table.json").read_text())["rows"]]
    assert rates == sorted(rates, reverse=True)


def test_job_report_lines_give_each_cell_and_a_job_error_is_the_experiment_error():
    import base64

    import pytest

    from controller.experiments.job import CELL_PREFIX, ERROR_PREFIX
    from controller.experiments.on_ray import RayDrawError, parse_logs

    cell = {"index": 3, "images": [base64.b64encode(b"png").decode()], "latencies": [0.5], "wall_s": 0.6, "device": "cpu", "load_s": 1,
            "environment": {"diffops.device": "Some CPU", "diffops.torch": "2.9"}}
    drawn = parse_logs(f"loading\n{CELL_PREFIX}{json.dumps(cell)}\nnoise", "job-1")
    assert list(drawn) == [3] and drawn[3].images == (b"png",) and drawn[3].latencies == (0.5,) and drawn[3].wall_s == 0.6
    assert drawn[3].environment == {"diffops.device": "Some CPU", "diffops.torch": "2.9"}
    error = ERROR_PREFIX + json.dumps({"message": "ArtifactError: file://models/x: digest mismatch"})
    with pytest.raises(RayDrawError, match=r"^experiment job job-2: ArtifactError: file://models/x: digest mismatch$"):
        parse_logs(f"{CELL_PREFIX}{json.dumps(cell)}\n{error}", "job-2")
