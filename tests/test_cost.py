"""Cost accounting: GPU-seconds by kind, images, egress and storage, priced, kept across a restart, and what
`diffops cost` and `diffops diff` show for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client import generate_latest

from controller.cli.main import main
from controller.cost import CostRecord, Fetch, GateRun, Work, account, cost_per_image, held_gpus, integrate, window
from controller.metrics import ControllerMetrics
from controller.parse.release import Cost
from controller.plan.changes import diff_releases
from controller.plan.report import as_text
from controller.state.records import ReleaseRecord, VersionRecord
from controller.state.store import State, Store
from controller.tick.costs import CostBook, model_bytes, work_readings
from serving.artifacts import ModelCache
from tests.conftest import make_release, respec

GPU2 = respec(make_release().spec, replicas={"count": 2, "gpus": 1}, cost={"gpu_hour_usd": 3.6, "egress_usd_per_gb": 0.1,
                                                                          "storage_usd_per_gb_month": 0.02, "budget_per_image_usd": 0.01})
PRICED = GPU2.cost


def version(role: str = "stable", weight: int = 100, status: str = "ready", replicas: int | None = None, name: str = "v1") -> VersionRecord:
    return VersionRecord("demo", name, role, weight, status, "c1", GPU2, 0.0, replicas=replicas)  # type: ignore[arg-type]


START = CostRecord("demo", "v1", at=1000.0, work_epoch="e1", work_busy_s=50.0, work_images=10)


# (case, version, work reading, expected (serving_s, idle_s, standby_s, images)) over 100 s, 2 replicas x 1 GPU = 200 GPU-s
INTEGRATE = [
    ("busy share is serving, the rest idle", version(), Work("e1", 80.0, 40), (30.0, 170.0, 0.0, 30)),
    ("busier than held: capped at held", version(), Work("e1", 500.0, 90), (200.0, 0.0, 0.0, 80)),
    ("no tally reading, taking traffic: all serving", version(), None, (200.0, 0.0, 0.0, 0)),
    ("no tally reading, no traffic: all idle", version("canary", 0), None, (0.0, 200.0, 0.0, 0)),
    ("standby: all standby, previews still counted", version("standby", 0), Work("e1", 51.0, 11), (0.0, 0.0, 200.0, 1)),
    ("a restarted tally counts from zero", version(), Work("e2", 20.0, 4), (20.0, 180.0, 0.0, 4)),
    ("surge-limited: the replicas running", version(replicas=1), Work("e1", 50.0, 10), (0.0, 100.0, 0.0, 0)),
    ("being prepared: holds nothing", version(status="preparing"), None, (0.0, 0.0, 0.0, 0)),
]


@pytest.mark.parametrize("case", INTEGRATE, ids=[c[0] for c in INTEGRATE])
def test_integrate_splits_held_gpu_time_by_kind(case: tuple[Any, ...]) -> None:
    _, held, work, (serving, idle, standby, images) = case
    after = integrate(START, held, 1100.0, work, PRICED)
    assert (after.serving_s, after.idle_s, after.standby_s, after.images) == pytest.approx((serving, idle, standby, images))
    assert after.gpu_usd == pytest.approx((serving + idle + standby) / 3600 * 3.6)
    assert after.at == 1100.0
    if work is not None:
        assert (after.work_epoch, after.work_busy_s, after.work_images) == (work.epoch, work.busy_s, work.images)
    else:
        assert (after.work_epoch, after.work_busy_s) == ("e1", 50.0)  # the next reading is taken against the last one


def test_unset_prices_count_quantities_but_no_usd() -> None:
    after = integrate(START, version(), 1100.0, Work("e1", 80.0, 40), Cost(), model_bytes=2e9)
    assert (after.serving_s, after.images, after.storage_gb_s) == (30.0, 30, pytest.approx(200.0))
    assert after.usd == 0.0


def test_a_clock_going_back_integrates_nothing() -> None:
    assert integrate(START, version(), 900.0, None, PRICED) == START


def test_account_adds_gates_egress_from_object_stores_and_storage() -> None:
    records = {("demo", "v1"): START}
    gates = [GateRun("demo", "v2", 120.0, 1.0)]
    fetches = [Fetch("demo", "v2", "s3", 3 * 10**9), Fetch("demo", "v2", "file", 5 * 10**9)]  # a repo read is no egress
    after = account(records, [version()], 1100.0, {"demo": PRICED}, gates=gates, fetches=fetches,
                    model_bytes={("demo", "v1"): 1.296e9})
    v1, v2 = after[("demo", "v1")], after[("demo", "v2")]
    assert v1.storage_gb_s == pytest.approx(129.6) and v1.storage_usd == pytest.approx(129.6 / (30 * 86400) * 0.02)
    assert (v2.gate_s, v2.gpu_usd) == (120.0, pytest.approx(0.12))
    assert (v2.egress_bytes, v2.egress_usd) == (3 * 10**9, pytest.approx(0.3))
    gone = account(after, [], 1200.0, {})
    assert gone == after  # a retired version keeps its totals


def test_first_sight_counts_from_then_and_held_gpus() -> None:
    after = account({}, [version()], 500.0, {"demo": PRICED})
    assert after[("demo", "v1")] == CostRecord("demo", "v1", 500.0)
    assert [held_gpus(version(status=s)) for s in ("preparing", "verified", "starting", "ready", "retiring")] == [0, 0, 2, 2, 2]


def test_window_and_cost_per_image() -> None:
    before = CostRecord("demo", "v1", 0.0, serving_s=100.0, images=10, gpu_usd=1.0)
    now = CostRecord("demo", "v1", 60.0, serving_s=160.0, images=40, gpu_usd=1.3, egress_usd=0.3)
    added = window(now, before)
    assert (added.serving_s, added.images, added.usd, added.at) == (60.0, 30, pytest.approx(0.6), 60.0)
    assert cost_per_image(added) == pytest.approx(0.02)
    assert cost_per_image(window(now, now)) is None  # no image in the window: no figure, never a division by zero
    assert window(now, None) == now


@pytest.mark.parametrize(("answer", "expected"), [
    ({"epoch": "e", "versions": {"v1": {"busy_s": 1.5, "images": 3}}}, {("demo", "v1"): Work("e", 1.5, 3)}),
    ({"epoch": "e", "versions": {"v1": {"busy_s": "x"}, "v2": {"busy_s": 2, "images": 1}}}, {("demo", "v2"): Work("e", 2.0, 1)}),
    (None, {}),
    ({"weights": {}}, {}),
])
def test_work_readings_from_a_router_answer(answer: Any, expected: dict[Any, Work]) -> None:
    assert work_readings("demo", answer) == expected


def test_model_bytes_are_shared_by_versions_pinning_one_model() -> None:
    shared = model_bytes([version(name="v1"), version(name="v2")], {GPU2.model.digest: 10})
    assert shared == {("demo", "v1"): 5.0, ("demo", "v2"): 5.0}


class Tally:
    def __init__(self) -> None:
        self.busy_s, self.images = 0.0, 0

    def router_work(self, release: str) -> dict[str, Any] | None:
        return {"epoch": "e1", "versions": {"v1": {"busy_s": self.busy_s, "images": self.images}}}


def state(*versions: VersionRecord) -> State:
    release = ReleaseRecord("demo", "Healthy", "", "c1", "v1", GPU2, 0.0)
    return State(releases={"demo": release}, versions=list(versions))


def scraped(metrics: ControllerMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_cost_book_keeps_totals_across_a_restart_and_moves_the_metrics(tmp_path: Path) -> None:
    clock = [1000.0]
    tally, metrics = Tally(), ControllerMetrics()
    store = Store(tmp_path / "state.db")
    book = CostBook(store, ModelCache(tmp_path / "models"), tally, metrics, clock=lambda: clock[0])
    book.gated(state(version()), [("demo", "v1", "k", {"seconds": 36.0, "checks": [{"name": "golden", "seconds": 2.0}]})])
    book.fetched([Fetch("demo", "v1", "gs", 10**9)])
    assert book.tick(state(version()))
    clock[0], tally.busy_s, tally.images = 1003.0, 10.0, 5
    assert not book.tick(state(version()))  # not due yet: integrated every few seconds
    clock[0] = 1100.0
    assert book.tick(state(version()))
    text = scraped(metrics)
    assert 'diffops_gpu_seconds_total{kind="serving",release="demo",version="v1"} 10.0' in text
    assert 'diffops_gpu_seconds_total{kind="idle",release="demo",version="v1"} 190.0' in text
    assert 'diffops_gpu_seconds_total{kind="gate",release="demo",version="v1"} 36.0' in text
    assert 'diffops_cost_usd_total{kind="egress",release="demo",version="v1"} 0.1' in text
    assert 'diffops_model_fetched_bytes_total{store="gs"} 1e+09' in text
    assert 'diffops_gate_seconds_count{check="golden",release="demo",version="v1"} 1.0' in text
    assert 'diffops_cost_budget_per_image_usd{release="demo"} 0.01' in text
    per_image = (236.0 / 3600 * 3.6 + 0.1) / 5
    assert metrics.registry.get_sample_value("diffops_cost_per_image_usd", {"release": "demo", "version": "v1"}) == pytest.approx(per_image)
    store.close()

    restarted = Store(tmp_path / "state.db")  # a new controller process: the totals come back from the store
    [kept] = restarted.costs()
    assert (kept.serving_s, kept.idle_s, kept.gate_s, kept.images, kept.egress_bytes) == (10.0, 190.0, 36.0, 5, 10**9)
    assert set(restarted.cost_samples(1000.0)) == {("demo", "v1")}  # sampled when first seen
    again = CostBook(restarted, ModelCache(tmp_path / "models"), tally, ControllerMetrics(), clock=lambda: 1200.0)
    tally.busy_s, tally.images = 20.0, 7
    again.tick(state(version()))
    [after] = restarted.costs()
    assert (after.serving_s, after.idle_s, after.images) == (20.0, 380.0, 7)  # counted on from the reading before the restart


def cli_state(tmp_path: Path) -> Path:
    store = Store(tmp_path / "state" / "state.db")
    store.save(state(version()))
    early = CostRecord("demo", "v1", 1000.0, serving_s=3600.0, images=100, gpu_usd=3.6)
    late = CostRecord("demo", "v1", 5000.0, serving_s=7200.0, idle_s=1800.0, standby_s=0.0, images=400, gpu_usd=9.0,
                      egress_bytes=10**9, egress_usd=0.1, storage_usd=0.02)
    old = CostRecord("demo", "v0", 900.0, standby_s=3600.0, gate_s=360.0, gpu_usd=3.96)
    store.save_costs([late, old], [early, old])
    store.close()
    return tmp_path / "state"


def test_cost_command_reports_totals_by_release_and_version(tmp_path: Path) -> None:
    state_dir = cli_state(tmp_path)
    result = CliRunner().invoke(main, ["cost", "--state-dir", str(state_dir), "-o", "json"])
    assert result.exit_code == 0, result.output
    [demo] = json.loads(result.stdout)["releases"]
    assert demo["gpu_hours"] == {"serving": 2.0, "idle": 0.5, "standby": 1.0, "gate": 0.1}
    assert (demo["images"], demo["usd"]["total"], demo["budget_per_image_usd"]) == (400, 13.08, 0.01)
    assert demo["cost_per_image_usd"] == pytest.approx(13.08 / 400)
    assert [(v["id"], v["images"], v["usd"]["egress"]) for v in demo["versions"]] == [("v1", 400, 0.1), ("v0", 0, 0.0)]
    text = CliRunner().invoke(main, ["cost", "demo", "--state-dir", str(state_dir)]).stdout
    assert text.splitlines()[2].split() == ["demo", "2.000", "0.500", "1.000", "0.100", "400", "$0.0327", "$12.96", "$0.1000",
                                            "$0.0200", "$13.08"]
    assert "budget $0.0100/image: OVER" in text


def test_cost_since_takes_the_window_from_the_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state_dir = cli_state(tmp_path)
    monkeypatch.setattr("controller.cli.cost.time.time", lambda: 5000.0)
    result = CliRunner().invoke(main, ["cost", "demo", "--since", "1h", "--state-dir", str(state_dir), "-o", "yaml"])
    assert result.exit_code == 0, result.output
    import yaml

    report = yaml.safe_load(result.stdout)
    v1, v0 = report["releases"][0]["versions"]
    assert report["since"] == 1400.0 and v1["gpu_hours"]["serving"] == 1.0 and v1["images"] == 300  # since the 1000.0 sample
    assert v0["gpu_hours"]["standby"] == 0.0  # nothing added since its sample


@pytest.mark.parametrize(("args", "code", "message"), [
    (["cost", "nope"], 1, "no release 'nope'"),
    (["cost", "--since", "soon"], 2, "expected a duration"),
])
def test_cost_command_errors_say_what_to_do(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    result = CliRunner().invoke(main, [*args, "--state-dir", str(cli_state(tmp_path))])
    assert result.exit_code == code and message in result.output


def test_diff_shows_what_a_rollout_adds() -> None:
    old = make_release(("    gpus: 0\n", "    gpus: 1\n"))
    new = make_release(("    gpus: 0\n", "    gpus: 1\n"), ("steps: 4", "steps: 8"))
    [change] = diff_releases({"demo": old}, {"demo": new})
    assert change.rollout is not None
    assert (change.rollout.standby_s, change.rollout.extra_gpu_hours, change.rollout.usd) == (600.0, pytest.approx(1 / 6, abs=1e-6),
                                                                                              pytest.approx(2.5 / 6, abs=1e-6))
    assert "rollout adds 0.166667 GPU-hours (≈ $0.42) over 10m standby" in as_text([change], [])
    cpu = diff_releases({"demo": make_release()}, {"demo": make_release(("steps: 4", "steps: 8"))})
    assert cpu[0].rollout is None and "rollout adds" not in as_text(cpu, [])
