"""Fetch a pinned model into the content-addressed cache, verified before anything loads it.

Called by the model deployment (and `diffops model fetch`, the controller and
the gate) before `serving.pipeline` builds the pipeline. Files stream from a
store into the digest's partial dir beside the cache entry while being hashed;
only a complete, verified copy is renamed into `<cache>/sha256/<hex>`, read-only
(layout and clean-up: `serving.model_cache`). A transfer that fails (a store
that stops answering mid-file, after `serving.transfer`'s retries) leaves what
landed there with its journal, and the next fetch of the digest resumes from it.

What a cache hit trusts:
- Every fetch runs the presence check: the entry's manifest is authentic (it
  hashes to the pinned digest) and the entry holds exactly its files, no more.
- `reverify=True` (each replica on start, `diffops model fetch --reverify`)
  re-hashes every file against that manifest: a full check at start, not
  per-page checks while reading, because safetensors are memory-mapped and
  read lazily by torch, where no hook can refuse a page. It costs one
  sequential read of the model at sha256 speed (1.13 GB synthetic model,
  2 vCPUs: 0.73 GB/s with the page cache warm, 0.35 GB/s cold; the presence
  check takes 6 ms) and leaves the model in the page cache for the load that
  follows (`python -m bench.cache_verify`).
- The controller's fetch before the gate may keep the presence check: every
  replica re-hashes before loading, and the gate's artifact check re-hashes
  too. `reverify=True, heal=True` there heals a changed byte before the gate
  judges the model, for one more read of it.

A damaged entry (a changed byte, a missing or extra file, a broken manifest)
is never loaded, and the fetch that finds it moves it aside under the entry's
lock (so the next download never meets a half entry: no `Directory not empty`):
- with `reverify` (a loader checking what it is about to load), unless
  `heal`, the fetch is refused with an ArtifactError naming the files that differ; the next fetch
  downloads the model again (a replica: Serve restarts it and it heals);
- otherwise (the controller's fetch, the gate's) the same fetch downloads it
  again at once and logs the files that differed (`FetchResult.healed`), so
  a damaged cache never holds a release back.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from serving.manifest import MANIFEST_NAME, ArtifactError, Manifest, check_key
from serving.model_cache import ModelCache
from serving.stores import ArtifactStore, open_store
from serving.transfer import Landed, Moved, move_files

__all__ = ["ArtifactError", "FetchResult", "ModelCache", "fetch"]

log = logging.getLogger("diffops.serving")
PROGRESS_MIN_BYTES = 64 << 20


@dataclass(frozen=True)
class FetchResult:
    path: Path
    digest: str
    files: int
    bytes_transferred: int
    cached: bool
    seconds: float
    healed: tuple[str, ...] = ()  # what was wrong with the cached copy this fetch replaced
    ranged_parts: int = 0  # byte ranges read over parallel connections (large files of object stores)
    resumed_bytes: int = 0  # left on disk by an earlier attempt that failed, hashed again instead of fetched


def _authentic_manifest(store: ArtifactStore, keys: set[str], digest: str) -> Manifest | None:
    if MANIFEST_NAME not in keys:
        return None
    with store.open(MANIFEST_NAME) as handle:
        manifest = Manifest.parse(handle.read(1 << 20).decode())
    return manifest if manifest.digest == digest else None


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
    heal: bool = False,
) -> FetchResult:
    """Return a verified local copy of the model pinned by `digest`, fetching (or healing) it if needed.

    `reverify`: re-hash a cached copy (else the presence check only); a damaged copy is then refused
    (ArtifactError naming the files, entry removed) unless `heal`, which downloads it again at once.
    """
    started = time.monotonic()
    try:
        with cache.lock(digest):
            found = cache.check(digest, rehash=reverify)
            if found.intact:
                cache.touch(digest)
                assert found.manifest is not None
                return FetchResult(cache.path(digest), digest, len(found.manifest.files), 0, True, time.monotonic() - started)
            healed = found.problems
            if found.exists:
                cache.discard(digest)
                problems = "; ".join(healed)
                if reverify and not heal:
                    log.warning("model cache: %s refused, damaged (%s); removed it; next: the next fetch downloads it again (%.2fs)",
                                digest[:19], problems, time.monotonic() - started)
                    raise ArtifactError(f"cached copy of {digest[:19]} is damaged ({problems}); it was removed, "
                                        "the next fetch downloads it again")
                log.warning("model cache: %s damaged (%s); moved it aside; next: downloading it again from %s (%.2fs)",
                            digest[:19], problems, uri, time.monotonic() - started)
            try:
                result = _fetch_into(cache, uri, digest, repo, commit, allowed_roots, started)
            except ArtifactError as err:
                if healed:
                    raise ArtifactError(f"cached copy of {digest[:19]} was damaged ({'; '.join(healed)}) and was removed; "
                                        f"downloading it again failed: {err}") from err
                raise
            cache.touch(digest)
            return replace(result, healed=healed)
    finally:
        cache.sweep()


def _fetch_into(cache: ModelCache, uri: str, digest: str, repo: Path | None, commit: str | None,
                allowed_roots: tuple[Path, ...], started: float) -> FetchResult:
    """Download, verify and rename into place; the caller holds the entry's lock and the entry is absent.

    The download lands in the digest's partial dir (`ModelCache.partial`): a transfer that fails leaves it with its
    journal, and the next fetch of the digest resumes from it; a verification failure removes it."""
    hub = cache.scratch("hub", digest)
    partial = cache.partial(digest)
    staging, journal = partial / "files", partial / "landed.json"
    keep_partial = True  # False once the copy is known bad (verification) or in place
    try:
        store = open_store(uri, repo=repo, commit=commit, allowed_roots=allowed_roots, scratch=hub)
        listing = {check_key(key) if key != MANIFEST_NAME else key: size for key, size in store.list()}
        expected = _authentic_manifest(store, set(listing), digest)
        listing.pop(MANIFEST_NAME, None)
        if expected is not None and listing.keys() != expected.files.keys():
            extra = [f"{key}: extra file" for key in sorted(listing.keys() - expected.files.keys())]
            missing = [f"{key}: missing" for key in sorted(expected.files.keys() - listing.keys())]
            raise ArtifactError(f"{uri}: does not match the pinned manifest: " + "; ".join(extra + missing))
        staging.mkdir(parents=True, exist_ok=True)
        try:
            moved = _download(store, listing, staging, expected, uri, journal)
        except ArtifactError:
            raise
        except Exception as err:  # a transfer that failed: what landed stays for the next attempt
            kept = sum(Landed.read(journal, listing, staging).values())
            log.warning("model fetch: %s failed after %.2f GB of %.2f GB landed (%s: %s); next: %s (%.1fs)", uri, kept / 1e9,
                        sum(listing.values()) / 1e9, type(err).__name__, str(err)[:300],
                        "the next fetch of it resumes from them" if kept else "the next fetch starts again", time.monotonic() - started)
            raise
        actual = Manifest(moved.hashes)
        if actual.digest != digest:
            raise ArtifactError(
                f"{uri}: digest mismatch: files hash to {actual.digest}, release pins {digest} "
                f"(ship a {MANIFEST_NAME} from 'diffops model digest --write' to name the file)"
            )
        (staging / MANIFEST_NAME).write_text(actual.text())
        _seal(staging)
        os.replace(staging, cache.path(digest))
        keep_partial = False
    except ArtifactError:
        keep_partial = False
        raise
    finally:
        if not keep_partial or not journal.exists():
            shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(hub, ignore_errors=True)
    total = sum(listing.values())
    return FetchResult(cache.path(digest), digest, len(listing), total - moved.resumed_bytes, False, time.monotonic() - started,
                       ranged_parts=moved.ranged_parts, resumed_bytes=moved.resumed_bytes)


def _download(store: ArtifactStore, listing: dict[str, int], staging: Path, expected: Manifest | None, uri: str,
              journal: Path) -> Moved:
    total = sum(listing.values())
    started = time.monotonic()
    resume = Landed.read(journal, listing, staging)
    if resume:
        log.info("model fetch: %s: resuming, %.2f GB of %.2f GB in %d file(s) landed in an earlier attempt; next: hashing "
                 "them from disk and fetching the rest", uri, sum(resume.values()) / 1e9, total / 1e9, len(resume))

    def check(key: str, sha: str) -> None:
        if expected is not None and sha != expected.files[key]:
            raise ArtifactError(f"{uri}: digest mismatch: {key}: sha256 {sha[:12]}… does not match pinned {expected.files[key][:12]}…")

    with tqdm(
        total=total, unit="B", unit_scale=True, desc=f"fetch {uri}", file=sys.stderr,
        disable=total < PROGRESS_MIN_BYTES or not sys.stderr.isatty(),
    ) as progress:
        moved = move_files(store, listing, staging, progress.update, check, journal, resume)
    seconds = time.monotonic() - started
    if total >= PROGRESS_MIN_BYTES:
        how = f"{moved.ranged_parts} ranged parts" if moved.ranged_parts else "streamed"
        if moved.resumed_bytes:
            how += f", {moved.resumed_bytes / 1e9:.2f} GB resumed from disk"
        log.info("model fetch: %s: %.2f GB in %d file(s) moved and hashed at %.2f GB/s (%s); next: verify the digest (%.1fs)",
                 uri, total / 1e9, len(listing), total / 1e9 / max(seconds, 1e-9), how, seconds)
    return moved
