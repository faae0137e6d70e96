"""Render a plan for people: terminal text, JSON, or a pull-request comment in markdown.

Pure formatting of `controller.plan.changes.ReleaseChange` lists (and the target
revision's lint errors) for `diffops diff`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from controller.parse.loader import ReleaseError
from controller.plan.changes import GpuImpact, ReleaseChange, RolloutCost
from controller.plan.downloads import download_text

__all__ = ["WHAT_HAPPENS", "as_json", "as_markdown", "as_text", "impact_line", "rollout_text", "summary", "version_text"]

WHAT_HAPPENS = {
    "version": "new version: gate checks, then rollout",
    "light": "in-place update, no replica restarts",
    "policy": "controller settings only; nothing restarts",
    "remove": "apps deleted; traffic stops",
}


def _value(value: Any) -> str:
    return "(unset)" if value is None else json.dumps(value) if isinstance(value, str) else str(value)


def _gpus(n: float) -> str:
    return f"{n:g}"


def impact_line(change: ReleaseChange) -> str:
    i: GpuImpact = change.impact
    parts = [f"starts {i.replicas_to_start} replica{'s' * (i.replicas_to_start != 1)}"]
    if i.gpus_before or i.gpus_peak or i.gpus_after:
        parts.append(f"GPUs {_gpus(i.gpus_before)} → peak {_gpus(i.gpus_peak)} → {_gpus(i.gpus_after)}")
    else:
        parts.append("no GPUs")
    if change.change_class == "version" and change.action == "change":
        parts.append(f"{change.strategy}: old and new run side by side until the switch")
    if i.standby_gpus:
        parts.append(f"standby keeps {_gpus(i.standby_gpus)} GPUs for scale_down_delay")
    if change.rollout is not None:
        parts.append(rollout_text(change.rollout))
    return "; ".join(parts)


def _span(seconds: float) -> str:
    return f"{seconds / 3600:g}h" if seconds >= 3600 else f"{seconds / 60:g}m" if seconds >= 60 else f"{seconds:g}s"


def rollout_text(cost: RolloutCost) -> str:
    """'rollout adds 0.35 GPU-hours (≈ $0.88) over 10m standby' and what is not counted."""
    price = f" (≈ ${cost.usd:,.2f})" if cost.usd is not None else " (no spec.cost.gpu_hour_usd to price it)"
    spans = [f"{_span(cost.walk_s)} canary walk" if cost.walk_s else "", f"{_span(cost.standby_s)} standby" if cost.standby_s else ""]
    manual = ", plus the wait for `diffops promote`" if cost.waits_for_promote else ""
    return f"rollout adds {cost.extra_gpu_hours:g} GPU-hours{price} over {' + '.join(s for s in spans if s)}{manual}"


def version_text(change: ReleaseChange) -> str:
    if change.old_version and change.new_version and change.old_version != change.new_version:
        return f"{change.old_version} → {change.new_version}"
    return change.new_version or change.old_version or ""


def summary(changes: Sequence[ReleaseChange]) -> str:
    if not changes:
        return "no release changes"
    counts: dict[str, int] = {}
    for change in changes:
        counts[change.change_class] = counts.get(change.change_class, 0) + 1
    extra_peak = sum(c.impact.gpus_peak - c.impact.gpus_before for c in changes)
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
    line = f"{len(changes)} release{'s' * (len(changes) != 1)} changed ({kinds}); peak GPUs +{_gpus(extra_peak)}"
    costs = [c.rollout for c in changes if c.rollout is not None]
    if costs:
        priced = [c.usd for c in costs if c.usd is not None]
        line += f"; rollouts add {sum(c.extra_gpu_hours for c in costs):g} GPU-hours" + (f" (≈ ${sum(priced):,.2f})" if priced else "")
    return line


def as_text(changes: Sequence[ReleaseChange], errors: Sequence[ReleaseError]) -> str:
    lines = []
    for change in changes:
        lines.append(f"{change.name}: {change.action} [{change.change_class}] version {version_text(change)}")
        lines.append(f"  {WHAT_HAPPENS[change.change_class]}")
        for f in change.fields:
            lines.append(f"  ~ {f.path}: {_value(f.old)} → {_value(f.new)}  ({f.change_class})")
        lines.append(f"  impact: {impact_line(change)}")
        if change.download is not None:
            lines.append(f"  download: {download_text(change.download)}")
    lines += [f"invalid: {error}" for error in errors]
    lines.append(summary(changes))
    return "\n".join(lines)


def as_json(changes: Sequence[ReleaseChange], errors: Sequence[ReleaseError], base: str, target: str) -> str:
    return json.dumps(
        {
            "from": base,
            "to": target,
            "changes": [asdict(c) for c in changes],
            "errors": [{**asdict(e), "text": str(e)} for e in errors],
            "summary": summary(changes),
        },
        indent=2,
    )


def as_markdown(changes: Sequence[ReleaseChange], errors: Sequence[ReleaseError], base: str, target: str) -> str:
    lines = [f"### diffops plan `{base[:12]}` → `{target[:12]}`", "", f"**{summary(changes)}**", ""]
    if changes:
        lines += ["| release | change | class | version | GPU impact | download |", "|---|---|---|---|---|---|"]
        for c in changes:
            fetched = download_text(c.download) if c.download is not None else "—"
            lines.append(f"| `{c.name}` | {c.action} | **{c.change_class}** | `{version_text(c)}` | {impact_line(c)} | {fetched} |")
        lines.append("")
    for c in changes:
        if c.fields:
            lines += [f"<details><summary><code>{c.name}</code>: {len(c.fields)} field(s) — {WHAT_HAPPENS[c.change_class]}</summary>", ""]
            lines += ["| field | before | after | class |", "|---|---|---|---|"]
            lines += [f"| `{f.path}` | `{_value(f.old)}` | `{_value(f.new)}` | {f.change_class} |" for f in c.fields]
            lines += ["", "</details>", ""]
    if errors:
        lines += ["#### Invalid release files", "", "```"] + [str(e) for e in errors] + ["```"]
    return "\n".join(lines)
