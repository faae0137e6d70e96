"""One reconcile: git -> desired releases -> rollout steps -> Serve config -> SQLite, as named phases.

The shell that runs a tick's phases (`controller.tick`) in order, each small
and tested alone:

1. observe  (`controller.tick.observe`): Ray Serve's apps (ours and others'),
   routers' confirmed weights, free resources, finished preparations, pending
   commands, each release's gate key and canary figures: one `TickInput`.
2. decide   (`controller.tick.decide`, pure): every release's rollout step,
   a failing one mapped to its phase: one `Plan` (or a `Halt`).
3. record   (`controller.tick.record`): the plan saved in one transaction
   before anything is acted on.
4. apply    (`controller.tick.apply`): the rendered Serve config applied,
   drift healed.
5. annotate (`controller.tick.annotate`): git notes, revert commits, pushes.
6. costs    (`controller.tick.costs`): GPU-seconds, bytes and images integrated
   from the recorded state and the releases' tallies, every few seconds.

Then the record phase logs the decisions (timed to here) and the apply phase
starts the background preparations (`controller.tick.prepare`) and keeps the
model cache under its cap. Long work runs in a thread pool and is picked up by
a later tick. Errors follow one taxonomy (`controller.errors`), mapped in one
place each: in `reconcile` for the tick (temporary: backoff with jitter) and in
decide for one release (its phase and message; the loop and the other
releases go on).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from controller import errors
from controller.apply.applier import Applier
from controller.apply.serve_client import ServeApi
from controller.apply.serve_config import RenderSettings
from controller.gate.prefetch import Prefetch
from controller.gate.runner import Gate, LocalGate
from controller.metrics import ControllerMetrics
from controller.source.git_source import ReleaseSource, Snapshot
from controller.source.signatures import SignatureGate
from controller.state.store import State, Store
from controller.tick import annotate, apply, decide, record
from controller.tick.costs import CostBook, WorkReader
from controller.tick.observe import Observer
from controller.tick.prepare import Preparations
from controller.tick.registry import RegistryLink
from controller.tracking.gate_runs import GateRuns
from controller.tracking.live_quality import QualityLog
from serving.artifacts import ModelCache

__all__ = ["Reconciler", "TickResult"]

log = logging.getLogger("diffops.controller")


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
                 rand: Callable[[], float] = random.random, cache_max_bytes: int | None = None,
                 gate_runs: GateRuns | None = None, registry: RegistryLink | None = None,
                 quality_log: QualityLog | None = None, prefetch: Prefetch | None = None):
        self.source, self.store, self.serve, self.settings = source, store, serve, settings
        self.signatures = signatures  # --require-signed-commits: only a HEAD signed by a trusted key is reconciled
        self.gate = gate or LocalGate()
        self.branch, self.clock, self.metrics = branch, clock, metrics
        self.reverts = annotate.Reverts(revert_on_abort, branch)
        self.state: State = store.load()
        self.snapshot: Snapshot | None = None
        self.rand = rand  # jitter of the retry backoff
        self.failed_ticks = 0  # consecutive ticks that ended early on an error (the backoff's attempt)
        self.reported: dict[str, str] = {}  # subject -> summary of the traceback last logged for it (logged once)
        policy = decide.Policy(allow_prune_all=allow_prune_all, allow_faults=allow_faults)
        self.observer = Observer(source, serve, settings.owner, policy, clock, metrics)
        self.applier = Applier(serve, metrics)
        cache = ModelCache(Path(settings.cache_dir))
        self.cache = apply.CacheKeeper(cache, cache_max_bytes, metrics)  # --cache-max-bytes: evict unused models past it
        self.preparations = Preparations(source, store, self.gate, cache, settings.cache_dir,
                                         gate_dir or Path(settings.cache_dir).parent / "gate", on_prepared, settings.placement,
                                         gate_runs, registry, prefetch)
        self.quality_log = quality_log  # each version's quality in serving, onto its gate's tracking run
        self.costs = CostBook(store, cache, serve if isinstance(serve, WorkReader) else None, metrics, clock)

    def reconcile(self) -> TickResult:
        started = time.monotonic()
        try:
            head = self._admitted_head()
            if head is None:
                seconds = time.monotonic() - started
                self._count("refused", seconds)
                return TickResult(True, False, seconds)
            self.snapshot = self.source.snapshot(head, base=self.snapshot)
            busy = self._tick(head, self.snapshot)
        except Exception as err:  # the one place a tick's error becomes a retry delay and a log line
            self.failed_ticks += 1
            outcome = errors.tick_outcome(err, self.failed_ticks, self.rand)
            seconds = time.monotonic() - started
            self._report("controller", outcome.message, err if outcome.traceback else None, seconds)
            self._count(outcome.result, seconds)
            return TickResult(False, False, seconds, retry_in=outcome.retry_in)
        if self.failed_ticks or self.reported.pop("controller", None) is not None:
            log.info("controller: reconcile works again after %d failed tick(s); next: tick as usual", self.failed_ticks)
        self.failed_ticks = 0
        seconds = time.monotonic() - started
        self._count("ok", seconds)
        return TickResult(True, busy, seconds)

    def _admitted_head(self) -> str | None:
        """The commit to reconcile: the branch head, or with --require-signed-commits the last accepted one (None:
        nothing accepted yet; the refusal is recorded for `diffops status`)."""
        self.source.refresh()
        head: str = self.source.resolve(f"refs/heads/{self.branch}" if self.branch else None).hexsha
        if self.signatures is None:
            return head
        recorded = self.state.controller
        admitted = self.signatures.admit(head, recorded.last_attempted_commit, recorded.refused, self.clock())
        if admitted.refused != recorded.refused:
            self.state = replace(self.state, controller=replace(recorded, refused=admitted.refused))
            if admitted.commit is None:
                self.store.save(self.state)  # nothing else to record: the refusal alone
        return admitted.commit

    def _tick(self, head: str, snapshot: Snapshot) -> bool:
        """observe -> decide -> record -> apply -> annotate; True while some rollout is in progress."""
        seen = self.observer.observe(head, snapshot, self.state, self.applier.ever, self.store, self.preparations)
        self.cache.due = self.cache.due or seen.finished > 0
        plan = decide.decide(seen.tick)
        self._say(plan.notes)
        if isinstance(plan, decide.Halt):
            raise plan.error
        self.preparations.seen()
        good = self.state.controller.last_applied_commit
        self.state = plan.state
        record.save(self.store, plan, seen.gates, seen.tick.commands)
        for healed in apply.apply(self.applier, plan.state, self.settings, seen.others):
            self.observer.forget(healed.release)
        annotate.annotate(self.source.repo, plan.events, head, good, self.reverts)
        record.announce(plan.events, seen.started)
        for version, desired in plan.prepare:
            self.preparations.start(version, desired)
        self.cache.evict(self.state.versions)
        record.count(self.metrics, self.state)
        self.costs.gated(self.state, seen.gates)
        self.costs.fetched(self.preparations.fetched())
        self.costs.tick(self.state)
        if self.quality_log is not None:
            self.quality_log.tick(self.store, self.clock())
        self._attach_gate_runs()
        return plan.busy

    def _attach_gate_runs(self) -> None:
        """Each gate logged in the background, named in its recorded report (status and history link it); one whose
        report is recorded by a later tick waits for it."""
        runs = self.preparations.gate_runs
        if runs is None:
            return
        for item in runs.collect():
            if not self.store.attach_gate_run(*item):
                runs.back(item)

    def _say(self, notes: Iterable[decide.Note]) -> None:
        """Log what decide noted per release, in release order; a failure's traceback once while it repeats."""
        for note in notes:
            if isinstance(note, decide.Adopted):
                log.info("%s: adopted running app %s (%d replicas) instead of redeploying it; next: reconcile it like any release",
                         note.release, note.app, note.running)
            elif isinstance(note, decide.Failed):
                self._report(note.release, note.message, note.error if note.traceback else None, 0.0)
            elif self.reported.pop(note.release, None) is not None:
                log.info("%s: reconcile step works again; next: reconcile it as usual", note.release)

    def _report(self, subject: str, message: str, err: BaseException | None, seconds: float) -> None:
        """Log a failure; an unexpected one with its traceback, once while the same summary repeats."""
        if err is None:
            log.warning("%s: %s (%.0f ms)", subject, message, seconds * 1000)
        elif self.reported.get(subject) != errors.summary(err):
            self.reported[subject] = errors.summary(err)
            log.error("%s: %s (%.0f ms)", subject, message, seconds * 1000, exc_info=err)
        else:
            log.debug("%s: %s (same failure as before; traceback logged then)", subject, message)

    def _count(self, result: str, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_reconcile(result, seconds)

    def close(self) -> None:
        """Stop: cancel queued preparations and stop running gate jobs so the process can exit now."""
        self.preparations.close()
        if self.preparations.gate_runs is not None:
            self.preparations.gate_runs.close()
        if self.quality_log is not None:
            self.quality_log.close()
