"""`diffops cost [RELEASE] [--since DURATION]`: what each release and version cost, from the controller's records.

Reads the cost totals the controller keeps in its state store (`controller.tick.costs`,
priced by `controller.cost`): GPU-hours by kind (serving, idle, standby, gate),
images made, cost per image, egress and storage USD. With `--since`, the
difference between now and the samples taken at the start of the window
(about one a minute). `cost_report` is pure: the command reads the store and prints.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from controller.cli.common import fail, state_dir_option, store_at
from controller.cli.output import choose, dump, output_option
from controller.cost import GPU_KINDS, CostRecord, cost_per_image, window
from serving.fields import parse_duration

__all__ = ["cost", "cost_report", "cost_text"]


def _figures(record: CostRecord) -> dict[str, Any]:
    per_image = cost_per_image(record)
    return {
        "gpu_hours": {kind: round(record.gpu_seconds(kind) / 3600, 6) for kind in GPU_KINDS},
        "images": record.images,
        "cost_per_image_usd": round(per_image, 6) if per_image is not None else None,
        "usd": {"gpu": round(record.gpu_usd, 6), "egress": round(record.egress_usd, 6), "storage": round(record.storage_usd, 6),
                "total": round(record.usd, 6)},
        "egress_bytes": record.egress_bytes,
    }


def _sum(release: str, records: Iterable[CostRecord]) -> CostRecord:
    total = CostRecord(release, "", 0.0)
    for r in records:
        total = CostRecord(release, "", max(total.at, r.at), total.serving_s + r.serving_s, total.idle_s + r.idle_s,
                           total.standby_s + r.standby_s, total.gate_s + r.gate_s, total.images + r.images,
                           total.egress_bytes + r.egress_bytes, total.storage_gb_s + r.storage_gb_s, total.gpu_usd + r.gpu_usd,
                           total.egress_usd + r.egress_usd, total.storage_usd + r.storage_usd)
    return total


def cost_report(records: Iterable[CostRecord], baseline: Mapping[tuple[str, str], CostRecord] | None, now: float,
                since: float | None = None, budgets: Mapping[str, float | None] | None = None) -> dict[str, Any]:
    """Per release (and per version inside it) the figures of the window from `since` (None: since first seen) to now;
    `baseline`: each version's totals sampled at the window's start."""
    per: dict[str, list[CostRecord]] = {}
    for record in records:
        added = window(record, (baseline or {}).get((record.release, record.version))) if since is not None else record
        per.setdefault(record.release, []).append(added)
    releases = []
    for name, versions in sorted(per.items()):
        budget = (budgets or {}).get(name)
        versions = sorted(versions, key=lambda r: r.at, reverse=True)  # the newest version first
        releases.append({"name": name, **_figures(_sum(name, versions)), "budget_per_image_usd": budget,
                         "versions": [{"id": r.version, **_figures(r)} for r in versions]})
    return {"since": since, "until": now, "releases": releases}


def _usd(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}" if value < 1 else f"${value:,.2f}"


def _row(label: str, figures: dict[str, Any]) -> str:
    hours = figures["gpu_hours"]
    return (f"{label:<16} {hours['serving']:>9.3f} {hours['idle']:>8.3f} {hours['standby']:>8.3f} {hours['gate']:>7.3f} "
            f"{figures['images']:>8} {_usd(figures['cost_per_image_usd']):>10} {_usd(figures['usd']['gpu']):>9} "
            f"{_usd(figures['usd']['egress']):>9} {_usd(figures['usd']['storage']):>9} {_usd(figures['usd']['total']):>9}")


def cost_text(report: dict[str, Any]) -> str:
    """The report as plain text: one block per release, its total first, then a line per version."""
    if not report["releases"]:
        return "no cost recorded yet (the controller records it while it runs)"
    since = report["since"]
    span = f"from {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(since))} UTC" if since is not None else "since first seen"
    lines = [f"cost {span} (GPU-hours by kind; USD from spec.cost prices)",
             f"{'RELEASE/VERSION':<16} {'SERVING-h':>9} {'IDLE-h':>8} {'STANDBY-h':>8} {'GATE-h':>7} {'IMAGES':>8} {'$/IMAGE':>10} "
             f"{'GPU':>9} {'EGRESS':>9} {'STORAGE':>9} {'TOTAL':>9}"]
    for release in report["releases"]:
        lines.append(_row(release["name"], release))
        lines += [_row(f"  {version['id']}", version) for version in release["versions"]]
        if release["budget_per_image_usd"] is not None:
            per_image = release["cost_per_image_usd"]
            over = per_image is not None and per_image > release["budget_per_image_usd"]
            lines.append(f"  budget {_usd(release['budget_per_image_usd'])}/image: {'OVER' if over else 'within'}")
    return "\n".join(lines)


@click.command()
@click.argument("release", required=False)
@state_dir_option
@click.option("--since", "since_text", default=None, metavar="DURATION",
              help="Only the last DURATION (30m, 6h, 7d); default: everything since the controller first saw each version.")
@output_option("text", "json", "yaml")
def cost(release: str | None, state_dir: Path, since_text: str | None, output: str) -> None:
    """GPU-hours by kind, images, cost per image, egress and storage USD, per release and version."""
    try:
        span = parse_duration(since_text).total_seconds() if since_text is not None else None
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--since") from None
    path = state_dir / "state.db"
    if not path.exists():
        fail(f"no controller state in {state_dir}; start one with `diffops controller run --state-dir {state_dir}`")
    store = store_at(path)
    try:
        now = time.time()
        since = now - span if span is not None else None
        records = store.costs(release)
        baseline = store.cost_samples(since, release) if since is not None else None
        state = store.load()
    finally:
        store.close()
    if release is not None and not records and release not in state.releases:
        fail(f"no release {release!r} in the controller's records at {state_dir}; `diffops status` lists them")
    budgets = {name: r.spec.cost.budget_per_image_usd for name, r in state.releases.items() if r.spec is not None}
    report = cost_report(records, baseline, now, since, budgets)
    fmt = choose(output)
    click.echo(cost_text(report) if fmt == "text" else dump(report, fmt))
    sys.exit(0)
