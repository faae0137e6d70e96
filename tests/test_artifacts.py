"""Model artifacts: digests, the file policy and the verified cache (object stores: tests/test_store_emulators.py)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from serving.artifacts import ModelCache, fetch
from serving.manifest import MANIFEST_NAME, ArtifactError, Manifest, manifest_of
from tests.conftest import DEMO_MODEL, ReleaseRepo

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


# Object stores (s3://, gs://, az://), each a real server on loopback: tests/test_store_emulators.py.
