"""`diffops experiment run`, the shell: read the release, fetch, draw every cell, measure, log to the tracker.

Sits between the CLI (`controller.cli.experiment`) and the pure steps (`grid`, `measure`, `record`, `sheet`,
`table`). Models and the CLIP model are fetched and verified into the state dir's model cache
(`serving.artifacts.fetch`, the gate's path); each model is loaded once: in this process, or with `ray` in one Ray
job per model (`controller.experiments.on_ray`, all models at once), whose cells are then measured and logged here.
The baseline config's model and cells come first, so every cell is measured and logged (a child of the parent run)
as soon as it is drawn: a run cut short still leaves its finished cells in MLflow, and the parent run is marked
FAILED. On W&B and Neptune (`--tracker`) the cells share a group (`diffops/parent`) and the parent is logged last.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from checks import dependency
from checks.report import CheckResult, GateReport
from controller.experiments import draw as drawing
from controller.experiments.grid import Cell, expand
from controller.experiments.loader import ExperimentFile, InvalidExperiment
from controller.experiments.measure import cell_metrics
from controller.experiments.on_ray import ModelJob, RayDrawer
from controller.experiments.record import cell_record, experiment_name, parent_record
from controller.experiments.schema import ModelPin
from controller.experiments.sheet import contact_sheet
from controller.experiments.table import sort_rows
from controller.parse.release import Release
from controller.source.git_source import ReleaseSource
from controller.tracking.mlflow_store import Tracker, TrackingError
from controller.tracking.runs import RunRecord, environment_tags
from controller.tracking.tracker import RunTracker
from serving.artifacts import ArtifactError, ModelCache, fetch

__all__ = ["ExperimentRun", "ExperimentRunError", "environment", "release_of", "run_experiment"]

log = logging.getLogger("diffops.controller")


class ExperimentRunError(Exception):
    """The experiment could not run (a model that does not verify, a CLIP model that does not load); says what to do."""


@dataclass
class ExperimentRun:
    """What one `experiment run` produced: the parent run, the rows of the table (sorted), the sheet and table JSON."""

    parent_run_id: str
    link: str
    rows: list[dict[str, Any]]
    sheet: bytes
    commit: str
    cells: list[Cell] = field(default_factory=list)

    def table_json(self) -> bytes:
        return json.dumps({"parent_run_id": self.parent_run_id, "commit": self.commit, "rows": self.rows}, indent=1).encode()


def release_of(found: ExperimentFile, source: ReleaseSource, rev: str | None) -> tuple[Release, str]:
    """The experiment's release at `rev`, or InvalidExperiment at spec.release saying what is there."""
    snapshot = source.snapshot(rev)
    name = found.experiment.spec.release
    release = snapshot.releases.get(name)
    if release is not None:
        return release, snapshot.revision
    problems = [str(e) for e in snapshot.errors if Path(e.file).stem == name]
    message = (f"release {name!r} does not validate at {snapshot.revision[:12]}: " + "; ".join(problems) if problems else
               f"no release {name!r} at {snapshot.revision[:12]} (releases: {', '.join(sorted(snapshot.releases)) or 'none'})")
    raise InvalidExperiment([found.error("spec.release", message)])


def environment(release: Release, device: str) -> dict[str, str]:
    """The hardware and package tags a gate run carries (`environment_tags`), gathered the way the gate does."""
    runtime = release.spec.runtime
    checks = (dependency.run(runtime.requires, runtime.image, runtime.image_policy), dependency.run_cuda(runtime.requires),
              CheckResult("load", "passed", "", {"device": device}))
    return environment_tags(GateReport(release.name, "", checks, 0.0))


def _fetch(pin: ModelPin, what: str, cache: ModelCache, source: ReleaseSource, commit: str) -> Path:
    try:
        return fetch(pin.uri, pin.digest, cache, repo=source.path, commit=commit).path
    except ArtifactError as err:
        raise ExperimentRunError(f"{what} {pin.uri}: {err}; fix the pin in the experiment file (diffops model digest PATH)") from err


def _order(cells: list[Cell], baseline: int) -> list[Cell]:
    """The baseline config's model first, and its cells first within it; otherwise grid order."""
    model = next(c.config.model_index for c in cells if c.config.index == baseline)
    return sorted(cells, key=lambda c: (c.config.model_index != model, c.config.model_index, c.config.index != baseline, c.index))


def run_experiment(found: ExperimentFile, raw: bytes, source: ReleaseSource, rev: str | None, state_dir: Path, tracker: RunTracker, *,
                   sort: str, say: Callable[[str], None] = lambda line: None,
                   on_drawn: Callable[[Cell], None] = lambda cell: None, controller_version: str | None = None,
                   ray: RayDrawer | None = None) -> ExperimentRun:
    """Run every cell and log it; with `ray`, the cells are drawn as Ray jobs (one per model, in parallel) first."""
    started = time.monotonic()
    spec, name = found.experiment.spec, found.experiment.name
    release, commit = release_of(found, source, rev)
    cells = expand(found, release)
    prompts = list(found.prompts)
    several = len({c.config.model_index for c in cells}) > 1
    cache = ModelCache(state_dir / "models")
    clip_pin = spec.clip or (ModelPin(uri=release.spec.quality.clip.uri, digest=release.spec.quality.clip.digest)
                             if release.spec.quality.clip is not None else None)
    scorer = None
    if clip_pin is not None:
        from serving.quality_models import QualityModelError, load_clip

        try:
            scorer = load_clip(_fetch(clip_pin, "CLIP model", cache, source, commit))
        except QualityModelError as err:
            raise ExperimentRunError(f"CLIP model {clip_pin.uri}: {err}") from err
    from serving.pipeline import pick_device

    env = environment(release, pick_device())
    mlflow_experiment = experiment_name(name)
    parent = parent_record(name, release.name, commit, cells=len(cells), prompts=prompts, experiment_file=raw, environment=env,
                           controller_version=controller_version)
    parent_id = _start_parent(tracker, parent, mlflow_experiment) if isinstance(tracker, Tracker) else _group_id(name)
    say(f"experiment {name}: {len(cells)} cells x {len(prompts)} prompts of release {release.name} at {commit[:12]}; parent run "
        f"{parent_id}; next: drawing")
    try:
        if ray is not None:
            groups = [tuple(c for c in cells if c.config.model_index == m) for m in sorted({c.config.model_index for c in cells})]
            say(f"experiment {name}: {len(groups)} Ray job(s), one per model; next: wait for their cells")

            def done(finished: tuple[Cell, ...]) -> None:
                for cell in finished:
                    on_drawn(cell)

            predrawn = ray.draw([ModelJob(group, tuple(prompts), str(source.path), commit) for group in groups], on_done=done)
            draw_cell: Callable[[Cell], drawing.Drawn] = lambda cell: predrawn[cell.index]  # noqa: E731
        else:
            draw_cell = _local_drawer(prompts, source, commit, cache, several, name, say, on_drawn)
        rows, drawn_images = _cells(cells, prompts, spec.baseline, tracker, scorer, parent_id, draw_cell, commit=commit,
                                    name=name, env=env, several=several, controller_version=controller_version)
        ordered = sorted(cells, key=lambda c: c.index)
        sheet = contact_sheet(ordered, prompts, [drawn_images[c.index] for c in ordered], several_models=several,
                              baseline_config=spec.baseline)
        result = ExperimentRun(parent_id, "", sort_rows(rows, sort), sheet, commit, ordered)
        outputs = {"contact-sheet.png": sheet, "table.json": result.table_json()}
        result.link = _finish(tracker, parent_id, parent, mlflow_experiment, outputs, "FINISHED")
    except BaseException:
        _finish(tracker, parent_id, parent, mlflow_experiment, {}, "FAILED")
        raise
    say(f"experiment {name}: {len(cells)} cells logged under {result.link}; next: compare them ({time.monotonic() - started:.1f}s)")
    return result


def _local_drawer(prompts: list[str], source: ReleaseSource, commit: str, cache: ModelCache, several: bool, name: str,
                  say: Callable[[str], None], on_drawn: Callable[[Cell], None]) -> Callable[[Cell], drawing.Drawn]:
    """Draw cells in this process, loading each model once (cells come model by model)."""
    loaded: dict[int, drawing.Loaded] = {}

    def draw_cell(cell: Cell) -> drawing.Drawn:
        index = cell.config.model_index
        if index not in loaded:
            loaded.clear()  # the previous model is released before the next loads
            path = _fetch(cell.config.model, f"spec.models.{index}" if several else "model", cache, source, commit)
            loaded[index] = drawing.load(path, cell.release.spec.model.dtype, cell.release.spec.generation.sampler)
            say(f"experiment {name}: loaded {cell.config.model.uri} on {loaded[index].runner.device}; next: its cells "
                f"({loaded[index].load_seconds:.1f}s)")
        drawn = drawing.draw(loaded[index], cell.release.spec.generation.model_dump(mode="json"), prompts)
        on_drawn(cell)
        return drawn

    return draw_cell


def _cells(cells: list[Cell], prompts: list[str], baseline: int, tracker: RunTracker, scorer: Any, parent_id: str,
           draw_cell: Callable[[Cell], drawing.Drawn], *, commit: str, name: str, env: dict[str, str], several: bool,
           controller_version: str | None) -> tuple[list[dict[str, Any]], dict[int, tuple[bytes, ...]]]:
    """Measure and log every cell as it is drawn (baseline config first); the table rows and each cell's images."""
    from checks.golden import decode_png

    rows: list[dict[str, Any]] = []
    images: dict[int, tuple[bytes, ...]] = {}
    baseline_drawn: dict[int, drawing.Drawn] = {}  # seed -> the baseline config's drawing
    baseline_cells = {c.seed: c for c in cells if c.config.index == baseline}
    for cell in _order(cells, baseline):
        drawn = draw_cell(cell)
        if cell.config.index == baseline:
            baseline_drawn[cell.seed] = drawn
        scores = scorer.score([decode_png(i) for i in drawn.images], prompts) if scorer is not None else None
        metrics = cell_metrics(cell.release.spec, drawn, baseline_drawn[cell.seed], scores)
        record: RunRecord = cell_record(name, cell, prompts, metrics, drawn.images, commit=commit, environment={**env, **drawn.environment},
                                        baseline=baseline_cells[cell.seed], several_models=several, controller_version=controller_version)
        logged = tracker.log(record, experiment_name(name), parent=parent_id)
        images[cell.index] = drawn.images
        rows.append({"index": cell.index, "cell": cell.id, "config": cell.label(several), "version": cell.version,
                     "baseline": cell.config.index == baseline, "run_id": logged.run_id, "metrics": metrics})
    return rows, images


def _group_id(name: str) -> str:
    """The parent of an experiment's cells on W&B (their group) and Neptune (their `diffops/parent`): one per run."""
    return f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _finish(tracker: RunTracker, parent_id: str, parent: RunRecord, experiment: str, artifacts: dict[str, bytes], status: str) -> str:
    """Close the experiment's parent run with its sheet and table; where a person opens it. On MLflow the parent was
    started before the cells and is finished now; on W&B and Neptune it is logged now, in the cells' group."""
    if isinstance(tracker, Tracker):
        _finish_parent(tracker, parent_id, artifacts, status)
        from controller.tracking.mlflow_store import run_link

        return run_link(tracker.uri, tracker.client.get_run(parent_id).info.experiment_id, parent_id)
    record = replace(parent, tags={**parent.tags, "diffops.status": status, "diffops.group": parent_id},
                     artifacts={**parent.artifacts, **artifacts})
    try:
        return tracker.log(record, experiment, parent=parent_id).link
    except TrackingError as err:
        if status == "FINISHED":
            raise
        log.warning("experiment %s: its failed parent run was not logged (%s); next: nothing, the cells logged stay", parent_id, err)
        return ""


def _start_parent(tracker: Tracker, record: RunRecord, experiment: str) -> str:
    try:
        client = tracker.client
        run = client.create_run(tracker.experiment(experiment), run_name=record.name, tags=record.tags)
        for key, value in record.params.items():
            client.log_param(run.info.run_id, key, value)
        _artifacts(tracker, run.info.run_id, record.artifacts)
        return str(run.info.run_id)
    except TrackingError:
        raise
    except Exception as err:
        raise TrackingError(f"tracking store {tracker.uri}: starting the experiment's run failed: {type(err).__name__}: {err}") from err


def _artifacts(tracker: Tracker, run_id: str, artifacts: dict[str, bytes]) -> None:
    import tempfile

    if not artifacts:
        return
    with tempfile.TemporaryDirectory(prefix="diffops-experiment-") as folder:
        for path, data in artifacts.items():
            Path(folder, path).write_bytes(data)
        tracker.client.log_artifacts(run_id, folder)


def _finish_parent(tracker: Tracker, run_id: str, artifacts: dict[str, bytes], status: str) -> None:
    try:
        _artifacts(tracker, run_id, artifacts)
        tracker.client.set_terminated(run_id, status)
    except Exception as err:
        if status == "FINISHED":
            raise TrackingError(f"tracking store {tracker.uri}: finishing run {run_id} failed: {type(err).__name__}: {err}") from err
        log.warning("experiment run %s: could not be marked %s (%s); next: nothing, it stays RUNNING in MLflow", run_id, status, err)
