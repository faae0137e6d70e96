"""What a change downloads: the new model's bytes per node, for `diffops diff`. Pure.

Every node that starts a replica of a change (a new version, a new release,
a scale-out) fetches the model into that node's cache, unless its cache
already holds the digest (caches are content-addressed: a node running any
version with the same model fetches nothing). Ray places the replicas, so the
plan counts the worst case, one node per replica started and none holding
it, and names the nodes known to hold it (they run a version with that
model, as the controller's state records). Sizes come from the
model's listing (`controller.cli.main.model_sizes`); a size that could not be
read offline is named with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.cost import GB
from controller.parse.release import Release
from controller.state.records import ObservedApp, VersionRecord, app_name

__all__ = ["Download", "ModelSize", "download", "download_text", "held_nodes", "human_bytes"]


@dataclass(frozen=True)
class ModelSize:
    bytes: int
    files: int


@dataclass(frozen=True)
class Download:
    """The new model a change brings to its nodes: its size (or why it is unknown), the nodes that may fetch it (one
    per replica at most), the worst-case bytes over all of them and their egress price, and who holds it already."""

    digest: str
    bytes: int | None
    files: int | None
    nodes: int
    total_bytes: int | None
    usd: float | None  # total_bytes at spec.cost.egress_usd_per_gb; None when unknown or unpriced
    held_by: tuple[str, ...] = ()
    unknown: str = ""  # why the size is unknown


def download(new: Release | None, starts: int, size: ModelSize | str | None, held_by: Iterable[str] = ()) -> Download | None:
    """The model download of a change that starts `starts` replicas of `new` (None when it starts none)."""
    if new is None or starts <= 0:
        return None
    known = size if isinstance(size, ModelSize) else None
    total = known.bytes * starts if known else None
    price = new.spec.cost.egress_usd_per_gb
    usd = round(total / GB * price, 6) if total is not None and price is not None else None
    unknown = "" if known else (size if isinstance(size, str) else "no listing")
    return Download(new.spec.model.digest, known.bytes if known else None, known.files if known else None, starts, total, usd,
                    tuple(sorted(held_by)), unknown)


def held_nodes(versions: Iterable[VersionRecord], apps: Mapping[str, ObservedApp]) -> dict[str, tuple[str, ...]]:
    """Model digest -> the nodes whose caches hold it: those running a replica of a version with that model."""
    out: dict[str, set[str]] = {}
    for version in versions:
        app = apps.get(app_name(version.release, version.version))
        if app is not None and app.nodes:
            out.setdefault(version.spec.model.digest, set()).update(app.nodes)
    return {digest: tuple(sorted(nodes)) for digest, nodes in out.items()}


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def download_text(d: Download) -> str:
    """'model sha256:0a1b2c3d4e5f 512.0 KB in 9 files on each node that starts a replica without it: up to 2 nodes,
    ≤ 1.0 MB (≈ $0.00 egress); cached on 198.18.0.3'."""
    what = f"model {d.digest[:19]}"
    size = (f"{human_bytes(d.bytes)} in {d.files} file{'s' * (d.files != 1)}" if d.bytes is not None and d.files is not None
            else f"size unknown ({d.unknown})")
    line = f"{what} {size} on each node that starts a replica without it: up to {d.nodes} node{'s' * (d.nodes != 1)}"
    if d.total_bytes is not None:
        line += f", ≤ {human_bytes(d.total_bytes)}" + (f" (≈ ${d.usd:,.2f} egress)" if d.usd is not None else "")
    return line + (f"; cached on {', '.join(d.held_by)}" if d.held_by else "")
