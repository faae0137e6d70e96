"""Where model files come from: one small store per URI scheme.

Used by `serving.artifacts.fetch`, which never trusts what a store lists: it
checks every key and hashes every byte. A store only lists (key, size) pairs
and opens keys for reading.

- `file://models/x` — a directory in the release repo, read from git objects
  at the release's commit (never the work tree); `file:///abs` — a local
  directory under an allowed root.
- `s3://`, `gs://`, `az://` — fsspec (s3fs, gcsfs, adlfs), each configured by its ecosystem's own
  environment (`fsspec_target`): `AWS_*` (and `AWS_ENDPOINT_URL` for an S3-compatible server),
  `GOOGLE_APPLICATION_CREDENTIALS` (and `STORAGE_EMULATOR_HOST`, read anonymously as Google's
  client libraries do), `AZURE_STORAGE_CONNECTION_STRING` or `AZURE_STORAGE_ACCOUNT_NAME` + a key,
  SAS token or service principal.
- `hf://org/name@revision` — huggingface_hub, safetensors and configs only,
  downloaded (`local_dir` mode, so no hub cache elsewhere) into a scratch dir
  the fetch names under the model cache and removes after the fetch; a dir
  left by a killed fetch is swept when the cache is next opened.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from serving.manifest import MANIFEST_NAME, REFUSED_SUFFIXES, ArtifactError, list_model_files
from serving.transfer import FILES_AT_ONCE, local_concurrency

if TYPE_CHECKING:
    import git

__all__ = ["ArtifactStore", "FsspecStore", "GitTreeStore", "HfStore", "LocalStore", "filesystem", "fsspec_target", "open_store"]

LFS_POINTER = b"version https://git-lfs"


class ArtifactStore(Protocol):
    """Where model files are read from: S3, GCS, Azure, the Hub, a local folder or a git tree; listed, then opened by
    key, `concurrency` files at once (`serving.transfer`; object stores and local folders also read byte ranges)."""

    concurrency: int

    def list(self) -> list[tuple[str, int]]: ...
    def open(self, key: str) -> IO[bytes]: ...


class LocalStore:
    concurrency = local_concurrency()

    def __init__(self, root: Path):
        if not root.is_dir():
            raise ArtifactError(f"{root}: no such model directory")
        self.root = root.resolve()

    def list(self) -> list[tuple[str, int]]:
        keys = list_model_files(self.root)
        if (self.root / MANIFEST_NAME).is_file():
            keys.append(MANIFEST_NAME)
        return [(key, (self.root / key).stat().st_size) for key in keys]

    def open(self, key: str) -> IO[bytes]:
        return open(self.root / key, "rb")

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        with open(self.root / key, "rb") as handle:
            return os.pread(handle.fileno(), length, offset)


class _BlobStream:
    """A git object stream usable in `with`, like a file."""

    def __init__(self, stream: IO[bytes]):
        self.read = stream.read

    def __enter__(self) -> _BlobStream:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class GitTreeStore:
    """A model directory committed in the release repo, read at one commit (one file at a time: GitPython reads
    objects through one `git cat-file` process)."""

    concurrency = 1

    def __init__(self, repo_path: Path, commit: str, subdir: str):
        import git

        self.repo = git.Repo(repo_path)
        tree = self.repo.commit(commit).tree
        try:
            self.tree = tree / subdir
        except KeyError:
            raise ArtifactError(f"{subdir}: not in the repo at commit {commit[:12]}") from None
        self.subdir = subdir
        self.blobs: dict[str, git.Blob] = {}

    def _walk(self) -> Iterator[tuple[str, git.Blob]]:
        # traverse() without as_edge yields the objects themselves: trees, blobs and submodules (type "commit")
        for item in cast("Iterator[git.Tree | git.Blob | git.Submodule]", self.tree.traverse()):
            key = posixpath.relpath(item.path, self.subdir)
            if item.type == "submodule":
                raise ArtifactError(f"{key}: submodules are not allowed in a model directory")
            if item.type == "blob":
                yield key, item

    def list(self) -> list[tuple[str, int]]:
        entries = dict(self._walk())
        for key, blob in list(entries.items()):
            if blob.mode == 0o120000:  # symlink: follow it only inside the model directory
                target = posixpath.normpath(posixpath.join(posixpath.dirname(key), blob.data_stream.read().decode()))
                if target.startswith("../") or target == ".." or posixpath.isabs(target) or target not in entries:
                    raise ArtifactError(f"{key}: symlink escapes the model directory")
                entries[key] = entries[target]
        listed = []
        for key, blob in entries.items():
            if blob.size < 200 and blob.data_stream.read().startswith(LFS_POINTER):
                raise ArtifactError(f"{key}: is a Git LFS pointer, not the file; host large models on s3:// or hf://")
            self.blobs[key] = blob
            listed.append((key, blob.size))
        return listed

    def open(self, key: str) -> IO[bytes]:
        return _BlobStream(self.blobs[key].data_stream)  # type: ignore[return-value]  # read() and `with` are all fetch uses


def fsspec_target(uri: str, environ: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """The fsspec URL and options for an object-store URI. Pure.

    `az://container/path` is adlfs's `abfs://container/path` (the account from `AZURE_STORAGE_*`). With
    `STORAGE_EMULATOR_HOST` set, `gs://` reads that emulator anonymously, as Google's own client libraries do:
    no credential lookup (which would probe the metadata server and send real tokens to a local emulator).
    """
    if uri.startswith("az://"):
        return "abfs://" + uri.removeprefix("az://"), {}
    if uri.startswith("gs://") and environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default"):
        return uri, {"token": "anon"}
    return uri, {}


def filesystem(uri: str) -> tuple[Any, str]:
    """The fsspec filesystem and path for an object-store URI, configured from this process's environment.

    On a GCS emulator gcsfs's core filesystem is used: the default one first asks the gRPC storage-control API for
    the bucket's layout, which an emulator does not serve (anonymous, it retries against Google until it times out).
    """
    import fsspec

    target, options = fsspec_target(uri, os.environ)
    if target.startswith("gs://") and options:
        import gcsfs

        gcs = gcsfs.core.GCSFileSystem(**options)
        return gcs, gcs._strip_protocol(target)
    fs, path = fsspec.core.url_to_fs(target, **options)
    return fs, path


class FsspecStore:
    """Object storage through fsspec; credentials and endpoints from the usual environment (`fsspec_target`).
    Large files are read as byte ranges over parallel connections (`serving.transfer`)."""

    concurrency = FILES_AT_ONCE

    def __init__(self, uri: str):
        self.fs, path = filesystem(uri)
        self.root = path.rstrip("/")
        self.uri = uri

    def list(self) -> list[tuple[str, int]]:
        found = self.fs.find(self.root, detail=True, withdirs=False)
        if not found:
            raise ArtifactError(f"{self.uri}: no files found")
        entries = []
        for path, info in found.items():
            key = path[len(self.root) :].removeprefix("/") if path.startswith(self.root + "/") else path
            if info.get("type") == "link" or info.get("islink"):
                raise ArtifactError(f"{key}: symlinks are refused in object stores")
            entries.append((key, int(info.get("size") or 0)))
        return entries

    def open(self, key: str) -> IO[bytes]:
        handle: IO[bytes] = self.fs.open(f"{self.root}/{key}", "rb")  # fsspec is untyped: a binary file object
        return handle

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        data: bytes = self.fs.cat_file(f"{self.root}/{key}", start=offset, end=offset + length)
        return data


class HfStore:
    """A Hugging Face Hub repo at a pinned revision; pickle and code files are never downloaded."""

    concurrency = local_concurrency()

    def __init__(self, uri: str, scratch: Path):
        repo, _, revision = uri.removeprefix("hf://").partition("@")
        if repo.count("/") != 1 or not revision:
            raise ArtifactError(f"{uri}: expected hf://org/name@revision")
        self.repo, self.revision = repo, revision
        self.staging = scratch  # the caller removes it

    def list(self) -> list[tuple[str, int]]:
        from huggingface_hub import snapshot_download

        self.staging.mkdir(parents=True, exist_ok=True)
        snapshot_download(
            self.repo,
            revision=self.revision,
            local_dir=self.staging,
            ignore_patterns=[f"*{suffix}" for suffix in REFUSED_SUFFIXES] + ["*.msgpack", "*.h5", "*.onnx", "*.onnx_data"],
        )
        hub_bookkeeping = self.staging / ".cache"
        if hub_bookkeeping.is_dir():
            shutil.rmtree(hub_bookkeeping)
        return LocalStore(self.staging).list()

    def open(self, key: str) -> IO[bytes]:
        return open(self.staging / key, "rb")


def open_store(uri: str, *, repo: Path | None, commit: str | None, allowed_roots: tuple[Path, ...] = (),
               scratch: Path | None = None) -> ArtifactStore:
    """The store for a model URI; file:// paths never escape the repo or an allowed root.

    `scratch`: a directory the caller owns and removes, for stores that must download before
    listing (hf://); the fetch names one under the model cache.
    """
    if uri.startswith("file://"):
        rest = uri.removeprefix("file://")
        if rest.startswith("/"):
            path = Path(rest).resolve()
            if not any(path.is_relative_to(root.resolve()) for root in allowed_roots):
                raise ArtifactError(f"{uri}: outside the allowed model roots ({', '.join(map(str, allowed_roots)) or 'none configured'})")
            return LocalStore(path)
        subdir = posixpath.normpath(rest)
        if subdir.startswith("..") or subdir == ".":
            raise ArtifactError(f"{uri}: must name a directory inside the repo")
        if repo is None or commit is None:
            raise ArtifactError(f"{uri}: a repo-relative model needs the repo and commit it was released from")
        return GitTreeStore(repo, commit, subdir)
    if uri.startswith("hf://"):
        if scratch is None:
            raise ArtifactError(f"{uri}: hf:// models need a scratch directory under the model cache (fetch names one)")
        return HfStore(uri, scratch)
    if uri.startswith(("s3://", "gs://", "az://", "abfs://")):
        return FsspecStore(uri)
    raise ArtifactError(f"{uri}: unsupported scheme")
