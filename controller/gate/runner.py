"""Run the gate for a version: locally (`diffops check`) or as a Ray job on the release's resources.

Builds the gate input (spec, model pin, the golden reference read from git at
the version's commit), keys results by what they depend on (`gate_key`), and
submits `python -m checks.job` through Ray's job REST API with the release's
CPUs and GPUs, polling it under a time limit.

The input travels by reference: `checks.job.pack` zips it (the JSON and the
reference PNG as separate files), the zip is uploaded once to the cluster's
package store (`PUT /api/packages/gcs/_ray_pkg_<sha256>.zip`, as Ray's job
client does for a `working_dir`), and the job's runtime_env names it as its
working directory, so any node can run it and nothing large rides in the job's
environment or command line. A job that does not start within its deadline
(`controller.gate.start`) fails the gate with Ray's reason; one that crashes (an
OOM kill, a missing GPU) yields a report whose one failed check says why. Job
ids carry the package's content hash, so a controller restarted after kill -9
picks up the job its predecessor left running instead of starting it again.

Settings (environment, read when the controller starts):
`DIFFOPS_GATE_START_DEADLINE_S` the start deadline's base (default 120 s);
`DIFFOPS_GATE_RESOURCES` custom Ray resources every gate job asks for, as JSON
(`{"gpu-pool-a100": 1}`), to pin gates to the node pool that serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import git

from checks.job import REFERENCE_MAX_BYTES, REPORT_PREFIX, pack, run_dir
from checks.quality import MAX_PROMPT_FILE_BYTES
from checks.report import CheckResult, GateReport
from controller.apply.dashboard import DashboardClient, DashboardError
from controller.gate.start import DEFAULT_START_BASE_S, Fail, asked, start_deadline_s, start_verdict
from controller.parse.release import Release, pinned_models
from controller.source.git_source import ReleaseSource
from serving.code_pin import PIN_ENV
from serving.schema import ModelSpec

__all__ = ["FINAL", "JOBS_PATH", "PACKAGES_PATH", "PACKAGE_MAX_BYTES", "Gate", "LocalGate", "RayJobGate", "crashed", "gate_input",
           "gate_key", "job_request", "package_uri", "prompts_blob", "quality_pins", "reference_blob", "settings_from_env"]

log = logging.getLogger("diffops.controller")
JOBS_PATH = "/api/jobs/"
PACKAGES_PATH = "/api/packages/gcs/"
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
PACKAGE_MAX_BYTES = 100 * 2**20  # the dashboard's request body limit (DASHBOARD_CLIENT_MAX_SIZE); the reference cap keeps far below


class Gate(Protocol):
    """Runs a version's checks on `cpus` and `gpus` and reports them; the reconciler's boundary to the gate."""

    def run(self, gate: dict[str, Any], cpus: float, gpus: float) -> GateReport: ...


def reference_blob(source: ReleaseSource, commit: str, release: Release) -> git.Blob | None:
    """The golden reference image's blob at a commit (not read), or None."""
    golden = release.spec.checks.golden
    return source.blob(commit, golden.reference) if golden is not None else None


QUALITY_MODELS = {"safety checker": "safety", "CLIP model": "clip"}  # `pinned_models` names -> the gate input's keys


def quality_pins(release: Release) -> dict[str, ModelSpec]:
    """The release's quality models as the gate input names them, where the release pins them."""
    return {QUALITY_MODELS[what]: pin for what, pin in pinned_models(release.spec) if what in QUALITY_MODELS}


def prompts_blob(source: ReleaseSource, commit: str, release: Release) -> git.Blob | None:
    """The quality check's prompt set file's blob at a commit (not read), or None."""
    check = release.spec.checks.quality
    return source.blob(commit, check.prompts) if check is not None else None


def gate_key(release: Release, reference: git.Blob | None, prompts: git.Blob | None = None) -> str:
    """What a gate result depends on beyond the version: the checks config, the reference image and, with a quality
    check, its prompt set and the CLIP model that scores it."""
    checks = json.dumps(release.spec.checks.model_dump(mode="json"), sort_keys=True)
    reference_sha = "none" if release.spec.checks.golden is None else reference.hexsha if reference is not None else "missing"
    key = f"{checks}\n{reference_sha}"
    if release.spec.checks.quality is not None:
        clip = release.spec.quality.clip
        key += f"\n{prompts.hexsha if prompts is not None else 'missing'}\n{clip.digest if clip is not None else 'no clip'}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def gate_input(release: Release, version: str, source: ReleaseSource, cache_dir: str | None, *, model_commit: str,
               checks_commit: str, model: ModelSpec | None = None, repo: bool = True,
               quality_models: dict[str, ModelSpec] | None = None, quality_baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the gate job needs: the models as replicas fetch them, the checks as the desired commit has them (the
    golden reference and the quality prompt set, each read only within its cap), and for checks.quality.max_distance
    the previous version's image features. On a cluster `cache_dir` is None (the node's own cache) and `repo` False:
    the job never gets a controller path."""
    spec = release.model_dump(mode="json")["spec"]
    blob = reference_blob(source, checks_commit, release)
    size = blob.size if blob is not None else None
    reference = blob.data_stream.read() if blob is not None and blob.size <= REFERENCE_MAX_BYTES else None  # over it: never read
    prompts = prompts_blob(source, checks_commit, release)
    prompt_set = (prompts.data_stream.read().decode("utf-8", "replace")
                  if prompts is not None and prompts.size <= MAX_PROMPT_FILE_BYTES else None)
    return {
        "release": release.name, "version": version, "spec": spec,
        "model": (model or release.spec.model).model_dump(mode="json"),
        "repo": str(source.path) if repo else None, "commit": model_commit, "cache_dir": cache_dir,
        "reference": reference, "reference_bytes": size, "timeout_s": release.spec.checks.timeout.total_seconds(),
        "prompt_set": prompt_set, "prompt_set_bytes": prompts.size if prompts is not None else None,
        "quality_models": {name: pin.model_dump(mode="json", include={"uri", "digest"})
                           for name, pin in (quality_models if quality_models is not None else quality_pins(release)).items()},
        "quality_baseline": quality_baseline,
    }


def package_uri(package: bytes) -> str:
    """The content-addressed name Ray's package store keeps a gate input under."""
    return f"gcs://_ray_pkg_{hashlib.sha256(package).hexdigest()[:40]}.zip"


def job_request(gate: dict[str, Any], job_id: str, uri: str, python: str, cpus: float, gpus: float,
                resources: dict[str, float] | None = None, serving_code: str | None = None) -> dict[str, Any]:
    """The job submission: a pointer to the uploaded package and the release's resources; never the input itself.
    `serving_code` pins the code the job's node must run (the dependency check fails on another)."""
    body: dict[str, Any] = {
        "entrypoint": f"{shlex.quote(python)} -m checks.job",
        "submission_id": job_id,
        "entrypoint_num_cpus": cpus,
        "entrypoint_num_gpus": gpus,
        "runtime_env": {"working_dir": uri, **({"env_vars": {PIN_ENV: serving_code}} if serving_code else {})},
        "metadata": {"release": gate["release"], "version": gate["version"], "num_cpus": f"{cpus:g}", "num_gpus": f"{gpus:g}"},
    }
    if resources:
        body["entrypoint_resources"] = dict(resources)
    return body


def settings_from_env(environ: Mapping[str, str] = os.environ) -> tuple[float, dict[str, float]]:
    """(start deadline base, custom resources) from DIFFOPS_GATE_START_DEADLINE_S / DIFFOPS_GATE_RESOURCES."""
    raw_base = environ.get("DIFFOPS_GATE_START_DEADLINE_S", "")
    try:
        base = float(raw_base) if raw_base else DEFAULT_START_BASE_S
    except ValueError:
        raise ValueError(f"DIFFOPS_GATE_START_DEADLINE_S={raw_base!r}: give seconds, e.g. 120") from None
    if not base > 0 or base == float("inf"):
        raise ValueError(f"DIFFOPS_GATE_START_DEADLINE_S={raw_base!r}: give a positive number of seconds, e.g. 120")
    raw = environ.get("DIFFOPS_GATE_RESOURCES", "")
    try:
        resources = json.loads(raw) if raw else {}
        if not isinstance(resources, dict) or not all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                                                      for k, v in resources.items()):
            raise ValueError
    except ValueError:
        raise ValueError(f'DIFFOPS_GATE_RESOURCES={raw!r}: give a JSON object of positive amounts, e.g. {{"gpu-pool-a100": 1}}') from None
    return base, {k: float(v) for k, v in resources.items()}


def crashed(gate: dict[str, Any], message: str, seconds: float, job: str | None = None) -> GateReport:
    """A report whose one failed check says why the gate could not run or report."""
    return GateReport(gate["release"], gate["version"], (CheckResult("gate", "error", message),), round(seconds, 3), job=job)


class RayJobGate:
    """The gate as a Ray job: `entrypoint_num_cpus/gpus` are the release's replica resources."""

    def __init__(self, dashboard_url: str, token: str | None, python: str | None = None, poll_s: float = 0.5,
                 start_base_s: float | None = None, resources: dict[str, float] | None = None, serving_code: str | None = None):
        self.dashboard = DashboardClient(dashboard_url, token, timeout_s=30)
        self.python = python or sys.executable  # the cluster's Python with diffops installed; this one for a local head
        self.poll_s = poll_s
        env_base, env_resources = settings_from_env()
        self.start_base_s = start_base_s if start_base_s is not None else env_base
        self.resources = resources if resources is not None else env_resources
        self.stopping = threading.Event()  # set when the controller stops: running gate jobs are stopped
        self.serving_code = serving_code

    def run(self, gate: dict[str, Any], cpus: float, gpus: float) -> GateReport:
        started = time.monotonic()
        package = pack(gate)
        uri = package_uri(package)
        base = f"diffops-gate-{gate['release']}-{gate['version']}-{uri.removeprefix('gcs://_ray_pkg_')[:8]}"
        if len(package) > PACKAGE_MAX_BYTES:
            return crashed(gate, f"gate input is {len(package)} bytes, over the {PACKAGE_MAX_BYTES} the Ray dashboard accepts", 0.0)
        try:
            job_id = self._left_behind(base)
            if job_id is not None:
                log.info("%s: gate job %s for %s is still running, started by an earlier controller; next: wait "
                         "for its report instead of starting it again", gate["release"], job_id, gate["version"])
            else:
                job_id = f"{base}-{uuid.uuid4().hex[:6]}"
                uploaded = self._upload(uri, package)
                body = job_request(gate, job_id, uri, self.python, cpus, gpus, self.resources, self.serving_code)
                response = self.dashboard.send("POST", JOBS_PATH, json=body)
                if response.status_code >= 400:
                    refused = f"Ray refused the gate job: HTTP {response.status_code} {response.text[:300]}"
                    return crashed(gate, refused, time.monotonic() - started)
                log.info("%s: gate job %s for %s submitted (input %s, %d bytes, %s) in %.1fs; next: wait up to %.0fs for "
                         "it to start on %s", gate["release"], job_id, gate["version"], uri, len(package),
                         "uploaded" if uploaded else "already in the cluster", time.monotonic() - started,
                         start_deadline_s(gpus, self.start_base_s), asked(cpus, gpus, self.resources))
            limit = gate["timeout_s"] * 4 + 60  # every check has its own limit inside; this bounds the job once it runs
            status, reason = self._wait(job_id, limit, cpus, gpus)
            if reason is not None:
                log.warning("%s: gate job %s for %s never started (%.0fs); next: the gate fails with Ray's reason",
                            gate["release"], job_id, gate["version"], time.monotonic() - started)
                return crashed(gate, reason, time.monotonic() - started, job_id)
            logs = str(self.dashboard.send("GET", f"{JOBS_PATH}{job_id}/logs").json().get("logs", ""))
        except DashboardError as err:
            return crashed(gate, f"Ray job API: {err}", time.monotonic() - started)
        for line in reversed(logs.splitlines()):
            if line.startswith(REPORT_PREFIX):
                return replace(GateReport.from_dict(json.loads(line[len(REPORT_PREFIX):])), job=job_id)
        tail = " | ".join(logs.strip().splitlines()[-3:])[-600:]
        ended = f"gate job {job_id} ended {status} without a report: {tail or 'no output'}"
        return crashed(gate, ended, time.monotonic() - started, job_id)

    def _upload(self, uri: str, package: bytes) -> bool:
        """Put the package in the cluster's package store unless it is there; True if it was uploaded.
        The GET also pins the package for a while, so Ray keeps it until the job that names it starts."""
        name = uri.removeprefix("gcs://")
        found = self.dashboard.send("GET", f"{PACKAGES_PATH}{name}")
        if found.status_code == 200:
            return False
        if found.status_code != 404:
            raise DashboardError(f"package lookup {name} answered HTTP {found.status_code}: {found.text[:300]}")
        put = self.dashboard.send("PUT", f"{PACKAGES_PATH}{name}", content=package)
        if put.status_code != 200:
            raise DashboardError(f"package upload {name} answered HTTP {put.status_code}: {put.text[:300]}")
        return True

    def _left_behind(self, base: str) -> str | None:
        """A job for exactly this gate input still running after its controller was killed (a finished one is run again)."""
        jobs = self.dashboard.send("GET", JOBS_PATH).json()
        for job in jobs if isinstance(jobs, list) else []:
            submission = str(job.get("submission_id") or "")
            if submission.startswith(f"{base}-") and job.get("status") in ("PENDING", "RUNNING"):
                return submission
        return None

    def _wait(self, job_id: str, limit_s: float, cpus: float, gpus: float) -> tuple[str, str | None]:
        """(final status, None), or (status, why it never started) once the start deadline passed (the job is stopped)."""
        submitted = time.monotonic()
        running_since: float | None = None
        while True:
            response = self.dashboard.send("GET", f"{JOBS_PATH}{job_id}")
            job = response.json() if response.status_code == 200 else {"status": "UNKNOWN", "message": response.text[:300]}
            status = str(job.get("status") or "UNKNOWN")
            if status in FINAL:
                if status != "SUCCEEDED" and job.get("message"):
                    return f"{status} ({' '.join(str(job['message']).split())[:600]})", None
                return status, None
            now = time.monotonic()
            verdict = start_verdict(status, str(job.get("message") or ""), now - submitted, cpus, gpus, self.resources, self.start_base_s)
            if isinstance(verdict, Fail):
                self.dashboard.send("POST", f"{JOBS_PATH}{job_id}/stop")
                return status, verdict.reason
            if status == "RUNNING" and running_since is None:
                running_since = now
            if (running_since is not None and now - running_since > limit_s) or self.stopping.is_set():
                self.dashboard.send("POST", f"{JOBS_PATH}{job_id}/stop")
                return ("STOPPED (the controller is stopping)" if self.stopping.is_set() else f"STOPPED after {limit_s:.0f}s"), None
            self.stopping.wait(self.poll_s)


class LocalGate:
    """The same gate in this process (for `diffops check` and pull requests)."""

    def run(self, gate: dict[str, Any], cpus: float = 0, gpus: float = 0) -> GateReport:
        """Through the same package as a Ray job (packed, unpacked, read back), so both read their input alike."""
        import tempfile
        import zipfile
        from io import BytesIO

        with tempfile.TemporaryDirectory(prefix="diffops-gate-") as folder:
            zipfile.ZipFile(BytesIO(pack(gate))).extractall(folder)
            report: GateReport = run_dir(Path(folder))
            return report
