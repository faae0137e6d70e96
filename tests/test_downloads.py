"""What a change downloads, as a table: the new model's bytes per node, the worst case over its replicas, the egress
price, and the nodes whose caches hold it; then `diffops diff` on a real repository with a controller's state."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from controller.plan.changes import diff_releases, with_downloads
from controller.plan.downloads import Download, ModelSize, download, download_text, held_nodes
from controller.state.records import ObservedApp, VersionRecord
from controller.state.store import State, Store
from serving.manifest import manifest_of
from tests.conftest import DEMO_MODEL, ReleaseRepo
from tests.conftest import make_release as release
from tests.live import DIFFOPS

OTHER = ("2b30c6ef", "3b30c6ef")  # another model digest
THREE = ("    count: 1\n", "    count: 3\n")
EGRESS = ("    gpu_hour_usd: 2.5\n", "    gpu_hour_usd: 2.5\n    egress_usd_per_gb: 0.09\n")
GB = ModelSize(2_000_000_000, 12)

# (case, release after the change, replicas it starts, size, held by, expected download or None)
DOWNLOADS = [
    ("a new release: one node per replica", release(), 1, GB, (),
     Download(release().spec.model.digest, GB.bytes, 12, 1, GB.bytes, None)),
    ("a new model on three replicas, priced", release(OTHER, THREE, EGRESS), 3, GB, ("198.18.0.3",),
     Download(release(OTHER).spec.model.digest, GB.bytes, 12, 3, 3 * GB.bytes, 0.54, ("198.18.0.3",))),
    ("a scale-out: the new replicas' nodes may fetch it too", release(THREE), 2, GB, ("198.18.0.3",),
     Download(release().spec.model.digest, GB.bytes, 12, 2, 2 * GB.bytes, None, ("198.18.0.3",))),
    ("nothing starts (a store move, a policy): nothing to fetch", release(("file://models/tiny-sd", "s3://b/tiny-sd")), 0, GB, (), None),
    ("a removed release", None, 0, GB, (), None),
    ("size unknown: the reason is kept", release(OTHER), 1, "in an object store; --model-sizes lists it", (),
     Download(release(OTHER).spec.model.digest, None, None, 1, None, None, (), "in an object store; --model-sizes lists it")),
]


@pytest.mark.parametrize("case", DOWNLOADS, ids=[c[0] for c in DOWNLOADS])
def test_download(case):
    _, new, starts, size, held, expected = case
    assert download(new, starts, size, held) == expected


def test_download_text_says_size_nodes_total_price_and_holders():
    d = download(release(OTHER, THREE, EGRESS), 3, GB, ("198.18.0.4", "198.18.0.3"))
    assert d is not None
    assert download_text(d) == (f"model {d.digest[:19]} 2.0 GB in 12 files on each node that starts a replica without it: "
                                "up to 3 nodes, ≤ 6.0 GB (≈ $0.54 egress); cached on 198.18.0.3, 198.18.0.4")
    unknown = download(release(OTHER), 1, "could not list s3://b/m: NoCredentialsError: no credentials", ())
    assert unknown is not None and download_text(unknown).endswith(
        "size unknown (could not list s3://b/m: NoCredentialsError: no credentials) on each node that starts a replica without it: up to 1 node")


def test_held_nodes_are_those_running_a_version_of_that_model():
    spec = release().spec
    versions = [VersionRecord("demo", "v1", "stable", 100, "ready", "c1", spec, 0.0),
                VersionRecord("other", "v9", "stable", 100, "ready", "c1", spec, 0.0),
                VersionRecord("demo", "v2", "canary", 0, "starting", "c2", release(OTHER).spec, 0.0)]
    apps = {"demo--v1": ObservedApp("demo--v1", "RUNNING", running=2, target=2, nodes=("198.18.0.3", "198.18.0.4")),
            "other--v9": ObservedApp("other--v9", "RUNNING", running=1, target=1, nodes=("198.18.0.3",)),
            "demo--v2": ObservedApp("demo--v2", "DEPLOYING", running=0, target=1)}
    assert held_nodes(versions, apps) == {spec.model.digest: ("198.18.0.3", "198.18.0.4")}


def test_with_downloads_sizes_each_change_that_starts_replicas():
    old = {"demo": release(), "moved": release(name="moved")}
    new = {"demo": release(OTHER), "second": release(name="second"), "moved": release(("file://models/tiny-sd", "s3://b/m"), name="moved")}
    changes = with_downloads(diff_releases(old, new), new, {release(OTHER).spec.model.digest: GB}, {})
    by_name = {c.name: c.download for c in changes}
    assert by_name["demo"] is not None and by_name["demo"].bytes == GB.bytes
    assert by_name["second"] is not None and by_name["second"].unknown == "no listing"  # its digest was not sized
    assert by_name["moved"] is None  # a store move starts nothing


def diff(repo: ReleaseRepo, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DIFFOPS, "diff", "--state-dir", str(state), *args], cwd=repo.path, capture_output=True, text=True)


def test_diff_shows_the_bytes_a_new_model_brings_to_each_node(model_repo: ReleaseRepo, tmp_path: Path):
    files = [p for p in DEMO_MODEL.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    # the repo's model, sized from the commit's tree: the demo release added
    [change] = json.loads(diff(model_repo, tmp_path / "none", "--format", "json").stdout)["changes"]
    assert change["download"]["bytes"] == size and change["download"]["files"] == len(files) and change["download"]["nodes"] == 1
    # a copy of the model with its own digest, served by a controller whose state says which node holds the old one
    copy = model_repo.path / "models" / "tiny-sd-2"
    copy.mkdir()
    for path in files:
        target = copy / path.relative_to(DEMO_MODEL)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes() + (b"\n" if path.name == "model_index.json" else b""))
    digest = manifest_of(copy).digest
    old_digest = manifest_of(DEMO_MODEL).digest
    model_repo.release(**{"file://models/tiny-sd": "file://models/tiny-sd-2", old_digest: digest, "    count: 1\n": "    count: 2\n"})
    model_repo.commit("the model, retrained")
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    store = Store(state_dir / "state.db", readonly=False)
    serving = VersionRecord("demo", "v1", "stable", 100, "ready", "c1", release().spec, 0.0)
    store.save(State(versions=[serving], apps={"demo--v1": ObservedApp("demo--v1", "RUNNING", running=1, target=1, nodes=("198.18.0.3",))}))
    store.close()
    text = diff(model_repo, state_dir).stdout
    assert f"download: model {digest[:19]} {(size + 1) / 1000:.1f} KB in {len(files)} files on each node" in text, text
    assert "up to 2 nodes" in text and "cached on" not in text  # the old model's holder holds nothing new
    # back to the old model: the node that serves it holds it
    model_repo.repo.git.revert("--no-edit", "HEAD")
    text = diff(model_repo, state_dir).stdout
    assert f"download: model {old_digest[:19]}" in text and "cached on 198.18.0.3" in text, text
    # a model in an object store is listed only when asked; a store that cannot answer is named, not a failure
    model_repo.release(**{"file://models/tiny-sd": "s3://no-such-bucket/tiny-sd", old_digest: digest})
    model_repo.commit("the model moved to S3")
    offline = diff(model_repo, state_dir)
    assert offline.returncode == 0 and "size unknown (in an object store; --model-sizes lists it)" in offline.stdout
    dead_store = subprocess.run([DIFFOPS, "diff", "--state-dir", str(state_dir), "--model-sizes", "--format", "markdown"],
                              cwd=model_repo.path, capture_output=True, text=True,
                              env={**os.environ, "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "x",
                                   "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"})
    assert dead_store.returncode == 0, dead_store.stderr
    assert "| download |" in dead_store.stdout and "size unknown (could not list s3://no-such-bucket/tiny-sd:" in dead_store.stdout
