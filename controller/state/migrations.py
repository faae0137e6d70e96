"""The state file's schema, as an ordered list of migrations keyed on SQLite's `PRAGMA user_version`.

Opened by `store.Store` before anything is read or written. A file at an older
version (including one with no version at all) is upgraded in place, one
migration per transaction, each logged; a file written by a newer diffops is
refused untouched (`StateFileError`), never truncated or altered.

To change the schema, append a migration: never edit one that has shipped.
Each step's SQL is frozen text, so a migration means the same thing forever.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MIGRATIONS", "Migration", "SCHEMA_VERSION", "StateFileError", "file_version", "migrate", "pending", "refuse_newer"]

log = logging.getLogger("diffops.controller")

# Version 1: the first layout (every diffops before canary rollouts wrote user_version 1 with it).
V1_TABLES = """
CREATE TABLE IF NOT EXISTS controller (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    last_attempted_commit TEXT, attempted_at REAL,
    last_applied_commit TEXT, applied_at REAL
);
CREATE TABLE IF NOT EXISTS releases (
    name TEXT PRIMARY KEY, phase TEXT NOT NULL, message TEXT NOT NULL,
    desired_commit TEXT, desired_version TEXT, spec TEXT, updated_at REAL NOT NULL,
    failed_version TEXT, load_seconds REAL
);
CREATE TABLE IF NOT EXISTS versions (
    release TEXT NOT NULL, version TEXT NOT NULL, role TEXT NOT NULL, weight INTEGER NOT NULL,
    status TEXT NOT NULL, "commit" TEXT NOT NULL, spec TEXT NOT NULL, created_at REAL NOT NULL,
    ready_at REAL, standby_since REAL, deployed_args TEXT,
    PRIMARY KEY (release, version)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, release TEXT NOT NULL, version TEXT,
    kind TEXT NOT NULL, message TEXT NOT NULL, "commit" TEXT
);
CREATE INDEX IF NOT EXISTS events_by_release ON events (release, id);
CREATE TABLE IF NOT EXISTS apps (
    name TEXT PRIMARY KEY, status TEXT NOT NULL, message TEXT NOT NULL, running INTEGER NOT NULL, target INTEGER NOT NULL
);
"""

# Version 2: canary steps and analysis, gates, manual commands, router weights, surge replicas, refused commits.
# Files that say version 1 were written in three layouts (columns were added without a version bump), so this
# step adds whatever column of the version-2 layout a table lacks instead of a fixed list of ALTERs.
V2_TABLES = """
CREATE TABLE IF NOT EXISTS gates (
    release TEXT NOT NULL, version TEXT NOT NULL, gate_key TEXT NOT NULL, ok INTEGER NOT NULL,
    report TEXT NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (release, version, gate_key)
);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT, release TEXT NOT NULL, action TEXT NOT NULL, who TEXT NOT NULL,
    at REAL NOT NULL, "full" INTEGER NOT NULL DEFAULT 0, consumed_at REAL
);
CREATE TABLE IF NOT EXISTS refused_commit (
    id INTEGER PRIMARY KEY CHECK (id = 1), "commit" TEXT NOT NULL, reason TEXT NOT NULL, message TEXT NOT NULL, at REAL NOT NULL
);
"""
V2_COLUMNS = {
    "releases": ('held_fingerprint TEXT', 'step INTEGER', 'step_started_at REAL', 'analysis_at REAL',
                 'failures INTEGER NOT NULL DEFAULT 0', 'analysis TEXT'),
    "versions": ('gate_key TEXT', 'retire_at REAL', 'replicas INTEGER'),
    "apps": ('weights TEXT',),
}

# Version 4: cost accounting. `costs`: each version's running totals (GPU-seconds by kind, images, bytes, USD) and the
# last tally reading taken in; `cost_samples`: the totals as they were, about once a minute, for windows (--since).
COST_COLUMNS = """release TEXT NOT NULL, version TEXT NOT NULL, at REAL NOT NULL,
    serving_s REAL NOT NULL DEFAULT 0, idle_s REAL NOT NULL DEFAULT 0, standby_s REAL NOT NULL DEFAULT 0,
    gate_s REAL NOT NULL DEFAULT 0, images INTEGER NOT NULL DEFAULT 0, egress_bytes INTEGER NOT NULL DEFAULT 0,
    storage_gb_s REAL NOT NULL DEFAULT 0, gpu_usd REAL NOT NULL DEFAULT 0, egress_usd REAL NOT NULL DEFAULT 0,
    storage_usd REAL NOT NULL DEFAULT 0"""
V4_TABLES = f"""
CREATE TABLE IF NOT EXISTS costs (
    {COST_COLUMNS},
    work_epoch TEXT, work_busy_s REAL NOT NULL DEFAULT 0, work_images INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (release, version)
);
CREATE TABLE IF NOT EXISTS cost_samples (
    {COST_COLUMNS},
    PRIMARY KEY (release, version, at)
);
CREATE INDEX IF NOT EXISTS cost_samples_by_time ON cost_samples (at)
"""

# Version 5: feedback on answered requests (one row per request and client: a repeat replaces), read from each
# release's tally past a cursor (the tally's epoch and the last sequence number stored).
V5_TABLES = """
CREATE TABLE IF NOT EXISTS feedback (
    release TEXT NOT NULL, request_id TEXT NOT NULL, client TEXT NOT NULL, version TEXT NOT NULL,
    rating INTEGER, flags TEXT NOT NULL, comment TEXT, prompt_sha256 TEXT, seed INTEGER, params TEXT,
    generated_at REAL, at REAL NOT NULL, stored_at REAL NOT NULL,
    PRIMARY KEY (release, request_id, client)
);
CREATE INDEX IF NOT EXISTS feedback_by_version ON feedback (release, version);
CREATE TABLE IF NOT EXISTS feedback_cursor (
    release TEXT PRIMARY KEY, epoch TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL
);
"""

# Version 6: sampled outputs (scored by the release's scorer, kept for review up to a bound per version) read from
# each release's scorer past a cursor; feedback says where it came from (a user through the API, or a reviewer).
V6_TABLES = """
CREATE TABLE IF NOT EXISTS samples (
    release TEXT NOT NULL, request_id TEXT NOT NULL, version TEXT NOT NULL, prompt TEXT NOT NULL, negative_prompt TEXT,
    seed INTEGER, params TEXT NOT NULL, clip_score REAL, nsfw INTEGER, image TEXT, at REAL NOT NULL, stored_at REAL NOT NULL,
    PRIMARY KEY (release, request_id)
);
CREATE INDEX IF NOT EXISTS samples_by_version ON samples (release, version);
CREATE TABLE IF NOT EXISTS sample_cursor (
    release TEXT PRIMARY KEY, epoch TEXT NOT NULL, seq INTEGER NOT NULL, at REAL NOT NULL
);
"""
V6_COLUMNS: dict[str, tuple[str, ...]] = {"feedback": ("source TEXT NOT NULL DEFAULT 'user'",)}

# Version 7: registry drift per release: its models:/ URI resolves to another digest than the pin (or cannot be
# checked), recorded by the controller's registry watch for `diffops status`.
V7_TABLES = """
CREATE TABLE IF NOT EXISTS registry_drift (
    release TEXT PRIMARY KEY, uri TEXT NOT NULL, message TEXT NOT NULL, since REAL NOT NULL, checked_at REAL NOT NULL
)
"""

# Version 8: each version's latest replica start by phase, as its replicas told the release's tally.
V8_TABLES = """
CREATE TABLE IF NOT EXISTS load_phases (
    release TEXT NOT NULL, version TEXT NOT NULL, phases TEXT NOT NULL, reported_at REAL NOT NULL,
    PRIMARY KEY (release, version)
)
"""

Step = str | Callable[[sqlite3.Connection], None]


class StateFileError(Exception):
    """The state file cannot be used by this diffops (newer schema, or not a state file); it was left untouched."""


@dataclass(frozen=True)
class Migration:
    version: int  # user_version once applied
    what: str  # one line for the log
    steps: tuple[Step, ...]


def _statements(script: str) -> list[str]:
    """A frozen DDL script as single statements (executescript would commit the migration's transaction)."""
    return [s.strip() for s in script.split(";") if s.strip()]


def _add_columns(columns: dict[str, tuple[str, ...]]) -> Callable[[sqlite3.Connection], None]:
    def step(db: sqlite3.Connection) -> None:
        for table, wanted in columns.items():
            have = {row[1] for row in db.execute(f'PRAGMA table_info("{table}")')}
            for column in wanted:
                if column.split()[0] not in have:
                    db.execute(f'ALTER TABLE "{table}" ADD COLUMN {column}')
    return step


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "the first layout: controller, releases, versions, events, apps", tuple(_statements(V1_TABLES))),
    Migration(2, "canary steps, gates, manual commands, router weights, surge replicas, refused commits",
              (*_statements(V2_TABLES), _add_columns(V2_COLUMNS))),
    Migration(3, "the nodes each app's replicas run on", ('ALTER TABLE apps ADD COLUMN nodes TEXT',)),
    Migration(4, "cost accounting: running totals per version, and samples of them for windows", tuple(_statements(V4_TABLES))),
    Migration(5, "user feedback per answered request, and the cursor of each release's feedback read",
              tuple(_statements(V5_TABLES))),
    Migration(6, "sampled outputs with their quality scores and review images, and where each feedback came from",
              (*_statements(V6_TABLES), _add_columns(V6_COLUMNS))),
    Migration(7, "registry drift per release (a models:/ alias that moved away from the pinned digest)",
              tuple(_statements(V7_TABLES))),
    Migration(8, "each version's latest replica start by phase (fetch, verify, load, warm-up)", tuple(_statements(V8_TABLES))),
)
SCHEMA_VERSION = MIGRATIONS[-1].version


def file_version(db: sqlite3.Connection, path: Path) -> int:
    """The file's schema version; a file that is not SQLite at all is refused."""
    try:
        return int(db.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as err:
        raise StateFileError(f"{path} is not a diffops state file ({err}); it was left as it is: move it away, "
                             "or pass another --state-dir") from None


def refuse_newer(version: int, path: Path, known: int = SCHEMA_VERSION) -> None:
    if version > known:
        raise StateFileError(
            f"{path} has state schema version {version}, newer than the {known} this diffops knows: a newer diffops "
            f"wrote it; it was left untouched. Upgrade diffops to read it, or pass another --state-dir to start afresh")


def pending(version: int, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[Migration]:
    """The migrations a file at `version` still needs, in order."""
    return [m for m in migrations if m.version > version]


def migrate(db: sqlite3.Connection, path: Path, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the file up to the last migration, one transaction each; return the versions applied.

    `db` is in autocommit mode (isolation_level=None). Each migration re-reads the version under the write lock,
    so two processes opening one old file apply each migration once.
    """
    applied = []
    fresh = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    for migration in migrations:
        started = time.monotonic()
        db.execute("BEGIN IMMEDIATE")
        try:
            current = file_version(db, path)
            refuse_newer(current, path, migrations[-1].version)
            if current >= migration.version:
                db.execute("ROLLBACK")
                continue
            for step in migration.steps:
                if isinstance(step, str):
                    db.execute(step)
                else:
                    step(db)
            db.execute(f"PRAGMA user_version = {int(migration.version)}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        applied.append(migration.version)
        if fresh:
            continue
        log.info("state: %s upgraded from schema %d to %d (%s) in %.0f ms; next: %s", path, current, migration.version,
                 migration.what, (time.monotonic() - started) * 1000,
                 "the next migration" if migration is not migrations[-1] else "load it as usual")
    if fresh and applied:
        log.info("state: created %s at schema %d; next: record the first reconcile", path, applied[-1])
    return applied
