"""Where diffops logs a finished run: what every tracking backend offers, and the one place that opens them.

A `RunRecord` (`controller.tracking.runs`: tags, params, metrics, artifacts) is
logged by a `RunTracker`, picked by `--tracker` (`DIFFOPS_TRACKER`) on the
commands that log runs (`controller run`, `check --track`, `experiment run`):
MLflow (`mlflow_store.Tracker`, the default, at `--tracking-uri`), Weights &
Biases (`wandb_store`) or Neptune (`neptune_store`), each configured by its own
environment variables, both offline unless that environment says otherwise.
The models:/ registry, live quality and `experiment reproduce` stay on MLflow:
they read runs back, which only MLflow's client does here. Each library is imported on
first use, never by replicas.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, get_args

from controller.tracking.runs import RunRecord

__all__ = ["NAMES", "TRACKERS", "LoggedRun", "RunTracker", "TrackerKind", "TrackingError", "first_line", "one_at_a_time", "open_tracker",
           "short_tags"]

log = logging.getLogger("diffops.controller")

TrackerKind = Literal["mlflow", "wandb", "neptune"]
TRACKERS: tuple[str, ...] = get_args(TrackerKind)
NAMES = {"mlflow": "MLflow", "wandb": "W&B", "neptune": "Neptune"}
SHORT_TAGS = ("diffops.kind", "diffops.release", "diffops.version", "diffops.ok", "diffops.where")
MAX_SHORT_TAG = 64  # W&B's limit on a tag; Neptune's tags are shown as the same chips


class TrackingError(Exception):
    """The tracking store refused or could not be reached; the message names the store and what to do."""


@dataclass(frozen=True)
class LoggedRun:
    """A logged run: its id in the backend, the experiment (MLflow) or project (W&B, Neptune) holding it, and where a
    person opens it (a server's page, or the local files and the command that shows or uploads them)."""

    run_id: str
    experiment_id: str
    link: str


class RunTracker(Protocol):
    """What diffops needs of a tracking backend: log one finished run and say where it went."""

    @property
    def kind(self) -> str:
        """`mlflow`, `wandb` or `neptune`."""
        ...

    @property
    def where(self) -> str:
        """The store, for log lines: a URI, or the local folder and mode."""
        ...

    def log(self, record: RunRecord, experiment: str, parent: str | None = None) -> LoggedRun:
        """Log `record` into `experiment` (an MLflow experiment; a W&B or Neptune project or group), as a child of run
        `parent` when given. A failure raises TrackingError naming the store."""
        ...


def short_tags(tags: dict[str, str]) -> list[str]:
    """The identity tags as `name=value` chips (`kind=gate`, `release=demo`, `ok=true`) for backends whose tags are
    plain strings; one longer than a tag may be is left out (every tag is also kept whole as a field)."""
    chips = [f"{key.removeprefix('diffops.')}={tags[key]}" for key in SHORT_TAGS if key in tags]
    return [chip for chip in chips if len(chip) <= MAX_SHORT_TAG]


def open_tracker(kind: str, state_dir: Path, uri: str | None = None) -> RunTracker:
    """The backend named `kind`: MLflow at `uri` (default the state dir's SQLite store), or W&B / Neptune writing under
    the state dir (`<state-dir>/wandb`, `<state-dir>/.neptune`); `uri` is MLflow's alone."""
    if kind == "mlflow":
        from controller.tracking.mlflow_store import Tracker

        return Tracker.for_state_dir(state_dir, uri)
    if kind == "wandb":
        from controller.tracking.wandb_store import WandbTracker

        return WandbTracker(state_dir / "wandb")
    if kind == "neptune":
        from controller.tracking.neptune_store import NeptuneTracker

        return NeptuneTracker(state_dir / ".neptune")
    raise ValueError(f"unknown tracker {kind!r}; use one of {', '.join(TRACKERS)}")


def first_line(err: BaseException) -> str:
    """An error's first line, for a message that names the store."""
    text = str(err).strip()
    return text.splitlines()[0][:500] if text else type(err).__name__


def one_at_a_time(lock: threading.Lock, where: str, hint: str, record: RunRecord, write: Callable[[], LoggedRun]) -> LoggedRun:
    """A backend's `write` of one run under its lock, timed; any failure a TrackingError naming `where` and what to check."""
    started = time.monotonic()
    try:
        with lock:
            logged = write()
    except Exception as err:
        raise TrackingError(f"{where}: logging {record.name!r} failed: {type(err).__name__}: {first_line(err)}; {hint}") from err
    log.debug("tracking: %s run %s written in %.1fs", where, logged.run_id, time.monotonic() - started)
    return logged
