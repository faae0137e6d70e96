"""The controller's SQLite state store (WAL, synchronous=FULL).

Record step of a reconcile: `save()` writes the whole recorded state (small,
fixed-schema rows) and appends events in one transaction, so a killed
controller leaves either the old state or the new one, never a mix. Readers
(`diffops status`, `history`) open the same file read-only. The schema is
an ordered list of migrations (`store_schema`): a file written by an older
diffops is upgraded in place when the controller opens it, one written by a
newer one is refused untouched; columns a record does not know are ignored on
reading. A refused commit (`--require-signed-commits`) has a table of its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import ValidationError

from controller.cost import CostRecord
from controller.parse.release import Spec
from controller.state.migrations import SCHEMA_VERSION, StateFileError, file_version, migrate, refuse_newer
from controller.state.records import Command, Event, ObservedApp, ReleaseRecord, VersionRecord

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = ["SCHEMA_VERSION", "ControllerRecord", "GateRecord", "RefusedCommit", "State", "StateFileError", "Store"]

log = logging.getLogger("diffops.controller")

APP_COLUMNS = ("name", "status", "message", "running", "target", "weights", "nodes")
JSON_FIELDS = {"deployed_args", "analysis"}

GateRecord = tuple[str, str, str, dict[str, Any]]  # release, version, gate key, the gate's report
_R = TypeVar("_R", bound="DataclassInstance")


@dataclass(frozen=True)
class RefusedCommit:
    """A branch head refused by `--require-signed-commits`: nothing from it was applied."""

    commit: str
    reason: str  # unsigned | untrusted-key | bad-signature
    message: str  # what happened and what to do
    at: float  # when it was first refused


@dataclass(frozen=True)
class ControllerRecord:
    last_attempted_commit: str | None = None
    attempted_at: float | None = None
    last_applied_commit: str | None = None
    applied_at: float | None = None
    refused: RefusedCommit | None = None  # kept in its own table, cleared once a signed head is accepted


@dataclass
class State:
    controller: ControllerRecord = field(default_factory=ControllerRecord)
    releases: dict[str, ReleaseRecord] = field(default_factory=dict)
    versions: list[VersionRecord] = field(default_factory=list)
    apps: dict[str, ObservedApp] = field(default_factory=dict)  # what Ray Serve last reported, for `status`
    registry_drift: dict[str, dict[str, Any]] = field(default_factory=dict)  # release -> {uri, message, since, checked_at}
    load_phases: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)  # (release, version) -> seconds by phase


def _encode(name: str, value: Any) -> Any:
    """A field as its column value: a spec as its JSON dump, a JSON field as JSON, anything else as it is."""
    if value is None:
        return None
    if name == "spec":
        return value.model_dump_json()
    return json.dumps(value, sort_keys=True) if name in JSON_FIELDS else value


def _decode(name: str, raw: Any, path: Path) -> Any:
    """A column value as its field; a stored spec is validated again, so every record holds a valid `Spec`."""
    if raw is None:
        return None
    if name == "spec":
        try:
            return Spec.model_validate_json(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise StateFileError(f"{path}: a recorded release spec no longer validates (spec.{where}: {first['msg']}); "
                                 "run the diffops that wrote this file, or move the file aside to start afresh") from None
    return json.loads(raw) if name in JSON_FIELDS else raw


def _row(record: DataclassInstance) -> dict[str, Any]:
    """A record's fields as column values."""
    return {f.name: _encode(f.name, getattr(record, f.name)) for f in dataclasses.fields(record)}


def _record(cls: type[_R], row: sqlite3.Row, path: Path) -> _R:
    """A record from a row; columns the record does not know (a state file from another diffops) are left out."""
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _decode(k, row[k], path) for k in row.keys() if k in known})


def _insert(db: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    columns = ", ".join(f'"{c}"' for c in row)
    db.execute(f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))


class Store:
    def __init__(self, path: Path, readonly: bool = False):
        """Open the state file; raise StateFileError (file untouched) when a newer diffops wrote it.

        The version is read before anything that could write (WAL mode rewrites the header), so a refused file
        stays byte-identical. A writer upgrades an older file; a reader reads it as it is.
        """
        self.path = Path(path)
        if readonly:
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            self._refuse_newer()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            self._refuse_newer()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            migrate(self.db, self.path)
        self.db.row_factory = sqlite3.Row

    def _refuse_newer(self) -> None:
        try:
            refuse_newer(file_version(self.db, self.path), self.path)
        except StateFileError:
            self.db.close()
            raise

    @property
    def version(self) -> int:
        return file_version(self.db, self.path)

    def load(self) -> State:
        row = self.db.execute("SELECT * FROM controller WHERE id = 1").fetchone()
        controller = _record(ControllerRecord, row, self.path) if row else ControllerRecord()
        controller = dataclasses.replace(controller, refused=self._refused())
        releases = {r["name"]: _record(ReleaseRecord, r, self.path) for r in self.db.execute("SELECT * FROM releases ORDER BY name")}
        versions = [_record(VersionRecord, r, self.path) for r in self.db.execute("SELECT * FROM versions ORDER BY release, created_at")]
        apps = {r["name"]: ObservedApp(**{**dict(r), "weights": json.loads(r["weights"]) if r["weights"] else None,
                                          "nodes": tuple(json.loads(r["nodes"]) if r["nodes"] else ())})
                for r in self.db.execute("SELECT * FROM apps")}
        return State(controller, releases, versions, apps, self.registry_drift(), self.load_phases())

    def save(self, state: State, events: Sequence[Event] = (), gates: Sequence[GateRecord] = (),
             consumed: Sequence[Command] = ()) -> None:
        """Replace the recorded state, append events, record gate reports (release, version, gate key, report)
        and mark manual commands consumed, atomically."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute("DELETE FROM controller")
            controller = _row(state.controller)
            refused = controller.pop("refused")
            _insert(db, "controller", {"id": 1, **controller})
            db.execute("DELETE FROM refused_commit")
            if refused is not None:
                _insert(db, "refused_commit", {"id": 1, **_row(refused)})
            db.execute("DELETE FROM releases")
            for release in state.releases.values():
                _insert(db, "releases", _row(release))
            db.execute("DELETE FROM versions")
            for version in state.versions:
                _insert(db, "versions", _row(version))
            db.execute("DELETE FROM apps")
            for app in state.apps.values():
                row = {column: getattr(app, column) for column in APP_COLUMNS}
                _insert(db, "apps", {**row, "weights": json.dumps(row["weights"]) if row["weights"] is not None else None,
                                     "nodes": json.dumps(list(row["nodes"]))})
            now = time.time()
            for command in consumed:
                db.execute("UPDATE commands SET consumed_at = ? WHERE id = ?", (now, command.id))
            for gate_release, gate_version, key, report in gates:
                db.execute("INSERT OR REPLACE INTO gates VALUES (?, ?, ?, ?, ?, ?)",
                           (gate_release, gate_version, key, int(report["ok"]), json.dumps(report), now))
            for event in events:
                _insert(db, "events", _row(dataclasses.replace(event, at=event.at or now)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _refused(self) -> RefusedCommit | None:
        try:
            row = self.db.execute('SELECT "commit", reason, message, at FROM refused_commit WHERE id = 1').fetchone()
        except sqlite3.OperationalError:  # a read-only look at a state file written before the table existed
            return None
        return RefusedCommit(**dict(row)) if row else None

    def registry_drift(self) -> dict[str, dict[str, Any]]:
        """Per release, its registry drift as the registry watch last recorded it (none in an older state file)."""
        try:
            rows = self.db.execute("SELECT release, uri, message, since, checked_at FROM registry_drift ORDER BY release").fetchall()
        except sqlite3.OperationalError:  # a read-only look at a file written before the table existed
            return {}
        return {r[0]: {"uri": r[1], "message": r[2], "since": r[3], "checked_at": r[4]} for r in rows}

    def load_phases(self) -> dict[tuple[str, str], dict[str, float]]:
        """Each version's latest replica start, seconds by phase, as its replicas reported it (none in an older file)."""
        try:
            rows = self.db.execute("SELECT release, version, phases FROM load_phases").fetchall()
        except sqlite3.OperationalError:  # a read-only look at a file written before the table existed
            return {}
        return {(r[0], r[1]): json.loads(r[2]) for r in rows}

    def save_load_phases(self, phases: dict[tuple[str, str], dict[str, float]], at: float, keep: Iterable[tuple[str, str]]) -> None:
        """Record reported starts, and forget those of versions not in `keep` (gone from the state)."""
        kept = set(keep)
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for (release, version), seconds in phases.items():
                db.execute("INSERT OR REPLACE INTO load_phases VALUES (?, ?, ?, ?)", (release, version, json.dumps(seconds), at))
            for release, version in db.execute("SELECT release, version FROM load_phases").fetchall():
                if (release, version) not in kept:
                    db.execute("DELETE FROM load_phases WHERE release = ? AND version = ?", (release, version))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def set_registry_drift(self, release: str, entry: dict[str, Any] | None) -> None:
        """Record a release's registry drift (None: it ended)."""
        if entry is None:
            self.db.execute("DELETE FROM registry_drift WHERE release = ?", (release,))
        else:
            self.db.execute("INSERT OR REPLACE INTO registry_drift VALUES (?, ?, ?, ?, ?)",
                            (release, entry["uri"], entry["message"], entry["since"], entry["checked_at"]))

    def events(self, release: str | None = None, limit: int = 1000) -> list[Event]:
        where, args = ("WHERE release = ?", (release,)) if release else ("", ())
        rows = self.db.execute(f"SELECT * FROM (SELECT * FROM events {where} ORDER BY id DESC LIMIT ?) ORDER BY id", (*args, limit))
        return [_record(Event, r, self.path) for r in rows]

    def add_command(self, command: Command) -> int:
        cursor = self.db.execute('INSERT INTO commands (release, action, who, at, "full") VALUES (?, ?, ?, ?, ?)',
                                 (command.release, command.action, command.who, command.at, int(command.full)))
        return int(cursor.lastrowid or 0)

    def pending_commands(self) -> list[Command]:
        rows = self.db.execute('SELECT id, release, action, who, at, "full" FROM commands WHERE consumed_at IS NULL ORDER BY id')
        return [Command(r["release"], r["action"], r["who"], r["at"], bool(r["full"]), r["id"]) for r in rows]

    def passed_gate(self, release: str, version: str, gate_key: str) -> dict[str, Any] | None:
        """A passing gate report for exactly this version and these checks, if one was recorded."""
        row = self.db.execute("SELECT report FROM gates WHERE release = ? AND version = ? AND gate_key = ? AND ok = 1",
                              (release, version, gate_key)).fetchone()
        if row is None:
            return None
        report: dict[str, Any] = json.loads(row["report"])
        return report

    def attach_gate_run(self, release: str, version: str, gate_key: str, run: dict[str, Any]) -> bool:
        """Name the tracking run that logged a recorded gate in its report; False when no such gate is recorded (yet)."""
        row = self.db.execute("SELECT report FROM gates WHERE release = ? AND version = ? AND gate_key = ?",
                              (release, version, gate_key)).fetchone()
        if row is None:
            return False
        report = {**json.loads(row["report"]), "run": run}
        self.db.execute("UPDATE gates SET report = ? WHERE release = ? AND version = ? AND gate_key = ?",
                        (json.dumps(report), release, version, gate_key))
        return True

    def gate_reports(self, release: str | None = None) -> dict[tuple[str, str], dict[str, Any]]:
        """The latest gate report per (release, version)."""
        where, args = ("WHERE release = ?", (release,)) if release else ("", ())
        rows = self.db.execute(f"SELECT release, version, report FROM gates {where} ORDER BY at", args)
        return {(r["release"], r["version"]): json.loads(r["report"]) for r in rows}

    def save_costs(self, records: Iterable[CostRecord], samples: Iterable[CostRecord] = (), keep_since: float | None = None) -> None:
        """Replace the cost totals of `records`, append `samples` of them, and drop samples older than `keep_since`."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for record in records:
                db.execute("DELETE FROM costs WHERE release = ? AND version = ?", (record.release, record.version))
                _insert(db, "costs", _row(record))
            for sample in samples:
                row = {k: v for k, v in _row(sample).items() if not k.startswith("work_")}
                db.execute(f"INSERT OR REPLACE INTO cost_samples ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                           tuple(row.values()))
            if keep_since is not None:
                db.execute("DELETE FROM cost_samples WHERE at < ?", (keep_since,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def costs(self, release: str | None = None) -> list[CostRecord]:
        """Every version's cost totals (none in a state file from before cost accounting)."""
        where, args = ("WHERE release = ?", (release,)) if release else ("", ())
        try:
            rows = self.db.execute(f"SELECT * FROM costs {where} ORDER BY release, version", args).fetchall()
        except sqlite3.OperationalError:  # a read-only look at a file written before the table existed
            return []
        return [_record(CostRecord, r, self.path) for r in rows]

    def cost_samples(self, at: float, release: str | None = None) -> dict[tuple[str, str], CostRecord]:
        """Per version, its totals as last sampled at or before `at` (versions sampled only later are absent)."""
        where, args = ("AND release = ?", (release,)) if release else ("", ())
        query = (f"SELECT s.* FROM cost_samples s JOIN (SELECT release, version, max(at) AS at FROM cost_samples WHERE at <= ? {where} "
                 "GROUP BY release, version) latest USING (release, version, at)")
        try:
            rows = self.db.execute(query, (at, *args)).fetchall()
        except sqlite3.OperationalError:
            return {}
        return {(r["release"], r["version"]): _record(CostRecord, r, self.path) for r in rows}

    def integrity(self) -> str:
        return str(self.db.execute("PRAGMA integrity_check").fetchone()[0])

    def close(self) -> None:
        self.db.close()
