"""MLflow as diffops' tracking backend: the thin shell that logs `RunRecord`s and reads runs back.

Opened by the controller (gate runs, off the reconcile loop, in the preparation
threads) and by the CLI (`experiment`, `model`, `check --track`). The tracking
URI is `--tracking-uri` / `DIFFOPS_TRACKING_URI`; unset, it is the embedded
default `sqlite:///<state-dir>/mlflow.db` with artifacts under
`<state-dir>/mlflow-artifacts`, and any MLflow tracking server (`http://...`)
works the same. MLflow is imported on first use (about 2 s), never by replicas,
with its telemetry off. One experiment per release (`diffops/<release>`) holds
its gate runs; experiments name their own. The default `RunTracker`
(`controller.tracking.tracker`), and the only one that reads runs back.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.tracking.runs import RunRecord
from controller.tracking.tracker import LoggedRun, TrackingError

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["DB_NAME", "DEFAULT_ENV", "LoggedRun", "Tracker", "TrackingError", "default_uri", "run_link"]

log = logging.getLogger("diffops.controller")
DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlflow-artifacts"
DEFAULT_ENV = {  # each only where the environment does not set it
    "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",  # no telemetry
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # stdout is the CLI's (-o json); diffops prints the link itself
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",  # a server that is down: ~5 s, not minutes
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
_BATCH = 100  # MLflow's per-call limit on params and tags (metrics: 1000)


def default_uri(state_dir: Path) -> str:
    """The embedded store: SQLite in the state dir."""
    return f"sqlite:///{(state_dir / DB_NAME).resolve()}"


def run_link(uri: str, experiment_id: str, run_id: str) -> str:
    """Where a person opens the run: the server's UI page, or for a local store the `mlflow ui` to run and the page."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} (experiment {experiment_id}; see it with: mlflow ui --backend-store-uri {uri})"


class Tracker:
    """An MLflow tracking and registry store (a `RunTracker`). Thread-safe: the client is created once, under a lock."""

    kind = "mlflow"

    def __init__(self, uri: str, artifact_root: Path | None = None):
        self.uri = uri
        self.artifact_root = artifact_root  # for a local store: where experiments keep artifacts (a server has its own)
        self._client: MlflowClient | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_state_dir(cls, state_dir: Path, uri: str | None = None) -> Tracker:
        """`uri`, or the embedded SQLite store of `state_dir` with its artifacts beside it."""
        if uri:
            return cls(uri, state_dir / ARTIFACTS_DIR if not uri.startswith(("http://", "https://")) else None)
        return cls(default_uri(state_dir), state_dir / ARTIFACTS_DIR)

    @property
    def where(self) -> str:
        return self.uri

    @property
    def client(self) -> MlflowClient:
        with self._lock:
            if self._client is None:
                for key, value in DEFAULT_ENV.items():
                    os.environ.setdefault(key, value)
                started = time.monotonic()
                try:
                    from mlflow import MlflowClient

                    logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store migrations log at INFO on first use
                    logging.getLogger("alembic").setLevel(logging.WARNING)

                    client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
                    client.search_experiments(max_results=1)  # creates (migrates) a local store, or reaches a server
                except Exception as err:
                    raise TrackingError(f"tracking store {self.uri}: {type(err).__name__}: {_first_line(err)}; check "
                                        "--tracking-uri (DIFFOPS_TRACKING_URI) and that the server is up") from err
                log.debug("tracking: opened %s in %.1fs", self.uri, time.monotonic() - started)
                self._client = client
            return self._client

    def experiment(self, name: str) -> str:
        """The id of experiment `name`, created (with its artifacts under the state dir for a local store) if new."""
        client = self.client
        found = client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        location = (self.artifact_root / name.replace("/", "_")).resolve().as_uri() if self.artifact_root is not None else None
        try:
            return str(client.create_experiment(name, artifact_location=location))
        except Exception:  # created meanwhile by another writer
            again = client.get_experiment_by_name(name)
            if again is None:
                raise
            return str(again.experiment_id)

    def log(self, record: RunRecord, experiment: str, parent: str | None = None) -> LoggedRun:
        """Log one finished run (a child of run `parent` when given); its id and link. A failure raises TrackingError
        naming the store."""
        try:
            return self._log(record, experiment, parent)
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(f"tracking store {self.uri}: logging {record.name!r} failed: {type(err).__name__}: "
                                f"{_first_line(err)}") from err

    def _log(self, record: RunRecord, experiment: str, parent: str | None) -> LoggedRun:
        from mlflow.entities import Metric, Param, RunTag

        client = self.client
        experiment_id = self.experiment(experiment)
        first = dict(list(record.tags.items())[:_BATCH - 1])
        run = client.create_run(experiment_id, run_name=record.name, tags={**first, **({"mlflow.parentRunId": parent} if parent else {})})
        run_id = run.info.run_id
        now = int(time.time() * 1000)
        tags = [RunTag(k, v) for k, v in list(record.tags.items())[_BATCH - 1:]]
        params = [Param(k, v) for k, v in record.params.items()]
        metrics = [Metric(k, v, now, 0) for k, v in record.metrics.items()]
        for start in range(0, max(len(params), len(tags), len(metrics)), _BATCH):
            client.log_batch(run_id, metrics=metrics[start:start + _BATCH], params=params[start:start + _BATCH],
                             tags=tags[start:start + _BATCH])
        if record.artifacts:
            with tempfile.TemporaryDirectory(prefix="diffops-run-") as folder:
                for path, data in record.artifacts.items():
                    target = Path(folder, path)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                client.log_artifacts(run_id, folder)
        client.set_terminated(run_id, "FINISHED")
        return LoggedRun(run_id, experiment_id, run_link(self.uri, experiment_id, run_id))

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        """Add one point per metric to a run's history (`step`: where it sits on the chart); TrackingError on failure."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        try:
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])
        except TrackingError:
            raise
        except Exception as err:
            raise TrackingError(f"tracking store {self.uri}: logging metrics on run {run_id} failed: {type(err).__name__}: "
                                f"{_first_line(err)}") from err

    def runs(self, experiment: str, where: str = "", max_results: int = 1000) -> list[Any]:
        """The runs of an experiment matching an MLflow filter string, newest first ([] for an unknown experiment)."""
        client = self.client
        found = client.get_experiment_by_name(experiment)
        if found is None:
            return []
        return list(client.search_runs([found.experiment_id], where, max_results=max_results, order_by=["attributes.start_time DESC"]))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:500] if text else type(err).__name__
