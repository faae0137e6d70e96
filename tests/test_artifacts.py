"""Model artifacts: digests, the file policy, the verified cache, and real object storage (moto on loopback)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from serving.artifacts import ModelCache, fetch
from serving.manifest import MANIFEST_NAME, ArtifactError, Manifest, manifest_of
from tests.conftest import DEMO_MODEL, ReleaseRepo, free_port

DEMO_DIGEST = Manifest.parse((DEMO_MODEL / MANIFEST_NAME).read_text()).digest
UNET = "unet/diffusion_pytorch_model.safetensors"


def copy_model(target: Path, *, manifest: bool = True) -> Path:
    shutil.copytree(DEMO_MODEL, target)
    if not manifest:
        (target / MANIFEST_NAME).unlink()
    return target


def flip_byte(path: Path, offset: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def marker_pickle(marker: Path) -> bytes:
    """A real pickle that creates `marker` when unpickled (what a hostile .bin checkpoint does)."""

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    return pickle.dumps(Payload())


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


def test_demo_model_digest_is_the_pinned_one():
    assert manifest_of(DEMO_MODEL).digest == DEMO_DIGEST
    assert manifest_of(DEMO_MODEL).text() == (DEMO_MODEL / MANIFEST_NAME).read_text()


def test_fetch_from_the_repo_at_a_commit(model_repo: ReleaseRepo, tmp_path):
    cache = ModelCache(tmp_path / "cache")
    commit = model_repo.repo.head.commit.hexsha
    shutil.rmtree(model_repo.path / "models")  # the work tree is never read
    result = fetch("file://models/tiny-sd", DEMO_DIGEST, cache, repo=model_repo.path, commit=commit)
    assert not result.cached and result.files == 10 and result.bytes_transferred > 400_000
    assert manifest_of(result.path).digest == DEMO_DIGEST
    assert not os.access(result.path / UNET, os.W_OK) or os.geteuid() == 0
    again = fetch("file://models/tiny-sd", DEMO_DIGEST, cache, repo=model_repo.path, commit=commit)
    assert again.cached and again.bytes_transferred == 0 and again.path == result.path


def test_flipped_byte_is_named(model_repo: ReleaseRepo, tmp_path):
    flip_byte(model_repo.path / "models" / "tiny-sd" / UNET)
    commit = model_repo.commit("corrupt weights")
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ArtifactError, match=f"digest mismatch: {UNET}: sha256 .* does not match pinned"):
        fetch("file://models/tiny-sd", DEMO_DIGEST, cache, repo=model_repo.path, commit=commit)
    assert files_under(cache.root) == set()  # nothing half-written is left behind


def test_without_manifest_a_mismatch_still_refuses(tmp_path):
    model = copy_model(tmp_path / "m", manifest=False)
    flip_byte(model / UNET)
    with pytest.raises(ArtifactError, match="files hash to sha256:.*release pins"):
        fetch(f"file://{model}", DEMO_DIGEST, ModelCache(tmp_path / "cache"), allowed_roots=(tmp_path,))


CORRUPTIONS = [
    ("truncated file", lambda m: (m / UNET).write_bytes((m / UNET).read_bytes()[:-100]), f"{UNET}: sha256"),
    ("extra file", lambda m: (m / "unet" / "extra.safetensors").write_bytes(b"x"), "unet/extra.safetensors: extra file"),
    ("missing file", lambda m: (m / "vae" / "config.json").unlink(), "vae/config.json: missing"),
    ("pickle weights", lambda m: (m / "unet" / "model.bin").write_bytes(marker_pickle(m.parent / "pickle-ran")),
     "unet/model.bin: .bin files are refused"),
    ("checkpoint", lambda m: (m / "model.ckpt").write_bytes(b"x"), "model.ckpt: .ckpt files are refused"),
    ("code file", lambda m: (m / "pipeline.py").write_text("import os"), "pipeline.py: .py files are refused"),
    ("symlink out of the tree", lambda m: (m / "unet" / "link.safetensors").symlink_to("/etc/passwd"), "symlink escapes"),
]


@pytest.mark.parametrize("case", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_refused_before_load(case, tmp_path):
    _, corrupt, fragment = case
    model = copy_model(tmp_path / "m")
    corrupt(model)
    before = files_under(tmp_path)
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ArtifactError, match=fragment):
        fetch(f"file://{model}", DEMO_DIGEST, cache, allowed_roots=(tmp_path,))
    assert files_under(tmp_path) == before  # nothing in the cache, nothing anywhere else
    assert not (tmp_path / "pickle-ran").exists()


def test_a_pickle_in_the_repo_never_runs(model_repo: ReleaseRepo, tmp_path):
    marker = tmp_path / "pickle-ran"
    model_repo.write("models/tiny-sd/unet/diffusion_pytorch_model.bin", marker_pickle(marker))
    commit = model_repo.commit("pickle weights beside the safetensors")
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="unet/diffusion_pytorch_model.bin: .bin files are refused"):
        fetch("file://models/tiny-sd", DEMO_DIGEST, cache, repo=model_repo.path, commit=commit)
    assert not marker.exists() and files_under(cache.root) == set()


def test_repo_paths_never_escape(model_repo: ReleaseRepo, tmp_path):
    commit = model_repo.repo.head.commit.hexsha
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="inside the repo"):
        fetch("file://../outside", DEMO_DIGEST, cache, repo=model_repo.path, commit=commit)
    with pytest.raises(ArtifactError, match="outside the allowed model roots"):
        fetch(f"file://{DEMO_MODEL}", DEMO_DIGEST, cache)
    with pytest.raises(ArtifactError, match="not in the repo at commit"):
        fetch("file://models/nope", DEMO_DIGEST, cache, repo=model_repo.path, commit=commit)


def test_symlink_in_git_tree_escaping_is_refused(model_repo: ReleaseRepo, tmp_path):
    (model_repo.path / "models" / "tiny-sd" / "unet" / "evil.safetensors").symlink_to("../../../../../etc/passwd")
    commit = model_repo.commit("escaping link")
    with pytest.raises(ArtifactError, match="unet/evil.safetensors: symlink escapes"):
        fetch("file://models/tiny-sd", DEMO_DIGEST, ModelCache(tmp_path / "c"), repo=model_repo.path, commit=commit)


def test_submodule_in_git_tree_is_refused(model_repo: ReleaseRepo, tmp_path):
    head = model_repo.repo.head.commit.hexsha  # a gitlink entry, as `git submodule add` writes it
    model_repo.repo.git.update_index("--add", "--cacheinfo", f"160000,{head},models/tiny-sd/vendor")
    model_repo.repo.git.commit("-m", "submodule in the model directory")  # not `add -A`: no work tree behind it
    commit = model_repo.repo.head.commit.hexsha
    with pytest.raises(ArtifactError, match="vendor: submodules are not allowed in a model directory"):
        fetch("file://models/tiny-sd", DEMO_DIGEST, ModelCache(tmp_path / "c"), repo=model_repo.path, commit=commit)


def test_lfs_pointer_is_explained(model_repo: ReleaseRepo, tmp_path):
    model_repo.write(f"models/tiny-sd/{UNET}", "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 10\n")
    commit = model_repo.commit("lfs")
    with pytest.raises(ArtifactError, match="Git LFS pointer"):
        fetch("file://models/tiny-sd", DEMO_DIGEST, ModelCache(tmp_path / "c"), repo=model_repo.path, commit=commit)


# --- s3:// against a real S3-compatible server (moto) on loopback ---------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test", AWS_DEFAULT_REGION="us-east-1")
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(s3_endpoint, request):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    name = f"models-{request.node.name.lower().replace('_', '-')[:40]}"
    s3.create_bucket(Bucket=name)
    for path in DEMO_MODEL.rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), name, f"tiny-sd/{path.relative_to(DEMO_MODEL).as_posix()}")
    return s3, name


def clear_fs_cache():
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_fetch_verifies_and_second_fetch_transfers_nothing(bucket, tmp_path):
    s3, name = bucket
    clear_fs_cache()
    cache = ModelCache(tmp_path / "cache")
    result = fetch(f"s3://{name}/tiny-sd", DEMO_DIGEST, cache)
    assert not result.cached and result.files == 10 and result.bytes_transferred > 400_000
    assert manifest_of(result.path).digest == DEMO_DIGEST
    for obj in s3.list_objects_v2(Bucket=name)["Contents"]:  # the bucket is gone: a transfer would fail
        s3.delete_object(Bucket=name, Key=obj["Key"])
    again = fetch(f"s3://{name}/tiny-sd", DEMO_DIGEST, cache)
    assert again.cached and again.bytes_transferred == 0


def test_s3_flipped_byte_is_named(bucket, tmp_path):
    s3, name = bucket
    clear_fs_cache()
    data = bytearray((DEMO_MODEL / UNET).read_bytes())
    data[500] ^= 0x01
    s3.put_object(Bucket=name, Key=f"tiny-sd/{UNET}", Body=bytes(data))
    with pytest.raises(ArtifactError, match=f"{UNET}: sha256"):
        fetch(f"s3://{name}/tiny-sd", DEMO_DIGEST, ModelCache(tmp_path / "cache"))


@pytest.mark.parametrize("key", ["tiny-sd/../escape.safetensors", "tiny-sd/unet/model.pth", "tiny-sd//abs.json"])
def test_s3_hostile_keys_are_refused_before_download(bucket, tmp_path, key):
    s3, name = bucket
    clear_fs_cache()
    s3.put_object(Bucket=name, Key=key, Body=b"{}")
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ArtifactError, match="refused"):
        fetch(f"s3://{name}/tiny-sd", DEMO_DIGEST, cache)
    assert files_under(tmp_path) == set()


def test_s3_damaged_cache_entry_is_refused_then_downloaded_again_from_the_bucket(bucket, tmp_path):
    _, name = bucket
    clear_fs_cache()
    cache = ModelCache(tmp_path / "cache")
    first = fetch(f"s3://{name}/tiny-sd", DEMO_DIGEST, cache)
    (first.path / UNET).chmod(0o644)
    flip_byte(first.path / UNET)
    with pytest.raises(ArtifactError, match=f"is damaged \\({UNET}: sha256 .* does not match pinned"):
        fetch(f"s3://{name}/tiny-sd", DEMO_DIGEST, cache, reverify=True)  # what a replica does on start
    healed = fetch(f"s3://{name}/tiny-sd", DEMO_DIGEST, cache, reverify=True)
    assert not healed.cached and healed.bytes_transferred > 400_000
    assert manifest_of(healed.path).digest == DEMO_DIGEST
