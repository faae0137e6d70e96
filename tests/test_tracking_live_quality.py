"""A version's quality in serving lands on its gate's MLflow run (controller.tracking.live_quality): real SQLite state
file, real MLflow store, feedback stored through the same function the controller's drain uses."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from checks.report import CheckResult, GateReport
from controller.parse.loader import parse_release
from controller.state.feedback import store_page
from controller.state.store import State, Store
from controller.tracking.gate_runs import GateRuns
from controller.tracking.live_quality import QualityLog, live_metrics
from controller.tracking.mlflow_store import Tracker
from tests.conftest import DEMO_RELEASE

SUMMARY = {"version": "v1", "feedback": 4, "reviews": 1, "ratings": {"count": 3, "mean": 4.0}, "flagged": 1,
           "samples": {"count": 2}, "clip_score": {"count": 2, "mean": 27.5}, "nsfw": {"rate": 0.0}}


@pytest.mark.parametrize(("changes", "expected"), [
    ({}, {"live.feedback": 4, "live.reviews": 1, "live.ratings": 3, "live.flagged": 1, "live.samples": 2, "live.flag_rate": 0.25,
          "live.mean_rating": 4.0, "live.mean_clip_score": 27.5, "live.nsfw_rate": 0.0}),
    ({"feedback": 0, "reviews": 0, "flagged": 0, "ratings": {"count": 0, "mean": None}, "clip_score": {"count": 0, "mean": None},
      "nsfw": {"rate": None}},
     {"live.feedback": 0, "live.reviews": 0, "live.ratings": 0, "live.flagged": 0, "live.samples": 2}),  # nothing to average yet
])
def test_live_metrics(changes, expected):
    assert live_metrics({**SUMMARY, **changes}) == expected


def feedback(n: int, rating: int, flags: tuple[str, ...] = ()) -> dict:
    return {"request_id": f"r{n}", "client": "c", "version": "v1", "rating": rating, "flags": list(flags), "at": 1000.0 + n}


def test_changed_quality_is_logged_on_the_versions_gate_run_once_per_change(tmp_path: Path, caplog):
    from mlflow import MlflowClient

    tracker = Tracker.for_state_dir(tmp_path)
    spec = parse_release(DEMO_RELEASE.encode(), "releases/demo.yaml").spec
    report = GateReport("demo", "v1", (CheckResult("golden", "passed", "ok", {"ssim": 1.0}),), 1.0)
    run = GateRuns(tracker, "diffops test").record(report, spec, "c0ffee")
    assert run is not None
    store = Store(tmp_path / "state.db")
    store.save(State(), gates=[("demo", "v1", "k", {**report.to_dict(with_artifacts=False), "run": run})])
    store_page(store.db, "demo", [feedback(1, 5), feedback(2, 3, ("artifact",))], ("e1", 2))
    quality = QualityLog(tracker, interval_s=60)

    def drawn(name: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in MlflowClient(tracker.uri).get_metric_history(run["id"], name)]

    def tick(now: float) -> None:
        quality.tick(store, now)
        quality.flush(60)

    tick(10_000)
    assert drawn("live.mean_rating") == [(10_000, 4.0)] and drawn("live.flag_rate") == [(10_000, 0.5)]
    store_page(store.db, "demo", [feedback(3, 1)], ("e1", 3))
    tick(10_030)  # within the interval: not yet
    assert drawn("live.feedback") == [(10_000, 2.0)]
    tick(10_060)
    assert drawn("live.feedback") == [(10_000, 2.0), (10_060, 3.0)] and drawn("live.mean_rating")[-1] == (10_060, 3.0)
    tick(10_120)  # nothing changed: no new point
    assert len(drawn("live.feedback")) == 2

    down = QualityLog(Tracker("http://127.0.0.1:9"), interval_s=60)
    with caplog.at_level(logging.WARNING, logger="diffops.controller"):
        down.tick(store, 10_000)
        down.flush(120)
    assert "demo: live quality of v1 not tracked (tracking store http://127.0.0.1:9" in caplog.text
    assert down.logged == {}  # tried again at the next interval


def test_a_gate_run_carries_production_size_images_whole(tmp_path: Path):
    """Two 1024x1024 noise PNGs (the golden output and its comparison at a production size, ~5 MB together) are logged
    and read back byte for byte with MLflow's own client."""
    import base64
    import io

    from mlflow import MlflowClient
    from PIL import Image

    def noise(seed: int) -> bytes:
        buffer = io.BytesIO()
        Image.effect_noise((1024, 1024), 64 + seed).convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()

    images = {"golden-produced.png": noise(0), "golden-compare.png": noise(1)}
    assert sum(map(len, images.values())) > 4_000_000
    report = GateReport("demo", "v1", (CheckResult("golden", "passed", "ok", {"ssim": 1.0}),), 1.0,
                        {name: base64.b64encode(data).decode() for name, data in images.items()})
    tracker = Tracker.for_state_dir(tmp_path)
    run = GateRuns(tracker, "diffops test").record(report, parse_release(DEMO_RELEASE.encode(), "releases/demo.yaml").spec, "c0ffee",
                                                   strict=True)
    assert run is not None
    client = MlflowClient(tracker.uri)
    for name, data in images.items():
        assert Path(client.download_artifacts(run["id"], f"gate/{name}", str(tmp_path / "back"))).read_bytes() == data


def test_a_gate_that_ends_while_the_controller_stops_is_not_tracked_and_raises_nothing(tmp_path: Path, caplog):
    """The preparation thread hands a finished gate over after `close` (SIGTERM): one line, no exception in its callback."""
    runs = GateRuns(Tracker.for_state_dir(tmp_path), "diffops test")
    spec = parse_release(DEMO_RELEASE.encode(), "releases/demo.yaml").spec
    report = GateReport("demo", "v1", (CheckResult("artifact", "passed", "ok", {}),), 1.0)
    runs.submit(report, spec, "c0ffee", "k1")  # starts the pool
    runs.close()
    with caplog.at_level(logging.INFO, logger="diffops.controller"):
        runs.submit(report, spec, "c0ffee", "k2")
    assert "demo: gate of v1 not tracked: the controller is stopping" in caplog.text
