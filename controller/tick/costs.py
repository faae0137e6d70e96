"""Costs: the cost accounting's shell, run at the end of a reconcile (`controller.reconciler`).

Every `ACCOUNT_S` at most it reads each release's tally through its router
(`GET /<release>/work`: pipeline seconds and images per version), integrates
what the recorded state holds (`controller.cost.account`), writes the totals
to the state store (so they survive a restart) with a sample about once a
minute (the windows of `diffops cost --since`), and moves the cost metrics:
GPU-seconds and USD by kind, bytes fetched, cost per image over the last
hour, each release's budget per image. Gate reports and the controller's own
model fetches are buffered until then. The same answer carries each version's
latest replica start by phase, which is stored as it changes (`diffops status`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from controller.cost import CostRecord, Fetch, GateRun, Work, account, cost_per_image, window
from controller.metrics import ControllerMetrics
from controller.parse.release import Cost
from controller.state.records import VersionRecord
from controller.state.store import GateRecord, State, Store
from serving.artifacts import ModelCache

__all__ = ["ACCOUNT_S", "KEEP_S", "LOAD_PHASES", "SAMPLE_S", "WINDOW_S", "CostBook", "WorkReader", "load_readings", "model_bytes", "prices",
           "work_readings"]

log = logging.getLogger("diffops.controller")

ACCOUNT_S = 5.0  # seconds between two integrations (each reads every release's tally once)
SAMPLE_S = 60.0  # seconds between two samples of a version's totals
KEEP_S = 35 * 86400  # samples kept this long
WINDOW_S = 3600.0  # the window of diffops_cost_per_image_usd
LOAD_PHASES = ("fetch", "verify", "load", "warmup")  # a replica's start (`serving.model_server.load_phases`)


@runtime_checkable
class WorkReader(Protocol):
    def router_work(self, release: str) -> dict[str, Any] | None: ...


def work_readings(release: str, answer: dict[str, Any] | None) -> dict[tuple[str, str], Work]:
    """A router's `/work` answer as readings per (release, version); none for no answer or a malformed one."""
    if not isinstance(answer, dict) or not isinstance(answer.get("versions"), dict):
        return {}
    epoch = str(answer.get("epoch"))
    out = {}
    for version, totals in answer["versions"].items():
        try:
            out[(release, str(version))] = Work(epoch, float(totals["busy_s"]), int(totals["images"]))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def load_readings(release: str, answer: dict[str, Any] | None) -> dict[tuple[str, str], dict[str, float]]:
    """A router's `/work` answer's replica starts per (release, version), seconds by phase; a malformed one is dropped."""
    loads = answer.get("loads") if isinstance(answer, dict) else None
    if not isinstance(loads, dict):
        return {}
    out = {}
    for version, phases in loads.items():
        try:
            seconds = {phase: float(phases[phase]) for phase in LOAD_PHASES}
        except (KeyError, TypeError, ValueError):
            continue
        if all(0 <= value < 1e7 for value in seconds.values()):
            out[(release, str(version))] = seconds
    return out


def prices(state: State) -> dict[str, Cost]:
    """Each release's prices: its last valid spec's, else its newest version's."""
    out = {version.release: version.spec.cost for version in state.versions}
    out.update({name: record.spec.cost for name, record in state.releases.items() if record.spec is not None})
    return out


def model_bytes(versions: Iterable[VersionRecord], cached: Mapping[str, int]) -> dict[tuple[str, str], float]:
    """The cache bytes of each version's model (by digest), shared out among the versions pinning the same one."""
    pinning: dict[str, list[tuple[str, str]]] = {}
    for version in versions:
        pinning.setdefault(version.spec.model.digest, []).append((version.release, version.version))
    return {key: cached.get(digest, 0) / len(keys) for digest, keys in pinning.items() for key in keys}


class CostBook:
    """The running totals, their samples, and the cost metrics; `tick` integrates when due."""

    def __init__(self, store: Store, cache: ModelCache, reader: WorkReader | None, metrics: ControllerMetrics | None = None,
                 clock: Callable[[], float] = time.time, every: float = ACCOUNT_S):
        self.store, self.cache, self.reader, self.metrics, self.clock, self.every = store, cache, reader, metrics, clock, every
        self.records = {(r.release, r.version): r for r in store.costs()}
        now = clock()
        self.sampled = {key: r.at for key, r in store.cost_samples(now).items()}
        self.baseline = store.cost_samples(now - WINDOW_S)  # the window's start, refreshed with every sample
        self.gates: list[GateRun] = []
        self.fetches: list[Fetch] = []
        self.last: float | None = None
        self.loads = store.load_phases()  # what the state file holds, written again only when a start changes

    def gated(self, state: State, gates: Iterable[GateRecord]) -> None:
        """Gate reports recorded this tick: their checks' seconds observed now, their GPU time at the next integration."""
        for release, version, _key, report in gates:
            spec = next((v.spec for v in state.versions if (v.release, v.version) == (release, version)), None)
            if spec is None and release in state.releases:
                spec = state.releases[release].spec
            gpus = spec.replicas.gpus if spec is not None else 0.0
            self.gates.append(GateRun(release, version, float(report.get("seconds") or 0.0), gpus))
            if self.metrics is not None:
                self.metrics.observe_gate(release, version, report)

    def fetched(self, fetches: Iterable[Fetch]) -> None:
        for fetch in fetches:
            self.fetches.append(fetch)
            if self.metrics is not None:
                self.metrics.fetched_bytes.labels(fetch.store).inc(fetch.bytes)

    def tick(self, state: State) -> bool:
        """Integrate up to now when `every` passed since the last time; True when it did."""
        now = self.clock()
        if self.last is not None and now - self.last < self.every:
            return False
        started = time.monotonic()
        self.last = now
        work, loads = self._read_work(state)
        self._store_loads(loads, state, now)
        cached = {entry.digest: entry.bytes for entry in self.cache.entries()}
        after = account(self.records, state.versions, now, prices(state), work, self.gates, self.fetches,
                        model_bytes(state.versions, cached))
        changed = [record for key, record in after.items() if record != self.records.get(key)]
        samples = [record for key, record in after.items() if now - self.sampled.get(key, float("-inf")) >= SAMPLE_S]
        self.store.save_costs(changed, samples, keep_since=now - KEEP_S if samples else None)
        if samples:
            self.sampled.update({(r.release, r.version): now for r in samples})
            self.baseline = self.store.cost_samples(now - WINDOW_S)
        self._count(self.records, after, state)
        self.records, self.gates, self.fetches = after, [], []
        log.debug("costs: %d version(s) integrated, %d sampled (%.0f ms)", len(after), len(samples), (time.monotonic() - started) * 1000)
        return True

    def _read_work(self, state: State) -> tuple[dict[tuple[str, str], Work], dict[tuple[str, str], dict[str, float]]]:
        """Every release's tally, read through its router: (work, replica starts); a router that does not answer, none."""
        if self.reader is None:
            return {}, {}
        work: dict[tuple[str, str], Work] = {}
        loads: dict[tuple[str, str], dict[str, float]] = {}
        for release in sorted({v.release for v in state.versions if v.status in ("ready", "retiring") or v.weight > 0}):
            answer = self.reader.router_work(release)
            work.update(work_readings(release, answer))
            loads.update(load_readings(release, answer))
        return work, loads

    def _store_loads(self, loads: dict[tuple[str, str], dict[str, float]], state: State, now: float) -> None:
        """Record the starts that changed, and forget those of versions that are gone."""
        live = {(v.release, v.version) for v in state.versions}
        changed = {key: phases for key, phases in loads.items() if key in live and self.loads.get(key) != phases}
        if changed or self.loads.keys() - live:
            self.store.save_load_phases(changed, now, keep=live)
            self.loads = {key: phases for key, phases in {**self.loads, **changed}.items() if key in live}

    def _count(self, before: Mapping[tuple[str, str], CostRecord], after: Mapping[tuple[str, str], CostRecord], state: State) -> None:
        if self.metrics is None:
            return
        for key, record in after.items():
            self.metrics.observe_costs(before.get(key), record)
            per_image = cost_per_image(window(record, self.baseline.get(key)))
            self.metrics.set_cost_per_image(record.release, record.version, per_image)
        self.metrics.set_budgets({name: c.budget_per_image_usd for name, c in prices(state).items()})
