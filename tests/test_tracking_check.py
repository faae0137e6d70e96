"""`diffops check --track`: a local gate logged to the embedded MLflow store, and a tracking store that cannot be
reached named after the report (no Ray: the gate runs in the command's own process)."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.conftest import ReleaseRepo
from tests.live import DIFFOPS, gate_runs

pytestmark = pytest.mark.timeout(300)


def test_check_track_logs_a_local_gate_and_names_an_unreachable_store(model_repo: ReleaseRepo, tmp_path):
    state = tmp_path / "s"
    done = subprocess.run([DIFFOPS, "check", "demo", "--track", "--state-dir", str(state), "-o", "json"], cwd=model_repo.path,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
    report = json.loads(done.stdout)  # stdout stays the report alone: MLflow prints nothing there
    [run] = gate_runs(f"sqlite:///{state / 'mlflow.db'}", "demo", report["version"])
    assert run.info.run_id == report["run"]["id"] and run.data.tags["diffops.where"] == "local"
    down = subprocess.run([DIFFOPS, "check", "demo", "--track", "--state-dir", str(state), "--tracking-uri", "http://127.0.0.1:9"],
                          cwd=model_repo.path, capture_output=True, text=True, timeout=180)
    assert down.returncode == 1 and "golden" in down.stdout  # the report is printed, then the tracking failure
    assert "was not tracked: tracking store http://127.0.0.1:9" in down.stderr and "check --tracking-uri" in down.stderr
