"""One reconcile: git -> desired releases -> rollout steps -> Serve config -> SQLite.

The shell around the pure steps. Each tick recomputes from the branch head,
the recorded state and what Ray Serve reports; long work (model fetch and
verification) runs in a thread pool and is picked up by a later tick. Only
applications this controller owns are observed as its own (`controller.apply.drift`);
the apply step re-applies what drifted (`controller.apply.applier`). Errors follow
one taxonomy (`controller.errors`), mapped here only: in `reconcile` for the
tick (temporary: backoff with jitter) and in `_failed_step` for one release
(its phase and message; the loop and the other releases go on).
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from git import GitCommandError

from checks.report import GateReport
from controller import errors
from controller.apply import drift
from controller.apply.applier import Applier
from controller.apply.serve_client import ServeApi
from controller.apply.serve_config import ROUTER_CPUS, RenderSettings, render, rendered_versions, router_weights
from controller.gate.runner import Gate, LocalGate, gate_input, gate_key, reference_blob
from controller.metrics import ControllerMetrics
from controller.plan.versions import version_id
from controller.rollout import steps as rollout
from controller.source.git_source import ReleaseFile, ReleaseSource, Snapshot
from controller.source.signatures import SignatureGate
from controller.state import git_notes, git_revert
from controller.state.records import Command, Event, ObservedApp, ReleaseRecord, VersionRecord, app_name, with_phase
from controller.state.store import State, Store
from serving.artifacts import ModelCache, fetch
from serving.manifest import ArtifactError

log = logging.getLogger("diffops.controller")
VERSION_ID_CACHE = 10_000


@dataclass(frozen=True)
class TickResult:
    ok: bool
    busy: bool  # some rollout is in progress: tick again soon
    seconds: float
    retry_in: float | None = None


class Reconciler:
    def __init__(self, source: ReleaseSource, store: Store, serve: ServeApi, settings: RenderSettings, *,
                 branch: str | None = None, allow_prune_all: bool = False, clock: Callable[[], float] = time.time,
                 on_prepared: Callable[[], None] = lambda: None, metrics: ControllerMetrics | None = None,
                 gate: Gate | None = None, gate_dir: Path | None = None, allow_faults: bool = False,
                 revert_on_abort: str = "off", signatures: SignatureGate | None = None,
                 rand: Callable[[], float] = random.random, cache_max_bytes: int | None = None):
        self.source, self.store, self.serve, self.settings = source, store, serve, settings
        self.signatures = signatures  # --require-signed-commits: only a HEAD signed by a trusted key is reconciled
        self.gate = gate or LocalGate()
        self.allow_faults = allow_faults
        self.revert_on_abort = revert_on_abort
        self.gate_dir = gate_dir or Path(settings.cache_dir).parent / "gate"
        self.branch, self.allow_prune_all, self.clock = branch, allow_prune_all, clock
        self.on_prepared, self.metrics = on_prepared, metrics
        self.state: State = store.load()
        self.snapshot: Snapshot | None = None
        self.applier = Applier(serve, metrics)
        self.rand = rand  # jitter of the retry backoff
        self.failed_ticks = 0  # consecutive ticks that ended early on an error (the backoff's attempt)
        self.reported: dict[str, str] = {}  # subject -> summary of the traceback last logged for it (logged once)
        self.confirmed: dict[str, dict[str, int]] = {}  # router weights each router has confirmed serving
        self.prepared: dict[tuple[str, str, str], rollout.Prepared] = {}  # (release, version, gate key)
        self.preparing: dict[tuple[str, str, str], Future] = {}
        self.finished: queue.SimpleQueue[tuple[tuple[str, str, str], rollout.Prepared]] = queue.SimpleQueue()
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="prepare")
        self.cache = ModelCache(Path(settings.cache_dir))
        self.cache_max_bytes = cache_max_bytes  # --cache-max-bytes: evict unused models past it
        self.evict_due = True  # at start and after each finished fetch
        self.version_ids: dict[str, str] = {}  # release file blob -> version id

    def reconcile(self) -> TickResult:
        started = time.monotonic()
        try:
            self.source.refresh()
            head = self.source.resolve(f"refs/heads/{self.branch}" if self.branch else None).hexsha
            if self.signatures is not None:  # a refused HEAD: reconcile the last accepted commit, or nothing
                recorded = self.state.controller
                admitted = self.signatures.admit(head, recorded.last_attempted_commit, recorded.refused, self.clock())
                if admitted.refused != recorded.refused:
                    self.state = replace(self.state, controller=replace(recorded, refused=admitted.refused))
                    if admitted.commit is None:
                        self.store.save(self.state)  # nothing else to record: the refusal alone, for `diffops status`
                if admitted.commit is None:
                    seconds = time.monotonic() - started
                    self._count("refused", seconds)
                    return TickResult(True, False, seconds)
                head = admitted.commit
            self.snapshot = self.source.snapshot(head, base=self.snapshot)
            ours, others = drift.partition(self.serve.observe(), self.settings.owner, self._recorded_apps())
            busy = self._tick(head, self._confirm_weights(ours), others)
        except Exception as err:  # the one place a tick's error becomes a retry delay and a log line
            self.failed_ticks += 1
            outcome = errors.tick_outcome(err, self.failed_ticks, self.rand)
            seconds = time.monotonic() - started
            self._report("controller", outcome.message, err if outcome.traceback else None, seconds)
            self._count(outcome.result, seconds)
            return TickResult(False, False, seconds, retry_in=outcome.retry_in)
        if self.failed_ticks or self.reported.pop("controller", None):
            log.info("controller: reconcile works again after %d failed tick(s); next: tick as usual", self.failed_ticks)
        self.failed_ticks = 0
        seconds = time.monotonic() - started
        self._count("ok", seconds)
        return TickResult(True, busy, seconds)

    def _report(self, subject: str, message: str, err: BaseException | None, seconds: float) -> None:
        """Log a failure; an unexpected one with its traceback, once while the same summary repeats."""
        if err is None:
            log.warning("%s: %s (%.0f ms)", subject, message, seconds * 1000)
        elif self.reported.get(subject) != errors.summary(err):
            self.reported[subject] = errors.summary(err)
            log.error("%s: %s (%.0f ms)", subject, message, seconds * 1000, exc_info=err)
        else:
            log.debug("%s: %s (same failure as before; traceback logged then)", subject, message)

    def _recorded_apps(self) -> set[str]:
        """Apps we deployed (recorded, or applied by this process): unmarked ones by these names are ours (from before
        owner marks, or being deleted: Ray drops a deleting app's config)."""
        live = rendered_versions(self.state.versions)
        return {v.app for v in live} | {v.release for v in live} | self.applier.ever

    def _tick(self, head: str, observed: dict[str, ObservedApp], others: dict[str, ObservedApp]) -> bool:
        started, now = time.monotonic(), self.clock()
        gates: list[tuple[str, str, str, dict]] = []
        while not self.finished.empty():
            key, result = self.finished.get()
            self.preparing.pop(key, None)
            self.prepared[key] = result
            self.evict_due = True
            if result.report is not None:
                gates.append((*key, result.report))
        state, snapshot = self.state, self.snapshot
        assert snapshot is not None
        files = {PurePosixPath(path).stem: f for path, f in snapshot.files.items()}
        every_file_gone = not files and bool(state.releases)
        releases: dict[str, ReleaseRecord] = {}
        versions: list[VersionRecord] = []
        events: list[Event] = []
        to_prepare: list[tuple[VersionRecord, rollout.Desired]] = []
        commands = self.store.pending_commands()
        desired_versions = {name: self._version_id(f) for name, f in files.items() if f.release is not None}
        settled = {(v.release, v.version) for v in state.versions if v.status == "ready" and v.replicas is None}
        needs_room = any((name, version) not in settled for name, version in desired_versions.items())
        free = self._free_resources() if needs_room else None  # asked of Ray only while something must start
        for name in sorted(set(state.releases) | set(files)):
            record = state.releases.get(name)
            mine = [v for v in state.versions if v.release == name]
            asked = [c for c in commands if c.release == name]
            try:
                held = drift.holder(name, others)
                if held is not None:
                    raise errors.ReleaseError(held, "Failed")
                result, desired = self._step(name, files.get(name), desired_versions.get(name), record, mine, observed, head,
                                             every_file_gone, now, asked, free)
                if self.reported.pop(name, None) is not None:
                    log.info("%s: reconcile step works again; next: reconcile it as usual", name)
            except Exception as err:  # a failing release never blocks another
                result, desired = self._failed_step(name, err, record, mine, now), None
            if result.release is not None:
                releases[name] = result.release
            versions += result.versions
            events += [replace(e, commit=e.commit or head, at=now) for e in result.events]
            to_prepare += [(version, desired) for version in result.prepare if desired is not None]
        self.prepared = {}  # a result is seen by exactly one tick; passing gates are kept in the store
        for command in commands:
            if command.release not in releases:
                log.warning("%s: `%s` from %s ignored: no such release", command.release, command.action, command.who)
        all_live = all(r.phase == "Healthy" for r in releases.values())
        controller = replace(state.controller, last_attempted_commit=head, attempted_at=now)
        if all_live and controller.last_applied_commit != head:
            controller = replace(controller, last_applied_commit=head, applied_at=now)
        self.state = State(controller, releases, versions, observed)
        self.store.save(self.state, events, gates, consumed=commands)  # recorded before it is acted on
        for healed in self.applier.apply(render(releases.values(), versions, self.settings), observed, others):
            self.confirmed.pop(healed.release, None)  # ask the router again once it is back
        git_notes.annotate(self.source.repo, events)
        if self.revert_on_abort != "off":
            self._revert_aborted(events, head, state.controller.last_applied_commit)
        took_ms = (time.monotonic() - started) * 1000
        for event in events:
            log.info("%s: %s (decided in %.0f ms)", event.release, event.message, took_ms,
                     extra={"subject": event.release, "event": event.kind, "version": event.version})
        for version, desired in to_prepare:
            self._prepare(version, desired)
        if self.evict_due:
            self._evict()
        if self.metrics is not None:
            self.metrics.observe_state(self.state)
        return any(r.phase == "Progressing" or r.step is not None for r in releases.values())

    def _evict(self) -> None:
        """Keep the model cache under --cache-max-bytes; every model a recorded version pins (live, standby,
        being prepared or gated) is kept."""
        self.evict_due = False
        if self.cache_max_bytes:
            keep = {v.spec["model"]["digest"] for v in self.state.versions}
            self.cache.evict(self.cache_max_bytes, keep)
        if self.metrics is not None:
            self.metrics.cache_bytes.set(self.cache.size())

    def _failed_step(self, name: str, err: Exception, record: ReleaseRecord | None, versions: list[VersionRecord],
                     now: float) -> rollout.Step:
        """The one place a release's error becomes its phase and message; its versions (what serves) are kept."""
        serving = any(v.weight > 0 and v.status == "ready" for v in versions)
        outcome = errors.release_outcome(err, serving)
        if outcome.end_tick:
            raise err
        if outcome.phase is None:
            return rollout.Step(record, versions)
        if outcome.traceback or record is None or record.message != outcome.message:
            self._report(name, outcome.message, err if outcome.traceback else None, 0.0)
        base = record or ReleaseRecord(name, outcome.phase, outcome.message, None, None, None, now)
        return rollout.Step(with_phase(base, outcome.phase, outcome.message, now), versions)

    def _revert_aborted(self, events: list[Event], head: str, good: str | None) -> None:
        """After an automatic rollback, commit a revert so desired and live state agree again."""
        for event in events:
            if event.kind != "aborted" or "aborted by" in event.message:
                continue
            if good is None:
                log.warning("%s: no fully applied commit to revert to; next: revert the commit by hand", event.release)
                continue
            try:
                commit, ref = git_revert.revert_release(self.source.repo, head, event.release, good, event.message,
                                                        self.revert_on_abort, self.branch)
            except (git_revert.RevertError, GitCommandError) as err:
                log.warning("%s: could not commit a revert (%s); next: revert the commit by hand", event.release, err)
                continue
            log.info("%s: committed revert %s on %s (releases/%s.yaml as of %s); next: merge it so git matches what serves",
                     event.release, commit[:12], ref, event.release, good[:12], extra={"subject": event.release, "event": "reverted"})

    def _version_id(self, file: ReleaseFile) -> str:
        """A release file's version id, computed once per blob (a tick asks for every release)."""
        if file.blob not in self.version_ids:
            self.version_ids[file.blob] = version_id(file.release)
            if len(self.version_ids) > VERSION_ID_CACHE:
                self.version_ids.pop(next(iter(self.version_ids)))
        return self.version_ids[file.blob]

    def _free_resources(self) -> dict[str, float] | None:
        """Free CPUs/GPUs: the cluster's total minus the larger of Ray's reported usage (seconds old) and what our
        own apps and gate jobs hold right now, so a lagging report never lets a replica be overcommitted."""
        report = self.serve.cluster_resources()
        if report is None:
            return None
        held = {"CPU": ROUTER_CPUS * len({v.release for v in rendered_versions(self.state.versions)}), "GPU": 0.0}
        for version in rendered_versions(self.state.versions):  # retiring ones too: they hold resources until deleted
            count = version.replicas if version.replicas is not None else version.spec["replicas"]["count"]
            held["CPU"] += count * version.spec["replicas"]["cpus"]
            held["GPU"] += count * version.spec["replicas"]["gpus"]
        for release, version_id_, _ in self.preparing:
            version = next((v for v in self.state.versions if (v.release, v.version) == (release, version_id_)), None)
            if version is not None:
                held["CPU"] += version.spec["replicas"]["cpus"]
                held["GPU"] += version.spec["replicas"]["gpus"]
        return {name: max(0.0, total - max(used, held.get(name, 0.0))) for name, (used, total) in report.items()}

    def _confirm_weights(self, observed: dict[str, ObservedApp]) -> dict[str, ObservedApp]:
        """Attach each router's live weights; a router is asked only until it confirms the recorded ones."""
        self.confirmed = {name: weights for name, weights in self.confirmed.items() if name in observed}  # gone: ask again
        for name, app in observed.items():
            if "--" in name:
                continue
            recorded = router_weights(v for v in self.state.versions if v.release == name)
            live = recorded if self.confirmed.get(name) == recorded else self.serve.router_weights(name)
            if live == recorded:
                self.confirmed[name] = recorded
            observed[name] = replace(app, weights=live)
        return observed

    def _step(self, name: str, file: ReleaseFile | None, desired_version: str | None, record: ReleaseRecord | None,
              versions: list[VersionRecord], observed: dict[str, ObservedApp], head: str, every_file_gone: bool, now: float,
              commands: list[Command], free: dict[str, float] | None) -> tuple[rollout.Step, rollout.Desired | None]:
        if file is None:
            assert record is not None
            return rollout.removed(record, versions, allowed=self.allow_prune_all or not every_file_gone, now=now), None
        if file.release is None:
            return rollout.invalid(record, name, [str(e) for e in file.errors], versions, now), None
        if file.release.spec.faults is not None and not self.allow_faults:
            refusal = f"{file.path}: spec.faults is refused: fault injection needs the controller flag --allow-fault-injection"
            return rollout.invalid(record, name, [refusal], versions, now), None
        key = gate_key(file.release, reference_blob(self.source, head, file.release))
        desired = rollout.Desired(file.release, desired_version, head, f"{file.blob}:{key}", key)
        if record is None and not versions:
            versions = adopt(desired, observed, now)
        prepared = {version: result for (release, version, gate), result in self.prepared.items() if release == name and gate == key}
        walking = record is not None and any(v.role == "canary" and v.status == "ready" for v in versions)
        stats = self.serve.router_stats(name, record.analysis_at or now) if walking and record else None
        return rollout.step(name, now, desired, record, versions, observed, prepared, stats, commands, free), desired

    def _prepare(self, version: VersionRecord, desired: rollout.Desired) -> None:
        """Fetch and verify a version's model, then gate it, in the background; a later tick reads the result."""
        key = (version.release, version.version, desired.gate_key)
        if key in self.preparing or key in self.prepared:
            return
        model = version.spec["model"]
        passed = self.store.passed_gate(*key)
        gate = gate_input(desired.release, version.version, self.source, self.settings.cache_dir,
                          model_commit=version.commit, checks_commit=desired.commit, model=model)
        resources = version.spec["replicas"]

        def work() -> rollout.Prepared:
            started = time.monotonic()
            try:
                fetch(model["uri"], model["digest"], self.cache, repo=self.source.path, commit=version.commit,
                      reverify=True, heal=True)  # a damaged cached copy is fetched again, never gated
            except ArtifactError as err:
                return rollout.Prepared(False, f"model refused: {err}", time.monotonic() - started)
            except Exception as err:  # network, permissions: the version fails with the reason, the controller goes on
                return rollout.Prepared(False, f"model fetch failed: {type(err).__name__}: {err}", time.monotonic() - started)
            if passed is not None:
                return rollout.Prepared(True, "checks passed before for this version and these checks (reused, not run again)", time.monotonic() - started)
            report = self.gate.run(gate, resources["cpus"], resources["gpus"])
            return self._judge(report, time.monotonic() - started)

        def done(future: Future) -> None:
            if not future.cancelled():
                self.finished.put((key, future.result()))
                self.on_prepared()

        note = "reusing its passed checks" if passed else "running the gate as a Ray job"
        log.info("%s: verifying model %s for %s, then %s; next: start replicas if it passes",
                 version.release, model["digest"][:19], version.version, note)
        future = self.pool.submit(work)
        self.preparing[key] = future
        future.add_done_callback(done)

    def _judge(self, report: GateReport, seconds: float) -> rollout.Prepared:
        """A gate report as a preparation result; a failure's images are saved and named."""
        if report.ok:
            return rollout.Prepared(True, f"checks passed: {report.summary()}", seconds, report.to_dict(with_artifacts=False))
        saved = report.save_artifacts(self.gate_dir / report.release / report.version)
        where = f" (images: {', '.join(str(p) for p in saved)})" if saved else ""
        return rollout.Prepared(False, f"checks failed: {report.summary()}{where}", seconds, report.to_dict(with_artifacts=False))

    def _count(self, result: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_reconcile(result, seconds)

    def close(self) -> None:
        """Stop: cancel queued preparations and stop running gate jobs so the process can exit now."""
        getattr(self.gate, "stopping", threading.Event()).set()
        self.pool.shutdown(wait=False, cancel_futures=True)


def adopt(desired: rollout.Desired, observed: dict[str, ObservedApp], now: float) -> list[VersionRecord]:
    """With no record of a release, take over its desired version if Ray Serve already runs it."""
    app = observed.get(app_name(desired.release.name, desired.version))
    if app is None or not app.ready or not app.args:
        return []
    spec = {**desired.release.model_dump(mode="json")["spec"], "model": app.args["model"]}
    log.info("%s: adopted running app %s (%d replicas) instead of redeploying it; next: reconcile it like any release",
             desired.release.name, app.name, app.running)
    return [VersionRecord(desired.release.name, desired.version, "stable", 100, "ready", app.args["commit"], spec, now,
                          ready_at=now, deployed_args=app.args)]
