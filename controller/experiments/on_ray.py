"""Draw an experiment's cells on a Ray cluster: one job per model, all models at once, through the dashboard's job API.

Used by `diffops experiment run --ray-address` in place of drawing in-process. Each model's cells go to one Ray job
(`controller.experiments.job`) that loads the model once, with the release's replica CPUs and GPUs as the job's
resources, so the models of an experiment draw in parallel on whatever the cluster has; the cells of one model
draw one after another on its job. The job's input travels as its working directory (uploaded to the cluster's
package store, as the gate's does); its results come back as report lines in the job's logs
(`controller.experiments.job.MAX_REPORT_BYTES` caps them). A job that does not start within the gate's start
deadline is stopped and the experiment fails with Ray's reason.
"""

from __future__ import annotations

import base64
import io
import json
import shlex
import sys
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from controller.apply.dashboard import DashboardClient, DashboardError
from controller.experiments.draw import Drawn
from controller.experiments.grid import Cell
from controller.experiments.job import CELL_PREFIX, ERROR_PREFIX, INPUT_NAME
from controller.gate.runner import FINAL, JOBS_PATH, PACKAGES_PATH, package_uri
from controller.gate.start import DEFAULT_START_BASE_S, Fail, start_verdict

__all__ = ["ModelJob", "RayDrawer", "RayDrawError", "parse_logs"]


class RayDrawError(Exception):
    """A job could not draw its cells; the message names the job, Ray's reason or the job's error."""


@dataclass(frozen=True)
class ModelJob:
    """One model's cells, and what the job needs to fetch the model."""

    cells: tuple[Cell, ...]
    prompts: tuple[str, ...]
    repo: str | None
    commit: str

    def document(self) -> dict[str, Any]:
        model = self.cells[0].release.spec.model.model_dump(mode="json")
        cells = [{"index": c.index, "generation": c.release.spec.generation.model_dump(mode="json")} for c in self.cells]
        runtime = self.cells[0].release.spec.runtime.model_dump(mode="json", include={"requires", "image", "image_policy"})
        return {"model": model, "repo": self.repo, "commit": self.commit, "cache_dir": None, "cells": cells, "prompts": list(self.prompts),
                "runtime": runtime}


def parse_logs(logs: str, job_id: str) -> dict[int, Drawn]:
    """Each cell's drawing from a job's report lines; RayDrawError with the job's own error line if it has one."""
    drawn: dict[int, Drawn] = {}
    for line in logs.splitlines():
        if line.startswith(ERROR_PREFIX):
            raise RayDrawError(f"experiment job {job_id}: {json.loads(line[len(ERROR_PREFIX):])['message']}")
        if line.startswith(CELL_PREFIX):
            cell = json.loads(line[len(CELL_PREFIX):])
            drawn[int(cell["index"])] = Drawn(tuple(base64.b64decode(i) for i in cell["images"]), tuple(cell["latencies"]),
                                              float(cell["wall_s"]), str(cell["device"]),
                                              {str(k): str(v) for k, v in (cell.get("environment") or {}).items()})
    return drawn


def _package(document: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        info = zipfile.ZipInfo(INPUT_NAME, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o644 << 16
        archive.writestr(info, json.dumps(document, sort_keys=True))
    return buffer.getvalue()


class RayDrawer:
    """Submits one job per model and waits for all of them (`draw` returns every cell's drawing by cell index)."""

    def __init__(self, dashboard_url: str, token: str | None, python: str | None = None, poll_s: float = 0.5,
                 limit_s: float = 3600.0, start_base_s: float = DEFAULT_START_BASE_S):
        self.dashboard = DashboardClient(dashboard_url, token, timeout_s=60)
        self.python, self.poll_s, self.limit_s, self.start_base_s = python or sys.executable, poll_s, limit_s, start_base_s

    def draw(self, jobs: list[ModelJob], on_done: Any = lambda cells: None) -> dict[int, Drawn]:
        results: dict[int, Drawn] = {}
        with ThreadPoolExecutor(max(1, len(jobs)), thread_name_prefix="experiment-job") as pool:
            for drawn in pool.map(lambda job: self._one(job, on_done), jobs):
                results.update(drawn)
        return results

    def _one(self, job: ModelJob, on_done: Any) -> dict[int, Drawn]:
        package = _package(job.document())
        uri = package_uri(package)
        replicas = job.cells[0].release.spec.replicas
        job_id = f"diffops-experiment-{job.cells[0].release.name}-{uuid.uuid4().hex[:8]}"
        try:
            name = uri.removeprefix("gcs://")
            if self.dashboard.send("GET", f"{PACKAGES_PATH}{name}").status_code != 200:
                put = self.dashboard.send("PUT", f"{PACKAGES_PATH}{name}", content=package)
                if put.status_code != 200:
                    raise RayDrawError(f"uploading the experiment input {name}: HTTP {put.status_code} {put.text[:300]}")
            body = {"entrypoint": f"{shlex.quote(self.python)} -m controller.experiments.job", "submission_id": job_id,
                    "entrypoint_num_cpus": replicas.cpus, "entrypoint_num_gpus": replicas.gpus, "runtime_env": {"working_dir": uri},
                    "metadata": {"experiment_cells": str(len(job.cells))}}
            response = self.dashboard.send("POST", JOBS_PATH, json=body)
            if response.status_code >= 400:
                raise RayDrawError(f"Ray refused experiment job {job_id}: HTTP {response.status_code} {response.text[:300]}")
            status = self._wait(job_id, replicas.cpus, replicas.gpus)
            logs = str(self.dashboard.send("GET", f"{JOBS_PATH}{job_id}/logs").json().get("logs", ""))
        except DashboardError as err:
            raise RayDrawError(f"experiment job {job_id}: Ray job API: {err}") from err
        drawn = parse_logs(logs, job_id)
        missing = [c.id for c in job.cells if c.index not in drawn]
        if missing:
            tail = " | ".join(logs.strip().splitlines()[-3:])[-600:]
            raise RayDrawError(f"experiment job {job_id} ended {status} without cells {', '.join(missing)}: {tail or 'no output'}")
        on_done(job.cells)
        return drawn

    def _wait(self, job_id: str, cpus: float, gpus: float) -> str:
        submitted, running_since = time.monotonic(), None
        while True:
            response = self.dashboard.send("GET", f"{JOBS_PATH}{job_id}")
            job = response.json() if response.status_code == 200 else {"status": "UNKNOWN", "message": response.text[:300]}
            status = str(job.get("status") or "UNKNOWN")
            if status in FINAL:
                return f"{status} ({' '.join(str(job.get('message') or '').split())[:300]})"
            now = time.monotonic()
            verdict = start_verdict(status, str(job.get("message") or ""), now - submitted, cpus, gpus, None, self.start_base_s)
            if isinstance(verdict, Fail):
                self.dashboard.send("POST", f"{JOBS_PATH}{job_id}/stop")
                raise RayDrawError(f"experiment job {job_id} did not start: {verdict.reason}")
            running_since = running_since if running_since is not None or status != "RUNNING" else now
            if running_since is not None and now - running_since > self.limit_s:
                self.dashboard.send("POST", f"{JOBS_PATH}{job_id}/stop")
                raise RayDrawError(f"experiment job {job_id} ran past {self.limit_s:.0f}s and was stopped")
            time.sleep(self.poll_s)
