"""`diffops experiment run` and `reproduce` on the tiny model, read back with MLflow's own client.

One run of a 2 samplers x 2 steps x 2 seeds grid (8 cells, 2 prompts, the tiny CLIP model pinned) in a real git
repository, logged to a real SQLite MLflow store, shared by the module's tests.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from controller.cli.experiment import experiment
from controller.experiments.sheet import sheet_size
from controller.parse.edit import set_fields
from controller.parse.loader import parse_release
from controller.plan.versions import version_id
from controller.tracking.mlflow_store import default_uri
from serving.manifest import manifest_of
from tests.conftest import DEMO_RELEASE, ROOT, ReleaseRepo, demo_repo

PROMPTS = ["a red cube", "a blue sphere"]
TAGS = ("diffops.kind", "diffops.experiment", "diffops.release", "diffops.commit", "diffops.cell", "diffops.version", "diffops.device",
        "diffops.torch", "diffops.diffusers")
PARAMS = ("model.uri", "model.digest", "generation.sampler", "generation.steps", "generation.guidance_scale", "generation.seed",
          "generation.width", "generation.height", "generation.negative_prompt", "prompts")
METRICS = ("performance.p50_latency_s", "performance.p95_latency_s", "performance.images_per_s", "cost.usd_per_image",
           "quality.mean_clip_score", "baseline.phash_distance", "baseline.ssim")


@dataclass
class Ran:
    repo: ReleaseRepo
    commit: str
    state: Path
    out: Path
    result: Result
    uri: str


def invoke(*args: str) -> Result:
    return CliRunner().invoke(experiment, list(args))


def experiment_repo(path: Path, *edits: tuple[str, str]) -> ReleaseRepo:
    """The demo release repo with the tiny CLIP model and experiments/demo-grid.yaml (`edits` applied), committed."""
    repo = demo_repo(path)
    shutil.copytree(ROOT / "models" / "tiny-clip", repo.path / "models" / "tiny-clip")
    clip = manifest_of(repo.path / "models" / "tiny-clip").digest
    text = (ROOT / "experiments" / "demo-grid.yaml").read_text().replace("sha256:1688fa6468ecc7a53b3c9562864e713aa3af24f93557a66fe84e0ccd12825f91", clip)
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    repo.write("experiments/demo-grid.yaml", text)
    repo.write("experiments/prompts/demo.txt", (ROOT / "experiments" / "prompts" / "demo.txt").read_text())
    repo.commit("experiment")
    return repo


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    base = tmp_path_factory.mktemp("experiment")
    repo = experiment_repo(base / "repo")
    commit = repo.repo.head.commit.hexsha
    state, out = base / "state", base / "out"
    result = invoke("run", str(repo.path / "experiments" / "demo-grid.yaml"), "--repo", str(repo.path), "--state-dir", str(state),
                    "-o", str(out), "--sort", "baseline.ssim")
    assert result.exit_code == 0, result.output
    return Ran(repo, commit, state, out, result, default_uri(state))


@pytest.fixture
def mlflow_at(ran: Ran) -> Iterator[Any]:
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(ran.uri)
    yield mlflow
    mlflow.set_tracking_uri(before)


def cells_and_parent(mlflow: Any) -> tuple[list[Any], Any]:
    runs = mlflow.search_runs(experiment_names=["diffops-experiment/demo-grid"], output_format="list")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id], parents[0]


def test_every_cell_is_a_child_run_with_its_params_tags_metrics_and_images(ran: Ran, mlflow_at: Any):
    from mlflow import MlflowClient

    cells, parent = cells_and_parent(mlflow_at)
    grid = sorted((r.data.params["generation.sampler"], int(r.data.params["generation.steps"]), int(r.data.params["generation.seed"]))
                  for r in cells)
    assert grid == [(s, n, seed) for s in ("ddim", "euler") for n in (2, 4) for seed in (1, 2)]
    client = MlflowClient(ran.uri)
    digest = manifest_of(ROOT / "models" / "tiny-sd").digest
    for run in cells:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert set(TAGS) <= set(tags) and set(PARAMS) <= set(params) and set(METRICS) <= set(metrics), run.info.run_name
        assert (tags["diffops.kind"], tags["diffops.experiment"], tags["diffops.release"], tags["diffops.commit"]) == (
            "experiment", "demo-grid", "demo", ran.commit)
        sampler, steps, seed = params["generation.sampler"], params["generation.steps"], params["generation.seed"]
        assert tags["diffops.cell"] == f"m0-{sampler}-{steps}-cfg7.5-seed{seed}"
        assert len(tags["diffops.version"]) == 10 and tags["diffops.device"]
        assert (params["model.uri"], params["model.digest"], params["generation.guidance_scale"], params["generation.width"],
                params["generation.height"], params["generation.negative_prompt"]) == ("file://models/tiny-sd", digest, "7.5", "64", "64", "")
        assert json.loads(params["prompts"]) == PROMPTS
        assert 0 < metrics["performance.p50_latency_s"] <= metrics["performance.p95_latency_s"] and metrics["performance.images_per_s"] > 0
        assert metrics["cost.usd_per_image"] == 0.0, "the demo release runs on 0 GPUs"
        assert 0 <= metrics["quality.mean_clip_score"] <= 100
        baseline = (sampler, steps) == ("ddim", "2")
        if baseline:  # the baseline config against itself
            assert metrics["baseline.phash_distance"] == 0 and metrics["baseline.ssim"] == 1.0
        assert tags["diffops.is_baseline"] == str(baseline).lower()
        artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id, "images"))
        assert artifacts == ["images/0.png", "images/1.png"]
        assert json.loads(Path(client.download_artifacts(run.info.run_id, "prompts.json", str(ran.out / run.info.run_id))).read_text()) == PROMPTS
    assert len({r.data.tags["diffops.version"] for r in cells}) == 8
    euler = next(r for r in cells if r.data.tags["diffops.cell"] == "m0-euler-4-cfg7.5-seed2")
    edited = set_fields(DEMO_RELEASE, {"spec.generation.sampler": "euler", "spec.generation.steps": 4, "spec.generation.seed": 2})
    assert euler.data.tags["diffops.version"] == version_id(parse_release(edited.encode(), "releases/demo.yaml")), \
        "the version the release gets with the cell's config"
    assert any(r.data.metrics["baseline.phash_distance"] > 0 for r in cells), "some config draws differently from the baseline"
    assert parent.data.tags["diffops.kind"] == "experiment" and parent.info.status == "FINISHED"


def test_contact_sheet_and_table_are_on_the_parent_run_and_in_the_output_dir(ran: Ran, mlflow_at: Any):
    from mlflow import MlflowClient

    cells, parent = cells_and_parent(mlflow_at)
    folder = MlflowClient(ran.uri).download_artifacts(parent.info.run_id, "", str(ran.out / "parent"))
    sheet = (Path(folder) / "contact-sheet.png").read_bytes()
    with Image.open(io.BytesIO(sheet)) as image:
        assert image.format == "PNG" and image.size == sheet_size(8, 2, (64, 64))
    assert sheet == (ran.out / "contact-sheet.png").read_bytes()
    table = json.loads((ran.out / "table.json").read_text())
    assert table == json.loads((Path(folder) / "table.json").read_text()) and table["parent_run_id"] == parent.info.run_id
    ssims = [row["metrics"]["baseline.ssim"] for row in table["rows"]]
    assert ssims == sorted(ssims, reverse=True) and {row["run_id"] for row in table["rows"]} == {r.info.run_id for r in cells}
    printed = [line for line in ran.result.stdout.splitlines() if line.startswith("m0-")]
    assert [line.split()[0] for line in printed] == [row["cell"] for row in table["rows"]]
    assert "SSIM *" in ran.result.stdout


def test_cells_draw_what_the_release_would_serve(ran: Ran, mlflow_at: Any):
    from mlflow import MlflowClient

    from serving.generator import PipelineRunner, resolve
    from serving.pipeline import load_pipeline

    cells, _ = cells_and_parent(mlflow_at)
    run = next(r for r in cells if r.data.tags["diffops.cell"] == "m0-euler-4-cfg7.5-seed2")
    recorded = Path(MlflowClient(ran.uri).download_artifacts(run.info.run_id, "images/1.png", str(ran.out / "served"))).read_bytes()
    runner = PipelineRunner(load_pipeline(ROOT / "models" / "tiny-sd", sampler="euler", device="cpu"), "cpu")
    generation = {"sampler": "euler", "steps": 4, "guidance_scale": 7.5, "width": 64, "height": 64, "negative_prompt": "", "seed": 2}
    assert runner.run([resolve({"prompt": "a blue sphere"}, generation)])[0]["images"][0] == recorded


def test_reproduce_reports_zero_distance_then_fails_on_a_replaced_image(ran: Ran, mlflow_at: Any, tmp_path: Path):
    from mlflow import MlflowClient

    cells, parent = cells_and_parent(mlflow_at)
    run = next(r for r in cells if r.data.tags["diffops.cell"] == "m0-ddim-4-cfg7.5-seed1")
    other = next(r for r in cells if r.data.tags["diffops.cell"] == "m0-euler-2-cfg7.5-seed2")
    args = ("reproduce", run.info.run_id, "--repo", str(ran.repo.path), "--tracking-uri", ran.uri)
    result = invoke(*args, "--state-dir", str(tmp_path / "fresh"))  # the model is not cached there: fetched from the repo
    assert result.exit_code == 0, result.output
    assert (tmp_path / "fresh" / "models").is_dir()
    args = (*args, "--state-dir", str(ran.state))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "prompt 0 'a red cube': phash distance 0, pixels max 0 mean 0.0000 ok",
        "prompt 1 'a blue sphere': phash distance 0, pixels max 0 mean 0.0000 ok",
        f"run {run.info.run_id}: reproduced, 2 prompt(s) within pHash distance 0"]
    client = MlflowClient(ran.uri)
    replacement = Path(client.download_artifacts(other.info.run_id, "images/1.png", str(tmp_path)))
    client.log_artifact(run.info.run_id, str(replacement), "images")
    result = invoke(*args)
    assert result.exit_code == 1
    assert "prompt 0 'a red cube': phash distance 0, pixels max 0" in result.stdout
    assert "prompt 1 'a blue sphere': phash distance " in result.stdout and result.stdout.count("DIFFERS") == 1
    assert "1 of 2 prompt(s) differ past pHash distance 0, first prompt 1 'a blue sphere'" in result.stderr
    assert invoke(*args, "--max-phash-distance", "64").exit_code == 0
    refused = invoke("reproduce", parent.info.run_id, "--state-dir", str(ran.state))
    assert refused.exit_code == 1 and "is not an experiment cell" in refused.stderr


def test_an_invalid_file_is_refused_before_anything_runs(ran: Ran, tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ran.repo.path / "experiments" / "demo-grid.yaml").read_text().replace("sampler: [ddim, euler]", "sampler: [ddim, warp]"))
    result = invoke("run", str(bad), "--repo", str(ran.repo.path), "--state-dir", str(tmp_path / "state"))
    assert result.exit_code == 1
    assert f"{bad}:10:21: spec.grid.sampler.1: Input should be 'ddim'" in result.stderr and "got 'warp'" in result.stderr
    assert not (tmp_path / "state" / "mlflow.db").exists()


def test_a_cell_promoted_to_the_release_lints_and_its_diff_shows_the_config(ran: Ran, mlflow_at: Any):
    from controller.cli.main import main

    cells, _ = cells_and_parent(mlflow_at)
    euler = next(r for r in cells if r.data.tags["diffops.cell"] == "m0-euler-4-cfg7.5-seed2")
    where = ["--repo", str(ran.repo.path), "--state-dir", str(ran.state)]
    promoted = CliRunner().invoke(main, ["experiment", "promote", euler.info.run_id, "--release", "demo", *where])
    assert promoted.exit_code == 0, promoted.output
    branch = f"experiment/{euler.info.run_id[:8]}"
    assert ran.repo.repo.head.commit.hexsha == ran.commit and not ran.repo.repo.is_dirty()  # the checkout is untouched
    assert euler.info.run_id in ran.repo.repo.commit(branch).message
    lint = CliRunner().invoke(main, ["lint", "--rev", branch, *where])
    assert lint.exit_code == 0, lint.output
    diff = CliRunner().invoke(main, ["diff", f"{ran.commit}..{branch}", "-o", "markdown", *where])
    assert "generation.sampler" in diff.stdout and "euler" in diff.stdout and diff.stdout in promoted.stdout
