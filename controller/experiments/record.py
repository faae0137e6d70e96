"""What an experiment logs to MLflow: one run per cell under one parent run per `experiment run`. Pure.

Fifth step of `diffops experiment run`: `controller.experiments.run` hands these `RunRecord`s to
`controller.tracking.mlflow_store.Tracker`. Cell runs carry the release's tag contract (`diffops.kind=experiment`,
`diffops.release`, `diffops.commit`, `diffops.version`: the version id the release would get with this cell's
config) plus `diffops.experiment` and `diffops.cell`, the hardware tags the gate logs, params by release field path
(`controller.tracking.runs.spec_params` of the cell's spec; `prompts` is the experiment's prompts), the cell's
metrics, and artifacts `images/<prompt index>.png` and `prompts.json`. `reproduce` needs nothing but these.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

from controller.experiments.grid import Cell
from controller.tracking.runs import MAX_PARAM_CHARS, RunRecord, spec_params

__all__ = ["PROMPTS_ARTIFACT", "cell_record", "experiment_name", "parent_record", "prompts_param"]

PROMPTS_ARTIFACT = "prompts.json"


def experiment_name(name: str) -> str:
    """The MLflow experiment holding an experiment's runs."""
    return f"diffops-experiment/{name}"


def prompts_param(prompts: Sequence[str]) -> str:
    """The prompts as a JSON list; past MLflow's param limit it is cut and marked (the whole list is prompts.json)."""
    text = json.dumps(list(prompts))
    note = f"... ({len(text)} chars; whole in {PROMPTS_ARTIFACT})"
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - len(note)] + note


def _common_tags(name: str, release: str, commit: str, controller_version: str | None) -> dict[str, str]:
    tags = {"diffops.kind": "experiment", "diffops.experiment": name, "diffops.release": release, "diffops.commit": commit,
            "mlflow.source.git.commit": commit}
    if controller_version:
        tags["diffops.controller_version"] = controller_version
    return tags


def cell_record(name: str, cell: Cell, prompts: Sequence[str], metrics: Mapping[str, float], images: Sequence[bytes], *,
                commit: str, environment: Mapping[str, str], baseline: Cell, several_models: bool,
                controller_version: str | None = None) -> RunRecord:
    tags = {**_common_tags(name, cell.release.name, commit, controller_version), **environment,
            "diffops.cell": cell.id, "diffops.version": cell.version, "diffops.config": cell.label(several_models),
            "diffops.baseline_cell": baseline.id, "diffops.is_baseline": str(cell.config == baseline.config).lower()}
    params = {**spec_params(cell.release.spec), "prompts": prompts_param(prompts)}
    artifacts = {f"images/{i}.png": data for i, data in enumerate(images)}
    artifacts[PROMPTS_ARTIFACT] = json.dumps(list(prompts), indent=1).encode()
    return RunRecord(f"{name} {cell.id}", tags, params, dict(metrics), artifacts)


def parent_record(name: str, release: str, commit: str, *, cells: int, prompts: Sequence[str], experiment_file: bytes,
                  environment: Mapping[str, str], controller_version: str | None = None) -> RunRecord:
    """The parent run's tags and params (its contact sheet and table are logged once the cells are done)."""
    tags = {**_common_tags(name, release, commit, controller_version), **environment, "diffops.cells": str(cells)}
    params = {"experiment.cells": str(cells), "prompts": prompts_param(prompts)}
    return RunRecord(f"{name} ({cells} cells)", tags, params, {}, {"experiment.yaml": experiment_file,
                                                                   PROMPTS_ARTIFACT: json.dumps(list(prompts), indent=1).encode()})
