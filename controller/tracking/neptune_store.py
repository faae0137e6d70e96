"""Neptune as a tracking backend (`--tracker neptune`): the thin shell that logs a `RunRecord` as a Neptune run.

Opened by `controller.tracking.tracker.open_tracker` for the controller's gate
runs and `diffops check --track`. Offline unless `NEPTUNE_MODE` says otherwise:
the run is written under `NEPTUNE_DATA_DIRECTORY`, else `<state-dir>/.neptune`
(`offline/run__<id>__...`: an operation log and the uploaded files; upload it
later with `neptune sync --path <state-dir> --project WS/PROJECT`),
and nothing is sent anywhere. `NEPTUNE_MODE=async` (with `NEPTUNE_API_TOKEN`,
`NEPTUNE_PROJECT`) logs to Neptune instead. Console, hardware, traceback, git
and source capture are off. A record maps as: params -> `parameters/<name>`;
every tag -> `diffops/tags/<name>` (whole, by its MLflow name), the identity
tags also as `sys/tags` (`kind=gate`, `release=demo`, ...); metrics -> floats
`metrics/<name>`; artifacts -> files `artifacts/<path>`; the MLflow experiment
-> `diffops/experiment`; a parent run -> `diffops/parent`.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from pathlib import Path, PurePosixPath
from typing import Any

from controller.tracking.runs import RunRecord
from controller.tracking.tracker import LoggedRun, one_at_a_time, short_tags

__all__ = ["NeptuneTracker", "fields_of"]

log = logging.getLogger("diffops.controller")
_LOCK = threading.Lock()  # the data directory is read from the environment when a run starts: one run at a time


def fields_of(record: RunRecord, experiment: str, parent: str | None) -> dict[str, str | float]:
    """The run's fields by Neptune path: params, every tag whole, metrics, the experiment and the parent."""
    fields: dict[str, str | float] = {f"parameters/{k}": v for k, v in record.params.items()}
    fields.update({f"diffops/tags/{k}": v for k, v in record.tags.items()})
    fields.update({f"metrics/{k}": v for k, v in record.metrics.items()})
    fields["diffops/experiment"] = experiment
    if parent:
        fields["diffops/parent"] = parent
    return fields


class NeptuneTracker:
    """Logs finished runs as Neptune runs, offline under `root` by default; thread-safe (one run at a time)."""

    kind = "neptune"

    def __init__(self, root: Path):
        self.root = Path(os.environ["NEPTUNE_DATA_DIRECTORY"]) if os.environ.get("NEPTUNE_DATA_DIRECTORY") else root
        self.mode = os.environ.get("NEPTUNE_MODE", "offline")

    @property
    def where(self) -> str:
        return f"Neptune ({self.mode}) under {self.root}"

    def log(self, record: RunRecord, experiment: str, parent: str | None = None) -> LoggedRun:
        """Log one finished run; its id, project and where it is. A failure raises TrackingError naming the folder."""
        return one_at_a_time(_LOCK, self.where, "check NEPTUNE_MODE (and NEPTUNE_API_TOKEN, NEPTUNE_PROJECT online)", record,
                             lambda: self._log(record, experiment, parent))

    def _log(self, record: RunRecord, experiment: str, parent: str | None) -> LoggedRun:
        self.root.mkdir(parents=True, exist_ok=True)
        neptune: Any = importlib.import_module("neptune")  # several seconds, on first use only
        file_type: Any = importlib.import_module("neptune.types").File
        logging.getLogger("neptune").setLevel(logging.WARNING)  # its "initialized" lines go nowhere near -o json
        before = os.environ.get("NEPTUNE_DATA_DIRECTORY")
        os.environ["NEPTUNE_DATA_DIRECTORY"] = str(self.root)
        try:
            run = neptune.init_run(
                project=os.environ.get("NEPTUNE_PROJECT"), mode=self.mode, name=record.name, tags=short_tags(record.tags),
                capture_stdout=False, capture_stderr=False, capture_hardware_metrics=False, capture_traceback=False,
                fail_on_exception=False, git_ref=False, source_files=[])
        finally:
            if before is None:
                os.environ.pop("NEPTUNE_DATA_DIRECTORY", None)
            else:
                os.environ["NEPTUNE_DATA_DIRECTORY"] = before
        try:
            for path, value in fields_of(record, experiment, parent).items():
                run[path] = value
            for name, data in record.artifacts.items():
                run[f"artifacts/{name}"].upload(file_type.from_content(data, extension=PurePosixPath(name).suffix.lstrip(".") or "bin"))
            url = str(run.get_url())
        finally:
            run.stop()
        run_id = url.removeprefix("offline/")
        link = url if self.mode != "offline" else \
            f"offline run {run_id} in {self.root / 'offline'} (upload it with: neptune sync --path {self.root.parent} --project WS/PROJECT)"
        return LoggedRun(run_id, os.environ.get("NEPTUNE_PROJECT", ""), link)
