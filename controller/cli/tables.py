"""`diffops status` and `diffops history` as tables for a terminal (rich), built from the same data as their
JSON. Pure: data in, a `rich.table.Table` out; `terminal.print_rich` fits it to the terminal's width (long
cells wrap, short ones never do). Piped output uses `status_view`'s plain text instead.
"""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from controller.cli.status_view import HistoryRow, age, analysis_summary, load_text, nodes_text, quality_text

__all__ = ["PHASE_STYLES", "history_table", "status_table"]

PHASE_STYLES = {"Healthy": "green", "Progressing": "cyan", "Paused": "yellow", "Degraded": "red", "Failed": "bold red",
                "Invalid": "bold red"}
OUTCOME_STYLES = {"promoted": "green", "in progress": "cyan", "failed": "red", "abandoned": "yellow"}


def _release_detail(release: dict[str, Any]) -> str:
    parts = [release["message"]]
    if release["step"]:
        parts.append(f"canary step {release['step']}")
    analysis = release["analysis"]
    if analysis:
        parts.append(f"analysis {analysis_summary(analysis)}")
    return "\n".join(parts)


def _version_detail(version: dict[str, Any]) -> str:
    detail = f"from {version['commit'][:12]}"
    if version["nodes"]:
        detail = f"on {nodes_text(version['nodes'])}, {detail}"
    if version["image_policy"] == "unverified":
        detail += ", image unverified"
    gate = version["gate"]
    if gate is not None:
        detail += ", checks " + " ".join(f"{name}:{'ok' if c['outcome'] == 'passed' else c['outcome']}"
                                         for name, c in gate["checks"].items())
    if version.get("load"):
        detail += "," + load_text(version["load"]).removeprefix(" ")
    if version.get("quality"):
        detail += "," + quality_text(version["quality"]).removeprefix(" ")
    return detail


def status_table(data: dict[str, Any], now: float | None = None) -> Table:
    """kubectl-like: one row per release (phase, age, message), then one indented row per version (role, weight,
    ready replicas, commit and checks)."""
    now = now or time.time()
    caption = f"reconciled {(data['commit'] or 'none')[:12]} (fully live: {(data['applied_commit'] or 'none')[:12]})"
    refused = data["refused_commit"]
    if refused:
        caption += (f"\nrefused {refused['commit'][:12]} ({refused['reason']}, {age(now - refused['at'])} ago): "
                    f"nothing from it is applied; {refused['message']}")
    table = Table(title=caption, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for name in ("NAME", "STATUS", "WEIGHT", "READY", "AGE"):
        table.add_column(name, no_wrap=True, justify="right" if name in ("WEIGHT", "READY", "AGE") else "left")
    table.add_column("DETAIL", overflow="fold", ratio=1)
    if not data["releases"]:
        table.add_row("no releases", "", "", "", "", "")
    for release in data["releases"]:
        phase = Text(release["phase"], style=PHASE_STYLES.get(release["phase"], ""))
        table.add_row(Text(release["name"], style="bold"), phase, "", "", age(now - release["updated_at"]), _release_detail(release))
        for v in release["versions"]:
            weight = f"{v['weight']}%" if v["live_weight"] in (None, v["weight"]) else f"{v['weight']}% (router {v['live_weight']}%)"
            table.add_row(f"  {v['id']}", v["role"], weight, f"{v['ready_replicas']}/{v['replicas']}", "", _version_detail(v))
    return table


def history_table(release: str, rows: list[HistoryRow]) -> Table:
    """One row per rollout, then its timeline (seconds after the start) under it."""
    table = Table(title=f"{release}: {len(rows)} rollout(s)", title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                  pad_edge=False, padding=(0, 1, 0, 0))
    table.add_column("STARTED (UTC)", overflow="fold")  # date and time wrap onto two lines on a narrow terminal
    for name in ("VERSION", "COMMIT", "OUTCOME", "TOOK"):
        table.add_column(name, no_wrap=True, justify="right" if name == "TOOK" else "left")
    table.add_column("MESSAGE", overflow="fold", ratio=1)
    for row in rows:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(row["started_at"]))
        took = f"{row['finished_at'] - row['started_at']:.1f}s" if row["finished_at"] else "-"
        outcome = Text(row["outcome"], style=OUTCOME_STYLES.get(row["outcome"], "yellow" if "rolled back" in row["outcome"] else ""))
        table.add_row(started, row["version"] or "", (row["commit"] or "")[:12], outcome, took, row["message"])
        for item in row["timeline"]:
            table.add_row("", "", "", "", f"+{item['after_s']:.1f}s", f"{item['event']}: {item['message']}")
        if row.get("run"):
            table.add_row("", "", "", "", "", f"gate tracked: {row['run']}")
    return table
