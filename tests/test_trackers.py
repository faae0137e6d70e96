"""One gate run logged with MLflow, W&B (offline) and Neptune (offline), read back with each library's own tools.

MLflow through `MlflowClient`; W&B through its own protobuf `Record`s, decoded from the run's `.wandb` transaction log
(framed as a LevelDB log, the format `wandb sync` uploads), plus `wandb sync --dry-run`; Neptune by replaying the
offline operation log (its `DiskQueue` and `Operation`s) into its own offline backend (`NeptuneBackendMock`, what
`mode="debug"` runs on). No Ray. `diffops check --track --tracker wandb|neptune` runs under strace: no socket but
local ones is ever opened.
"""

from __future__ import annotations

import base64
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from checks.report import CheckResult, GateReport
from controller.parse.loader import parse_release
from controller.tracking.gate_runs import experiment_name
from controller.tracking.runs import RunRecord, gate_record, numeric_figures, spec_params
from controller.tracking.tracker import open_tracker, short_tags
from controller.tracking.wandb_store import project_name
from tests.conftest import DEMO_RELEASE, ROOT, ReleaseRepo

pytestmark = pytest.mark.timeout(300)
GOLDEN = (ROOT / "releases" / "golden" / "demo.png").read_bytes()
REPORT = GateReport("demo", "abc1234567", (
    CheckResult("artifact", "passed", "ok", {"files": 10, "total_bytes": 507752, "component_bytes": {"unet": 283454}}),
    CheckResult("dependency", "passed", "ok", {"packages": {"torch": "2.13.0", "diffusers": "0.42.1"}, "image_pinned": "sha256:" + "0" * 64}),
    CheckResult("cuda", "skipped", "no CUDA", {"cuda_available": False, "cpu": "AMD EPYC 7B13"}),
    CheckResult("golden", "passed", "ok", {"phash_distance": 2, "ssim": 0.981, "psnr_db": 31.25}, seconds=0.4),
    CheckResult("performance", "passed", "ok", {"p50_latency_s": 0.2, "p95_latency_s": 0.3, "images_per_s": 8.0}, seconds=2.0),
    CheckResult("quality", "passed", "ok", {"mean_clip_score": 21.5, "nsfw_rate": 0.0, "images": 4}),
), 9.5, {"golden-produced.png": base64.b64encode(GOLDEN).decode()}, job="diffops-gate-demo-abc")
RECORD = gate_record("demo", "abc1234567", "c0ffee", parse_release(DEMO_RELEASE.encode(), "releases/demo.yaml").spec, REPORT,
                     controller_version="diffops 0.1.0", gate_key="k1")


def mlflow_view(uri: str, run_id: str) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    folder = Path(client.download_artifacts(run_id, "gate"))
    return {"name": run.info.run_name, "params": run.data.params, "metrics": run.data.metrics,
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.source.git.commit"},
            "images": {f"gate/{p.name}": p.read_bytes() for p in folder.glob("*.png")}}


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a `.wandb` file: a 7-byte header (`:W&B`, magic, version), then 32 KiB blocks of chunks
    (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last), each record one of W&B's own `Record` messages."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, pos, parts, records = path.read_bytes(), 7, [], []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def wandb_view(root: Path) -> dict[str, Any]:
    [view] = wandb_views(root)
    return view


def wandb_views(root: Path) -> list[dict[str, Any]]:
    return [wandb_run(log_file) for log_file in sorted(root.glob("wandb/offline-run-*/run-*.wandb"))]


def wandb_run(log_file: Path) -> dict[str, Any]:
    records = wandb_records(log_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
    history = [item for r in records if r.WhichOneof("record_type") == "history" for item in r.history.item]
    metrics = {item.nested_key[0]: json.loads(item.value_json) for item in history
               if len(item.nested_key) == 1 and not item.nested_key[0].startswith("_")}
    media = {item.nested_key[0]: json.loads(item.value_json) for item in history if list(item.nested_key[1:]) == ["path"]}
    return {"name": run.display_name, "project": run.project, "group": run.run_group, "chips": list(run.tags),
            "params": {k: v for k, v in config.items() if k != "tags"},
            "tags": config["tags"], "metrics": metrics, "images": {k: (log_file.parent / "files" / v).read_bytes() for k, v in media.items()},
            "files": sorted(r.files.files[0].path for r in records if r.WhichOneof("record_type") == "files")}


def neptune_view(root: Path, tmp_path: Path) -> dict[str, Any]:
    [view] = neptune_views(root, tmp_path)
    return view


def neptune_views(root: Path, tmp_path: Path) -> list[dict[str, Any]]:
    return [neptune_run(folder, tmp_path) for folder in sorted(root.glob("offline/run__*"))]


def neptune_run(folder: Path, tmp_path: Path) -> dict[str, Any]:
    from neptune.core.components.operation_storage import OperationStorage
    from neptune.core.components.queue.disk_queue import DiskQueue
    from neptune.internal.backends.neptune_backend_mock import NeptuneBackendMock
    from neptune.internal.container_type import ContainerType
    from neptune.internal.operation import Operation

    queue = DiskQueue(folder, to_dict=lambda op: op.to_dict(), from_dict=Operation.from_dict, lock=threading.RLock())
    operations = []
    while (element := queue.get()) is not None:
        operations.append(element.obj)
    backend = NeptuneBackendMock()
    run = backend.create_run(backend._project_id)
    assert backend.execute_operations(run.id, ContainerType.RUN, operations, OperationStorage(folder))[1] == []
    fields = {a.path: a.type.value for a in backend.get_attributes(run.id, ContainerType.RUN)}

    def value(path: str) -> Any:
        getter = {"string": backend.get_string_attribute, "float": backend.get_float_attribute}[fields[path]]
        return getter(run.id, ContainerType.RUN, path.split("/")).value

    images = {}
    for path in (p for p, kind in fields.items() if kind == "file" and p.endswith(".png")):
        backend.download_file(run.id, ContainerType.RUN, path.split("/"), destination=str(tmp_path / "image.png"))
        images[path.removeprefix("artifacts/")] = (tmp_path / "image.png").read_bytes()
    return {"name": value("sys/name"), "experiment": value("diffops/experiment"),
            "group": value("diffops/parent") if "diffops/parent" in fields else None,
            "chips": sorted(backend.get_string_set_attribute(run.id, ContainerType.RUN, ["sys", "tags"]).values),
            "params": {p.removeprefix("parameters/"): value(p) for p in fields if p.startswith("parameters/")},
            "tags": {p.removeprefix("diffops/tags/"): value(p) for p in fields if p.startswith("diffops/tags/")},
            "metrics": {p.removeprefix("metrics/"): value(p) for p in fields if p.startswith("metrics/")},
            "images": images, "files": sorted(p for p, kind in fields.items() if kind == "file")}


def logged(kind: str, state: Path, record: RunRecord = RECORD) -> tuple[Any, float]:
    started = time.monotonic()
    run = open_tracker(kind, state).log(record, experiment_name("demo"))
    return run, time.monotonic() - started


@pytest.fixture(scope="module")
def mlflow_run(tmp_path_factory) -> dict[str, Any]:
    state = tmp_path_factory.mktemp("mlflow")
    run, _ = logged("mlflow", state)
    return mlflow_view(f"sqlite:///{state / 'mlflow.db'}", run.run_id)


def test_the_mlflow_run_holds_the_record(mlflow_run):
    assert mlflow_run["params"] == RECORD.params and mlflow_run["tags"] == RECORD.tags and mlflow_run["metrics"] == RECORD.metrics
    assert mlflow_run["images"] == {"gate/golden-produced.png": GOLDEN} and mlflow_run["name"] == "gate demo abc1234567"


def test_wandb_offline_run_carries_what_the_mlflow_run_does(mlflow_run, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run, _ = logged("wandb", tmp_path)
    view = wandb_view(tmp_path / "wandb")
    assert {k: view[k] for k in ("params", "tags", "metrics", "images", "name")} == mlflow_run
    assert view["project"] == "diffops-demo" and run.experiment_id == "diffops-demo" and run.link.startswith(f"offline run {run.run_id} in ")
    assert view["chips"] == ["kind=gate", "release=demo", "version=abc1234567", "ok=true"]
    assert "gate/report.json" in view["files"]  # the report saved with the run, beside the image
    synced = subprocess.run([str(Path(sys.executable).with_name("wandb")), "sync", "--dry-run", str(tmp_path / "wandb" / "wandb")],
                            capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "WANDB_ERROR_REPORTING": "false"})
    assert synced.returncode == 0 and "Would sync 1 run(s)" in synced.stdout + synced.stderr  # W&B's own CLI sees one whole run


def test_neptune_offline_run_carries_what_the_mlflow_run_does(mlflow_run, tmp_path, monkeypatch):
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    monkeypatch.delenv("NEPTUNE_DATA_DIRECTORY", raising=False)
    run, _ = logged("neptune", tmp_path)
    view = neptune_view(tmp_path / ".neptune", tmp_path)
    assert {k: view[k] for k in ("params", "tags", "metrics", "images", "name")} == mlflow_run
    assert view["experiment"] == "diffops/demo" and view["chips"] == sorted(["kind=gate", "release=demo", "version=abc1234567", "ok=true"])
    assert "artifacts/gate/report.json" in view["files"] and run.link.startswith(f"offline run {run.run_id} in ")


@pytest.mark.parametrize(("tags", "chips"), [
    ({"diffops.kind": "gate", "diffops.release": "demo", "diffops.torch": "2.13.0"}, ["kind=gate", "release=demo"]),
    ({"diffops.version": "v" * 60}, []),  # past W&B's 64 characters: kept whole in the config only
    ({"diffops.where": "local", "diffops.ok": "false"}, ["ok=false", "where=local"]),
    ({}, []),
])
def test_short_tags(tags, chips):
    assert short_tags(tags) == chips


@pytest.mark.parametrize(("experiment", "project"), [
    ("diffops/demo", "diffops-demo"), ("diffops/my release", "diffops-my-release"), ("sweep.v2_a", "sweep.v2_a")])
def test_project_name(experiment, project):
    assert project_name(experiment) == project


@pytest.mark.parametrize("kind", ["wandb", "neptune"])
def test_check_track_with_another_tracker_writes_offline_and_contacts_nobody(kind, model_repo: ReleaseRepo, tmp_path):
    state, trace = tmp_path / "s", tmp_path / "connect.trace"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "NEPTUNE_"))}
    done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace), sys.executable, "-m", "controller.cli.main",
                           "check", "demo", "--track", "--tracker", kind, "--state-dir", str(state), "-o", "json"],
                          cwd=model_repo.path, capture_output=True, text=True, timeout=240, env=env)
    report = json.loads(done.stdout)  # stdout is the report alone: neither library printed there
    assert done.returncode == (0 if report["ok"] else 1), done.stderr[-3000:]  # a gate failed (a slow box) is tracked all the same
    inet = [line for line in trace.read_text().splitlines() if re.search(r"sa_family=AF_INET6?\b", line)]
    assert inet == []
    view = wandb_view(state / "wandb") if kind == "wandb" else neptune_view(state / ".neptune", tmp_path)
    spec = parse_release((model_repo.path / "releases" / "demo.yaml").read_bytes(), "releases/demo.yaml").spec
    assert view["params"] == spec_params(spec) and report["run"]["tracker"] == kind
    assert {k: view["tags"][k] for k in ("diffops.release", "diffops.version", "diffops.kind", "diffops.where")} == {
        "diffops.release": "demo", "diffops.version": report["version"], "diffops.kind": "gate", "diffops.where": "local"}
    assert view["tags"]["diffops.ok"] == str(report["ok"]).lower()
    for check in report["checks"]:
        assert dict(numeric_figures(check["name"], check["figures"])).items() <= view["metrics"].items()
    produced = next(Path(p) for p in report["saved"] if p.endswith("golden-produced.png"))
    assert view["images"]["gate/golden-produced.png"] == produced.read_bytes()


@pytest.mark.parametrize("kind", ["wandb", "neptune"])
def test_an_experiment_logs_its_cells_and_their_parent_to_another_tracker(kind, tmp_path, monkeypatch):
    """`diffops experiment run --tracker wandb|neptune` (offline): every cell is a run carrying what its MLflow run does
    (the params, tags, metrics and images `test_experiment_run.py` reads from MLflow), all in the parent's group, and
    the parent, logged last, holds the contact sheet and the table naming each cell's run."""
    from click.testing import CliRunner

    from controller.cli.experiment import experiment
    from tests.test_experiment_run import METRICS, PARAMS, TAGS, experiment_repo

    for name in [k for k in os.environ if k.startswith(("WANDB_", "NEPTUNE_"))]:
        monkeypatch.delenv(name)
    repo = experiment_repo(tmp_path / "repo", ("    sampler: [ddim, euler]", "    sampler: [ddim]"), ("    steps: [2, 4]", "    steps: [2]"))
    state = tmp_path / "state"
    result = CliRunner().invoke(experiment, ["run", str(repo.path / "experiments" / "demo-grid.yaml"), "--repo", str(repo.path),
                                             "--state-dir", str(state), "--tracker", kind])
    assert result.exit_code == 0, result.output
    views = wandb_views(state / "wandb") if kind == "wandb" else neptune_views(state / ".neptune", tmp_path)
    [parent] = [v for v in views if "contact-sheet.png" in v["images"]]
    cells = [v for v in views if v is not parent]
    assert len(cells) == 2 and {c["tags"]["diffops.kind"] for c in cells} == {"experiment"}, [v["name"] for v in views]
    for cell in cells:
        assert set(PARAMS) <= set(cell["params"]) and set(TAGS) <= set(cell["tags"]) and set(METRICS) <= set(cell["metrics"]), cell["name"]
        assert cell["images"] and all(png.startswith(b"\x89PNG") for png in cell["images"].values())
        assert cell["group"] == parent["group"] == parent["tags"]["diffops.group"]
    assert parent["tags"]["diffops.status"] == "FINISHED" and parent["tags"]["diffops.cells"] == "2"
    assert any(path.endswith("table.json") for path in parent["files"]) and f"parent run {parent['group']}" in result.output
