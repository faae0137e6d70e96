"""What a commit changes, per release, and what it costs in GPUs. Pure.

`diff_releases(old, new)` compares two sets of valid releases (name -> Release)
and returns one `ReleaseChange` per added, changed or removed release: the
changed field paths, the change class (`version`, `light`, `policy`,
`remove`), the version ids and the GPU impact of the release's strategy.
`diffops diff` prints it; the controller acts on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from controller.parse.release import Release
from controller.plan.versions import COST_ORDER, ChangeClass, field_class, leaves, version_id

__all__ = ["FieldChange", "GpuImpact", "ReleaseChange", "diff_releases", "field_changes", "gpu_impact", "gpus", "release_change"]


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
    return ReleaseChange(name, "change", change_class, old_version, new_version, gpu_impact(old, new, change_class), strategy, changes)


def diff_releases(old: Mapping[str, Release], new: Mapping[str, Release]) -> list[ReleaseChange]:
    """Per-release changes from `old` to `new`, sorted by release name."""
    out = []
    for name in sorted(old.keys() | new.keys()):
        change = release_change(name, old.get(name), new.get(name))
        if change is not None:
            out.append(change)
    return out
