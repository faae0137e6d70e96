"""Models in object storage, the same table on every store: S3 (moto), Google Cloud Storage (gcp-storage-emulator) and
Azure Blob (Azurite), each a real server on loopback reached through its ecosystem's usual environment
(tests/emulators.py). A fetch verifies every byte into the cache and the next one transfers nothing; hostile keys,
extra files and a flipped byte are refused before anything lands; a `file://` model is published to each as a
`--model-store` and read back by a replica's fetch; and the pipeline loads from what was fetched and draws."""

from __future__ import annotations

import json
import os

import pytest

from controller.apply.model_store import Placement, publish, published_uri
from serving.artifacts import ModelCache, fetch
from serving.manifest import MANIFEST_NAME, ArtifactError, Manifest, manifest_of
from serving.stores import fsspec_target
from tests.conftest import DEMO_MODEL
from tests.emulators import STORES, Bucket, azurite, clear_fs_caches, gcs_emulator, object_store, s3_endpoint  # noqa: F401

DIGEST = Manifest.parse((DEMO_MODEL / MANIFEST_NAME).read_text()).digest
UNET = "unet/diffusion_pytorch_model.safetensors"
MODEL_BYTES = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())  # what publishing sends
FETCHED_BYTES = MODEL_BYTES - (DEMO_MODEL / MANIFEST_NAME).stat().st_size  # what a fetch counts: the manifest aside


def files_under(root):
    return {p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")}


TARGETS = [
    # (case, uri, environment, fsspec url, options)
    ("s3 as given", "s3://b/m", {}, "s3://b/m", {}),
    ("az is adlfs's abfs", "az://container/m", {}, "abfs://container/m", {}),
    ("gs with credentials from the environment", "gs://b/m", {}, "gs://b/m", {}),
    ("gs on an emulator: anonymous", "gs://b/m", {"STORAGE_EMULATOR_HOST": "127.0.0.1:9023"}, "gs://b/m", {"token": "anon"}),
    ("gs, emulator 'default': real credentials", "gs://b/m", {"STORAGE_EMULATOR_HOST": "default"}, "gs://b/m", {}),
    ("an emulator host never makes s3 anonymous", "s3://b/m", {"STORAGE_EMULATOR_HOST": "127.0.0.1:9023"}, "s3://b/m", {}),
]


@pytest.mark.parametrize("case", TARGETS, ids=[c[0] for c in TARGETS])
def test_each_store_is_reached_through_its_own_environment(case):
    _, uri, environ, url, options = case
    assert fsspec_target(uri, environ) == (url, options)


def test_fetch_verifies_and_a_second_fetch_transfers_nothing(object_store: Bucket, tmp_path):  # noqa: F811 (the fixture imported above)
    uri = object_store.upload_model("tiny-sd")
    cache = ModelCache(tmp_path / "cache")
    result = fetch(uri, DIGEST, cache)
    assert not result.cached and result.files == 10 and result.bytes_transferred == FETCHED_BYTES
    assert manifest_of(result.path).digest == DIGEST
    object_store.wipe()  # the bucket is empty now: a transfer would fail
    assert object_store.keys() == []
    again = fetch(uri, DIGEST, cache)
    assert again.cached and again.bytes_transferred == 0 and again.path == result.path


def test_a_flipped_byte_is_named_and_nothing_is_cached(object_store: Bucket, tmp_path):  # noqa: F811 (the fixture imported above)
    uri = object_store.upload_model("tiny-sd")
    data = bytearray((DEMO_MODEL / UNET).read_bytes())
    data[500] ^= 0x01
    object_store.put(f"tiny-sd/{UNET}", bytes(data))
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ArtifactError, match=f"{UNET}: sha256 .* does not match pinned"):
        fetch(uri, DIGEST, cache)
    assert files_under(cache.root) == set()


def large_model(tmp_path):
    """The demo model with a UNet of 40 MB of random bytes (3 ranged parts of 16 MiB at most), its manifest shipped
    beside the files (a refusal names the file): (folder, weights, digest)."""
    import shutil

    model = tmp_path / "large"
    shutil.copytree(DEMO_MODEL, model)
    (model / MANIFEST_NAME).unlink()
    weights = os.urandom(40_000_000)
    (model / UNET).write_bytes(weights)
    manifest = manifest_of(model)
    (model / MANIFEST_NAME).write_text(manifest.text())
    return model, weights, manifest.digest


def test_a_large_file_moves_in_ranged_parts_and_a_flipped_byte_inside_one_is_named(object_store: Bucket, tmp_path):  # noqa: F811 (the fixture imported above)
    """The demo model with a UNet of 40 MB (3 ranged parts of 16 MiB at most): fetched in parts over parallel
    connections, every byte as in the store; then one byte flipped in the middle part is refused, nothing cached."""
    from serving.transfer import PART_BYTES, parts_of

    model, weights, digest = large_model(tmp_path)
    uri = object_store.upload_model("large", model)
    result = fetch(uri, digest, ModelCache(tmp_path / "cache"))
    assert not result.cached and result.ranged_parts == len(parts_of(len(weights))) == 3
    assert (result.path / UNET).read_bytes() == weights

    flipped = bytearray(weights)
    flipped[PART_BYTES + 12345] ^= 0x01  # inside the second part
    object_store.put(f"large/{UNET}", bytes(flipped))
    cache = ModelCache(tmp_path / "cache-2")
    with pytest.raises(ArtifactError, match=f"{UNET}: sha256 .* does not match pinned"):
        fetch(uri, digest, cache)
    assert files_under(cache.root) == set()


def test_a_fetch_cut_off_mid_file_resumes_from_the_parts_that_landed(object_store: Bucket, tmp_path, monkeypatch):  # noqa: F811 (the fixture imported above)
    """The store drops every read of the UNet's third part (as a connection reset does): the fetch fails naming those
    bytes after its retries and keeps the two parts that landed; the next fetch reads only the third part from the
    store and caches the verified model."""
    from serving.stores import FsspecStore
    from serving.transfer import PART_BYTES, PART_TRIES, TransferError

    model, weights, digest = large_model(tmp_path)
    uri = object_store.upload_model("large", model)
    read_range, reads, dropping = FsspecStore.read_range, [], [True]

    def through_the_store(store, key, offset, length):
        reads.append((key, offset))
        if dropping[0] and offset == 2 * PART_BYTES:
            raise ConnectionResetError(104, "Connection reset by peer")
        return read_range(store, key, offset, length)

    monkeypatch.setattr(FsspecStore, "read_range", through_the_store)
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(TransferError, match=rf"{UNET} bytes {2 * PART_BYTES}-{len(weights) - 1}: read failed {PART_TRIES}"):
        fetch(uri, digest, cache)
    assert not cache.path(digest).exists() and cache.partial(digest).is_dir()
    journal = json.loads((cache.partial(digest) / "landed.json").read_text())["files"]
    assert journal[UNET] == {"size": len(weights), "landed": 2 * PART_BYTES}
    kept = sum(entry["landed"] for entry in journal.values())  # the UNet's two parts and the small files done by then

    dropping[0], reads[:] = False, []
    result = fetch(uri, digest, cache)
    assert reads == [(UNET, 2 * PART_BYTES)]  # the two parts that landed are not fetched again
    total = FETCHED_BYTES - (DEMO_MODEL / UNET).stat().st_size + len(weights)
    assert result.resumed_bytes == kept and result.bytes_transferred == total - kept
    assert (result.path / UNET).read_bytes() == weights and manifest_of(result.path).digest == digest
    assert not cache.partial(digest).exists()


HOSTILE = [
    # (case, key planted beside the model, what the refusal says)
    ("dot-dot key", "tiny-sd/../escape.safetensors", "'..' or empty parts are refused"),
    ("empty part", "tiny-sd//abs.json", "'/abs.json': absolute file keys are refused"),
    ("pickle weights", "tiny-sd/unet/model.pth", ".pth files are refused"),
    ("code file", "tiny-sd/pipeline.py", ".py files are refused"),
    ("extra file", "tiny-sd/unet/extra.safetensors", "unet/extra.safetensors: extra file"),
]
# Azure's client resolves dot segments in the URL it signs before sending: no `..` blob can be written there (below).
HOSTILE_ON = [pytest.param(store, case, id=f"{store}-{case[0]}") for store in STORES for case in HOSTILE
              if not (store == "az" and case[0] == "dot-dot key")]


@pytest.mark.parametrize("object_store, case", HOSTILE_ON, indirect=["object_store"])
def test_hostile_keys_are_refused_before_anything_lands(object_store: Bucket, case, tmp_path):  # noqa: F811 (the fixture imported above)
    _, key, fragment = case
    uri = object_store.upload_model("tiny-sd")
    object_store.put(key, b"{}")
    assert key in object_store.keys()  # the store holds the key as given
    cache = ModelCache(tmp_path / "cache")
    with pytest.raises(ArtifactError, match=fragment):
        fetch(uri, DIGEST, cache)
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("object_store", ["az"], indirect=True)
def test_an_azure_blob_name_with_dot_segments_cannot_be_written(object_store: Bucket):  # noqa: F811 (the fixture imported above)
    from azure.core.exceptions import HttpResponseError

    with pytest.raises(HttpResponseError, match="AuthorizationFailure"):
        object_store.put("tiny-sd/../escape.safetensors", b"{}")
    assert object_store.keys() == []


def test_a_damaged_cache_entry_is_refused_then_downloaded_again(object_store: Bucket, tmp_path):  # noqa: F811 (the fixture imported above)
    uri = object_store.upload_model("tiny-sd")
    cache = ModelCache(tmp_path / "cache")
    first = fetch(uri, DIGEST, cache)
    (first.path / UNET).chmod(0o644)
    data = bytearray((first.path / UNET).read_bytes())
    data[1000] ^= 0xFF
    (first.path / UNET).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"is damaged \\({UNET}: sha256 .* does not match pinned"):
        fetch(uri, DIGEST, cache, reverify=True)  # what a replica does on start
    healed = fetch(uri, DIGEST, cache, reverify=True)
    assert not healed.cached and healed.bytes_transferred == FETCHED_BYTES
    assert manifest_of(healed.path).digest == DIGEST


def test_a_model_store_publishes_once_by_digest_and_replicas_fetch_it(object_store: Bucket, tmp_path):  # noqa: F811 (the fixture imported above)
    verified = fetch(f"file://{DEMO_MODEL}", DIGEST, ModelCache(tmp_path / "controller"), allowed_roots=(DEMO_MODEL.parent,))
    store = f"{object_store.uri}/published"
    placement = Placement(store, local=False)  # the controller with --model-store <store>, replicas on other nodes
    uri = placement.for_replicas(make_spec()).uri
    assert uri == published_uri(store, DIGEST) and uri.startswith(f"{object_store.scheme}://")
    sent, already = publish(verified.path, uri)
    assert (sent, already) == (MODEL_BYTES, False)
    assert sorted(object_store.keys()) == sorted(f"published/{DIGEST.replace(':', '-')}/{p.relative_to(DEMO_MODEL).as_posix()}"
                                                 for p in DEMO_MODEL.rglob("*") if p.is_file())
    clear_fs_caches()
    node = fetch(uri, DIGEST, ModelCache(tmp_path / "node"))  # what a replica on another node does
    assert not node.cached and node.bytes_transferred == FETCHED_BYTES and manifest_of(node.path).digest == DIGEST
    assert publish(verified.path, uri) == (0, True)  # content-addressed: the next version with this model sends nothing


def test_publishing_to_a_bucket_that_does_not_exist_says_what_to_do(object_store: Bucket, tmp_path):  # noqa: F811 (the fixture imported above)
    verified = fetch(f"file://{DEMO_MODEL}", DIGEST, ModelCache(tmp_path / "c"), allowed_roots=(DEMO_MODEL.parent,))
    missing = f"{object_store.scheme}://no-such-bucket-{object_store.name[-8:].strip('-')}/m"
    with pytest.raises(ArtifactError, match=f"publishing .* to {missing}/sha256-[0-9a-f]{{64}} failed: .*check the store's "):
        publish(verified.path, published_uri(missing, DIGEST))


@pytest.mark.parametrize("object_store", ["gs", "az"], indirect=True)
def test_the_pipeline_loads_from_the_fetched_copy_and_draws(object_store: Bucket, tmp_path):  # noqa: F811 (the fixture imported above)
    import numpy as np
    import torch

    from serving.pipeline import load_pipeline

    fetched = fetch(object_store.upload_model("tiny-sd"), DIGEST, ModelCache(tmp_path / "cache"))
    pipeline = load_pipeline(fetched.path, sampler="ddim", device="cpu")
    image = pipeline("a red cube", num_inference_steps=2, width=64, height=64, guidance_scale=7.5,
                     generator=torch.Generator("cpu").manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all() and float(image.std()) > 0.01


def make_spec():
    from serving.schema import ModelSpec

    return ModelSpec(uri="file://models/tiny-sd", digest=DIGEST)
