"""The comparison table of an experiment's cells, sorted by a metric. Pure: rows in, rows or a rich Table out.

Printed by `diffops experiment run` (a rich table on a terminal, its plain rendering when piped), written as
`table.json` to `-o DIR` and logged on the parent run. Lower is better for latency, cost and pHash distance,
higher for images/s, CLIP score and SSIM; a cell without the metric sorts last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich import box
from rich.table import Table

__all__ = ["COLUMNS", "HIGHER_IS_BETTER", "comparison_table", "sort_rows"]

HIGHER_IS_BETTER = frozenset({"performance.images_per_s", "quality.mean_clip_score", "baseline.ssim"})
COLUMNS = (("performance.p50_latency_s", "P50 S", "{:.3f}"), ("performance.p95_latency_s", "P95 S", "{:.3f}"),
           ("performance.images_per_s", "IMG/S", "{:.2f}"), ("cost.usd_per_image", "USD/IMG", "{:.6f}"),
           ("quality.mean_clip_score", "CLIP", "{:.2f}"), ("baseline.phash_distance", "PHASH", "{:.1f}"),
           ("baseline.ssim", "SSIM", "{:.3f}"))


def sort_rows(rows: Sequence[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Best first by `metric` (each row's `metrics` dict); rows without it last, ties in cell order."""
    sign = -1.0 if metric in HIGHER_IS_BETTER else 1.0

    def key(row: dict[str, Any]) -> tuple[bool, float, int]:
        value = row["metrics"].get(metric)
        return value is None, sign * value if value is not None else 0.0, int(row["index"])

    return sorted(rows, key=key)


def comparison_table(title: str, rows: Sequence[dict[str, Any]], metric: str) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1, 0, 0))
    for name in ("CELL", "CONFIG", "VERSION"):
        table.add_column(name, no_wrap=name != "CONFIG", overflow="fold")
    for key, header, _ in COLUMNS:
        table.add_column(header + (" *" if key == metric else ""), justify="right", no_wrap=True)
    table.add_column("RUN", no_wrap=True)
    for row in rows:
        figures = [fmt.format(row["metrics"][key]) if key in row["metrics"] else "-" for key, _, fmt in COLUMNS]
        table.add_row(row["cell"], row["config"] + (" (baseline)" if row["baseline"] else ""), row["version"], *figures, row["run_id"])
    return table
