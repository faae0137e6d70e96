"""Fetch a pinned model into the content-addressed cache, verified before anything loads it.

Called by the model deployment (and `diffops model fetch`) before
`serving.pipeline` builds the pipeline. Files stream from a store into a
temporary directory beside the cache entry while being hashed; only a complete,
verified copy is renamed into `<cache>/sha256/<hex>`, read-only. A second fetch
of a cached digest transfers nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from serving.manifest import CHUNK, MANIFEST_NAME, ArtifactError, Manifest, check_key, verify
from serving.stores import Store, open_store

PROGRESS_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class FetchResult:
    path: Path
    digest: str
    files: int
    bytes_transferred: int
    cached: bool
    seconds: float


class ModelCache:
    """`<root>/sha256/<hex>/` holds one verified model directory per digest."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest.removeprefix("sha256:")

    def lookup(self, digest: str) -> Manifest | None:
        """The cached manifest if it is the pinned one and every file it lists is there."""
        path = self.path(digest)
        try:
            manifest = Manifest.parse((path / MANIFEST_NAME).read_text())
        except (FileNotFoundError, ArtifactError):
            return None
        if manifest.digest != digest or not all((path / key).is_file() for key in manifest.files):
            return None
        return manifest


def _authentic_manifest(store: Store, keys: set[str], digest: str) -> Manifest | None:
    if MANIFEST_NAME not in keys:
        return None
    with store.open(MANIFEST_NAME) as handle:
        manifest = Manifest.parse(handle.read(1 << 20).decode())
    return manifest if manifest.digest == digest else None


def _copy(store: Store, key: str, target: Path, progress: tqdm) -> str:
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with store.open(key) as src, open(target, "wb") as dst:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            dst.write(chunk)
            progress.update(len(chunk))
    return digest.hexdigest()


def _seal(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def fetch(
    uri: str,
    digest: str,
    cache: ModelCache,
    *,
    repo: Path | None = None,
    commit: str | None = None,
    allowed_roots: tuple[Path, ...] = (),
    reverify: bool = False,
) -> FetchResult:
    """Return a verified local copy of the model pinned by `digest`, fetching it if needed."""
    started = time.monotonic()
    cache.root.joinpath("sha256").mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache.path(digest)) + ".lock"):
        hit = cache.lookup(digest)
        if hit is not None:
            if reverify:
                verify(cache.path(digest), digest)
            return FetchResult(cache.path(digest), digest, len(hit.files), 0, True, time.monotonic() - started)
        store = open_store(uri, repo=repo, commit=commit, allowed_roots=allowed_roots)
        listing = {check_key(key) if key != MANIFEST_NAME else key: size for key, size in store.list()}
        expected = _authentic_manifest(store, set(listing), digest)
        listing.pop(MANIFEST_NAME, None)
        if expected is not None and listing.keys() != expected.files.keys():
            extra = [f"{key}: extra file" for key in sorted(listing.keys() - expected.files.keys())]
            missing = [f"{key}: missing" for key in sorted(expected.files.keys() - listing.keys())]
            raise ArtifactError(f"{uri}: does not match the pinned manifest: " + "; ".join(extra + missing))
        staging = cache.root / f".staging-{digest.removeprefix('sha256:')[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            hashes = _download(store, listing, staging, expected, uri)
            actual = Manifest(hashes)
            if actual.digest != digest:
                raise ArtifactError(
                    f"{uri}: digest mismatch: files hash to {actual.digest}, release pins {digest} "
                    f"(ship a {MANIFEST_NAME} from 'diffops model digest --write' to name the file)"
                )
            (staging / MANIFEST_NAME).write_text(actual.text())
            _seal(staging)
            os.replace(staging, cache.path(digest))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        total = sum(listing.values())
        return FetchResult(cache.path(digest), digest, len(listing), total, False, time.monotonic() - started)


def _download(store: Store, listing: dict[str, int], staging: Path, expected: Manifest | None, uri: str) -> dict[str, str]:
    total = sum(listing.values())
    hashes = {}
    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"fetch {uri}", file=sys.stderr,
        disable=total < PROGRESS_MIN_BYTES or not sys.stderr.isatty(),
    ) as progress:
        for key in sorted(listing):
            target = staging / key
            if not target.resolve().is_relative_to(staging.resolve()):
                raise ArtifactError(f"{key}: would be written outside the cache")
            hashes[key] = _copy(store, key, target, progress)
            if expected is not None and hashes[key] != expected.files[key]:
                raise ArtifactError(f"{uri}: digest mismatch: {key}: sha256 {hashes[key][:12]}… does not match pinned {expected.files[key][:12]}…")
    return hashes
