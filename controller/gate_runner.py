"""Run the gate for a version: locally (`diffops check`) or as a Ray job on the release's resources.

Builds the gate input (spec, model pin, the golden reference read from git at
the version's commit), keys results by what they depend on (`gate_key`), and
submits `python -m checks.job` through Ray's job REST API with the release's
CPUs and GPUs, polling it under a time limit. A job that crashes (an OOM
kill, a missing GPU) yields a report whose one failed check says why. Job ids
carry a hash of the gate input, so a controller restarted after kill -9 picks
up the job its predecessor left running instead of starting it again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import shlex
import sys
import threading
import time
import uuid
from typing import Any, Protocol

import git
import httpx

from checks.job import REPORT_PREFIX
from checks.report import CheckResult, GateReport
from controller.release import Release
from controller.source import ReleaseSource

log = logging.getLogger("diffops.controller")
JOBS_PATH = "/api/jobs/"
FINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class Gate(Protocol):
    def run(self, gate: dict[str, Any], cpus: float, gpus: float) -> GateReport: ...


def reference_blob(source: ReleaseSource, commit: str, release: Release) -> git.Blob | None:
    """The golden reference image's blob at a commit (not read), or None."""
    golden = release.spec.checks.golden
    return source.blob(commit, golden.reference) if golden is not None else None


def gate_key(release: Release, reference: git.Blob | None) -> str:
    """What a gate result depends on beyond the version: the checks config and the reference image."""
    checks = json.dumps(release.spec.checks.model_dump(mode="json"), sort_keys=True)
    reference_sha = "none" if release.spec.checks.golden is None else reference.hexsha if reference is not None else "missing"
    return hashlib.sha256(f"{checks}\n{reference_sha}".encode()).hexdigest()[:12]


def gate_input(release: Release, version: str, source: ReleaseSource, cache_dir: str, *, model_commit: str,
               checks_commit: str, model: dict | None = None) -> dict[str, Any]:
    """What the gate job needs: the model as the version pins it, the checks as the desired commit has them."""
    spec = release.model_dump(mode="json")["spec"]
    blob = reference_blob(source, checks_commit, release)
    reference = blob.data_stream.read() if blob is not None else None
    return {
        "release": release.name, "version": version, "spec": spec,
        "model": model or {k: spec["model"][k] for k in ("uri", "digest", "dtype")},
        "repo": str(source.path), "commit": model_commit, "cache_dir": cache_dir,
        "reference": reference, "timeout_s": release.spec.checks.timeout.total_seconds(),
    }


def crashed(gate: dict[str, Any], message: str, seconds: float) -> GateReport:
    return GateReport(gate["release"], gate["version"], (CheckResult("gate", "error", message),), round(seconds, 3))


class RayJobGate:
    """The gate as a Ray job: `entrypoint_num_cpus/gpus` are the release's replica resources."""

    def __init__(self, dashboard_url: str, token: str | None, python: str | None = None, poll_s: float = 0.5):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=dashboard_url.rstrip("/"), headers=headers, timeout=10)
        self.python = python or sys.executable  # the cluster's Python with diffops installed; this one for a local head
        self.poll_s = poll_s
        self.stopping = threading.Event()  # set when the controller stops: running gate jobs are stopped

    def run(self, gate: dict[str, Any], cpus: float, gpus: float) -> GateReport:
        started = time.monotonic()
        payload = dict(gate, reference=base64.b64encode(gate["reference"]).decode() if gate.get("reference") else None)
        encoded = base64.b64encode(json.dumps(payload, sort_keys=True).encode()).decode()
        base = f"diffops-gate-{gate['release']}-{gate['version']}-{hashlib.sha256(encoded.encode()).hexdigest()[:8]}"
        try:
            job_id = self._left_behind(base)
            if job_id is not None:
                log.info("%s: gate job %s for %s is still running, started by an earlier controller; next: wait "
                         "for its report instead of starting it again", gate["release"], job_id, gate["version"])
            else:
                job_id = f"{base}-{uuid.uuid4().hex[:6]}"
                body = {
                    "entrypoint": f"{shlex.quote(self.python)} -m checks.job",
                    "submission_id": job_id,
                    "entrypoint_num_cpus": cpus,
                    "entrypoint_num_gpus": gpus,
                    "runtime_env": {"env_vars": {"DIFFOPS_GATE_INPUT": encoded}},
                    "metadata": {"release": gate["release"], "version": gate["version"], "num_cpus": f"{cpus:g}", "num_gpus": f"{gpus:g}"},
                }
                response = self.http.post(JOBS_PATH, json=body)
                if response.status_code >= 400:
                    return crashed(gate, f"Ray refused the gate job: HTTP {response.status_code} {response.text[:300]}", time.monotonic() - started)
            limit = gate["timeout_s"] * 4 + 60  # every check has its own limit inside; this bounds the whole job
            status = self._wait(job_id, limit)
            logs = self.http.get(f"{JOBS_PATH}{job_id}/logs").json().get("logs", "")
        except httpx.HTTPError as err:
            return crashed(gate, f"Ray job API unreachable ({type(err).__name__})", time.monotonic() - started)
        for line in reversed(logs.splitlines()):
            if line.startswith(REPORT_PREFIX):
                return GateReport.from_dict(json.loads(line[len(REPORT_PREFIX):]))
        tail = " | ".join(logs.strip().splitlines()[-3:])[-600:]
        return crashed(gate, f"gate job {job_id} ended {status} without a report: {tail or 'no output'}", time.monotonic() - started)

    def _left_behind(self, base: str) -> str | None:
        """A job for exactly this gate input still running after its controller was killed (a finished one is run again)."""
        jobs = self.http.get(JOBS_PATH).json()
        for job in jobs if isinstance(jobs, list) else []:
            if str(job.get("submission_id") or "").startswith(f"{base}-") and job.get("status") in ("PENDING", "RUNNING"):
                return job["submission_id"]
        return None

    def _wait(self, job_id: str, limit_s: float) -> str:
        deadline = time.monotonic() + limit_s
        while True:
            status = self.http.get(f"{JOBS_PATH}{job_id}").json().get("status", "UNKNOWN")
            if status in FINAL:
                return status
            if time.monotonic() > deadline or self.stopping.is_set():
                self.http.post(f"{JOBS_PATH}{job_id}/stop")
                return "STOPPED (the controller is stopping)" if self.stopping.is_set() else f"STOPPED after {limit_s:.0f}s"
            self.stopping.wait(self.poll_s)


class LocalGate:
    """The same gate in this process (for `diffops check` and pull requests)."""

    def run(self, gate: dict[str, Any], cpus: float = 0, gpus: float = 0) -> GateReport:
        from checks.gate import run_gate

        return run_gate(gate)
