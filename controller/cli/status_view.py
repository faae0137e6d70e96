"""What `diffops status` and `diffops history` show, built from the recorded state. Pure.

`status_json` is the contract in DESIGN.md (plus `refused_commit`, the branch
head `--require-signed-commits` refused, and each version's `image_policy`);
`status_text` is the same for a terminal (with a post-promotion watch's time
left and last verdict); `history_rows` pairs each rollout's start with its
outcome, a rollback after promotion included.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, TypedDict

from controller.parse.release import Spec
from controller.state.records import Event, ReleaseRecord, app_name
from controller.state.store import State

__all__ = ["HistoryRow", "TimelineItem", "age", "analysis_summary", "checks_summary", "history_rows", "history_text", "image_policy",
           "load_text", "nodes_count", "nodes_text", "status_json", "status_text", "step_text", "watch_json", "watch_text", "with_runs"]

ROLE_ORDER = {"stable": 0, "canary": 1, "standby": 2}
LOAD_NAMES = {"fetch": "fetch", "verify": "verify", "load": "load", "warmup": "warm-up"}  # a replica's start, in order
OUTCOMES = {"promoted": "promoted", "failed": "failed", "abandoned": "abandoned", "rolled-back": "rolled back",
            "aborted": "rolled back (aborted)"}


class TimelineItem(TypedDict):
    after_s: float
    event: str
    message: str


class _HistoryRequired(TypedDict):
    version: str | None
    commit: str | None
    started_at: float
    finished_at: float | None
    outcome: str
    message: str
    timeline: list[TimelineItem]


class HistoryRow(_HistoryRequired, total=False):
    """One rollout in `diffops history -o json` (`checks`: what the gate said when the version was prepared)."""

    checks: str
    run: str  # the gate's tracking run (its link), when it was tracked


def checks_summary(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {"ok": report["ok"], "job": report.get("job"), "run": report.get("run"),
            "checks": {c["name"]: {"outcome": c["outcome"], "message": c["message"], "figures": c["figures"]} for c in report["checks"]}}


def quality_brief(summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """A version's quality in `diffops status` (`controller.quality.summarize`'s entry, trimmed); None without any."""
    if summary is None:
        return None
    return {"feedback": summary["feedback"], "reviews": summary["reviews"], "ratings": summary["ratings"]["count"],
            "mean_rating": summary["ratings"]["mean"], "flagged": summary["flagged"], "samples": summary["samples"]["count"],
            "mean_clip_score": summary["clip_score"]["mean"], "nsfw_rate": summary["nsfw"]["rate"]}


def load_text(load: dict[str, float] | None) -> str:
    """`  started in 3.1s (fetch 0.0s, verify 0.3s, load 2.4s, warm-up 0.4s)`: a version's latest replica start, or nothing."""
    if not load:
        return ""
    phases = ", ".join(f"{name} {load[phase]:.1f}s" for phase, name in LOAD_NAMES.items() if phase in load)
    return f"  started in {sum(load.values()):.1f}s ({phases})"


def quality_text(quality: dict[str, Any] | None) -> str:
    """`  quality 3 rated (mean 4.33), 1 flagged, 2 from reviewers, CLIP 27.1`, or nothing."""
    if not quality:
        return ""
    mean = f" (mean {quality['mean_rating']:.2f})" if quality["mean_rating"] is not None else ""
    parts = [f"{quality['ratings']} rated{mean}", f"{quality['flagged']} flagged", f"{quality['reviews']} from reviewers"]
    if quality["mean_clip_score"] is not None:
        parts.append(f"CLIP {quality['mean_clip_score']:.1f}")
    if quality["nsfw_rate"] is not None:
        parts.append(f"NSFW {quality['nsfw_rate']:.0%}")
    return "  quality " + ", ".join(parts)


def status_json(state: State, gates: dict[tuple[str, str], dict[str, Any]] | None = None,
                quality: dict[tuple[str, str], dict[str, Any]] | None = None) -> dict[str, Any]:
    """`quality`: `controller.quality.summarize` entries by (release, version)."""
    gates, quality = gates or {}, quality or {}
    releases = []
    for release in state.releases.values():
        versions = sorted((v for v in state.versions if v.release == release.name), key=lambda v: (ROLE_ORDER[v.role], v.version))
        router = state.apps.get(release.name)
        live = router.weights if router is not None and router.weights is not None else {}
        rows = []
        for version in versions:
            app = state.apps.get(app_name(release.name, version.version))
            rows.append({
                "id": version.version,
                "role": version.role,
                "weight": version.weight,
                "live_weight": live.get(version.version),
                "ready_replicas": app.running if app else 0,
                "replicas": version.spec.replicas.count,
                "nodes": nodes_count(app.nodes) if app else {},
                "status": version.status,
                "commit": version.commit,
                "image_policy": image_policy(version.spec),
                "gate": checks_summary(gates.get((release.name, version.version))),
                "quality": quality_brief(quality.get((release.name, version.version))),
                "load": state.load_phases.get((release.name, version.version)),
            })
        releases.append({
            "name": release.name,
            "phase": release.phase,
            "message": release.message,
            "desired_commit": release.desired_commit,
            "desired_version": release.desired_version,
            "updated_at": release.updated_at,
            "step": step_text(release),
            "analysis": release.analysis,
            "watch": watch_json(release),
            "registry_drift": state.registry_drift.get(release.name),
            "versions": rows,
        })
    return {
        "commit": state.controller.last_attempted_commit,
        "applied_commit": state.controller.last_applied_commit,
        "refused_commit": dataclasses.asdict(refused) if (refused := state.controller.refused) else None,
        "releases": releases,
    }


def nodes_count(nodes: tuple[str, ...]) -> dict[str, int]:
    """Running replicas per node address, e.g. {"198.18.0.3": 2}."""
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node] = counts.get(node, 0) + 1
    return dict(sorted(counts.items()))


def nodes_text(counts: dict[str, int]) -> str:
    """'198.18.0.3 x2, 198.18.0.4' for a status line."""
    return ", ".join(node if count == 1 else f"{node} x{count}" for node, count in counts.items())


def image_policy(spec: Spec) -> str:
    """`verify` unless the version's release said `runtime.image_policy: unverified`."""
    return spec.runtime.image_policy


def step_text(release: ReleaseRecord) -> str | None:
    """'2/3' while a canary walks its steps."""
    if release.step is None or not release.spec:
        return None
    return f"{release.step + 1}/{len(release.spec.rollout.steps)}"


def age(seconds: float) -> str:
    """A short age for a table cell: 45s, 12m, 3h."""
    seconds = max(0, int(seconds))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"


def analysis_summary(analysis: dict[str, Any]) -> str:
    """The latest analysis in one line: verdict, failures in a row, the judged version's figures, the reasons."""
    if "verdict" not in analysis:
        return "no interval judged yet"
    watched = "figures" in analysis
    figures = analysis.get("figures" if watched else "canary") or {}
    readings = "".join(f", {r.get('name')} {'no data' if r.get('value') is None else format(r['value'], '.4g')}"
                       for r in figures.get("queries") or [])
    return (f"{analysis['verdict']} ({analysis['failures']} failed in a row): {'version' if watched else 'canary'} "
            f"{figures.get('requests', 0)} requests, error rate {figures.get('error_rate', '-')}, "
            f"p95 {figures.get('p95_latency_s', '-')}s{readings}"
            + (f"; {'; '.join(analysis['reasons'])}" if analysis.get("reasons") else ""))


def watch_json(release: ReleaseRecord) -> dict[str, Any] | None:
    """A post-promotion watch under way: the version, its standby, when it ends (None until the router switched)."""
    watch = release.analysis or {}
    if watch.get("kind") != "post-promotion":
        return None
    return {"version": watch.get("version"), "standby": watch.get("standby"), "started_at": watch.get("started_at"),
            "ends_at": watch.get("ends_at"), "verdict": watch.get("verdict"), "failures": watch.get("failures", 0),
            "intervals": watch.get("intervals")}


def watch_text(watch: dict[str, Any], now: float) -> str:
    """'post-promotion watch of v2: 3m left, standby v1 warm; last verdict passed' for the status lines."""
    ends = watch.get("ends_at")
    left = "starts once the router switched" if ends is None else f"{age(ends - now)} left"
    verdict = f"last verdict {watch['verdict']}" if watch.get("verdict") else "no interval judged yet"
    return f"post-promotion watch of {watch['version']}: {left}, standby {watch['standby']} warm; {verdict}"


def status_text(state: State, gates: dict[tuple[str, str], dict[str, Any]] | None = None, now: float | None = None,
                quality: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
    now = now or time.time()
    data = status_json(state, gates, quality)
    commit = (data["commit"] or "none")[:12]
    applied = (data["applied_commit"] or "none")[:12]
    lines = [f"reconciled {commit} (fully live: {applied})", ""]
    refused = data["refused_commit"]
    if refused:
        lines[1:1] = [f"refused   {refused['commit'][:12]} ({refused['reason']}, {age(now - refused['at'])} ago): "
                      f"nothing from it is applied; {refused['message']}"]
    if not data["releases"]:
        lines.append("no releases")
    for release in data["releases"]:
        lines.append(f"{release['name']:<20} {release['phase']:<12} {age(now - release['updated_at'])} ago  {release['message']}")
        if release["step"]:
            lines.append(f"  canary step {release['step']}")
        if release["watch"]:
            lines.append(f"  {watch_text(release['watch'], now)}")
        if release["registry_drift"]:
            lines.append(f"  registry drift ({age(now - release['registry_drift']['since'])}): {release['registry_drift']['message']}")
        analysis = release["analysis"]
        if analysis:
            lines.append(f"  analysis: {analysis_summary(analysis)}")
        for v in release["versions"]:
            gate = v["gate"]
            checks = "" if gate is None else "  checks " + " ".join(
                f"{name}:{'ok' if c['outcome'] == 'passed' else c['outcome']}" for name, c in gate["checks"].items())
            checks += f"  run {gate['run']['id']}" if gate is not None and gate.get("run") else ""
            actual = "" if v["live_weight"] in (None, v["weight"]) else f" (router: {v['live_weight']}%)"
            image = "  image unverified" if v["image_policy"] == "unverified" else ""
            nodes = f" on {nodes_text(v['nodes'])}" if v["nodes"] else ""
            lines.append(f"  {v['id']:<12} {v['role']:<8} weight {v['weight']:>3}%{actual}  "
                         f"replicas {v['ready_replicas']}/{v['replicas']}{nodes}  from {v['commit'][:12]}{image}{checks}"
                         f"{load_text(v['load'])}{quality_text(v['quality'])}")
    return "\n".join(lines)


def history_rows(events: list[Event]) -> list[HistoryRow]:
    """One row per rollout (start -> outcome) and per instant rollback, oldest first."""
    rows: list[HistoryRow] = []
    open_rollouts: dict[str, HistoryRow] = {}
    promoted: dict[str, HistoryRow] = {}  # rows closed as promoted: a post-promotion watch may still roll them back
    for event in events:
        if event.kind == "rollout-started":
            row: HistoryRow = {"version": event.version, "commit": event.commit, "started_at": event.at, "finished_at": None,
                               "outcome": "in progress", "message": event.message, "timeline": []}
            open_rollouts[event.version or ""] = row
            promoted.pop(event.version or "", None)
            rows.append(row)
        elif event.kind == "rolled-back":
            rows.append({"version": event.version, "commit": event.commit, "started_at": event.at, "finished_at": event.at,
                         "outcome": "rolled back", "message": event.message, "timeline": []})
        elif event.kind == "aborted" and (event.version or "") in promoted:
            row = promoted.pop(event.version or "")
            row["timeline"].append({"after_s": round(event.at - row["started_at"], 1), "event": event.kind, "message": event.message})
            row["finished_at"], row["outcome"], row["message"] = event.at, "rolled back (post-promotion)", event.message
        elif (event.version or "") in open_rollouts:
            row = open_rollouts[event.version or ""]
            row["timeline"].append({"after_s": round(event.at - row["started_at"], 1), "event": event.kind, "message": event.message})
            if event.kind == "prepared":
                row["checks"] = event.message
            if event.kind in OUTCOMES:
                open_rollouts.pop(event.version or "")
                row["finished_at"], row["outcome"], row["message"] = event.at, OUTCOMES[event.kind], event.message
                if event.kind == "promoted":
                    promoted[event.version or ""] = row
        elif (event.version or "") in promoted and event.kind.startswith(("post-promotion", "analysis-failed")):
            row = promoted[event.version or ""]
            row["timeline"].append({"after_s": round(event.at - row["started_at"], 1), "event": event.kind, "message": event.message})
    return rows


def with_runs(rows: list[HistoryRow], gates: dict[str, dict[str, Any]]) -> list[HistoryRow]:
    """Each row with its version's tracked gate run (`gates`: the latest gate report per version)."""
    for row in rows:
        run = (gates.get(row["version"] or "") or {}).get("run")
        if run:
            row["run"] = run["link"]
    return rows


def history_text(release: str, rows: list[HistoryRow]) -> str:
    if not rows:
        return f"{release}: no rollouts recorded"
    lines = [f"{'started (UTC)':<20} {'version':<12} {'commit':<12} {'outcome':<12} {'took':>7}  message"]
    for row in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["started_at"]))
        took = f"{row['finished_at'] - row['started_at']:.1f}s" if row["finished_at"] else "-"
        commit = (row["commit"] or "")[:12]
        lines.append(f"{started:<20} {row['version'] or '':<12} {commit:<12} {row['outcome']:<12} {took:>7}  {row['message']}")
        lines += [f"{'':<20}   +{item['after_s']:>6.1f}s  {item['event']}: {item['message']}" for item in row["timeline"]]
        if row.get("run"):
            lines.append(f"{'':<20}   gate tracked: {row['run']}")
    return "\n".join(lines)
