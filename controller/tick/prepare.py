"""Prepare: fetch and verify a version's model, then gate it, in the background; a later tick reads the result.
On a cluster whose nodes do not share this machine's cache, the model's prefetch onto the nodes that can run its
replicas starts just before the gate and runs beside it (`controller.gate.prefetch`).

Started by the apply phase (`controller.tick`) for the versions the plan names,
read back by the observe phase: `collect` hands each finished preparation to
exactly one tick (its gate report to the record phase). Nothing here blocks the
loop; `close` cancels what is queued and stops running gate jobs.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from checks.quality import FEATURES_NAME
from checks.report import GateReport
from controller.apply.model_store import Placement, publish
from controller.cost import Fetch
from controller.gate.prefetch import Prefetch
from controller.gate.runner import Gate, gate_input, quality_pins
from controller.parse.release import pinned_models
from controller.rollout.outcomes import Desired, Prepared
from controller.source.git_source import ReleaseSource
from controller.state.records import VersionRecord
from controller.state.store import Store
from controller.tick.registry import RegistryLink
from controller.tracking.gate_runs import GateRuns
from controller.tracking.registry import registry_ref
from serving.artifacts import ModelCache, fetch
from serving.manifest import ArtifactError
from serving.metrics import store_of

__all__ = ["Key", "Preparations", "judge"]

log = logging.getLogger("diffops.controller")
Key = tuple[str, str, str]  # (release, version, gate key)
_WORKERS = 4


class Preparations:
    """Model fetches and gate runs in a thread pool, keyed by (release, version, gate key)."""

    def __init__(self, source: ReleaseSource, store: Store, gate: Gate, cache: ModelCache, cache_dir: str, gate_dir: Path,
                 on_prepared: Callable[[], None] = lambda: None, placement: Placement | None = None,
                 gate_runs: GateRuns | None = None, registry: RegistryLink | None = None, prefetch: Prefetch | None = None):
        self.source, self.store, self.gate, self.cache = source, store, gate, cache
        self.prefetch = prefetch  # onto the nodes that will run a version, beside its gate (a cluster not on this machine)
        self.gate_runs = gate_runs  # each gate report is logged as a tracking run, in the background
        self.registry = registry  # where models:/ URIs resolve (`controller run --tracking-uri`); None: the state dir's store
        self.placement = placement or Placement()
        self.cache_dir, self.gate_dir, self.on_prepared = cache_dir, gate_dir, on_prepared
        self.prepared: dict[Key, Prepared] = {}  # finished, not yet seen by a tick that went through
        self.preparing: dict[Key, Future[Prepared]] = {}  # running or queued (their resources are held)
        self._finished: queue.SimpleQueue[tuple[Key, Prepared]] = queue.SimpleQueue()
        self._fetched: queue.SimpleQueue[Fetch] = queue.SimpleQueue()  # models downloaded (bytes by store), for cost accounting
        self._pool = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="prepare")

    def collect(self) -> list[tuple[Key, Prepared]]:
        """The preparations finished since the last call, moved to `prepared`."""
        finished = []
        while not self._finished.empty():
            key, result = self._finished.get()
            self.preparing.pop(key, None)
            self.prepared[key] = result
            finished.append((key, result))
        return finished

    def fetched(self) -> list[Fetch]:
        """The model downloads finished since the last call (cache hits transfer nothing and are left out)."""
        out = []
        while not self._fetched.empty():
            out.append(self._fetched.get())
        return out

    def seen(self) -> None:
        """A tick decided with `prepared`: a result is seen by exactly one tick (passing gates are kept in the store)."""
        self.prepared = {}

    def start(self, version: VersionRecord, desired: Desired) -> None:
        """Fetch and verify a version's model, then gate it, in the background; a later tick reads the result."""
        key = (version.release, version.version, desired.gate_key)
        if key in self.preparing or key in self.prepared:
            return
        if registry_ref(version.spec.model.uri) is not None:  # resolved first; the observe phase attaches the source
            self.registry_link().resolve(version, key, self._pool, self._finish, self.on_prepared)
            return
        model, placement = version.spec.model, self.placement
        model_commit = self._model_commit(version, desired)
        models = pinned_models(version.spec)
        passed = self.store.passed_gate(*key)
        local = placement.local
        quality = {name: placement.for_replicas(pin) for name, pin in quality_pins(desired.release).items()}
        check = desired.release.spec.checks.quality
        wants_distance = check is not None and check.max_distance is not None
        gate = gate_input(desired.release, version.version, self.source, self.cache_dir if local else None,
                          model_commit=model_commit, checks_commit=desired.commit, model=placement.for_replicas(model),
                          repo=any(placement.reads_repo(pin) for _, pin in models), quality_models=quality,
                          quality_baseline=latest_features(self.gate_dir / version.release, version.version) if wants_distance else None)
        resources = version.spec.replicas

        def work() -> Prepared:
            started = time.monotonic()
            for what, pinned in models:
                refusal = placement.refusal(pinned)
                if refusal is not None:
                    return Prepared(False, f"{what} unreachable from the cluster: {refusal}", 0.0)
                try:
                    fetched = fetch(pinned.uri, pinned.digest, self.cache, repo=self.source.path, commit=model_commit,
                                    reverify=True, heal=True,  # a damaged cached copy is fetched again, never gated
                                    allowed_roots=self.registry_link().roots(pinned.uri))  # a registered local source
                    if fetched.bytes_transferred:
                        self._fetched.put(Fetch(version.release, version.version, store_of(pinned.uri), fetched.bytes_transferred))
                    if placement.publishes(pinned):
                        publish(fetched.path, placement.for_replicas(pinned).uri)
                except ArtifactError as err:
                    return Prepared(False, f"{what} refused: {err}", time.monotonic() - started)
                except Exception as err:  # network, permissions: the version fails with the reason, the controller goes on
                    return Prepared(False, f"{what} fetch failed: {type(err).__name__}: {err}", time.monotonic() - started)
            if passed is not None:
                return Prepared(True, "checks passed before for this version and these checks (reused, not run again)",
                                time.monotonic() - started)
            prefetch = self.prefetch if self.prefetch is not None and not local else None
            prefetching = prefetch.start(version.release, version.version, placement.for_replicas(model), resources.cpus,
                                         resources.gpus) if prefetch is not None else None
            report = self.gate.run(gate, resources.cpus, resources.gpus)
            if prefetch is not None and prefetching is not None:
                prefetch.report(prefetching)
            if self.gate_runs is not None:  # tracked in the background: the gate's result does not wait for the store
                self.gate_runs.submit(report, version.spec, desired.commit, desired.gate_key)
            return judge(report, time.monotonic() - started, self.gate_dir)

        def done(future: Future[Prepared]) -> None:
            if not future.cancelled():
                self._finished.put((key, future.result()))
                self.on_prepared()

        note = "reusing its passed checks" if passed else "running the gate as a Ray job"
        log.info("%s: verifying model %s for %s, then %s; next: start replicas if it passes",
                 version.release, model.digest[:19], version.version, note)
        future = self._pool.submit(work)
        self.preparing[key] = future
        future.add_done_callback(done)

    def _model_commit(self, version: VersionRecord, desired: Desired) -> str:
        """The commit a repo model is read at: the version's own, or the desired one when this repo does not hold it (a
        version adopted from a history this clone lacks: the same version id pins the same model, and its digest is
        verified whichever commit it is read at)."""
        if not self.source.holds(version.commit):
            log.info("%s: %s was deployed from commit %s, which this repo does not hold; next: reading its model at %s "
                     "(same version, same pinned digest)", version.release, version.version, version.commit[:12], desired.commit[:12])
            return desired.commit
        return version.commit

    def registry_link(self) -> RegistryLink:
        """The model registry this controller resolves models:/ URIs through (default: the state dir's MLflow store)."""
        if self.registry is None:
            self.registry = RegistryLink.for_state_dir(self.store.path.parent)
        return self.registry

    def _finish(self, key: Key, result: Prepared) -> None:
        """A preparation that ended before its fetch (a refused models:/ URI), handed to the next tick."""
        self._finished.put((key, result))
        self.on_prepared()

    def close(self) -> None:
        """Cancel queued preparations and stop running gate jobs so the process can exit now."""
        stopping = getattr(self.gate, "stopping", None)  # a gate running Ray jobs stops them when this is set
        if isinstance(stopping, threading.Event):
            stopping.set()
        self._pool.shutdown(wait=False, cancel_futures=True)


def latest_features(release_dir: Path, version: str) -> dict[str, Any] | None:
    """The newest quality-check image features another version of the release left under the gate dir, or None."""
    found = sorted((p for p in release_dir.glob(f"*/{FEATURES_NAME}") if p.parent.name != version), key=lambda p: p.stat().st_mtime)
    for path in reversed(found):
        try:
            features: dict[str, Any] = json.loads(path.read_text())
            return features
        except (OSError, ValueError):
            continue
    return None


def judge(report: GateReport, seconds: float, gate_dir: Path) -> Prepared:
    """A gate report as a preparation result; a failure's images are saved under `gate_dir` and named. The quality
    check's image features are saved either way: the next version's gate measures its distance to them."""
    kept = report.to_dict(with_artifacts=False)
    if FEATURES_NAME in report.artifacts:
        features = replace(report, artifacts={FEATURES_NAME: report.artifacts[FEATURES_NAME]})
        features.save_artifacts(gate_dir / report.release / report.version)
    if report.ok:
        return Prepared(True, f"checks passed: {report.summary()}", seconds, kept)
    saved = [p for p in report.save_artifacts(gate_dir / report.release / report.version) if p.name != FEATURES_NAME]
    where = f" (images: {', '.join(str(p) for p in saved)})" if saved else ""
    return Prepared(False, f"checks failed: {report.summary()}{where}", seconds, kept)
