"""The prefetch job for real (serving/prefetch.py through controller/gate/prefetch.py's request and log reading): on
the session's Ray head it fetches a model from a real S3-compatible server (moto) into the node's cache, verified,
and its log says so node by node; a job Ray refuses is logged and nothing else happens. The decisions around it:
tests/test_prefetch.py; on a cluster of several nodes: tests/test_cluster_e2e.py."""

from __future__ import annotations

import os
import re
import sys

from controller.apply.dashboard import DashboardClient
from controller.apply.serve_client import ray_token
from controller.gate.prefetch import RayPrefetch, job_request, outcome_text
from serving.manifest import MANIFEST_NAME, manifest_of
from serving.schema import ModelSpec
from tests.conftest import DEMO_MODEL
from tests.emulators import _s3_bucket, s3_endpoint  # noqa: F401 (a fixture)
from tests.live import DASHBOARD, wait_for

DIGEST = manifest_of(DEMO_MODEL).digest



def test_the_prefetch_job_fetches_the_model_into_the_node_cache_and_says_so(ray_head, s3_endpoint, tmp_path):  # noqa: F811
    """On the session's Ray head (one node, 4 CPUs, 2 GPUs): the job started as the controller starts it, with the
    store's endpoint and the node's cache dir given to it as a node's environment would; the model lands verified in
    that cache, the controller's log line says the node fetched it; a second job finds it cached; a replica bigger
    than any node goes nowhere."""
    bucket = _s3_bucket("prefetch", s3_endpoint)
    for path in sorted(DEMO_MODEL.rglob("*")):
        if path.is_file():
            bucket.put(f"tiny-sd/{path.relative_to(DEMO_MODEL).as_posix()}", path.read_bytes())
    node_cache = tmp_path / "node-cache"
    env = {key: value for key, value in os.environ.items() if key.startswith("AWS_")}
    env["DIFFOPS_CACHE_DIR"] = str(node_cache)
    dashboard = DashboardClient(DASHBOARD, ray_token())
    model = ModelSpec(uri="s3://prefetch/tiny-sd", digest=DIGEST)

    def run(job_id: str, gpus: float) -> str:
        body = job_request(job_id, sys.executable, model, 0.5, gpus) | {"runtime_env": {"env_vars": env}}
        assert dashboard.send("POST", "/api/jobs/", json=body).status_code == 200
        wait_for(lambda: dashboard.send("GET", f"/api/jobs/{job_id}").json().get("status") in ("SUCCEEDED", "FAILED"), 120,
                 f"prefetch job {job_id} to end", every=0.5)
        job = dashboard.send("GET", f"/api/jobs/{job_id}").json()
        logs = str(dashboard.send("GET", f"/api/jobs/{job_id}/logs").json().get("logs", ""))
        assert job["status"] == "SUCCEEDED", logs[-2000:]
        return outcome_text(logs)

    first = run(f"diffops-prefetch-test-{tmp_path.name[-12:]}-1", 1)
    address = first.split(" ")[0]  # the head node, as Ray names it
    assert re.fullmatch(rf"{re.escape(address)} fetched 0\.5 MB in \d+\.\ds", first), first
    entry = node_cache / "sha256" / DIGEST.removeprefix("sha256:")
    assert manifest_of(entry).digest == DIGEST and (entry / MANIFEST_NAME).is_file()
    assert run(f"diffops-prefetch-test-{tmp_path.name[-12:]}-2", 1) == f"{address} already cached"
    assert run(f"diffops-prefetch-test-{tmp_path.name[-12:]}-3", 3) == "no alive node has the resources of one replica"


def test_the_controllers_prefetch_reports_a_job_ray_refuses_and_goes_on(ray_head, caplog):
    prefetch = RayPrefetch(DashboardClient(DASHBOARD, "not-the-token"), "python")
    with caplog.at_level("WARNING", logger="diffops.controller"):
        assert prefetch.start("demo", "v1", ModelSpec(uri="s3://b/m", digest=DIGEST), 1, 0) is None
    assert "demo: prefetch of model sha256:" in caplog.text and "replicas fetch the model when they start" in caplog.text
