"""The SQLite state store and what status/history make of it."""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest

from controller.cli.status_view import history_rows, status_json, status_text
from controller.state.records import Event, ObservedApp, ReleaseRecord, VersionRecord
from controller.state.store import SCHEMA_VERSION, ControllerRecord, State, Store
from tests.conftest import make_release, respec

SPEC = respec(make_release().spec, replicas={"count": 2})


def sample_state() -> State:
    release = ReleaseRecord("demo", "Healthy", "v2 serving 100%", "c2", "v2", SPEC, 10.0, load_seconds=6.5)
    versions = [
        VersionRecord("demo", "v2", "stable", 100, "ready", "c2", SPEC, 5.0, ready_at=9.0),
        VersionRecord("demo", "v1", "standby", 0, "ready", "c1", SPEC, 1.0, ready_at=2.0, standby_since=9.0, deployed_args={"a": 1}),
    ]
    apps = {"demo--v2": ObservedApp("demo--v2", "RUNNING", "", 2, 2), "demo--v1": ObservedApp("demo--v1", "RUNNING", "", 1, 2)}
    return State(ControllerRecord("c2", 10.0, "c2", 10.0), {"demo": release}, versions, apps)


def test_roundtrip_and_wal(tmp_path):
    store = Store(tmp_path / "state.db")
    state = sample_state()
    store.save(state, [Event("demo", "promoted", "v2 ready", "v2", "c2")])
    loaded = Store(tmp_path / "state.db", readonly=True).load()
    assert loaded.controller == state.controller and loaded.releases == state.releases
    assert sorted(loaded.versions, key=lambda v: v.version) == sorted(state.versions, key=lambda v: v.version)
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.integrity() == "ok"


def test_a_failed_save_leaves_the_previous_state(tmp_path):
    store = Store(tmp_path / "state.db")
    store.save(sample_state())
    broken = sample_state()
    broken.versions.append(broken.versions[0])  # duplicate primary key: the write fails midway
    with pytest.raises(sqlite3.IntegrityError):
        store.save(broken, [Event("demo", "x", "never recorded")])
    assert store.load().versions == Store(tmp_path / "state.db").load().versions
    assert len(store.load().versions) == 2 and store.events() == []


def test_readonly_store_refuses_writes(tmp_path):
    Store(tmp_path / "state.db").save(sample_state())
    with pytest.raises(sqlite3.OperationalError):
        Store(tmp_path / "state.db", readonly=True).save(sample_state())


def test_status_json_contract():
    data = status_json(sample_state())
    assert data["commit"] == "c2"
    [release] = data["releases"]
    assert {k: release[k] for k in ("name", "phase", "message", "desired_commit", "desired_version")} == {
        "name": "demo", "phase": "Healthy", "message": "v2 serving 100%", "desired_commit": "c2", "desired_version": "v2"}
    assert [(v["id"], v["role"], v["weight"], v["ready_replicas"], v["replicas"]) for v in release["versions"]] == [
        ("v2", "stable", 100, 2, 2), ("v1", "standby", 0, 1, 2)]
    assert "v1           standby  weight   0%  replicas 1/2" in status_text(sample_state(), now=20.0)


def test_history_pairs_starts_with_outcomes():
    events = [
        Event("demo", "rollout-started", "rolling out v2", "v2", "c2", 100.0),
        Event("demo", "prepared", "verified", "v2", "c2", 101.0),
        Event("demo", "promoted", "v2 ready", "v2", "c2", 107.5),
        Event("demo", "rolled-back", "v1 was the warm standby", "v1", "c3", 200.0),
        Event("demo", "rollout-started", "rolling out v3", "v3", "c4", 300.0),
        Event("demo", "failed", "v3 failed: digest mismatch", "v3", "c4", 301.0),
    ]
    rows = history_rows(events)
    assert [(r["version"], r["outcome"], r["finished_at"] - r["started_at"]) for r in rows] == [
        ("v2", "promoted", 7.5), ("v1", "rolled back", 0.0), ("v3", "failed", 1.0)]


def test_a_state_file_from_an_older_diffops_is_upgraded_in_place(tmp_path):
    path = tmp_path / "state.db"
    with sqlite3.connect(path) as old:  # an early layout: fewer columns, one since renamed
        old.execute("CREATE TABLE releases (name TEXT PRIMARY KEY, phase TEXT NOT NULL, message TEXT NOT NULL, desired_commit TEXT, "
                    "desired_version TEXT, spec TEXT, updated_at REAL NOT NULL, failed_version TEXT, failed_blob TEXT, load_seconds REAL)")
        old.execute("INSERT INTO releases VALUES ('demo', 'Healthy', 'v1 serving 100%', 'c1', 'v1', ?, 1.0, NULL, 'b1', 4.2)",
                    (SPEC.model_dump_json(),))
    store = Store(path)
    [record] = store.load().releases.values()
    assert (record.name, record.phase, record.load_seconds, record.failures, record.held_fingerprint) == ("demo", "Healthy", 4.2, 0, None)
    store.save(State(releases={"demo": replace(record, phase="Progressing")}))
    assert Store(path, readonly=True).load().releases["demo"].phase == "Progressing"


def test_a_new_state_file_is_created_at_the_current_schema_in_a_private_dir(tmp_path):
    path = tmp_path / "new" / "state.db"
    store = Store(path)
    assert store.version == SCHEMA_VERSION == 8
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == 8
    assert (path.parent.stat().st_mode & 0o777) == 0o700
