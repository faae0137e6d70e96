"""From an experiment cell to a release change on a branch: `diffops experiment promote RUN_ID --release NAME`.

The last step of an experiment: `experiment run` logged each cell of its grid as
an MLflow run (tag `diffops.kind=experiment`, params by release field path,
figures as metrics). `read_cell` reads one back; `release_changes` decides which
release fields the cell changes (model and generation, only those that differ;
the seed only where the release pins one); `edited_release` rewrites the file
with `controller.parse.edit.set_fields` and proves it with the release loader;
`commit_release` builds the commit with git plumbing (a temporary index, never
the user's work tree, index or HEAD) and `create_branch` points a new branch at
it. The CLI shell is `controller.cli.promote`.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import git

from controller.parse.edit import EditError, Scalar, set_fields
from controller.parse.loader import InvalidRelease, parse_release
from controller.parse.release import Release, Spec
from controller.tracking.mlflow_store import Tracker, TrackingError, run_link

__all__ = ["FIELDS", "FIGURES", "Cell", "PromoteError", "branch_exists", "cell_from_run", "cell_values", "commit_message", "commit_release",
           "config_text", "create_branch", "edited_release", "figure_lines", "read_cell", "release_changes", "subject"]

FIELDS = ("model.uri", "model.digest", "model.dtype", "generation.sampler", "generation.steps", "generation.guidance_scale",
          "generation.width", "generation.height", "generation.negative_prompt", "generation.seed")
"""The release fields a cell can change, as its params name them (`controller.tracking.runs.spec_params`)."""
_TEXT = {"model.uri", "model.digest", "model.dtype", "generation.sampler", "generation.negative_prompt"}  # logged as is; others JSON
FIGURES = (  # (metric, label, format) for the commit message
    ("performance.p50_latency_s", "p50 latency", "{:.3f} s"),
    ("performance.p95_latency_s", "p95 latency", "{:.3f} s"),
    ("performance.images_per_s", "images/s", "{:.2f}"),
    ("cost.usd_per_image", "cost per image", "${:.6f}"),
    ("quality.mean_clip_score", "CLIP score", "{:.2f}"),
    ("baseline.phash_distance", "pHash distance to the baseline", "{:g}"),
    ("baseline.ssim", "SSIM to the baseline", "{:.3f}"),
)
_NO_REF = "0" * 40
_UNKNOWN = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # MLflow's error codes for a run id it does not hold


class PromoteError(Exception):
    """The cell cannot be promoted; the message says why and what to do."""


@dataclass(frozen=True)
class Cell:
    """One experiment cell as MLflow holds it."""

    run_id: str
    experiment_id: str
    experiment: str  # the experiment file's name (`diffops.experiment`)
    cell: str
    release: str  # the release the experiment started from (`diffops.release`)
    commit: str
    params: dict[str, str]
    metrics: dict[str, float]


def cell_from_run(run: Any) -> Cell:
    """A cell from an MLflow `Run`; a run that is not an experiment cell is a PromoteError saying what it is."""
    tags: dict[str, str] = dict(run.data.tags)
    run_id = str(run.info.run_id)
    kind = tags.get("diffops.kind")
    if kind != "experiment":
        what = f"a {kind} run of release {tags.get('diffops.release', '?')}" if kind else "not a diffops run"
        raise PromoteError(f"run {run_id} is {what}, not an experiment cell; promote a run id from the table of "
                           "`diffops experiment run`")
    return Cell(run_id, str(run.info.experiment_id), tags.get("diffops.experiment", "?"), tags.get("diffops.cell", "?"),
                tags.get("diffops.release", ""), tags.get("diffops.commit", ""), dict(run.data.params),
                {key: float(value) for key, value in run.data.metrics.items()})


def read_cell(tracker: Tracker, run_id: str) -> tuple[Cell, str]:
    """The cell of run `run_id` and its link; an unknown run is a PromoteError, an unreachable store a TrackingError."""
    client = tracker.client
    try:
        run = client.get_run(run_id)
    except Exception as err:
        detail = f"{type(err).__name__}: {str(err).strip()[:200]}"
        if getattr(err, "error_code", "") in _UNKNOWN:
            raise PromoteError(f"no run {run_id!r} in {tracker.uri} ({detail}); check the run id and --tracking-uri") from None
        raise TrackingError(f"tracking store {tracker.uri}: reading run {run_id} failed ({detail}); check that the server "
                            "is up and try again") from err
    cell = cell_from_run(run)
    return cell, run_link(tracker.uri, cell.experiment_id, cell.run_id)


def cell_values(params: Mapping[str, str]) -> dict[str, Scalar]:
    """The release field values of a cell's params: text fields as logged, the others decoded from JSON."""
    values: dict[str, Scalar] = {}
    for name in FIELDS:
        if name not in params:
            continue
        raw = params[name]
        if name in _TEXT:
            values[name] = raw
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise PromoteError(f"param {name} = {raw!r} is not a number or null; the run was not logged by "
                               "`diffops experiment run`") from None
        if isinstance(value, (dict, list)):
            raise PromoteError(f"param {name} = {raw!r} is not a single value")
        values[name] = value
    if not any(name.startswith("generation.") for name in values):
        raise PromoteError("the run has no generation params (generation.sampler, generation.steps, ...); nothing to promote")
    return values


def release_changes(spec: Spec, values: Mapping[str, Scalar]) -> dict[str, Scalar]:
    """The release edits (`spec.<field>`) that give `spec` the cell's recipe: only the fields that differ.

    The seed is the one exception: a cell's seed chose which sample the grid drew, not how the model generates, so a
    release that draws a random seed per request (`seed: null`) keeps doing so; a release that pins a seed takes the
    cell's, so it serves the very images the experiment compared."""
    current = {f"model.{k}": v for k, v in spec.model.model_dump(mode="json").items()}
    current.update({f"generation.{k}": v for k, v in spec.generation.model_dump(mode="json").items()})
    changes: dict[str, Scalar] = {}
    for name, value in values.items():
        if name == "generation.seed" and (current[name] is None or value is None):
            continue
        if current.get(name) != value:
            changes[f"spec.{name}"] = value
    return changes


def edited_release(text: str, file: str, changes: Mapping[str, Scalar]) -> tuple[str, Release]:
    """The release file with `changes`, comments kept, validated like `diffops lint` does; a PromoteError names the field
    the schema refuses."""
    try:
        edited = set_fields(text, changes)
    except EditError as err:
        raise PromoteError(f"{file}: {err}") from None
    try:
        return edited, parse_release(edited.encode(), file)
    except InvalidRelease as err:
        problems = "; ".join(f"{e.field or 'line ' + str(e.line)}: {e.message}" for e in err.errors)
        raise PromoteError(f"the cell's params give an invalid release: {problems}; this cell cannot be promoted as is") from None


def config_text(values: Mapping[str, Scalar], changes: Mapping[str, Scalar]) -> str:
    """'euler, 8 steps, CFG 5' and, when the model changes, the model it uses."""
    parts = [str(values["generation.sampler"])] if "generation.sampler" in values else []
    if "generation.steps" in values:
        parts.append(f"{values['generation.steps']} steps")
    if "generation.guidance_scale" in values:
        parts.append(f"CFG {values['generation.guidance_scale']:g}" if isinstance(values["generation.guidance_scale"], (int, float))
                     else f"CFG {values['generation.guidance_scale']}")
    if "spec.model.uri" in changes or "spec.model.digest" in changes:
        parts.append(f"model {values.get('model.uri', '?')}")
    return ", ".join(parts)


def subject(release: str, cell: Cell, values: Mapping[str, Scalar], changes: Mapping[str, Scalar]) -> str:
    return f"{release}: {config_text(values, changes)} from experiment {cell.experiment}"


def figure_lines(metrics: Mapping[str, float]) -> list[str]:
    """The cell's figures, one per line, 'not measured' where the run has none."""
    width = max(len(label) for _, label, _ in FIGURES)
    return [f"  {label:<{width}}  {fmt.format(metrics[name]) if name in metrics else 'not measured'}" for name, label, fmt in FIGURES]


def commit_message(release: str, cell: Cell, link: str, values: Mapping[str, Scalar], changes: Mapping[str, Scalar],
                   before: Spec) -> str:
    """Subject naming the experiment and config; body linking the run, listing its figures and the fields changed."""
    current = {f"spec.{k}.{f}": v for k in ("model", "generation") for f, v in getattr(before, k).model_dump(mode="json").items()}
    lines = [subject(release, cell, values, changes), "",
             f"Promotes cell {cell.cell} of experiment {cell.experiment} (MLflow run {cell.run_id}"
             + (f", measured at commit {cell.commit[:12]}" if cell.commit else "") + ").",
             f"Run: {link}", "", "Figures of the cell:", *figure_lines(cell.metrics), "", "Changes:"]
    lines += [f"  {name}: {json.dumps(current.get(name))} -> {json.dumps(value)}" for name, value in changes.items()]
    seed = values.get("generation.seed")
    if seed is not None and before.generation.seed is None:
        lines += ["", f"The cell ran with seed {seed}; the release keeps seed: null (a random seed per request)."]
    lines += ["", f"Diffops-Experiment-Run: {cell.run_id}"]
    return "\n".join(lines) + "\n"


def commit_release(repo: git.Repo, base: str, path: str, text: str, message: str) -> str:
    """A commit on top of `base` with `path` replaced by `text`; the sha. Built in a temporary index with
    `commit-tree`: nothing the user has checked out (HEAD, index, work tree) is touched, and no ref moves."""
    try:
        mode = f"{(repo.commit(base).tree / path).mode:o}"
    except KeyError:
        mode = "100644"
    try:
        with tempfile.TemporaryDirectory(prefix="diffops-promote-") as tmp:
            content, note = os.path.join(tmp, "content"), os.path.join(tmp, "message")
            with open(content, "w", encoding="utf-8") as handle:
                handle.write(text)
            with open(note, "w", encoding="utf-8") as handle:
                handle.write(message)
            with repo.git.custom_environment(GIT_INDEX_FILE=os.path.join(tmp, "index")):
                repo.git.read_tree(base)
                blob = repo.git.hash_object("-w", "--path", path, content)
                repo.git.update_index("--cacheinfo", f"{mode},{blob},{path}")
                tree = repo.git.write_tree()
                sha: str = repo.git.commit_tree(tree, "-p", base, "-F", note)
                return sha
    except git.GitCommandError as err:
        raise PromoteError(f"git could not write the commit: {str(err.stderr).strip()}; check `git config user.email` "
                           "and `user.name` in the repository") from None


def create_branch(repo: git.Repo, branch: str, sha: str) -> None:
    """Point a new branch at `sha`; a branch of that name that exists (even one made meanwhile) is a PromoteError."""
    try:
        repo.git.check_ref_format("--branch", branch)
    except git.GitCommandError:
        raise PromoteError(f"{branch!r} is not a valid branch name; pass another with --branch") from None
    try:
        repo.git.update_ref(f"refs/heads/{branch}", sha, _NO_REF)  # the zero old value: only if it does not exist
    except git.GitCommandError:
        raise PromoteError(f"branch {branch} exists; pass another with --branch, or delete it (git branch -D {branch})") from None


def branch_exists(repo: git.Repo, branch: str) -> bool:
    return f"refs/heads/{branch}" in {ref.path for ref in repo.references}

