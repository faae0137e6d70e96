"""The registry side of a reconcile: `models:/` URIs resolved before a version is prepared, and registry drift.

Between the apply phase (`controller.tick.prepare` asks `RegistryLink.resolve`
for a version whose model is `models:/NAME@ALIAS` or `models:/NAME/N`; the
lookup runs in the preparation pool, never on the loop) and the observe phase
(`attach` puts the resolved source into the version's recorded spec, where
`_follow_light_changes` keeps it: the model location stays what the version
was prepared from, saved with the state, so a later alias move never changes a
running version, and render and the gate read a plain URI). A registered digest
other than the pin refuses the version (the last good version keeps serving).
`DriftWatch` re-resolves the URIs of serving releases every `interval_s` off
the loop and records, logs and counts an alias that moved to another digest
(or a registry it cannot reach): status shows it; nothing that serves changes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from controller.metrics import ControllerMetrics
from controller.rollout.outcomes import Prepared
from controller.state.records import ReleaseRecord, VersionRecord
from controller.state.store import Store
from controller.tracking.mlflow_store import Tracker
from controller.tracking.registry import ModelRegistry, RegisteredVersion, RegistryError, RegistryRef, drift, refusal, registry_ref

__all__ = ["DEFAULT_INTERVAL_S", "DriftWatch", "RegistryLink", "Resolved", "attach", "drift_changes", "serving_refs", "watch"]

log = logging.getLogger("diffops.controller")
DEFAULT_INTERVAL_S = 60.0
Key = tuple[str, str, str]


@dataclass(frozen=True)
class Resolved:
    """A version's `models:/` URI as resolved once: the registered version and where its bytes are."""

    ref: str  # the release's models:/ URI
    registered: str  # models:/NAME/N
    source: str


def attach(versions: Iterable[VersionRecord], resolved: dict[tuple[str, str], Resolved]) -> list[VersionRecord]:
    """The versions, each still naming a `models:/` URI it has a resolution for now naming the resolved source. Pure."""
    out = []
    for version in versions:
        found = resolved.get((version.release, version.version))
        if found is not None and registry_ref(version.spec.model.uri) is not None:
            model = version.spec.model.model_copy(update={"uri": found.source})
            version = replace(version, spec=version.spec.model_copy(update={"model": model}))
        out.append(version)
    return out


def serving_refs(releases: Iterable[ReleaseRecord], versions: Iterable[VersionRecord]) -> list[tuple[str, RegistryRef, str]]:
    """(release, its models:/ URI, the digest it pins) for each release that names a registered model and serves. Pure."""
    serving = {v.release for v in versions if v.weight > 0 and v.status == "ready"}
    out = []
    for record in releases:
        ref = registry_ref(record.spec.model.uri) if record.spec is not None else None
        if ref is not None and record.name in serving and record.spec is not None:
            out.append((record.name, ref, record.spec.model.digest))
    return sorted(out, key=lambda item: item[0])


def drift_changes(recorded: dict[str, str], found: dict[str, str | None]) -> tuple[dict[str, str], list[str]]:
    """What to report: drift that started or changed (release -> message), and releases whose drift ended. Pure.
    A release no longer checked (not serving, no registry URI) ends its drift."""
    started = {name: message for name, message in found.items() if message is not None and recorded.get(name) != message}
    ended = sorted(name for name in recorded if found.get(name) is None)
    return started, ended


class RegistryLink:
    """The controller's registry: resolutions of versions being prepared, and the drift watch."""

    def __init__(self, registry: ModelRegistry, interval_s: float = DEFAULT_INTERVAL_S):
        self.registry = registry
        self.resolved: dict[tuple[str, str], Resolved] = {}  # (release, version) -> resolution, until attached and saved
        self._resolving: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self.watch = DriftWatch(registry, interval_s)

    @classmethod
    def for_state_dir(cls, state_dir: Path, uri: str | None = None, interval_s: float = DEFAULT_INTERVAL_S) -> RegistryLink:
        return cls(ModelRegistry(Tracker.for_state_dir(state_dir, uri)), interval_s)

    def roots(self, uri: str) -> tuple[Path, ...]:
        """The allowed root for a `file:///` source the registry resolved (a release file's absolute path gets none)."""
        with self._lock:
            known = any(r.source == uri for r in self.resolved.values())
        return (Path(uri.removeprefix("file://")),) if known and uri.startswith("file:///") else ()

    def resolve(self, version: VersionRecord, key: Key, pool: Executor, finish: Callable[[Key, Prepared], None],
                woken: Callable[[], None]) -> None:
        """Resolve the version's `models:/` URI in `pool`: a match is kept for `attach` (then `woken`), a refusal
        finishes the preparation as failed. Asked again while it runs or once done: nothing happens."""
        at = (version.release, version.version)
        with self._lock:
            if at in self._resolving or at in self.resolved:
                return
            self._resolving.add(at)
        ref = registry_ref(version.spec.model.uri)
        assert ref is not None
        pinned = version.spec.model.digest

        def work() -> None:
            started = time.monotonic()
            try:
                found = self.registry.lookup(ref)
                problem = refusal(ref, pinned, found, version.release)
            except RegistryError as err:
                found, problem = None, f"{err}; `diffops retry {version.release}` once the registry answers"
            with self._lock:
                self._resolving.discard(at)
                if problem is None and found is not None:
                    self.resolved[at] = Resolved(ref.uri, found.uri, found.source)
            if problem is not None or found is None:
                log.warning("%s: model %s refused for %s: %s (%.2fs)", version.release, ref.uri, version.version, problem,
                            time.monotonic() - started)
                finish(key, Prepared(False, f"model {ref.uri} refused: {problem}", time.monotonic() - started))
                return
            log.info("%s: %s resolved to %s at %s (%s) for %s in %.2fs; next: fetch and verify it, then run the checks",
                     version.release, ref.uri, found.uri, found.source, pinned[:19], version.version, time.monotonic() - started)
            woken()

        log.info("%s: resolving %s in the registry at %s for %s; next: fetch the registered version if its digest is %s",
                 version.release, ref.uri, self.registry.uri, version.version, pinned[:19])
        pool.submit(work)


class DriftWatch:
    """Re-resolves the registry URIs of serving releases every `interval_s`, off the loop, and reports drift."""

    def __init__(self, registry: ModelRegistry, interval_s: float):
        self.registry, self.interval_s = registry, interval_s
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="registry")
        self._check: Future[dict[str, tuple[str, str | None]]] | None = None
        self._next_at = 0.0

    def poll(self, releases: Iterable[ReleaseRecord], versions: Iterable[VersionRecord], recorded: dict[str, dict[str, Any]],
             now: float) -> tuple[dict[str, dict[str, Any]], list[str]] | None:
        """Start a check when due; once one finished: (drift that started or changed, releases whose drift ended)."""
        result = None
        if self._check is not None and self._check.done():
            found, self._check = self._check.result(), None
            started, ended = drift_changes({k: v["message"] for k, v in recorded.items()}, {k: m for k, (_, m) in found.items()})
            result = ({name: {"uri": found[name][0], "message": message, "since": recorded.get(name, {}).get("since", now),
                              "checked_at": now} for name, message in started.items()}, ended)
        if self._check is None and now >= self._next_at:
            self._next_at = now + self.interval_s
            targets = serving_refs(releases, versions)
            if targets or recorded:
                self._check = self._pool.submit(self._lookups, targets)
        return result

    def _lookups(self, targets: list[tuple[str, RegistryRef, str]]) -> dict[str, tuple[str, str | None]]:
        out: dict[str, tuple[str, str | None]] = {}
        for release, ref, pinned in targets:
            found: RegisteredVersion | None = None
            error = None
            try:
                found = self.registry.lookup(ref)
            except RegistryError as err:
                error = str(err)
            out[release] = (ref.uri, drift(ref, pinned, found, error, release))
        return out


def watch(link: RegistryLink, releases: Iterable[ReleaseRecord], versions: Iterable[VersionRecord], store: Store,
          metrics: ControllerMetrics | None, now: float) -> None:
    """The observe phase's registry check: a finished check's drift recorded (`diffops status`), logged once when it
    starts or changes and once when it ends, and counted; the next check started when due. Nothing else changes."""
    recorded = store.registry_drift()
    changes = link.watch.poll(releases, versions, recorded, now)
    if changes is None:
        return
    started, ended = changes
    for name, entry in started.items():
        store.set_registry_drift(name, entry)
        log.warning("%s: registry drift: %s; next: check again in %.0fs", name, entry["message"], link.watch.interval_s,
                    extra={"subject": name, "event": "registry-drift"})
        if metrics is not None:
            metrics.set_registry_drift(name, True)
    for name in ended:
        since = recorded[name]["since"]
        store.set_registry_drift(name, None)
        log.info("%s: registry drift over: %s agrees with the release again after %.0fs; next: nothing to do", name,
                 recorded[name]["uri"], now - since, extra={"subject": name, "event": "registry-drift-over"})
        if metrics is not None:
            metrics.set_registry_drift(name, False)
