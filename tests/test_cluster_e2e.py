"""Running on a cluster, end to end: a controller in its own network namespace rolls releases out to a Ray head
and a worker node that share nothing with it but a bridge (`tests/netcluster.py`): the worker sees neither the
controller's repo nor its state dir nor its cache. Models reach the worker only through object stores on the head's
host, each a real server reached through its ecosystem's environment: S3 (moto), Google Cloud Storage
(gcp-storage-emulator) and Azure Blob (Azurite). Releases name an `s3://`, a `gs://` and an `az://` model, and a
`file://` model of the release repo that the controller publishes with `--model-store`. GPU replicas (4 advertised,
fake, GPUs on the worker only) and gate jobs land on the worker. Then blue/green, a warm revert, a canary abort and
kill -9 of the worker node under load. The tests of this module run in order on one cluster and one controller."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from serving.manifest import MANIFEST_NAME, manifest_of
from tests.conftest import DEMO_MODEL, demo_repo
from tests.emulators import AZURITE, azurite_connection
from tests.live import DIFFOPS, Controller, Load, pixels, wait_for
from tests.netcluster import NetCluster
from tests.test_canary_e2e import CANARY

pytestmark = pytest.mark.timeout(900)

S3_PORT, GCS_PORT, AZURE_PORT = 9000, 9023, 10000  # on the head's host
STORE = "s3://diffops-models/published"
AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
# every store as a node or the controller reaches it: "{head}" is the head's address
STORES_ENV = {**AWS, "AWS_ENDPOINT_URL": f"http://{{head}}:{S3_PORT}", "STORAGE_EMULATOR_HOST": f"http://{{head}}:{GCS_PORT}",
              "GOOGLE_CLOUD_PROJECT": "diffops-test", "AZURE_STORAGE_CONNECTION_STRING": azurite_connection("{head}", AZURE_PORT)}
REMOTE_MODELS = {"weights": "s3://weights/tiny-sd", "gcs": "gs://weights/tiny-sd", "azure": "az://weights/tiny-sd"}
ON_THE_WORKER = {"    gpus: 0\n": "    gpus: 1\n"}  # only the worker advertises GPUs: replicas and gate jobs go there
DEMO_DIGEST = manifest_of(DEMO_MODEL).digest
TIMEOUT = 420  # a first rollout here: gate job and replica start on a loaded 2-core machine (~2 min measured)


class ClusterController(Controller):
    """`diffops controller run` on the cluster's `controller` host, against the head's dashboard by address."""

    def __init__(self, cluster: NetCluster, repo: Path, state_dir: Path):
        super().__init__(repo, state_dir)
        self.cluster = cluster

    def start(self) -> ClusterController:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        argv = [DIFFOPS, "controller", "run", "--repo", str(self.repo), "--state-dir", str(self.state_dir),
                "--ray-address", self.cluster.dashboard_url, "--model-store", STORE, "--http-host", "0.0.0.0",
                "--proxy-location", "EveryNode", "--interval", "2", "--allow-fault-injection"]
        env = {**{key: value.format(head=self.cluster.head_ip) for key, value in STORES_ENV.items()}, "PYTHONUNBUFFERED": "1"}
        self.process = self.cluster.popen("controller", argv, env=env, stdout=open(self.log_path, "a"), stderr=subprocess.STDOUT)
        return self


def s3(cluster: NetCluster) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=f"http://{cluster.head_ip}:{S3_PORT}", **{k.lower(): v for k, v in AWS.items()
                                                                                       if k != "AWS_DEFAULT_REGION"},
                        region_name=AWS["AWS_DEFAULT_REGION"])


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with NetCluster.start(tmp_path_factory.mktemp("netcluster"), worker_cpus=4, worker_gpus=4, node_env=STORES_ENV) as cluster:
        head = cluster.head_ip
        cluster.popen("head", [Path(sys.executable).with_name("moto_server"), "-H", head, "-p", str(S3_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster.popen("head", [Path(sys.executable).with_name("gcp-storage-emulator"), "start", "-H", head, "--port",
                               str(GCS_PORT), "--in-memory", "--quiet"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster.popen("head", [AZURITE, "--blobHost", head, "--blobPort", str(AZURE_PORT), "--inMemoryPersistence",
                               "--skipApiVersionCheck", "--loose", "--silent"],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for name, port in (("S3", S3_PORT), ("GCS", GCS_PORT), ("Azure Blob", AZURE_PORT)):
            wait_for(lambda port=port: _answers(f"http://{head}:{port}/"), 60, f"the {name} server on the head's host")
        yield cluster


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def upload(cluster: NetCluster, uri: str, model: Path) -> None:
    """Put a model directory at `uri` through the store's own client (boto3, google-cloud-storage, azure-storage-blob)."""
    scheme, _, rest = uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    head = cluster.head_ip
    if scheme == "s3":
        client = s3(cluster)
        client.create_bucket(Bucket=bucket)
        put = lambda key, data: client.put_object(Bucket=bucket, Key=key, Body=data)  # noqa: E731
    elif scheme == "gs":
        from google.api_core.client_options import ClientOptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        gcs = storage.Client(project="diffops-test", credentials=AnonymousCredentials(),
                             client_options=ClientOptions(api_endpoint=f"http://{head}:{GCS_PORT}"))
        target = gcs.create_bucket(bucket)
        put = lambda key, data: target.blob(key).upload_from_string(data)  # noqa: E731
    else:
        from azure.storage.blob import BlobServiceClient

        container = BlobServiceClient.from_connection_string(azurite_connection(head, AZURE_PORT)).create_container(bucket)
        put = lambda key, data: container.upload_blob(key, data, overwrite=True)  # noqa: E731
    for path in sorted(model.rglob("*")):
        if path.is_file():
            put(f"{prefix}/{path.relative_to(model).as_posix()}", path.read_bytes())


@pytest.fixture(scope="module")
def deployed(cluster: NetCluster, tmp_path_factory: pytest.TempPathFactory):
    """Four releases on the cluster, all Healthy: `demo` (file:// model, published to the store) and one model of its
    own digest in each object store (`weights` on s3://, `gcs` on gs://, `azure` on az://, uploaded here); yields
    (repo, controller, {release: digest of its model})."""
    root = tmp_path_factory.mktemp("cluster-e2e")
    s3(cluster).create_bucket(Bucket="diffops-models")
    repo = demo_repo(root / "repo")
    repo.release(**ON_THE_WORKER)
    digests = {"demo": DEMO_DIGEST}
    for copies, (name, uri) in enumerate(REMOTE_MODELS.items(), start=1):
        other = root / f"tiny-sd-{name}"
        shutil.copytree(DEMO_MODEL, other)
        (other / "model_index.json").write_text((other / "model_index.json").read_text() + "\n" * copies)  # its own digest
        digests[name] = manifest_of(other).digest
        upload(cluster, uri, other)
        repo.release(name, **ON_THE_WORKER, **{"file://models/tiny-sd": uri, DEMO_DIGEST: digests[name]})
    repo.commit("a release from every store, all on the worker's GPUs")
    controller = ClusterController(cluster, repo.path, root / "state").start()
    try:
        for name in digests:
            controller.wait_release(healthy, timeout=TIMEOUT, name=name)
        yield repo, controller, digests
    finally:
        if controller.process is not None and controller.process.poll() is None:
            controller.stop()


def healthy(release: dict[str, Any]) -> bool:
    return release["phase"] == "Healthy" and any(v["role"] == "stable" and v["ready_replicas"] >= 1 for v in release["versions"])


def settled(release: dict[str, Any]) -> bool:
    """Healthy with one ready stable replica, every version ready, none retiring, and the router on the recorded weights."""
    return (healthy(release) and stable(release)["ready_replicas"] == 1
            and all(v["status"] == "ready" and v["live_weight"] == v["weight"] for v in release["versions"]))


def stable(release: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in release["versions"] if v["role"] == "stable")


def serve_apps(cluster: NetCluster) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {cluster.token}"}
    apps: dict[str, Any] = httpx.get(f"{cluster.dashboard_url}/api/serve/applications/", headers=headers, timeout=30).json()["applications"]
    return apps


def generate(url: str, release: str = "demo", **fields: Any) -> httpx.Response:
    return httpx.post(f"{url}/{release}/generate", json={"prompt": "a red cube", "steps": 2, **fields}, timeout=120)


def test_replicas_run_on_the_worker_and_fetch_models_only_from_the_stores(cluster: NetCluster, deployed):
    repo, controller, digests = deployed
    worker = cluster.worker_ips[0]
    for name in digests:
        assert stable(controller.release(name))["nodes"] == {worker: 1}, controller.release(name)
    status = subprocess.run([DIFFOPS, "status", "--state-dir", str(controller.state_dir)], capture_output=True, text=True).stdout
    assert f"replicas 1/1 on {worker}" in status, status
    # the Serve config names no path of the controller's machine; the file:// model is read from the store
    apps = serve_apps(cluster)
    config = json.dumps({name: app["deployed_app_config"] for name, app in apps.items()})
    assert str(repo.path.parent) not in config and str(controller.state_dir) not in config
    demo = stable(controller.release("demo"))["id"]
    args = apps[f"demo--{demo}"]["deployed_app_config"]["args"]
    assert args["model"]["uri"].startswith(f"{STORE}/sha256-") and args["repo"] is None and args["cache_dir"] is None
    published = {obj["Key"] for obj in s3(cluster).list_objects_v2(Bucket="diffops-models")["Contents"]}
    repo_digest = DEMO_DIGEST.replace(":", "-")
    assert f"published/{repo_digest}/{MANIFEST_NAME}" in published and f"published/{repo_digest}/model_index.json" in published
    for name, uri in REMOTE_MODELS.items():  # the other replicas fetch from the store their release names
        version = stable(controller.release(name))["id"]
        assert apps[f"{name}--{version}"]["deployed_app_config"]["args"]["model"]["uri"] == uri
    # the worker fetched and verified every model into its own cache, which this machine cannot see
    cached = cluster.run("worker", ["ls", "/tmp/ray/diffops-models/sha256"]).stdout.split()
    hexes = {name: digest.removeprefix("sha256:") for name, digest in digests.items()}
    assert sorted(c for c in cached if len(c) == 64) == sorted(hexes.values()), cached
    assert not any(Path("/tmp/ray/diffops-models/sha256", hexes[name]).exists() for name in REMOTE_MODELS)  # digests only the stores hold
    # both Serve proxies answer (EveryNode), the head's and the worker's
    for host in (cluster.head_ip, worker):
        response = generate(f"http://{host}:8000")
        assert response.status_code == 200 and response.content.startswith(b"\x89PNG") and response.headers["X-Diffops-Version"] == demo
    # the same weights, from four stores, draw the same picture (one replica process each: equal within rounding)
    drawn = {name: generate(cluster.serve_url, name, seed=7) for name in digests}
    assert all(r.status_code == 200 for r in drawn.values()), {n: r.text[:200] for n, r in drawn.items()}
    for name, response in drawn.items():
        assert np.abs(pixels(response.content) - pixels(drawn["demo"].content)).max() <= 2, name
    assert "model store: published" in controller.logs
    # each model was prefetched onto the worker (the one node with GPUs) by a job started before its gate's
    logs = controller.logs
    for name in digests:
        version = stable(controller.release(name))["id"]
        assert logs.index(f"{name}: prefetch job diffops-prefetch-{name}-{version}-") < logs.index(f"{name}: gate job diffops-gate-{name}-{version}-")
        assert re.search(rf"{name}: prefetch of model sha256:\S+ for {version} while the gate ran: {re.escape(worker)} "
                         r"(fetched|already cached)", logs), name
    # a release whose file is removed from git is deleted from the cluster (and frees the worker's GPUs for the drills)
    for name in ("gcs", "azure"):
        repo.remove(f"releases/{name}.yaml")
    repo.commit("gcs and azure releases removed")
    wait_for(lambda: not {"gcs", "azure"} & {name.split("--")[0] for name in serve_apps(cluster)}, 120, "the removed releases' apps to go")
    assert controller.release("gcs") == {} and stable(controller.release("demo"))["id"] == demo


def test_bluegreen_then_a_warm_revert_on_the_cluster(cluster: NetCluster, deployed):
    repo, controller, _ = deployed
    before = stable(controller.release())["id"]
    repo.release(**ON_THE_WORKER, **{"steps: 4": "steps: 5"})
    change = repo.commit("five steps")
    release = controller.wait_release(lambda r: healthy(r) and stable(r)["id"] != before, timeout=TIMEOUT)
    after = stable(release)["id"]
    assert {v["id"]: v["role"] for v in release["versions"]} == {after: "stable", before: "standby"}
    assert generate(cluster.serve_url).headers["X-Diffops-Version"] == after
    repo.repo.git.revert("--no-edit", change)
    reverted = controller.wait_release(lambda r: healthy(r) and stable(r)["id"] == before, timeout=60)
    assert {v["id"]: v["role"] for v in reverted["versions"]} == {before: "stable", after: "standby"}
    assert f"{before} was the warm standby: traffic switched back to it at once, no reload" in controller.logs




def test_a_failing_canary_is_aborted_on_the_cluster(cluster: NetCluster, deployed):
    repo, controller, _ = deployed
    serving = stable(controller.release())["id"]
    with Load(url=cluster.serve_url, timeout=120) as load:
        repo.release(**ON_THE_WORKER, **{"    strategy: bluegreen\n": CANARY.format(pause="60s"), "  cost:\n": "  faults:\n    error_rate: 1.0\n  cost:\n"})
        failing = repo.commit("a canary that fails every request")
        try:
            release = controller.wait_release(lambda r: r["phase"] == "Degraded", timeout=TIMEOUT)
            # `weight` is what the controller set; `live_weight` what the router draws with, once Serve reconfigured it
            confirmed = controller.wait_release(lambda r: stable(r)["live_weight"] == 100, timeout=60)
            answered = generate(cluster.serve_url).headers["X-Diffops-Version"]
        finally:
            repo.repo.git.revert("--no-edit", failing)  # what the message asks: git agrees with what serves again
    assert "rolled back" in release["message"] and "error rate" in release["message"], release["message"]
    assert stable(release)["id"] == serving and stable(release)["weight"] == 100
    assert stable(confirmed)["id"] == serving and answered == serving
    assert load.codes[200] > 0 and load.codes[500] > 0, load.codes  # the canary took traffic and failed it
    controller.wait_release(lambda r: healthy(r) and stable(r)["id"] == serving, timeout=60)


def test_kill_9_of_the_worker_under_load_loses_only_requests_in_flight_and_the_same_version_comes_back(cluster: NetCluster, deployed):
    repo, controller, _ = deployed
    # the drill starts from a settled release: an earlier test's rollback may still be retiring its canary, and a
    # retirement finishing during the outage would leave the router to reconfigure, not the replicas to report
    serving = stable(controller.wait_release(settled, timeout=TIMEOUT))["id"]
    with Load(url=cluster.serve_url, timeout=30) as load:
        wait_for(lambda: load.codes[200] >= 2, 120, "requests served before the kill")
        killed_at = time.time()
        cluster.kill_node("worker")
        cluster.wait_node("worker", alive=False, timeout=60)
        lost = controller.wait_release(lambda r: stable(r)["ready_replicas"] == 0, timeout=120)
        cluster.restart_node("worker")
        back = controller.wait_release(lambda r: healthy(r) and stable(r)["ready_replicas"] == 1, timeout=TIMEOUT)
        wait_for(lambda: load.answers and load.answers[-1][1] == 200, 120, "requests served again")
        served_again_at = time.time()
    assert controller.process is not None and controller.process.poll() is None  # the controller never stopped
    assert stable(lost)["id"] == stable(back)["id"] == serving  # rescheduled on the new node: no rollback, no new version
    assert stable(back)["nodes"] == {cluster.worker_ips[0]: 1}
    # Serve holds requests for a version with no replica until one is back: those in flight fail or wait out the
    # client's 30 s. The load sends one request at a time, so the failures are bounded by the outage: one per 30 s
    # waited out, plus the request the kill cut and its retry; every other answer was a 200, and none came after
    outage_s = served_again_at - killed_at
    failed = sum(count for code, count in load.codes.items() if code != 200)
    bound = math.ceil(outage_s / load.timeout) + 2
    assert set(load.codes) <= {200, 500, 503, "transport"} and failed <= bound, (outage_s, load.codes, load.errors[-3:])
    assert all(at >= killed_at for at, code, _, _ in load.answers if code != 200)  # nothing failed before the kill
    failures = [(code, body) for _, code, _, body in load.answers if code in (500, 503)]
    problems = [json.loads(body) for code, body in failures if body.startswith(b"{")]
    assert all(p.get("status") in (500, 503) and p.get("detail") for p in problems), problems[:3]  # the router's: documents
    # Serve's own proxy answers a request it cannot route during the outage with its plain-text 503, and one whose
    # router replica died with the node under it with its plain-text 500 (README: weak)
    plain = [(code, body) for code, body in failures if not body.startswith(b"{")]
    assert all(code == 503 or (code, body) == (500, b"Internal Server Error") for code, body in plain), plain[:3]
    assert "replicas" in lost["message"] or lost["phase"] in ("Degraded", "Failed"), lost
