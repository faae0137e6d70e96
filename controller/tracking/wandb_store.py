"""Weights & Biases as a tracking backend (`--tracker wandb`): the thin shell that logs a `RunRecord` as a W&B run.

Opened by `controller.tracking.tracker.open_tracker` for the controller's gate
runs and `diffops check --track`. Offline unless `WANDB_MODE` says otherwise:
the run is written under `<state-dir>/wandb` (a `.wandb` transaction log and its
files; upload it later with `wandb sync <run folder>`), and nothing is sent
anywhere. `WANDB_MODE=online` (with `WANDB_API_KEY`, `WANDB_ENTITY`,
`WANDB_BASE_URL` for a self-hosted server) logs to a server instead. W&B's
telemetry, error reporting, console capture, code and git scanning, system
metrics and requirements file are off. A record maps as: params -> the run's
config; every tag -> `config["tags"]` (whole, by its MLflow name), the identity
tags also as W&B tags (`kind=gate`, `release=demo`, ...); metrics -> one logged
step (0), so also the run's summary; PNG artifacts -> `wandb.Image`s logged
under their path, every other file saved with the run (`run.save`); the MLflow
experiment `diffops/<release>` -> the project `diffops-<release>`; a parent run
-> the run's group.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import threading
from pathlib import Path
from typing import Any

from controller.tracking.runs import RunRecord
from controller.tracking.tracker import LoggedRun, one_at_a_time, short_tags

__all__ = ["DEFAULT_ENV", "WandbTracker", "config_of", "project_name"]

log = logging.getLogger("diffops.controller")
DEFAULT_ENV = {  # each only where the environment does not set it
    "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true", "WANDB_DISABLE_GIT": "true",
    "WANDB_CONSOLE": "off", "WANDB_SAVE_CODE": "false",
}
_LOCK = threading.Lock()  # wandb keeps process-wide state: one run at a time
_PROJECT = re.compile(r"[^A-Za-z0-9_.\-]")


def project_name(experiment: str) -> str:
    """A W&B project for an MLflow-style experiment name: `diffops/demo` -> `diffops-demo` (W&B refuses `/`)."""
    return _PROJECT.sub("-", experiment)[:128]


def config_of(record: RunRecord) -> dict[str, Any]:
    """The run's config: every param by its name, and every tag whole under `tags` (W&B tags are short strings)."""
    return {**record.params, "tags": dict(record.tags)}


class WandbTracker:
    """Logs finished runs as W&B runs under `root` (offline by default); thread-safe (one run at a time)."""

    kind = "wandb"

    def __init__(self, root: Path):
        self.root = root
        self.mode = os.environ.get("WANDB_MODE", "offline")

    @property
    def where(self) -> str:
        return f"W&B ({self.mode}) under {self.root}"

    def _settings(self, wandb: Any) -> Any:
        return wandb.Settings(
            mode=self.mode, silent=True, console="off", save_code=False, disable_code=True, disable_git=True,
            disable_job_creation=True, x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True,
            x_disable_viewer=True, x_save_requirements=False, root_dir=str(self.root), reinit="create_new")

    def log(self, record: RunRecord, experiment: str, parent: str | None = None) -> LoggedRun:
        """Log one finished run; its id, project and where it is. A failure raises TrackingError naming the folder."""
        return one_at_a_time(_LOCK, self.where, "check WANDB_MODE (and WANDB_API_KEY online)", record,
                             lambda: self._log(record, experiment, parent))

    def _log(self, record: RunRecord, experiment: str, parent: str | None) -> LoggedRun:
        for key, value in {**DEFAULT_ENV, "WANDB_CONFIG_DIR": str(self.root / "config"), "WANDB_CACHE_DIR": str(self.root / "cache"),
                           "WANDB_DATA_DIR": str(self.root / "data"), "WANDB_ARTIFACT_DIR": str(self.root / "artifacts")}.items():
            os.environ.setdefault(key, value)
        self.root.mkdir(parents=True, exist_ok=True)
        wandb: Any = importlib.import_module("wandb")  # about 2 s, on first use only
        project = project_name(experiment)
        run = wandb.init(project=project, entity=os.environ.get("WANDB_ENTITY"), name=record.name, dir=str(self.root),
                         config=config_of(record), tags=short_tags(record.tags), group=parent,
                         job_type=record.tags.get("diffops.kind"), settings=self._settings(wandb))
        try:
            files = Path(run.dir)
            images: dict[str, Any] = {}
            for path, data in record.artifacts.items():
                target = files / path
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                if path.endswith(".png"):
                    images[path] = wandb.Image(str(target))
                else:
                    run.save(str(target), base_path=str(files), policy="now")
            run.log({**record.metrics, **images}, step=0)
            link = run.url if self.mode == "online" and run.url else \
                f"offline run {run.id} in {files.parent} (upload it with: wandb sync {files.parent})"
            run_id = str(run.id)
        except BaseException:
            run.finish(exit_code=1)
            wandb.teardown()
            raise
        run.finish(exit_code=0)
        wandb.teardown()  # finish() can return before the transaction log is on disk; this waits for it (~1 s)
        return LoggedRun(run_id, project, link)

