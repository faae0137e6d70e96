"""`diffops experiment promote`: an experiment cell logged in a real MLflow SQLite store becomes a release change on a
new branch of a real git repository, without touching the checkout; what it cannot promote leaves no branch."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from controller.cli.main import main
from controller.cli.promote import promote
from controller.tracking.mlflow_store import Tracker
from controller.tracking.promote import PromoteError, cell_values, release_changes
from controller.tracking.runs import RunRecord, spec_params
from tests.conftest import ReleaseRepo, make_release, respec

OTHER_DIGEST = "sha256:" + "ab" * 32
FIGURES = {"performance.p50_latency_s": 0.125, "performance.p95_latency_s": 0.2, "performance.images_per_s": 6.5,
           "cost.usd_per_image": 0.000107, "quality.mean_clip_score": 27.25, "baseline.phash_distance": 4.0, "baseline.ssim": 0.91}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Tracker, Path]]:
    """One real MLflow SQLite store for the module (creating one takes seconds): the tracker and its state dir."""
    state = tmp_path_factory.mktemp("state")
    yield Tracker.for_state_dir(state), state


def log_cell(tracker: Tracker, kind: str = "experiment", model: dict[str, Any] | None = None, **generation: Any) -> str:
    """A cell as `diffops experiment run` logs it: the demo recipe with `generation` and `model` changed."""
    spec = make_release().spec
    valid = {key: value for key, value in generation.items() if key != "sampler" or value in ("ddim", "euler")}
    params = spec_params(respec(spec, generation=valid, model=model or {}))
    params.update({f"generation.{key}": value for key, value in generation.items() if key not in valid})
    tags = {"diffops.kind": kind, "diffops.experiment": "sweep", "diffops.release": "demo", "diffops.commit": "c0ffee" * 6 + "abcd",
            "diffops.cell": "euler-8-s7", "diffops.version": "v1"}
    return tracker.log(RunRecord("cell euler-8-s7", tags, params, FIGURES), f"diffops-experiment/{'sweep' if kind == 'experiment' else 'demo'}").run_id


@pytest.fixture
def repo(release_repo: ReleaseRepo) -> ReleaseRepo:
    release_repo.release()
    release_repo.commit("demo release")
    return release_repo


def run_promote(store: tuple[Tracker, Path], repo: ReleaseRepo, run_id: str, *args: str) -> Result:
    tracker, state = store
    options = ["--repo", str(repo.path), "--state-dir", str(state), "--tracking-uri", tracker.uri]
    return CliRunner().invoke(promote, [run_id, "--release", "demo", *options, *args])


def diffops(repo: ReleaseRepo, state: Path, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--repo", str(repo.path), "--state-dir", str(state)])


def checkout(repo: ReleaseRepo) -> tuple[str, str, str, str]:
    """What the user has checked out: branch, HEAD, `git status`, and the release file in the work tree."""
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo.path, capture_output=True, text=True, check=True).stdout
    return repo.repo.active_branch.name, repo.repo.head.commit.hexsha, status, (repo.path / "releases/demo.yaml").read_text()


def branches(repo: ReleaseRepo) -> dict[str, str]:
    return {head.name: head.commit.hexsha for head in repo.repo.heads}


def test_promote_commits_the_cell_on_a_new_branch_and_leaves_the_checkout_alone(store: tuple[Tracker, Path], repo: ReleaseRepo) -> None:
    run_id = log_cell(store[0], sampler="euler", steps=8, guidance_scale=5.0, seed=7, negative_prompt="blurry")
    repo.release(**{"count: 1": "count: 3"})  # an uncommitted edit of the same file
    repo.write("notes.txt", "work in progress\n")
    repo.repo.git.add("notes.txt")
    before = checkout(repo)

    result = run_promote(store, repo, run_id)

    assert result.exit_code == 0, result.output
    assert checkout(repo) == before
    branch = f"experiment/{run_id[:8]}"
    commit = repo.repo.commit(branch)
    assert commit.parents[0].hexsha == before[1]
    assert commit.message.splitlines()[0] == "demo: euler, 8 steps, CFG 5 from experiment sweep"
    message = str(commit.message)
    assert f"MLflow run {run_id}" in message and f"mlflow ui --backend-store-uri {store[0].uri}" in message
    for figure in ("p50 latency                     0.125 s", "p95 latency                     0.200 s", "images/s                        6.50",
                   "cost per image                  $0.000107", "CLIP score                      27.25",
                   "pHash distance to the baseline  4", "SSIM to the baseline            0.910"):
        assert figure in message
    assert "The cell ran with seed 7; the release keeps seed: null" in message
    committed = (commit.tree / "releases/demo.yaml").data_stream.read().decode()
    original = (commit.parents[0].tree / "releases/demo.yaml").data_stream.read().decode()
    assert [(old, new) for old, new in zip(original.splitlines(), committed.splitlines(), strict=True) if old != new] == [
        ("    sampler: ddim", "    sampler: euler"), ("    steps: 4", "    steps: 8"), ("    guidance_scale: 7.5", "    guidance_scale: 5.0"),
        ('    negative_prompt: ""', '    negative_prompt: "blurry"')]

    lint = diffops(repo, store[1], "lint", "--rev", branch)
    assert lint.exit_code == 0, lint.output
    assert "1 valid, 0 invalid" in lint.stderr
    plan = diffops(repo, store[1], "diff", f"main..{branch}", "-o", "markdown")
    assert plan.exit_code == 0 and "| `demo` | change | **version** |" in plan.stdout
    assert "| `spec.generation.sampler` | `\"ddim\"` | `\"euler\"` | version |" in plan.stdout
    assert result.stdout == plan.stdout  # the pull request's description is `diffops diff` itself
    assert f"next: git push -u origin {branch}" in result.stderr
    assert "the golden reference releases/golden/demo.png was rendered with the old config" in result.stderr
    assert "`diffops golden demo --write`" in result.stderr


def test_a_cell_on_another_model_changes_the_model_and_a_pinned_seed(store: tuple[Tracker, Path], repo: ReleaseRepo) -> None:
    repo.release(**{"seed: null": "seed: 42"})
    pinned = repo.commit("pin the seed")
    repo.release(**{"count: 1": "count: 2"})
    repo.commit("scale out")  # HEAD moved on; the branch starts from --rev
    run_id = log_cell(store[0], model={"uri": "s3://models/tiny-sd-v2", "digest": OTHER_DIGEST}, sampler="ddim", steps=4, seed=7)

    result = run_promote(store, repo, run_id, "--branch", "try/tiny-v2", "--rev", pinned)

    assert result.exit_code == 0, result.output
    assert repo.repo.commit("try/tiny-v2").parents[0].hexsha == pinned
    assert repo.repo.commit("try/tiny-v2").summary == "demo: ddim, 4 steps, CFG 7.5, model s3://models/tiny-sd-v2 from experiment sweep"
    changes = json.loads(diffops(repo, store[1], "diff", f"{pinned}..try/tiny-v2", "-o", "json").stdout)["changes"]
    assert sorted((f["path"], f["old"], f["new"]) for f in changes[0]["fields"]) == [
        ("spec.generation.seed", 42, 7), ("spec.model.digest", make_release().spec.model.digest, OTHER_DIGEST),
        ("spec.model.uri", "file://models/tiny-sd", "s3://models/tiny-sd-v2")]
    assert "| `spec.model.uri` |" in result.stdout
    assert diffops(repo, store[1], "lint", "--rev", "try/tiny-v2").exit_code == 0


def test_dry_run_prints_the_plan_and_creates_no_branch(store: tuple[Tracker, Path], repo: ReleaseRepo) -> None:
    run_id = log_cell(store[0], sampler="euler", steps=8)
    before = branches(repo)
    result = run_promote(store, repo, run_id, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "| `spec.generation.steps` | `4` | `8` | version |" in result.stdout
    assert f"dry run, no branch created; experiment/{run_id[:8]} would change generation.sampler, generation.steps" in result.stderr
    assert branches(repo) == before


@pytest.mark.parametrize(("case", "message"), [
    ("unknown run", "no run '0123456789abcdef0123456789abcdef' in sqlite:///"),
    ("gate run", "is a gate run of release demo, not an experiment cell"),
    ("existing branch", "branch experiment/"),
    ("sampler the schema refuses", "the cell's params give an invalid release: spec.generation.sampler: "),
    ("steps over the release's limit", "spec.generation.steps: 80 exceeds limits.max_steps (50)"),
    ("the release has the config already", "already has the config of cell euler-8-s7; nothing to promote"),
])
def test_what_cannot_be_promoted_exits_1_and_leaves_no_branch(store: tuple[Tracker, Path], repo: ReleaseRepo, case: str,
                                                              message: str) -> None:
    cells: dict[str, dict[str, Any]] = {"gate run": {"kind": "gate", "sampler": "euler"}, "existing branch": {"sampler": "euler"},
                                        "sampler the schema refuses": {"sampler": "plms"}, "steps over the release's limit": {"steps": 80},
                                        "the release has the config already": {"sampler": "ddim", "steps": 4}}
    run_id = log_cell(store[0], **cells[case]) if case in cells else "0123456789abcdef0123456789abcdef"
    if case == "existing branch":
        repo.repo.create_head(f"experiment/{run_id[:8]}")
    before, checked_out = branches(repo), checkout(repo)

    result = run_promote(store, repo, run_id)

    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert branches(repo) == before and checkout(repo) == checked_out
    assert "Traceback" not in result.output


RANDOM, PINNED = ("seed: null", "seed: null"), ("seed: null", "seed: 42")  # edits of the demo release
SEED_AND_VALUES = [
    ("a release drawing random seeds keeps doing so", RANDOM, {"generation.seed": "7"}, {}),
    ("a pinned seed stays when the cell drew random ones", PINNED, {"generation.seed": "null"}, {}),
    ("a pinned seed takes the cell's", PINNED, {"generation.seed": "7"}, {"spec.generation.seed": 7}),
    ("equal values are no change, as logged", RANDOM, {"generation.guidance_scale": "7.5", "generation.steps": "4"}, {}),
    ("a CFG logged as an int is written as logged", RANDOM, {"generation.guidance_scale": "5"}, {"spec.generation.guidance_scale": 5}),
    ("text params are taken as logged", RANDOM, {"generation.sampler": "euler", "generation.negative_prompt": "7"},
     {"spec.generation.sampler": "euler", "spec.generation.negative_prompt": "7"}),
]


@pytest.mark.parametrize(("edit", "params", "changes"), [case[1:] for case in SEED_AND_VALUES], ids=[case[0] for case in SEED_AND_VALUES])
def test_release_changes_take_only_what_differs(edit: tuple[str, str], params: dict[str, str], changes: dict[str, Any]) -> None:
    spec = make_release(edit).spec
    assert release_changes(spec, cell_values({"generation.sampler": "ddim", **params})) == changes


@pytest.mark.parametrize(("params", "message"), [
    ({"generation.steps": "eight"}, "param generation.steps = 'eight' is not a number or null"),
    ({"generation.steps": "[4, 8]"}, "param generation.steps = '[4, 8]' is not a single value"),
    ({"model.uri": "file://models/tiny-sd", "prompts": "[]"}, "the run has no generation params"),
])
def test_params_that_are_not_a_cell_are_refused(params: dict[str, str], message: str) -> None:
    with pytest.raises(PromoteError) as refused:
        cell_values(params)
    assert message in str(refused.value)
