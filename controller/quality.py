"""The quality loop's controller side: read each release's user feedback into the state file, and sum it per version.

The observe phase (`controller.tick.observe`) calls `drain` once per tick for every router it sees: pages of
feedback past the stored cursor are read through the router (`GET /<release>/feedback`, from the release's
tally, `serving.feedback`) and stored with the cursor past them (`controller.state.feedback`). Reading deletes
nothing, so a controller that dies mid-read reads the page again; a tally that restarted (a new epoch) is read
from its start. `summarize` (pure) is what `diffops quality` prints and what the feedback metrics count.
"""

from __future__ import annotations

import base64
import logging
import re
import sqlite3
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from controller.state.feedback import Cursor, feedback_rows, read_cursor, store_page
from controller.state.samples import sample_counts, sample_rows, store_samples

__all__ = ["PAGE", "PAGES_PER_TICK", "FeedbackSource", "SampleSource", "drain", "drain_samples", "figures", "summarize"]

log = logging.getLogger("diffops.controller")

PAGE = 1000  # entries per read
PAGES_PER_TICK = 20  # reads per release per tick at most; the rest waits for the next tick
SAMPLE_PAGE = 200  # samples per read (the scorer also caps a page's image bytes)
SAFE_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # a request id or version id usable as a file name
FLAGS = ("nsfw", "artifact", "prompt_mismatch", "other")


@runtime_checkable
class FeedbackSource(Protocol):
    def router_feedback(self, release: str, epoch: str | None, after: int, limit: int) -> dict[str, Any] | None: ...


@runtime_checkable
class SampleSource(Protocol):
    def router_samples(self, release: str, epoch: str | None, after: int, limit: int) -> dict[str, Any] | None: ...


ReadPage = Callable[[str, str | None, int, int], dict[str, Any] | None]
StorePage = Callable[[list[dict[str, Any]], Cursor], None]


def _read(read: ReadPage, store: StorePage, release: str, db: sqlite3.Connection, table: str, key: str, what: str,
          limit: int) -> list[dict[str, Any]]:
    """Pages past the stored cursor in `table`, each stored with the cursor past it, until none is left (or
    PAGES_PER_TICK pages); what was stored."""
    stored: list[dict[str, Any]] = []
    for _ in range(PAGES_PER_TICK):
        cursor = read_cursor(db, release, table)
        epoch, after = cursor if cursor is not None else (None, 0)
        page = read(release, epoch, after, limit)
        if page is None:
            break
        entries, new_epoch = list(page.get(key) or []), str(page["epoch"])
        if new_epoch == epoch and int(page.get("first", 0)) > after + 1:
            log.warning("%s: %d %s were dropped before they were read (the router app holds a bounded number); next: storing "
                        "the rest", release, int(page["first"]) - after - 1, what)
        elif epoch is not None and new_epoch != epoch:
            log.info("%s: the %s source restarted (epoch %s, was %s); next: reading it from its start", release, what, new_epoch, epoch)
        if not entries:
            if cursor is None or new_epoch != epoch:
                store([], (new_epoch, 0))
            break
        store(entries, (new_epoch, int(entries[-1]["seq"])))
        stored += entries
        if int(entries[-1]["seq"]) >= int(page.get("last", 0)):
            break
    return stored


def drain(source: FeedbackSource, release: str, db: sqlite3.Connection) -> list[dict[str, Any]]:
    """Store the release's new feedback; the entries stored (empty when there were none or the router did not answer)."""
    stored = _read(source.router_feedback, lambda entries, cursor: store_page(db, release, entries, cursor), release, db,
                   "feedback_cursor", "entries", "feedback entries", PAGE)
    if stored:
        log.info("%s: stored %d feedback entries; next: `diffops quality %s`", release, len(stored), release)
    return stored


def drain_samples(source: SampleSource, release: str, db: sqlite3.Connection, samples_dir: Path, max_samples: int) -> list[dict[str, Any]]:
    """Store the release's new sampled outputs: every score, and the image of a sample drawn for review while its
    version has fewer than `max_samples` kept (as `<samples_dir>/<release>/<version>/<request id>.png`)."""
    kept = sample_counts(db, release)

    def store(samples: list[dict[str, Any]], cursor: Cursor) -> None:
        rows = []
        for sample in samples:
            image = None
            png = base64.b64decode(sample["png"]) if sample.get("png") else b""
            version, request_id = str(sample["version"]), str(sample["request_id"])
            if png and kept.get(version, 0) < max_samples and SAFE_NAME.fullmatch(request_id) and SAFE_NAME.fullmatch(version):
                image = f"{release}/{version}/{request_id}.png"
                (samples_dir / image).parent.mkdir(parents=True, exist_ok=True)
                (samples_dir / image).write_bytes(png)
                kept[version] = kept.get(version, 0) + 1
            rows.append({**sample, "image": image})
        store_samples(db, release, rows, cursor)

    stored = _read(source.router_samples, store, release, db, "sample_cursor", "samples", "sampled outputs", SAMPLE_PAGE)
    if stored:
        reviewed = sum(1 for s in stored if s.get("png"))
        log.info("%s: stored %d sampled outputs (%d for review); next: `diffops quality %s`, the review page",
                 release, len(stored), reviewed, release)
    return stored


def figures(db: sqlite3.Connection, release: str, version: str) -> dict[str, Any]:
    """A version's quality so far, as canary and post-promotion analysis judge it (`controller.rollout.analysis`):
    feedback (users' and reviewers'), ratings and their mean, feedback carrying a flag, CLIP scores and their mean."""
    rows = feedback_rows(db, release, version)
    ratings = [int(r["rating"]) for r in rows if r["rating"] is not None]
    scores = [float(s["clip_score"]) for s in sample_rows(db, release, version) if s["clip_score"] is not None]
    return {"feedback": len(rows), "ratings": len(ratings), "mean_rating": round(sum(ratings) / len(ratings), 3) if ratings else None,
            "flagged": sum(1 for r in rows if r["flags"]), "clip_scores": len(scores),
            "mean_clip_score": round(sum(scores) / len(scores), 3) if scores else None}


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


def summarize(rows: Iterable[dict[str, Any]], samples: Iterable[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Per version (first rated or sampled first): feedback count and how much came from reviewers, ratings (count,
    mean, histogram 1..5), flags (count and rate: the share of the version's feedback that carries the flag),
    comments counted; of its sampled outputs: how many, how many kept for review, CLIP scores (count, mean) and the
    share the safety checker flagged."""
    versions: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]]]] = {}
    for row in rows:
        versions.setdefault(row["version"], ([], []))[0].append(row)
    for sample in samples:
        versions.setdefault(sample["version"], ([], []))[1].append(sample)
    out = []
    for version, (mine, sampled) in versions.items():
        ratings = [int(r["rating"]) for r in mine if r["rating"] is not None]
        flags = {flag: sum(1 for r in mine if flag in r["flags"]) for flag in FLAGS}
        scores = [float(s["clip_score"]) for s in sampled if s["clip_score"] is not None]
        checked = [bool(s["nsfw"]) for s in sampled if s.get("nsfw") is not None]
        out.append({
            "version": version,
            "feedback": len(mine),
            "reviews": sum(1 for r in mine if r.get("source") == "review"),
            "ratings": {"count": len(ratings), "mean": _mean([float(r) for r in ratings]),
                        "histogram": {str(n): ratings.count(n) for n in range(1, 6)}},
            "flags": {flag: {"count": count, "rate": round(count / len(mine), 4) if mine else 0.0} for flag, count in flags.items()},
            "comments": sum(1 for r in mine if r["comment"]),
            "flagged": sum(1 for r in mine if r["flags"]),
            "samples": {"count": len(sampled), "kept_for_review": sum(1 for s in sampled if s.get("image"))},
            "clip_score": {"count": len(scores), "mean": _mean(scores)},
            "nsfw": {"checked": len(checked), "flagged": sum(checked), "rate": round(sum(checked) / len(checked), 4) if checked else None},
            "last_at": max([r["at"] for r in mine] + [s["at"] for s in sampled]),
        })
    return out
