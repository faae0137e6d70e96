"""Where replicas read models from on a cluster: the placement decision as a table, publishing `file://` models to
object stores by digest (tests/test_store_emulators.py, on each store), and the rendered Serve config that never names a path of
the controller's machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.apply.model_store import Placement, published_uri
from controller.apply.ray_cluster import is_local
from controller.apply.serve_config import RenderSettings, render
from controller.plan.versions import version_id
from controller.state.records import ReleaseRecord, VersionRecord
from serving.model_cache import node_cache_dir
from serving.schema import ModelSpec
from tests.conftest import make_release

DIGEST = "sha256:" + "ab" * 32
IN_REPO = ModelSpec(uri="file://models/tiny-sd", digest=DIGEST)
IN_S3 = ModelSpec(uri="s3://weights/sd-1.5", digest=DIGEST)
STORE = "s3://diffops-models/published"

PLACEMENTS = [
    # (case, store, local, model, uri replicas fetch, replicas read the repo, refused)
    ("local head, repo model: read from the repo", None, True, IN_REPO, "file://models/tiny-sd", True, False),
    ("local head with a store: published anyway", STORE, True, IN_REPO, f"{STORE}/sha256-{'ab' * 32}", False, False),
    ("cluster with a store: published", STORE, False, IN_REPO, f"{STORE}/sha256-{'ab' * 32}", False, False),
    ("cluster, no store: refused", None, False, IN_REPO, "file://models/tiny-sd", True, True),
    ("cluster, object-store model: as the release says", None, False, IN_S3, "s3://weights/sd-1.5", False, False),
    ("store set, object-store model: never copied", STORE, False, IN_S3, "s3://weights/sd-1.5", False, False),
]


@pytest.mark.parametrize("case", PLACEMENTS, ids=[c[0] for c in PLACEMENTS])
def test_where_replicas_fetch_a_model(case):
    _, store, local, model, uri, reads_repo, refused = case
    placement = Placement(store, local)
    assert placement.for_replicas(model).uri == uri
    assert placement.for_replicas(model).digest == model.digest  # the pin never changes, only where it is read
    assert placement.reads_repo(model) is reads_repo
    refusal = placement.refusal(model)
    assert (refusal is not None) is refused
    if refusal:
        assert "--model-store s3://bucket/prefix" in refusal and "cannot read" in refusal


def test_a_model_store_that_is_not_an_object_store_is_refused():
    with pytest.raises(ValueError, match=r"--model-store '/mnt/models': give an object store URI, e\.g\. s3://bucket/models"):
        Placement("/mnt/models", local=False)


@pytest.mark.parametrize("url, local", [
    ("http://127.0.0.1:8265", True), ("http://localhost:8265", True), ("http://[::1]:8265", True), ("http://127.0.5.1:8265", True),
    ("http://198.18.0.2:8265", False), ("https://ray-head.ml.svc:8265", False), ("http://0.0.0.0:8265", False),
])
def test_only_a_loopback_dashboard_is_this_machine(url, local):
    assert is_local(url) is local


def test_a_node_uses_the_cache_it_is_given_else_its_own(monkeypatch, tmp_path):
    assert node_cache_dir("/srv/state/models") == Path("/srv/state/models")
    monkeypatch.setenv("DIFFOPS_CACHE_DIR", str(tmp_path / "node"))
    assert node_cache_dir(None) == tmp_path / "node"
    monkeypatch.delenv("DIFFOPS_CACHE_DIR")
    assert node_cache_dir(None).name == "diffops-models"


def cluster_settings() -> RenderSettings:
    return RenderSettings(repo="/home/ops/releases", cache_dir="/var/lib/diffops/models", http_host="0.0.0.0",
                          placement=Placement(STORE, local=False), proxy_location="EveryNode")


def test_a_cluster_config_names_no_path_of_the_controllers_machine():
    release = make_release()
    version = VersionRecord("demo", version_id(release), "stable", 100, "ready", "c1", release.spec, 1.0)
    config = render([ReleaseRecord("demo", "Healthy", "", "c1", version.version, release.spec, 1.0)], [version], cluster_settings())
    assert (config["proxy_location"], config["http_options"]["host"]) == ("EveryNode", "0.0.0.0")
    [model_app] = [app for app in config["applications"] if app["name"] == version.app]
    args = model_app["args"]
    assert args["model"] == {"uri": published_uri(STORE, release.spec.model.digest), "digest": release.spec.model.digest,
                             "dtype": "float32"}
    assert args["repo"] is None and args["cache_dir"] is None
    text = json.dumps(config)
    assert "/home/ops/releases" not in text and "/var/lib/diffops" not in text


# Publishing to S3, GCS and Azure Blob, each a real server on loopback, and reading back: tests/test_store_emulators.py.


# --- the serving code pin -------------------------------------------------------------------------------------------


def test_every_app_pins_the_controllers_serving_code_and_a_node_with_other_code_refuses():
    from serving import code_pin

    release = make_release()
    version = VersionRecord("demo", version_id(release), "stable", 100, "ready", "c1", release.spec, 1.0)
    record = ReleaseRecord("demo", "Healthy", "", "c1", version.version, release.spec, 1.0)
    pinned = RenderSettings(repo="/r", cache_dir="/c", serving_code=code_pin.fingerprint())
    config = render([record], [version], pinned)
    assert [app["runtime_env"] for app in config["applications"]] == [{"env_vars": {"DIFFOPS_SERVING_CODE": code_pin.fingerprint()}}] * 2
    assert all("runtime_env" not in app for app in render([record], [version], RenderSettings(repo="/r", cache_dir="/c"))["applications"])

    assert code_pin.fingerprint().startswith("diffops ") and len(code_pin.fingerprint().split()[-1]) == 12
    code_pin.check("demo router", {"DIFFOPS_SERVING_CODE": code_pin.fingerprint()})  # the same code: starts
    code_pin.check("demo router", {})  # nothing pinned (`diffops check` on a laptop): starts
    with pytest.raises(code_pin.CodeMismatch, match=r"demo router: this node runs diffops .* the controller pinned diffops 0\.0\.0 serving "
                       r"000000000000; install the controller's diffops on every node"):
        code_pin.check("demo router", {"DIFFOPS_SERVING_CODE": "diffops 0.0.0 serving 000000000000"})


def test_the_dependency_check_fails_on_a_node_running_other_serving_code():
    from checks import dependency
    from serving import code_pin

    image = make_release().spec.runtime.image
    same = dependency.run({}, image, "unverified", {"DIFFOPS_SERVING_CODE": code_pin.fingerprint()})
    assert same.outcome == "passed" and same.figures["serving_code"] == same.figures["serving_code_pinned"]
    other = dependency.run({}, image, "unverified", {"DIFFOPS_SERVING_CODE": "diffops 0.0.0 serving 000000000000"})
    assert other.outcome == "failed" and "serving code: this node runs diffops" in other.message


# --- where replicas run, in `diffops status` --------------------------------------------------------------------------


def test_status_shows_on_which_nodes_each_versions_replicas_run(tmp_path):
    from controller.apply.serve_client import parse_applications
    from controller.cli.status_view import status_json, status_text
    from controller.state.store import ControllerRecord, State, Store

    release = make_release()
    version = VersionRecord("demo", version_id(release), "stable", 100, "ready", "c1", release.spec, 1.0)
    replica = {"state": "RUNNING", "replica_id": "r", "node_ip": "198.18.7.3"}
    details = {"applications": {version.app: {"status": "RUNNING", "deployments": {"Model": {
        "target_num_replicas": 3, "replicas": [replica, {**replica, "node_ip": "198.18.7.4"}, replica,
                                               {"state": "STARTING", "node_ip": "198.18.7.9"}]}}}}}
    observed = parse_applications(details)  # the shape of Ray Serve's GET /api/serve/applications/ answer
    assert observed[version.app].nodes == ("198.18.7.3", "198.18.7.3", "198.18.7.4")  # running replicas only
    store = Store(tmp_path / "state.db")
    store.save(State(ControllerRecord("c1", 1.0, "c1", 1.0), {"demo": ReleaseRecord("demo", "Healthy", "", "c1", version.version,
                                                                                      release.spec, 1.0)}, [version], observed))
    state = Store(tmp_path / "state.db", readonly=True).load()
    [row] = status_json(state)["releases"][0]["versions"]
    assert row["nodes"] == {"198.18.7.3": 2, "198.18.7.4": 1}
    assert "replicas 3/1 on 198.18.7.3 x2, 198.18.7.4  from c1" in status_text(state, now=2.0)
