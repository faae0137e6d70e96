"""The quality loop's controller side: read each release's user feedback into the state file, and sum it per version.

The observe phase (`controller.tick.observe`) calls `drain` once per tick for every router it sees: pages of
feedback past the stored cursor are read through the router (`GET /<release>/feedback`, from the release's
tally, `serving.feedback`) and stored with the cursor past them (`controller.state.feedback`). Reading deletes
nothing, so a controller that dies mid-read reads the page again; a tally that restarted (a new epoch) is read
from its start. `summarize` (pure) is what `diffops quality` prints and what the feedback metrics count.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

from controller.state.feedback import read_cursor, store_page

__all__ = ["PAGE", "PAGES_PER_TICK", "FeedbackSource", "drain", "summarize"]

log = logging.getLogger("diffops.controller")

PAGE = 1000  # entries per read
PAGES_PER_TICK = 20  # reads per release per tick at most; the rest waits for the next tick
FLAGS = ("nsfw", "artifact", "prompt_mismatch", "other")


@runtime_checkable
class FeedbackSource(Protocol):
    def router_feedback(self, release: str, epoch: str | None, after: int, limit: int) -> dict[str, Any] | None: ...


def drain(source: FeedbackSource, release: str, db: sqlite3.Connection) -> list[dict[str, Any]]:
    """Store the release's new feedback; the entries stored (empty when there were none or the router did not answer)."""
    stored: list[dict[str, Any]] = []
    for _ in range(PAGES_PER_TICK):
        cursor = read_cursor(db, release)
        epoch, after = cursor if cursor is not None else (None, 0)
        page = source.router_feedback(release, epoch, after, PAGE)
        if page is None:
            break
        entries, new_epoch = list(page.get("entries") or []), str(page["epoch"])
        if new_epoch == epoch and int(page.get("first", 0)) > after + 1:
            log.warning("%s: %d feedback entries were dropped by the tally before they were read (it holds %d at most); "
                        "next: storing the rest", release, int(page["first"]) - after - 1, 100_000)
        elif epoch is not None and new_epoch != epoch:
            log.info("%s: the feedback tally restarted (epoch %s, was %s); next: reading it from its start", release, new_epoch, epoch)
        if not entries:
            if cursor is None or new_epoch != epoch:
                store_page(db, release, [], (new_epoch, 0))
            break
        store_page(db, release, entries, (new_epoch, int(entries[-1]["seq"])))
        stored += entries
        if len(entries) < PAGE:
            break
    if stored:
        log.info("%s: stored %d feedback entries; next: `diffops quality %s`", release, len(stored), release)
    return stored


def summarize(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per version (first rated first): feedback count, ratings (count, mean, histogram 1..5), flags (count and
    rate: the share of the version's feedback that carries the flag) and comments counted."""
    versions: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        versions.setdefault(row["version"], []).append(row)
    out = []
    for version, mine in versions.items():
        ratings = [int(r["rating"]) for r in mine if r["rating"] is not None]
        flags = {flag: sum(1 for r in mine if flag in r["flags"]) for flag in FLAGS}
        out.append({
            "version": version,
            "feedback": len(mine),
            "ratings": {"count": len(ratings), "mean": round(sum(ratings) / len(ratings), 3) if ratings else None,
                        "histogram": {str(n): ratings.count(n) for n in range(1, 6)}},
            "flags": {flag: {"count": count, "rate": round(count / len(mine), 4)} for flag, count in flags.items()},
            "comments": sum(1 for r in mine if r["comment"]),
            "last_at": max(r["at"] for r in mine),
        })
    return out
