"""Prefetch a version's model onto the nodes that will run it, while its gate runs.

Started by `controller.tick.prepare` just before it runs the gate, on a cluster whose nodes do not share this
machine's cache (on a local one the controller's own fetch already filled the cache replicas read): one Ray job
(`python -m serving.prefetch`, no CPU reserved) fetches the model into the node-local cache of every node whose
resources hold one replica. Read back once the gate has ended: one log line per version naming each node and what
its cache did, or that it is still fetching (a replica starting there waits for it instead of fetching again).
The prefetch never decides anything: a node it missed fetches at replica start as before.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from controller.apply.dashboard import DashboardClient, DashboardError
from serving.prefetch import PREFIX
from serving.schema import ModelSpec

__all__ = ["JOB_PREFIX", "MAX_ARGUMENT_BYTES", "Prefetch", "Prefetching", "RayPrefetch", "job_request", "outcome_text"]

log = logging.getLogger("diffops.controller")
JOB_PREFIX = "diffops-prefetch"
MAX_ARGUMENT_BYTES = 16 << 10  # the job's one argument (a URI and a digest); far below Linux's 128 KiB per string


@dataclass(frozen=True)
class Prefetching:
    """A prefetch job started for a version."""

    release: str
    version: str
    digest: str
    job_id: str
    started: float  # time.monotonic() at submission


class Prefetch(Protocol):
    """Starts a model's prefetch beside a gate and reports it after; the preparations' boundary to it."""

    def start(self, release: str, version: str, model: ModelSpec, cpus: float, gpus: float) -> Prefetching | None: ...

    def report(self, prefetching: Prefetching) -> None: ...


def job_request(job_id: str, python: str, model: ModelSpec, cpus: float, gpus: float) -> dict[str, Any]:
    """The prefetch job's submission: the model as replicas fetch it and the resources one replica needs. Pure."""
    argument = json.dumps({"uri": model.uri, "digest": model.digest, "cpus": cpus, "gpus": gpus}, sort_keys=True)
    if len(argument.encode()) > MAX_ARGUMENT_BYTES:
        raise ValueError(f"model URI of {len(model.uri)} characters: too long to prefetch")
    return {"entrypoint": f"{shlex.quote(python)} -m serving.prefetch {shlex.quote(argument)}", "submission_id": job_id,
            "entrypoint_num_cpus": 0, "metadata": {"purpose": "prefetch", "digest": model.digest}}


def outcome_text(logs: str) -> str:
    """What a prefetch job's log says, node by node, for one log line: `198.18.0.3 fetched 1.2 GB in 9.1s, 198.18.0.4
    already cached, 198.18.0.5 still fetching`. Pure."""
    nodes: list[str] | None = None
    ended: dict[str, dict[str, Any]] = {}
    for line in logs.splitlines():
        if not line.startswith(PREFIX):
            continue
        try:
            said = json.loads(line[len(PREFIX):])
        except ValueError:
            continue
        if isinstance(said, dict) and isinstance(said.get("nodes"), list):
            nodes = [str(node) for node in said["nodes"]]
        elif isinstance(said, dict) and "node" in said:
            ended[str(said["node"])] = said
    if nodes is None and not ended:
        return "the job has not started yet"
    if not nodes and not ended:
        return "no alive node has the resources of one replica"
    nodes = nodes or []
    parts = []
    for node in nodes + sorted(set(ended) - set(nodes)):
        said = ended.get(node)
        if said is None:
            parts.append(f"{node} still fetching")
        elif "error" in said:
            parts.append(f"{node} failed ({said['error']})")
        elif said.get("cached"):
            parts.append(f"{node} already cached")
        else:
            resumed = f", {_figure(said.get('resumed')) / 1e6:.1f} MB resumed" if _figure(said.get("resumed")) else ""
            parts.append(f"{node} fetched {_figure(said.get('bytes')) / 1e6:.1f} MB in {_figure(said.get('seconds')):.1f}s{resumed}")
    return ", ".join(parts)


def _figure(value: Any) -> float:
    """A number the job printed, or 0 for anything else."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class RayPrefetch:
    """Prefetch jobs through Ray's job REST API (the gate's dashboard client and Python)."""

    def __init__(self, dashboard: DashboardClient, python: str):
        self.dashboard, self.python = dashboard, python

    def start(self, release: str, version: str, model: ModelSpec, cpus: float, gpus: float) -> Prefetching | None:
        """Submit the job; None (logged, nothing else changes) when Ray refuses it: replicas fetch at start instead."""
        started = time.monotonic()
        job_id = f"{JOB_PREFIX}-{release}-{version}-{uuid.uuid4().hex[:6]}"
        try:
            response = self.dashboard.send("POST", "/api/jobs/", json=job_request(job_id, self.python, model, cpus, gpus))
            if response.status_code >= 400:
                raise DashboardError(f"HTTP {response.status_code} {response.text[:300]}")
        except (DashboardError, ValueError) as err:
            log.warning("%s: prefetch of model %s for %s not started (%s); next: the gate runs, replicas fetch the model "
                        "when they start (%.1fs)", release, model.digest[:19], version, err, time.monotonic() - started)
            return None
        log.info("%s: prefetch job %s submitted: model %s for %s onto every node that can run its replicas (%.1fs); "
                 "next: the gate runs beside it", release, job_id, model.digest[:19], version, time.monotonic() - started)
        return Prefetching(release, version, model.digest, job_id, started)

    def report(self, prefetching: Prefetching) -> None:
        """One log line saying what each node's cache did so far (the job is not waited for). Never raises: the gate's
        result it follows must reach the tick."""
        try:
            outcome = outcome_text(str(self.dashboard.send("GET", f"/api/jobs/{prefetching.job_id}/logs").json().get("logs", "")))
        except Exception as err:  # the dashboard, its JSON, a log line of another shape
            outcome = f"its log could not be read ({type(err).__name__}: {err})"
        log.info("%s: prefetch of model %s for %s while the gate ran: %s; next: replicas on those nodes start from their "
                 "cache (job %s, %.1fs)", prefetching.release, prefetching.digest[:19], prefetching.version, outcome,
                 prefetching.job_id, time.monotonic() - prefetching.started)
