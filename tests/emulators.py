"""Real object stores on loopback for the tests: S3 (moto), Google Cloud Storage (gcp-storage-emulator) and Azure Blob
(Azurite), each reached by diffops through its ecosystem's usual environment, and each written to by the test through
that ecosystem's own client (boto3, google-cloud-storage, azure-storage-blob) so a hostile key is stored as given.

`object_store` is parametrised over the three: a fresh bucket (container) per test, with `put`/`wipe` to plant,
tamper with or empty it. Servers are per module; the environment each sets is restored when it stops."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_MODEL, ROOT, free_port

__all__ = ["AZURITE", "AZURITE_KEY", "STORES", "Bucket", "azurite", "azurite_connection", "gcs_emulator", "object_store", "s3_endpoint"]

STORES = ("s3", "gs", "az")
AZURITE = ROOT / ".venv" / "azurite" / "node_modules" / ".bin" / "azurite-blob"  # `make setup` installs it there
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="  # Azurite's documented dev key


@dataclass
class Bucket:
    """One empty bucket of one store: `uri` is `<scheme>://<bucket>`; `put` writes a key through the store's own client."""

    scheme: str
    name: str
    put: Callable[[str, bytes], None]
    keys: Callable[[], list[str]]
    delete: Callable[[str], None]

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.name}"

    def upload_model(self, prefix: str, model: Path = DEMO_MODEL) -> str:
        for path in sorted(model.rglob("*")):
            if path.is_file():
                self.put(f"{prefix}/{path.relative_to(model).as_posix()}", path.read_bytes())
        return f"{self.uri}/{prefix}"

    def wipe(self) -> None:
        for key in self.keys():
            self.delete(key)


def clear_fs_caches() -> None:
    """fsspec keeps one filesystem per set of options, not per environment: a new server needs a new one."""
    import adlfs
    import gcsfs
    import s3fs

    for cls in (s3fs.S3FileSystem, gcsfs.GCSFileSystem, gcsfs.core.GCSFileSystem, adlfs.AzureBlobFileSystem):
        cls.clear_instance_cache()


def _set_env(values: dict[str, str]) -> Callable[[], None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)

    def restore() -> None:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return restore


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"azurite exited with {process.returncode}: {process.stdout.read().decode() if process.stdout else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"azurite did not listen on 127.0.0.1:{port} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server; diffops reaches it through AWS_ENDPOINT_URL and AWS_* keys."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    restore = _set_env({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
                        "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"})
    clear_fs_caches()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    restore()


def _keep_names_verbatim() -> None:
    """Real GCS stores any object name but `.` and `..` as given; the emulator's storage refuses a `..` segment because
    on disk it maps names to directories. In memory (how it runs here) a name is a dict key: keep it as given."""
    from gcp_storage_emulator import storage

    def norm(path: str) -> str:
        return "/".join(part for part in path.replace("\\", "/").strip("/").split("/") if part and part != ".")

    storage._FileStore._norm = staticmethod(norm)


@pytest.fixture(scope="module")
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator in memory; diffops reaches it through STORAGE_EMULATOR_HOST (read anonymously)."""
    from gcp_storage_emulator.server import create_server

    _keep_names_verbatim()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    restore = _set_env({"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "diffops-test"})
    clear_fs_caches()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    restore()


def azurite_connection(host: str, port: int) -> str:
    """AZURE_STORAGE_CONNECTION_STRING for Azurite's dev account on host:port."""
    return (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://{host}:{port}/devstoreaccount1;")


@pytest.fixture(scope="module")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Azurite's blob service; diffops reaches it through AZURE_STORAGE_CONNECTION_STRING (the dev account)."""
    if not AZURITE.exists():
        raise RuntimeError(f"{AZURITE} is missing: run `make setup` (it installs npm azurite into .venv/azurite)")
    port = free_port()
    process = subprocess.Popen([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location",
                                str(tmp_path_factory.mktemp("azurite")), "--skipApiVersionCheck", "--loose", "--silent"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_port(port, process)
        connection = azurite_connection("127.0.0.1", port)
        restore = _set_env({"AZURE_STORAGE_CONNECTION_STRING": connection})
        clear_fs_caches()
        yield connection
        restore()
    finally:  # the npm shim and node under it: its own process group
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _bucket_name(request: pytest.FixtureRequest) -> str:
    """Valid in all three stores: lowercase letters, digits and single hyphens, 3 to 63 characters."""
    words = "".join(c if c.isalnum() else " " for c in request.node.name.lower()).split()
    return "-".join(["m", str(time.monotonic_ns() % 10**9), *words])[:60].rstrip("-")


def _s3_bucket(name: str, endpoint: str) -> Bucket:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=name)
    return Bucket("s3", name, lambda key, data: s3.put_object(Bucket=name, Key=key, Body=data),
                  lambda: [o["Key"] for o in s3.list_objects_v2(Bucket=name).get("Contents", [])],
                  lambda key: s3.delete_object(Bucket=name, Key=key))


def _gcs_bucket(name: str) -> Bucket:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="diffops-test", credentials=AnonymousCredentials())
    bucket = client.create_bucket(name)
    return Bucket("gs", name, lambda key, data: bucket.blob(key).upload_from_string(data),
                  lambda: [blob.name for blob in client.list_blobs(name)], lambda key: bucket.blob(key).delete())


def _az_container(name: str, connection: str) -> Bucket:
    from azure.storage.blob import BlobServiceClient

    container = BlobServiceClient.from_connection_string(connection).create_container(name)
    return Bucket("az", name, lambda key, data: container.upload_blob(key, data, overwrite=True),
                  lambda: [blob.name for blob in container.list_blobs()], container.delete_blob)


@pytest.fixture(params=STORES)
def object_store(request: pytest.FixtureRequest) -> Bucket:
    """An empty bucket in S3, GCS or Azure Blob (the test's parameter), its server running and diffops pointed at it."""
    name = _bucket_name(request)
    if request.param == "s3":
        bucket = _s3_bucket(name, request.getfixturevalue("s3_endpoint"))
    elif request.param == "gs":
        request.getfixturevalue("gcs_emulator")
        bucket = _gcs_bucket(name)
    else:
        bucket = _az_container(name, request.getfixturevalue("azurite"))
    clear_fs_caches()
    return bucket
