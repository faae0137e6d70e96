"""Reconcile cost: the controller's own work per tick, by number of releases, on a long history.

The real `controller.reconciler.Reconciler` on a real git repo (built with git
fast-import: N release files, an H-commit history) with a real SQLite store;
Ray Serve and the gate are faked at our own boundary (`bench.fakes`), so the
figures are git, parsing, planning, rendering and recording only.

Per size: a no-op reconcile (the branch head has not moved; median tick) and a
one-release change (a light edit to one release file, appended as a commit,
reconciled until applied; median over a few changes). Baselines: the no-op at
the smallest size (does an idle tick grow with the repo?) and the no-op at the
same size (what does a change add?). Wall time around `reconcile()`.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.context import Context
from bench.fakes import InstantServe, PassingGate
from bench.gitrepo import append_commit, blob_text, build_history, release_name
from bench.progress import Say, quiet
from bench.report import Figure, ratio
from controller.apply.serve_config import RenderSettings
from controller.reconciler import Reconciler
from controller.source.git_source import ReleaseSource
from controller.state.store import State, Store

SIZES, QUICK_SIZES = (10, 100, 1000), (10, 100)
HISTORY, QUICK_HISTORY = 1000, 100
CHANGES = 3


@dataclass
class Measured:
    releases: int
    history: int
    settle_s: float
    noop_s: list[float]
    noop_applies: int  # Serve applies during the no-op ticks (0 expected)
    change_s: list[float]  # per change: the ticks until it was applied, summed
    change_ticks: list[int]
    changed_apps: list[list[str]] = field(default_factory=list)  # apps whose config each change touched
    rss_mb: float = 0.0  # this process's resident memory with the reconciler settled at this size (for sizing)


def applied(state: State, head: str) -> bool:
    return state.controller.last_applied_commit == head and all(r.phase == "Healthy" for r in state.releases.values())


def tick_until_applied(reconciler: Reconciler, head: str, timeout_s: float, say: Say = quiet) -> tuple[float, int]:
    """Reconcile until `head` is applied everywhere; returns (seconds inside reconcile(), ticks)."""
    deadline, spent, ticks, reported = time.monotonic() + timeout_s, 0.0, 0, time.monotonic()
    while True:
        started = time.perf_counter()
        reconciler.reconcile()
        spent, ticks = spent + time.perf_counter() - started, ticks + 1
        if applied(reconciler.state, head):
            return spent, ticks
        if time.monotonic() - reported > 10:
            healthy = sum(1 for r in reconciler.state.releases.values() if r.phase == "Healthy")
            say(f"{healthy}/{len(reconciler.state.releases)} releases Healthy after {ticks} ticks")
            reported = time.monotonic()
        if time.monotonic() > deadline:
            phases = sorted({(r.phase, r.message) for r in reconciler.state.releases.values()})[:3]
            raise RuntimeError(f"{head[:12]} not applied after {timeout_s:.0f}s: {phases}")
        time.sleep(0.02)  # background preparations (model fetch, gate) finish between ticks


def light_edit(text: str, number: int) -> str:
    return re.sub(r"max_queued_requests: \d+", f"max_queued_requests: {16 + number}", text)


def measure(releases: int, history: int, workdir: Path, say: Say, changes: int = CHANGES) -> Measured:
    repo, state_dir = workdir / f"repo-{releases}", workdir / f"state-{releases}"
    say(f"{releases} releases, {history}-commit history: building the repo with git fast-import")
    head = build_history(repo, releases, history)
    serve = InstantServe()
    settings = RenderSettings(repo=str(repo), cache_dir=str(state_dir / "models"))
    reconciler = Reconciler(ReleaseSource.open(repo), Store(state_dir / "state.db"), serve, settings, gate=PassingGate())
    try:
        say(f"{releases} releases: first rollout of every release (fake Serve and gate)")
        started = time.monotonic()
        tick_until_applied(reconciler, head, timeout_s=120 + releases * 0.5, say=say)
        settle_s = time.monotonic() - started
        reconciler.reconcile()  # one settling tick, not timed
        applies = serve.applies
        say(f"{releases} releases: settled in {settle_s:.1f}s; timing no-op reconciles")
        noop = []
        for _ in range(max(5, min(30, 3000 // releases))):
            started_tick = time.perf_counter()
            reconciler.reconcile()
            noop.append(time.perf_counter() - started_tick)
        rss_mb = psutil.Process().memory_info().rss / 2**20
        measured = Measured(releases, history, settle_s, noop, serve.applies - applies, [], [], rss_mb=rss_mb)
        say(f"{releases} releases: timing {changes} one-release changes")
        target = release_name(0)
        for number in range(1, changes + 1):
            text = light_edit(blob_text(repo, f"releases/{target}.yaml"), number)
            head = append_commit(repo, {f"releases/{target}.yaml": text.encode()}, f"{target}: max_queued_requests")
            spent, ticks = tick_until_applied(reconciler, head, timeout_s=60)
            measured.change_s.append(spent)
            measured.change_ticks.append(ticks)
            measured.changed_apps.append(sorted(serve.changed_apps))
        return measured
    finally:
        reconciler.close()
        reconciler.store.db.close()


def figures(results: list[Measured]) -> list[Figure]:
    smallest = results[0]
    base_ms = statistics.median(smallest.noop_s) * 1000
    out = []
    for m in results:
        noop_ms = statistics.median(m.noop_s) * 1000
        detail = {"releases": m.releases, "history_commits": m.history, "settle_s": round(m.settle_s, 2),
                  "noop_ms": [round(s * 1000, 2) for s in m.noop_s], "noop_serve_applies": m.noop_applies,
                  "change_ms": [round(s * 1000, 2) for s in m.change_s], "change_ticks": m.change_ticks,
                  "changed_apps": m.changed_apps, "rss_mb": round(m.rss_mb, 1)}
        if m is not smallest:
            out.append(Figure("reconcile", f"no-op reconcile, {m.releases} releases", noop_ms, "ms",
                              f"no-op, {smallest.releases} releases", base_ms, ratio(noop_ms, base_ms), detail=detail))
        if m is not smallest:
            out.append(Figure("reconcile", f"controller resident memory, {m.releases} releases", round(m.rss_mb, 1), "MB",
                              f"{smallest.releases} releases", round(smallest.rss_mb, 1), ratio(m.rss_mb, smallest.rss_mb),
                              detail={"releases": m.releases}))
        change_ms = statistics.median(m.change_s) * 1000
        out.append(Figure("reconcile", f"one-release change, {m.releases} releases", change_ms, "ms",
                          f"no-op, {m.releases} releases", noop_ms, ratio(change_ms, noop_ms), detail=detail))
    return out


def run(workdir: Path, say: Say, sizes: tuple[int, ...] = SIZES, history: int = HISTORY,
        changes: int = CHANGES) -> list[Figure]:
    return figures([measure(size, history, workdir, say, changes) for size in sizes])


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.workdir, ctx.say, QUICK_SIZES if ctx.quick else SIZES, QUICK_HISTORY if ctx.quick else HISTORY)
