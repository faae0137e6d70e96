"""User feedback in the controller's state file: the `feedback` and `feedback_cursor` tables (migration 4).

Written by the observe phase's feedback read (`controller.quality.drain`): each page of entries read from a
release's tally and the cursor past them go in one transaction, so a controller killed mid-read reads the
same page again and stores it once (one row per release, request id and client; a later answer replaces an
earlier one, an older one never replaces a newer). Read by `diffops quality` and the feedback metrics.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["Cursor", "feedback_counts", "feedback_rows", "read_cursor", "store_page", "write_cursor"]

Cursor = tuple[str, int]  # the tally's epoch, the last sequence number stored

UPSERT = """
INSERT INTO feedback (release, request_id, client, version, rating, flags, comment, prompt_sha256, seed, params,
                      generated_at, at, stored_at, source)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (release, request_id, client) DO UPDATE SET
    source = excluded.source, version = excluded.version, rating = excluded.rating, flags = excluded.flags, comment = excluded.comment,
    prompt_sha256 = excluded.prompt_sha256, seed = excluded.seed, params = excluded.params,
    generated_at = excluded.generated_at, at = excluded.at, stored_at = excluded.stored_at
WHERE excluded.at >= feedback.at
"""


def read_cursor(db: sqlite3.Connection, release: str, table: str = "feedback_cursor") -> Cursor | None:
    """A release's read position in one of the tally streams (`feedback_cursor`, `sample_cursor`)."""
    row = db.execute(f"SELECT epoch, seq FROM {table} WHERE release = ?", (release,)).fetchone()
    return (str(row[0]), int(row[1])) if row else None


def write_cursor(db: sqlite3.Connection, release: str, cursor: Cursor, table: str = "feedback_cursor") -> None:
    """Move a release's read position (inside the caller's transaction)."""
    db.execute(f"INSERT INTO {table} (release, epoch, seq, at) VALUES (?, ?, ?, ?) ON CONFLICT (release) DO UPDATE "
               "SET epoch = excluded.epoch, seq = excluded.seq, at = excluded.at", (release, cursor[0], cursor[1], time.time()))


def store_page(db: sqlite3.Connection, release: str, entries: Iterable[dict[str, Any]], cursor: Cursor) -> None:
    """Store a page of tally entries and the cursor past them, atomically (`db` in autocommit mode)."""
    now = time.time()
    db.execute("BEGIN IMMEDIATE")
    try:
        for e in entries:
            seed = e.get("seed")
            db.execute(UPSERT, (release, str(e["request_id"]), str(e["client"]), str(e["version"]), e.get("rating"),
                                json.dumps(sorted(e.get("flags") or [])), e.get("comment"), e.get("prompt_sha256"),
                                seed if isinstance(seed, int) and 0 <= seed < 2**63 else None,
                                json.dumps(e.get("params") or {}, sort_keys=True), e.get("generated_at"), float(e["at"]), now,
                                str(e.get("source") or "user")))
        write_cursor(db, release, cursor)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def feedback_rows(db: sqlite3.Connection, release: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
    """Stored feedback (of one release, or one version of it, or all), oldest first; [] in a state file from before
    feedback existed."""
    where = " AND ".join(f"{name} = ?" for name, value in (("release", release), ("version", version)) if value is not None)
    args = tuple(value for value in (release, version) if value is not None)
    where = f"WHERE {where}" if where else ""
    try:
        rows = db.execute(f"SELECT release, version, request_id, rating, flags, comment, at, source FROM feedback {where} "
                          "ORDER BY at", args).fetchall()
    except sqlite3.OperationalError:  # a read-only look at a file at schema 5 or older
        return []
    return [{"release": r[0], "version": r[1], "request_id": r[2], "rating": r[3], "flags": json.loads(r[4]), "comment": r[5],
             "at": r[6], "source": r[7]} for r in rows]


def feedback_counts(db: sqlite3.Connection) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str, str], int]]:
    """Stored feedback per (release, version, rating or "none") and flags per (release, version, flag)."""
    ratings: dict[tuple[str, str, str], int] = {}
    flags: dict[tuple[str, str, str], int] = {}
    for row in feedback_rows(db):
        key = (row["release"], row["version"], str(row["rating"] or "none"))
        ratings[key] = ratings.get(key, 0) + 1
        for flag in row["flags"]:
            flags[(row["release"], row["version"], flag)] = flags.get((row["release"], row["version"], flag), 0) + 1
    return ratings, flags
