"""Sampled outputs in the controller's state file: the `samples` and `sample_cursor` tables (migration 6).

Written by the observe phase's sample read (`controller.quality.drain_samples`): each page of samples read from a
release's scorer (`serving.scorer`) and the cursor past it go in one transaction; a sample kept for review has its
PNG under `<state dir>/samples/` (written before the row, named by the row's `image`). Read by `diffops quality`,
the quality analysis and the review page (`controller.review`), whose ratings go to the `feedback` table with
source `review`, on the sample's request id, like a user's feedback on the same answer.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

from controller.state.feedback import UPSERT, Cursor, write_cursor

__all__ = ["review_queue", "sample_counts", "sample_rows", "store_review", "store_samples"]

INSERT = """
INSERT INTO samples (release, request_id, version, prompt, negative_prompt, seed, params, clip_score, nsfw, image, at, stored_at)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (release, request_id) DO NOTHING
"""
COLUMNS = ("release", "request_id", "version", "prompt", "negative_prompt", "seed", "params", "clip_score", "nsfw", "image", "at")


def store_samples(db: sqlite3.Connection, release: str, samples: Iterable[dict[str, Any]], cursor: Cursor) -> None:
    """Store a page of samples (`image`: the kept PNG's path under the samples dir, or None) and the cursor past
    them, atomically (`db` in autocommit mode). A sample read twice (a controller killed mid-read) is stored once."""
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    try:
        for s in samples:
            seed = s.get("seed")
            nsfw = s.get("nsfw")
            db.execute(INSERT, (release, str(s["request_id"]), str(s["version"]), str(s.get("prompt") or ""),
                                s.get("negative_prompt"), seed if isinstance(seed, int) and 0 <= seed < 2**63 else None,
                                json.dumps(s.get("params") or {}, sort_keys=True), s.get("clip_score"),
                                None if nsfw is None else int(bool(nsfw)), s.get("image"), float(s["at"]), now))
        write_cursor(db, release, cursor, "sample_cursor")
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _rows(db: sqlite3.Connection, where: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
    try:
        rows = db.execute(f"SELECT {', '.join(COLUMNS)} FROM samples {where}", args).fetchall()
    except sqlite3.OperationalError:  # a read-only look at a file at schema 5 or older
        return []
    return [{**dict(zip(COLUMNS, row, strict=True)), "params": json.loads(row[6])} for row in rows]


def sample_rows(db: sqlite3.Connection, release: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
    """Stored samples (of one release, or one version of it, or all), oldest first."""
    where = " AND ".join(f"{name} = ?" for name, value in (("release", release), ("version", version)) if value is not None)
    args = tuple(value for value in (release, version) if value is not None)
    return _rows(db, (f"WHERE {where} " if where else "") + "ORDER BY at", args)


def sample_counts(db: sqlite3.Connection, release: str) -> dict[str, int]:
    """Samples kept for review per version (those with an image): what `quality.review.max_samples` bounds."""
    try:
        rows = db.execute("SELECT version, COUNT(*) FROM samples WHERE release = ? AND image IS NOT NULL GROUP BY version",
                          (release,)).fetchall()
    except sqlite3.OperationalError:
        return {}
    return {str(version): int(count) for version, count in rows}


def review_queue(db: sqlite3.Connection, release: str, client: str, limit: int = 24) -> list[dict[str, Any]]:
    """Samples kept for review that `client` (a reviewer's key) has not rated yet, oldest first, at most `limit`."""
    where = ("WHERE release = ? AND image IS NOT NULL AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.release = samples.release "
             "AND f.request_id = samples.request_id AND f.client = ?) ORDER BY at LIMIT ?")
    return _rows(db, where, (release, client, max(0, limit)))


def store_review(db: sqlite3.Connection, release: str, request_id: str, client: str, feedback: dict[str, Any]) -> dict[str, Any] | None:
    """A reviewer's rating/flags/comment (`serving.feedback.parse_feedback`'s answer) on a kept sample, stored as
    feedback with source `review` (a repeat by the same reviewer replaces it); None when no such sample is kept."""
    found = _rows(db, "WHERE release = ? AND request_id = ? AND image IS NOT NULL", (release, request_id))
    if not found:
        return None
    sample = found[0]
    now = time.time()
    seed = sample["seed"]
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute(UPSERT, (release, request_id, client, sample["version"], feedback.get("rating"),
                            json.dumps(sorted(feedback.get("flags") or [])), feedback.get("comment"), None, seed,
                            json.dumps(sample["params"], sort_keys=True), sample["at"], now, now, "review"))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return {**feedback, "request_id": request_id, "client": client, "version": sample["version"], "source": "review", "at": now}
