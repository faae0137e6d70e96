"""What a commit changes, per release, and what it costs in GPUs. Pure.

`diff_releases(old, new)` compares two sets of valid releases (name -> Release)
and returns one `ReleaseChange` per added, changed or removed release: the
changed field paths, the change class (`version`, `light`, `policy`,
`remove`), the version ids, the GPU impact of the release's strategy and what the
rollout holds beyond its end state (GPU-hours, USD at `spec.cost.gpu_hour_usd`).
`diffops diff` prints it; the controller acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from controller.parse.release import Release
from controller.plan.downloads import Download, ModelSize, download
from controller.plan.versions import COST_ORDER, ChangeClass, field_class, leaves, version_id

__all__ = ["FieldChange", "GpuImpact", "ReleaseChange", "RolloutCost", "diff_releases", "field_changes", "gpu_impact", "gpus",
           "release_change", "rollout_cost", "with_downloads"]


@dataclass(frozen=True)
class FieldChange:
    """One field that differs: its dotted path, both values, and what changing it costs."""

    path: str
    old: Any
    new: Any
    change_class: ChangeClass


@dataclass(frozen=True)
class GpuImpact:
    """Replicas started, and GPUs held before, at the peak of, and after the rollout."""

    replicas_to_start: int
    gpus_before: float
    gpus_peak: float
    gpus_after: float
    standby_gpus: float = 0.0  # held by the warm previous version for scale_down_delay


@dataclass(frozen=True)
class RolloutCost:
    """What a change holds beyond the steady state while it rolls out: the GPUs over the end state, for the walk's
    timed steps, and the standby's, for scale_down_delay. The new version's start time is not known before it runs."""

    extra_gpu_hours: float
    walk_s: float  # canary: timed pauses + one analysis interval per partial weight step; else 0
    standby_s: float  # scale_down_delay, when the old version stays warm as standby
    usd: float | None  # at spec.cost.gpu_hour_usd; None when the release sets no price
    waits_for_promote: bool = False  # an untimed pause: the walk lasts until `diffops promote`, longer than counted


@dataclass(frozen=True)
class ReleaseChange:
    """One release's change between two revisions, as `diffops diff` shows it."""

    name: str
    action: Literal["add", "change", "remove"]
    change_class: Literal["version", "light", "policy", "remove"]
    old_version: str | None
    new_version: str | None
    impact: GpuImpact
    strategy: str | None = None
    fields: tuple[FieldChange, ...] = field(default_factory=tuple)
    rollout: RolloutCost | None = None  # None: the change holds nothing beyond its end state
    download: Download | None = None  # None: it starts no replica (or nobody asked: `with_downloads` sets it)


def gpus(release: Release | None) -> float:
    """GPUs a release's replicas hold (none for no release)."""
    if release is None:
        return 0.0
    return release.spec.replicas.count * release.spec.replicas.gpus


def gpu_impact(old: Release | None, new: Release | None, change_class: ChangeClass | Literal["remove"]) -> GpuImpact:
    """GPU cost of moving from old to new; both versions run side by side during a version rollout."""
    before, after = gpus(old), gpus(new)
    if new is None:
        return GpuImpact(0, before, before, 0.0)
    if old is None:
        return GpuImpact(new.spec.replicas.count, 0.0, after, after)
    if change_class == "version":
        return GpuImpact(new.spec.replicas.count, before, before + after, after, standby_gpus=before)
    if change_class == "light":
        added = max(0, new.spec.replicas.count - old.spec.replicas.count)
        return GpuImpact(added, before, max(before, after), after)
    return GpuImpact(0, before, before, after)


def rollout_cost(new: Release, impact: GpuImpact) -> RolloutCost | None:
    """The GPU-hours (and USD) a rollout holds beyond its end state: (peak - after) GPUs over the canary walk, and the
    standby's GPUs over scale_down_delay. None when it holds nothing extra."""
    rollout = new.spec.rollout
    walk_s, manual = 0.0, False
    if rollout.strategy == "canary":
        for step in rollout.steps:
            if step.is_pause:
                manual = manual or step.pause is None
                walk_s += step.pause.total_seconds() if step.pause is not None else 0.0
            elif step.weight is not None and step.weight < 100:
                walk_s += rollout.analysis.interval.total_seconds()  # a weight step lasts at least one analysis interval
    standby_s = rollout.scale_down_delay.total_seconds() if impact.standby_gpus else 0.0
    gpu_seconds = (impact.gpus_peak - impact.gpus_after) * walk_s + impact.standby_gpus * standby_s
    if gpu_seconds <= 0:
        return None
    price = new.spec.cost.gpu_hour_usd
    hours = gpu_seconds / 3600
    return RolloutCost(round(hours, 6), walk_s, standby_s, round(hours * price, 6) if price is not None else None, manual)


def field_changes(old: Release, new: Release) -> tuple[FieldChange, ...]:
    """Every field that differs from `old` to `new`, sorted by path."""
    before, after = leaves(old), leaves(new)
    paths = sorted(before.keys() | after.keys())
    return tuple(
        FieldChange(path, before.get(path), after.get(path), field_class(path))
        for path in paths
        if before.get(path) != after.get(path)
    )


def release_change(name: str, old: Release | None, new: Release | None) -> ReleaseChange | None:
    """The change for one release, or None when nothing differs."""
    old_version = version_id(old) if old else None
    new_version = version_id(new) if new else None
    strategy = new.spec.rollout.strategy if new else None
    if new is None:
        return ReleaseChange(name, "remove", "remove", old_version, None, gpu_impact(old, None, "remove"))
    if old is None:
        return ReleaseChange(name, "add", "version", None, new_version, gpu_impact(None, new, "version"), strategy)
    changes = field_changes(old, new)
    if not changes:
        return None
    change_class = max((c.change_class for c in changes), key=lambda c: COST_ORDER[c])
    impact = gpu_impact(old, new, change_class)
    return ReleaseChange(name, "change", change_class, old_version, new_version, impact, strategy, changes, rollout_cost(new, impact))


def diff_releases(old: Mapping[str, Release], new: Mapping[str, Release]) -> list[ReleaseChange]:
    """Per-release changes from `old` to `new`, sorted by release name."""
    out = []
    for name in sorted(old.keys() | new.keys()):
        change = release_change(name, old.get(name), new.get(name))
        if change is not None:
            out.append(change)
    return out


def with_downloads(changes: list[ReleaseChange], new: Mapping[str, Release], sizes: Mapping[str, ModelSize | str],
                   held: Mapping[str, tuple[str, ...]]) -> list[ReleaseChange]:
    """Each change with the model download of the replicas it starts: `sizes` by digest (a size, or why it is unknown),
    `held` the nodes whose caches hold a digest."""
    out = []
    for change in changes:
        after = new.get(change.name)
        digest = after.spec.model.digest if after is not None else ""
        fetched = download(after, change.impact.replicas_to_start, sizes.get(digest), held.get(digest, ()))
        out.append(replace(change, download=fetched))
    return out
