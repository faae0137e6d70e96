"""State file schema migrations: every layout an older diffops wrote upgrades in place, keeping its rows;
a file from a newer diffops is refused byte-identical, by the store and by `diffops status`.

The old layouts below are copied from what earlier diffops releases wrote (not derived from the migrations)."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from controller.cli.main import main
from controller.state.migrations import Migration, migrate
from controller.state.store import SCHEMA_VERSION, StateFileError, Store
from tests.conftest import make_release

FIRST_LAYOUT = """
CREATE TABLE controller (id INTEGER PRIMARY KEY CHECK (id = 1), last_attempted_commit TEXT, attempted_at REAL,
    last_applied_commit TEXT, applied_at REAL);
CREATE TABLE releases (name TEXT PRIMARY KEY, phase TEXT NOT NULL, message TEXT NOT NULL, desired_commit TEXT,
    desired_version TEXT, spec TEXT, updated_at REAL NOT NULL, failed_version TEXT, failed_blob TEXT, load_seconds REAL);
CREATE TABLE versions (release TEXT NOT NULL, version TEXT NOT NULL, role TEXT NOT NULL, weight INTEGER NOT NULL,
    status TEXT NOT NULL, "commit" TEXT NOT NULL, spec TEXT NOT NULL, created_at REAL NOT NULL, ready_at REAL,
    standby_since REAL, deployed_args TEXT, PRIMARY KEY (release, version));
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, release TEXT NOT NULL, version TEXT,
    kind TEXT NOT NULL, message TEXT NOT NULL, "commit" TEXT);
CREATE INDEX events_by_release ON events (release, id);
CREATE TABLE apps (name TEXT PRIMARY KEY, status TEXT NOT NULL, message TEXT NOT NULL, running INTEGER NOT NULL,
    target INTEGER NOT NULL);
"""
CANARY_ADDITIONS = """
ALTER TABLE releases ADD COLUMN held_fingerprint TEXT; ALTER TABLE releases ADD COLUMN step INTEGER;
ALTER TABLE releases ADD COLUMN step_started_at REAL; ALTER TABLE releases ADD COLUMN analysis_at REAL;
ALTER TABLE releases ADD COLUMN failures INTEGER NOT NULL DEFAULT 0; ALTER TABLE releases ADD COLUMN analysis TEXT;
ALTER TABLE versions ADD COLUMN gate_key TEXT; ALTER TABLE versions ADD COLUMN retire_at REAL;
ALTER TABLE apps ADD COLUMN weights TEXT;
CREATE TABLE gates (release TEXT NOT NULL, version TEXT NOT NULL, gate_key TEXT NOT NULL, ok INTEGER NOT NULL,
    report TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (release, version, gate_key));
CREATE TABLE commands (id INTEGER PRIMARY KEY AUTOINCREMENT, release TEXT NOT NULL, action TEXT NOT NULL,
    who TEXT NOT NULL, at REAL NOT NULL, "full" INTEGER NOT NULL DEFAULT 0, consumed_at REAL);
"""
SURGE_ADDITIONS = "ALTER TABLE versions ADD COLUMN replicas INTEGER;"
# (what an older diffops wrote, the user_version it set): the three layouts that all said version 1, and none
LAYOUTS = {
    "no user_version, first layout": (FIRST_LAYOUT, 0),
    "v1, first layout": (FIRST_LAYOUT, 1),
    "v1, canary layout": (FIRST_LAYOUT + CANARY_ADDITIONS, 1),
    "v1, surge layout": (FIRST_LAYOUT + CANARY_ADDITIONS + SURGE_ADDITIONS, 1),
}
# The demo spec as the first diffops recorded it: no batch wait, no image policy, no cost section yet.
SPEC = make_release().spec.model_dump(mode="json")
del SPEC["replicas"]["batch_wait_timeout_s"], SPEC["runtime"]["image_policy"], SPEC["cost"]


def old_state_file(path: Path, script: str, version: int) -> None:
    db = sqlite3.connect(path)
    db.executescript(script)
    db.execute("INSERT INTO controller VALUES (1, 'c2', 20.0, 'c1', 10.0)")
    db.execute("INSERT INTO releases (name, phase, message, desired_commit, desired_version, spec, updated_at, load_seconds) "
               "VALUES ('demo', 'Healthy', 'v1 serving 100%', 'c1', 'v1', ?, 10.0, 4.2)", (json.dumps(SPEC),))
    db.execute('INSERT INTO versions (release, version, role, weight, status, "commit", spec, created_at, ready_at) '
               "VALUES ('demo', 'v1', 'stable', 100, 'ready', 'c1', ?, 5.0, 9.0)", (json.dumps(SPEC),))
    db.execute("INSERT INTO events (at, release, version, kind, message, \"commit\") VALUES (9.0, 'demo', 'v1', 'promoted', 'v1 ready', 'c1')")
    db.execute("INSERT INTO apps (name, status, message, running, target) VALUES ('demo--v1', 'RUNNING', '', 1, 1)")
    db.execute(f"PRAGMA user_version = {version}")
    db.commit()
    db.close()


def layout(path: Path) -> dict[str, set[tuple[str, str]]]:
    db = sqlite3.connect(path)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")]
    result = {t: {(r[1], r[2]) for r in db.execute(f'PRAGMA table_info("{t}")')} for t in tables}
    db.close()
    return result


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_older_layout_upgrades_in_place_keeping_its_rows(name, tmp_path, caplog):
    script, version = LAYOUTS[name]
    path = tmp_path / "state.db"
    old_state_file(path, script, version)
    fresh = tmp_path / "fresh.db"
    Store(fresh).close()

    with caplog.at_level(logging.INFO, logger="diffops.controller"):
        store = Store(path)
    assert store.version == SCHEMA_VERSION == 8
    assert [r.getMessage().split(" in ")[0] for r in caplog.records][-1].startswith(f"state: {path} upgraded from schema 7 to 8 (")
    assert len(caplog.records) == 8 - version  # one line per migration applied
    upgraded = layout(path)
    assert {t: cols for t, cols in upgraded.items() if t != "releases"} == {t: c for t, c in layout(fresh).items() if t != "releases"}
    assert layout(fresh)["releases"] <= upgraded["releases"]  # a retired column (failed_blob) is kept, unread

    state = store.load()
    assert state.controller.last_applied_commit == "c1" and state.controller.last_attempted_commit == "c2"
    [release] = state.releases.values()
    assert (release.name, release.phase, release.load_seconds, release.failures) == ("demo", "Healthy", 4.2, 0)
    assert release.spec is not None and release.spec.model.digest == SPEC["model"]["digest"]
    assert (release.spec.replicas.batch_wait_timeout_s, release.spec.runtime.image_policy, release.spec.cost.gpu_hour_usd) == (
        0.01, "verify", None)  # the README's defaults for fields an older diffops did not record
    [v1] = state.versions
    assert (v1.version, v1.role, v1.weight, v1.ready_at, v1.replicas) == ("v1", "stable", 100, 9.0, None)
    assert [(e.kind, e.message) for e in store.events("demo")] == [("promoted", "v1 ready")]
    assert store.costs() == [] and store.cost_samples(100.0) == {}  # cost accounting starts from the upgrade
    assert store.integrity() == "ok"
    store.save(state)  # and it writes like a fresh one
    assert Store(path, readonly=True).load().releases == state.releases


def test_a_recorded_spec_that_no_longer_validates_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "state.db"
    old_state_file(path, FIRST_LAYOUT, 1)
    db = sqlite3.connect(path)
    db.execute("UPDATE versions SET spec = ?", (json.dumps({**SPEC, "replicas": {**SPEC["replicas"], "count": 0}}),))
    db.commit()
    db.close()
    with pytest.raises(StateFileError) as refused:
        Store(path).load()
    assert "a recorded release spec no longer validates (spec.replicas.count:" in str(refused.value)
    assert "run the diffops that wrote this file, or move the file aside" in str(refused.value)


def test_an_upgraded_file_is_not_upgraded_again(tmp_path, caplog):
    path = tmp_path / "state.db"
    old_state_file(path, FIRST_LAYOUT, 1)
    Store(path).close()
    with caplog.at_level(logging.INFO, logger="diffops.controller"):
        Store(path).close()
    assert caplog.records == []


def test_a_migration_that_fails_leaves_the_file_at_the_last_good_version(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path, isolation_level=None)
    migrations = (Migration(1, "t", ("CREATE TABLE t (x INTEGER)",)),
                  Migration(2, "u and a broken step", ("CREATE TABLE u (y INTEGER)", "ALTER TABLE missing ADD COLUMN z")))
    with pytest.raises(sqlite3.OperationalError, match="no such table: missing"):
        migrate(db, path, migrations)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    assert [r[0] for r in db.execute("SELECT name FROM sqlite_master ORDER BY name")] == ["t"]  # u was rolled back


@pytest.fixture
def newer_file(tmp_path) -> Path:
    path = tmp_path / "state" / "state.db"
    path.parent.mkdir()
    old_state_file(path, FIRST_LAYOUT + CANARY_ADDITIONS + SURGE_ADDITIONS, SCHEMA_VERSION + 1)
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE from_the_future (x TEXT)")
    db.commit()
    db.close()
    return path


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_from_a_newer_diffops_is_refused_untouched(newer_file, readonly):
    before = newer_file.read_bytes()
    with pytest.raises(StateFileError) as refused:
        Store(newer_file, readonly=readonly)
    assert str(refused.value) == (
        f"{newer_file} has state schema version {SCHEMA_VERSION + 1}, newer than the {SCHEMA_VERSION} this diffops knows: "
        "a newer diffops wrote it; it was left untouched. Upgrade diffops to read it, or pass another --state-dir to start afresh")
    assert newer_file.read_bytes() == before
    assert sorted(p.name for p in newer_file.parent.iterdir()) == ["state.db"]  # no journal or WAL left behind


@pytest.mark.parametrize("args", [["status"], ["status", "--json"], ["history", "demo"], ["abort", "demo"]])
def test_cli_on_a_newer_file_says_what_to_do_without_a_traceback(newer_file, args):
    before = newer_file.read_bytes()
    result = CliRunner().invoke(main, [*args, "--state-dir", str(newer_file.parent)])
    assert result.exit_code == 2 and result.exception is not None and isinstance(result.exception, SystemExit)
    assert f"error: {newer_file} has state schema version {SCHEMA_VERSION + 1}" in result.output
    assert "Upgrade diffops" in result.output and "Traceback" not in result.output
    assert newer_file.read_bytes() == before


def test_the_controller_refuses_a_newer_file_before_it_starts_anything(newer_file, release_repo):
    release_repo.release()
    release_repo.commit()
    before = newer_file.read_bytes()
    result = CliRunner().invoke(main, ["controller", "run", "--once", "--repo", str(release_repo.path),
                                       "--state-dir", str(newer_file.parent), "--ray-address", "http://127.0.0.1:9"])
    assert result.exit_code == 2 and "Upgrade diffops" in result.output and "Traceback" not in result.output
    assert "dashboard" not in result.output  # refused before any contact with Ray
    assert newer_file.read_bytes() == before


def test_a_file_that_is_not_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "state.db"
    path.write_bytes(b"not a database, but someone's notes\n" * 200)
    before = path.read_bytes()
    with pytest.raises(StateFileError, match="is not a diffops state file .* move it away"):
        Store(path)
    assert path.read_bytes() == before
