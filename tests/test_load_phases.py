"""A replica's start by phase (fetch, verify, load, warm-up) from the release's tally to the state file and
`diffops status`: the tally keeps each version's latest start, the controller's cost tick reads it with the work
(`GET /<release>/work`), stores what changed, forgets gone versions, and the status shows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from controller.cli.status_view import status_json, status_text
from controller.state.records import ReleaseRecord, VersionRecord
from controller.state.store import State, Store
from controller.tick.costs import CostBook, load_readings
from serving.artifacts import ModelCache
from serving.model_server import load_phases
from serving.tally import Tally
from tests.conftest import make_release

SPEC = make_release().spec
PHASES = {"fetch": 0.0, "verify": 0.25, "load": 2.5, "warmup": 0.5}

# (case, the router's /work answer, expected readings)
READINGS = [
    ("a start", {"loads": {"v1": PHASES}}, {("demo", "v1"): PHASES}),
    ("no loads: an older router", {"epoch": "e1", "versions": {}}, {}),
    ("not an answer", None, {}),
    ("loads not a mapping", {"loads": ["v1"]}, {}),
    ("a phase missing", {"loads": {"v1": {"fetch": 1.0}}}, {}),
    ("not a number", {"loads": {"v1": {**PHASES, "load": "slow"}}}, {}),
    ("negative seconds", {"loads": {"v1": {**PHASES, "load": -1}}}, {}),
    ("one bad, one good", {"loads": {"v1": {"load": None}, "v2": PHASES}}, {("demo", "v2"): PHASES}),
]


@pytest.mark.parametrize("case", READINGS, ids=[c[0] for c in READINGS])
def test_load_readings(case: tuple[Any, ...]) -> None:
    _, answer, expected = case
    assert load_readings("demo", answer) == expected


class Router:
    """The router's `GET /<release>/work`, answered by the release's real tally (no Ray: the same object a
    Serve deployment wraps)."""

    def __init__(self, tally: Tally):
        self.tally = tally

    def router_work(self, release: str) -> dict[str, Any] | None:
        return self.tally.work_totals()


def state(*names: str) -> State:
    versions = [VersionRecord("demo", name, "stable" if n == 0 else "standby", 100 if n == 0 else 0, "ready", "c1", SPEC, 0.0)
                for n, name in enumerate(names)]
    return State(releases={"demo": ReleaseRecord("demo", "Healthy", "v1 serving 100%", "c1", names[0], SPEC, 0.0)}, versions=versions)


def test_a_replica_start_reaches_the_state_file_and_the_status(tmp_path: Path) -> None:
    tally, clock = Tally(), [1000.0]
    store = Store(tmp_path / "state.db")
    store.save(state("v1"))
    book = CostBook(store, ModelCache(tmp_path / "models"), Router(tally), clock=lambda: clock[0], every=0)
    book.tick(state("v1"))
    assert store.load().load_phases == {}  # no replica told its start yet
    tally.loaded("v1", load_phases(cached=True, fetch_s=0.25, load_s=2.5, warmup_s=0.5))
    book.tick(state("v1"))
    assert store.load().load_phases == {("demo", "v1"): PHASES}
    [row] = status_json(store.load())["releases"][0]["versions"]
    assert row["load"] == PHASES
    assert "started in 3.2s (fetch 0.0s, verify 0.2s, load 2.5s, warm-up 0.5s)" in status_text(store.load())
    store.close()

    again = Store(tmp_path / "state.db")  # a restarted controller: the start is still there
    assert again.load().load_phases == {("demo", "v1"): PHASES}
    book = CostBook(again, ModelCache(tmp_path / "models"), Router(tally), clock=lambda: clock[0], every=0)
    tally.loaded("v1", {**PHASES, "load": 4.0})  # a replacement replica started slower: the latest start is shown
    tally.loaded("v2", PHASES)
    book.tick(state("v2", "v1"))
    assert again.load().load_phases == {("demo", "v1"): {**PHASES, "load": 4.0}, ("demo", "v2"): PHASES}
    book.tick(state("v2"))  # v1 retired: its start is forgotten
    assert again.load().load_phases == {("demo", "v2"): PHASES}
    again.close()
