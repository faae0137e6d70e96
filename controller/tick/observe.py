"""Observe: everything one tick reads before it decides, as one typed value.

The first phase of a reconcile (`controller.tick`). Reads what Ray Serve runs
and splits it into our applications and other owners' (`controller.apply.drift`),
asks each router for its live weights until it confirms the recorded ones, asks
Ray for free resources only while something must start, collects finished model
preparations and pending manual commands (a `models:/` URI resolved since: its
source, `controller.tick.registry`; the registry drift check when due), and reads per release what its step
needs: the checks' golden reference in git (the gate key) and, for a version
under analysis (a walking canary, or a promoted version under its
post-promotion watch), its router's figures, plus, once an interval is due with
`analysis.provider: prometheus`, the release's PromQL readings
(`controller.tick.prometheus`). Each router's new user feedback is stored on
the way (`controller.quality.drain`; a failed read is retried next tick). One release's read failing is carried to decide
(`StepInput.unobserved`) and fails that release only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import PurePosixPath

from controller import quality
from controller.apply import drift
from controller.apply.serve_client import ServeApi
from controller.apply.serve_config import ROUTER_CPUS, rendered_versions, router_weights
from controller.gate.runner import gate_key, prompts_blob, reference_blob
from controller.metrics import ControllerMetrics
from controller.plan.versions import version_id
from controller.quality import FeedbackSource, drain
from controller.rollout import capacity
from controller.rollout.analysis import judges_quality, subject
from controller.rollout.capacity import Resources
from controller.rollout.outcomes import Prepared
from controller.source.git_source import ReleaseFile, ReleaseSource, Snapshot
from controller.state.feedback import feedback_counts
from controller.state.records import ObservedApp, VersionRecord
from controller.state.store import GateRecord, State, Store
from controller.tick import registry
from controller.tick.decide import Policy, StepInput, TickInput
from controller.tick.prepare import Key, Preparations
from controller.tick.prometheus import read_queries

__all__ = ["VERSION_ID_CACHE", "Observation", "Observer", "free_resources", "recorded_apps"]

log = logging.getLogger("diffops.controller")

VERSION_ID_CACHE = 10_000  # release file blobs whose version id is kept


@dataclass(frozen=True)
class Observation:
    """One tick's observations: decide's input, and what the later phases need beside the plan."""

    started: float  # time.monotonic() once Ray Serve was read: the tick's decisions are timed from here
    tick: TickInput
    others: dict[str, ObservedApp]  # other owners' applications, carried unchanged in every apply
    gates: tuple[GateRecord, ...]  # gate reports finished since the last tick, to record
    finished: int  # preparations finished since the last tick (models fetched: the cache may need evicting)


class Observer:
    """The observe phase, with what it keeps from tick to tick: routers' confirmed weights, version ids by blob."""

    def __init__(self, source: ReleaseSource, serve: ServeApi, owner: str, policy: Policy, clock: Callable[[], float] = time.time,
                 metrics: ControllerMetrics | None = None):
        self.source, self.serve, self.owner, self.policy, self.clock = source, serve, owner, policy, clock
        self.metrics, self.feedback_seeded = metrics, False
        self.confirmed: dict[str, dict[str, int]] = {}  # router weights each router has confirmed serving
        self._version_ids: dict[str, str] = {}  # release file blob -> version id

    def observe(self, head: str, snapshot: Snapshot, state: State, applied: Iterable[str], store: Store,
                preparations: Preparations) -> Observation:
        """Read Ray Serve, the finished preparations, the commands and each release's inputs; `applied`: the app
        names this process applied (ours while Ray deletes them)."""
        ours, others = drift.partition(self.serve.observe(), self.owner, recorded_apps(state.versions, applied))
        observed = self._confirm_weights(ours, state.versions)
        self._drain_feedback(observed, store)
        self._drain_samples(observed, state, store)
        started, now = time.monotonic(), self.clock()
        finished = preparations.collect()
        link = preparations.registry_link()
        versions = registry.attach(state.versions, link.resolved)  # models:/ URIs resolved since: their source, recorded
        registry.watch(link, state.releases.values(), versions, store, self.metrics, now)
        gates = tuple((*key, result.report) for key, result in finished if result.report is not None)
        files = {PurePosixPath(path).stem: f for path, f in snapshot.files.items()}
        commands = tuple(store.pending_commands())
        desired = {name: self._version_id(f) for name, f in files.items() if f.release is not None}
        settled = {(v.release, v.version) for v in state.versions if v.status == "ready" and v.replicas is None}
        needs_room = any((name, version) not in settled for name, version in desired.items())
        free = self._free_resources(state.versions, preparations.preparing) if needs_room else None  # asked only then
        every_file_gone = not files and bool(state.releases)
        releases = []
        for name in sorted(set(state.releases) | set(files)):
            base = StepInput(name, now, head, files.get(name), state.releases.get(name),
                             tuple(v for v in versions if v.release == name), observed, self.policy,
                             desired_version=desired.get(name), every_file_gone=every_file_gone,
                             commands=tuple(c for c in commands if c.release == name), free=free)
            releases.append(self._release(base, others, preparations.prepared, store))
        tick = TickInput(head, now, state.controller, tuple(releases), observed, commands)
        return Observation(started, tick, others, gates, len(finished))

    def forget(self, release: str) -> None:
        """Ask this router for its weights again (its app was re-applied)."""
        self.confirmed.pop(release, None)

    def _release(self, base: StepInput, others: dict[str, ObservedApp], prepared: dict[Key, Prepared], store: Store) -> StepInput:
        """What this release's step reads beyond the recorded state: from git and from its router."""
        name, file, record = base.name, base.file, base.record
        try:
            held = drift.holder(name, others)
            if held is not None:
                return replace(base, held_by=held)
            if file is None or file.release is None or (file.release.spec.faults is not None and not self.policy.allow_faults):
                return base  # gone or invalid: its step reads nothing more
            key = gate_key(file.release, reference_blob(self.source, base.head, file.release),
                           prompts_blob(self.source, base.head, file.release))
            under = subject(record, base.versions, file.release.spec.rollout, base.now)
            stats = self.serve.router_stats(name, record.analysis_at or base.now) if under and record else None
            prometheus = under.analysis.prometheus if under is not None and under.analysis.provider == "prometheus" else None
            if under is not None and under.due and prometheus is not None:
                readings = read_queries(prometheus, name, under.version, under.analysis.interval)
                stats = {**(stats or {}), under.version: {**(stats or {}).get(under.version, {}), "queries": readings}}
            if under is not None and judges_quality(under.analysis):
                stats = {**(stats or {}), under.version: {**(stats or {}).get(under.version, {}),
                                                         "quality": quality.figures(store.db, name, under.version)}}
        except Exception as err:  # decided where every step's error is: this release's phase, never another's
            return replace(base, unobserved=err)
        mine = {version: result for (release, version, gate), result in prepared.items() if release == name and gate == key}
        return replace(base, gate_key=key, prepared=mine, stats=stats)

    def _confirm_weights(self, observed: dict[str, ObservedApp], versions: list[VersionRecord]) -> dict[str, ObservedApp]:
        """Attach each router's live weights; a router is asked only until it confirms the recorded ones."""
        self.confirmed = {name: weights for name, weights in self.confirmed.items() if name in observed}  # gone: ask again
        for name, app in observed.items():
            if "--" in name:
                continue
            recorded = router_weights(v for v in versions if v.release == name)
            live = recorded if self.confirmed.get(name) == recorded else self.serve.router_weights(name)
            if live == recorded:
                self.confirmed[name] = recorded
            observed[name] = replace(app, weights=live)
        return observed

    def _drain_feedback(self, observed: dict[str, ObservedApp], store: Store) -> None:
        """Store each router's new feedback and count it (a failure is logged; the next tick reads the same entries)."""
        if not isinstance(self.serve, FeedbackSource):
            return
        if self.metrics is not None and not self.feedback_seeded:
            self.metrics.seed_feedback(*feedback_counts(store.db))
            self.feedback_seeded = True
        for name in sorted(n for n in observed if "--" not in n):
            try:
                stored = drain(self.serve, name, store.db)
            except Exception as err:  # never fails the tick: the cursor was not moved, the entries are read again
                log.warning("%s: reading user feedback failed (%s: %s); next: read it again next tick", name, type(err).__name__, err)
                continue
            if self.metrics is not None:
                self.metrics.count_feedback(name, stored)

    def _drain_samples(self, observed: dict[str, ObservedApp], state: State, store: Store) -> None:
        """Store the sampled outputs of each release that samples them (a failure is logged; read again next tick)."""
        if not isinstance(self.serve, quality.SampleSource):
            return
        for name in sorted(n for n in observed if "--" not in n):
            record = state.releases.get(name)
            spec = record.spec if record is not None else None
            if spec is None or (spec.quality.review.sample_rate <= 0 and spec.quality.clip is None):
                continue
            try:
                quality.drain_samples(self.serve, name, store.db, store.path.parent / "samples", spec.quality.review.max_samples)
            except Exception as err:  # never fails the tick: the cursor was not moved, the samples are read again
                log.warning("%s: reading sampled outputs failed (%s: %s); next: read them again next tick", name, type(err).__name__, err)

    def _free_resources(self, versions: list[VersionRecord], preparing: Iterable[Key]) -> Resources | None:
        report = self.serve.cluster_resources()
        return None if report is None else free_resources(report, versions, preparing)

    def _version_id(self, file: ReleaseFile) -> str:
        """A release file's version id, computed once per blob (a tick asks for every release)."""
        if file.blob not in self._version_ids:
            assert file.release is not None
            self._version_ids[file.blob] = version_id(file.release)
            if len(self._version_ids) > VERSION_ID_CACHE:
                self._version_ids.pop(next(iter(self._version_ids)))
        return self._version_ids[file.blob]


def free_resources(usage: capacity.Usage, versions: list[VersionRecord], preparing: Iterable[Key]) -> Resources:
    """Free CPUs/GPUs: Ray's total minus the larger of its reported use (seconds old) and what our own apps (retiring
    ones too, until deleted) and gate jobs hold right now, so a lagging report never lets a replica be overcommitted."""
    gated = [next((v for v in versions if (v.release, v.version) == (release, version)), None) for release, version, _ in preparing]
    held = capacity.held(rendered_versions(versions), [v for v in gated if v is not None], ROUTER_CPUS)
    return capacity.free_resources(usage, held)


def recorded_apps(versions: Iterable[VersionRecord], applied: Iterable[str]) -> set[str]:
    """Apps we deployed (recorded, or applied by this process): unmarked ones by these names are ours (from before
    owner marks, or being deleted: Ray drops a deleting app's config)."""
    live = rendered_versions(versions)
    return {v.app for v in live} | {v.release for v in live} | set(applied)
