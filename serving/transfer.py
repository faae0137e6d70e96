"""Moving a model's files from a store into a fetch's staging directory, every byte hashed as it lands.

Called by `serving.artifacts.fetch`, which decides what to fetch and judges the hashes this returns. Files move in
parallel (`ArtifactStore.concurrency` at a time: one for a git tree, whose object stream is one process); a large file of a
store that serves byte ranges (`read_range`: S3, GCS, Azure, a local folder) moves as parts read and written
in place by parallel workers (parallel connections to an object store), and hashed in order by the file's own thread.
sha256 cannot be split, so one file's hash is one core's work: the largest file bounds a fetch at that core's hash
rate (about 1.3 GB/s on this project's 2-core test machine).

A failed or short ranged read is read again (`PART_TRIES` in all, waiting `RETRY_WAIT_S` doubled each time), so one
dropped connection costs one part. What has landed is journalled as it lands (`Landed`: bytes per file hashed from
the start, written by atomic replace): a later attempt of the same fetch (`resume`) hashes those bytes from disk
instead of fetching them again and reads only the parts after them.

Memory: at most `FILES_AT_ONCE` files x `PARTS_AHEAD` parts x `PART_BYTES` of part buffers (4 x 4 x 16 MiB = 256 MiB)
plus `CHUNK` per streamed file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from serving.manifest import CHUNK, ArtifactError

if TYPE_CHECKING:
    from serving.stores import ArtifactStore

__all__ = ["FILES_AT_ONCE", "PARTS_AHEAD", "PART_BYTES", "PART_TRIES", "Landed", "Moved", "TransferError", "local_concurrency",
           "move_files", "parts_of", "resumable"]

log = logging.getLogger("diffops.serving")
T = TypeVar("T")
PART_BYTES = 16 << 20  # one ranged read
PARTS_AHEAD = 4  # ranged reads in flight per file
FILES_AT_ONCE = 4  # files moving at once, at most (a store may ask for fewer)
PART_TRIES = 3  # reads of one part (or one streamed file) before the fetch fails
RETRY_WAIT_S = 0.2  # before the second read; doubled before each one after


class TransferError(OSError):
    """A part or file the store did not deliver after `PART_TRIES` reads: what landed is kept for the next attempt."""


class _Stopped(Exception):
    """Another file of the same fetch failed: this one stops where it is."""


@dataclass(frozen=True)
class Moved:
    """What `move_files` did: per-file sha256, and how the bytes travelled."""

    hashes: dict[str, str]
    ranged_parts: int  # ranged reads made (0: every file streamed)
    resumed_bytes: int = 0  # hashed from what an earlier attempt left on disk, not fetched


def resumable(journal: Mapping[str, Mapping[str, int]], listing: Mapping[str, int], on_disk: Mapping[str, int]) -> dict[str, int]:
    """Bytes per file an attempt may take from an earlier one's staging dir instead of fetching them: the journalled
    prefix of a file the store still lists at the journalled size, no longer than the file on disk, ending at a part
    boundary or at the file's end (parts land in file order from there). Pure."""
    kept = {}
    for key, landed in journal.items():
        size, prefix = landed.get("size"), landed.get("landed")
        if not isinstance(size, int) or not isinstance(prefix, int) or listing.get(key) != size:
            continue
        if 0 < prefix <= min(size, on_disk.get(key, -1)) and (prefix % PART_BYTES == 0 or prefix == size):
            kept[key] = prefix
    return kept


class Landed:
    """The journal of what has landed in a staging dir (`{key: {"size", "landed"}}` as JSON), rewritten by atomic
    replace each time a part is hashed, so a kill -9 at any moment leaves a journal that is true."""

    def __init__(self, path: Path, sizes: Mapping[str, int], resumed: Mapping[str, int]):
        self.path, self.sizes = path, dict(sizes)
        self.landed = dict(resumed)
        self._lock = threading.Lock()

    @staticmethod
    def read(path: Path, listing: Mapping[str, int], staging: Path) -> dict[str, int]:
        """What an earlier attempt left that this one may resume from (nothing when the journal is missing or broken)."""
        try:
            journal = json.loads(path.read_text())
            entries = journal.get("files") if isinstance(journal, dict) else None
        except (OSError, ValueError):
            return {}
        if not isinstance(entries, dict):
            return {}
        on_disk = {}
        for key in listing:
            try:
                on_disk[key] = (staging / key).stat().st_size
            except OSError:
                continue
        return resumable({k: v for k, v in entries.items() if isinstance(v, dict)}, listing, on_disk)

    def record(self, key: str, prefix: int) -> None:
        with self._lock:
            self.landed[key] = prefix
            body = json.dumps({"files": {k: {"size": self.sizes[k], "landed": n} for k, n in sorted(self.landed.items())}})
            temporary = self.path.with_name(self.path.name + ".tmp")
            temporary.write_text(body)
            os.replace(temporary, self.path)


def parts_of(size: int, part: int = PART_BYTES) -> list[tuple[int, int]]:
    """(offset, length) of the ranged reads that cover a file of `size` bytes. Pure."""
    return [(offset, min(part, size - offset)) for offset in range(0, size, part)]


def _stream(store: ArtifactStore, key: str, target: Path, progress: Callable[[int], object], stop: threading.Event) -> str:
    """One file read from its start; a failure takes back the progress it reported (the file is read again whole)."""
    digest, moved = hashlib.sha256(), 0
    try:
        with store.open(key) as src, open(target, "wb", buffering=0) as dst:
            while chunk := src.read(CHUNK):
                if stop.is_set():
                    raise _Stopped(key)
                digest.update(chunk)
                dst.write(chunk)
                progress(len(chunk))
                moved += len(chunk)
    except BaseException:
        progress(-moved)
        raise
    return digest.hexdigest()


def _hash_landed(target: Path, length: int, digest: Any, progress: Callable[[int], object], stop: threading.Event) -> None:
    """Feed the first `length` bytes an earlier attempt left in `target` to `digest` (read from disk, not fetched)."""
    with open(target, "rb") as landed:
        left = length
        while left and (chunk := landed.read(min(CHUNK, left))):
            if stop.is_set():
                raise _Stopped(str(target))
            digest.update(chunk)
            progress(len(chunk))
            left -= len(chunk)


def _retrying(what: str, read: Callable[[], T], complete: Callable[[T], bool], stop: threading.Event) -> T:
    """`read()` until `complete(answer)`, `PART_TRIES` times at most; the last answer (possibly short) is returned, the
    last error raised as a TransferError naming `what`."""
    for attempt in range(1, PART_TRIES + 1):
        try:
            data = read()
        except (_Stopped, ArtifactError):
            raise
        except Exception as err:  # every store raises its own errors (botocore, aiohttp, OSError)
            if stop.is_set():  # another file ended the fetch: its error is the one reported
                raise _Stopped(what) from err
            if attempt == PART_TRIES:
                raise TransferError(f"{what}: read failed {attempt} time(s), last: {type(err).__name__}: {err}") from err
            said = f"{type(err).__name__}: {err}"
        else:
            if complete(data) or attempt == PART_TRIES or stop.is_set():
                return data
            said = "answered short"
        wait_s = RETRY_WAIT_S * 2 ** (attempt - 1)
        log.warning("model fetch: %s: %s; next: reading it again in %.1fs (read %d of %d)", what, said[:300], wait_s,
                    attempt + 1, PART_TRIES)
        stop.wait(wait_s)
    raise AssertionError("unreachable")


def _in_parts(read_range: Callable[[str, int, int], bytes], key: str, size: int, target: Path,
              workers: ThreadPoolExecutor, progress: Callable[[int], object], stop: threading.Event,
              landed: int = 0, record: Callable[[int], object] = lambda prefix: None) -> tuple[str, int]:
    """Ranged reads in flight `PARTS_AHEAD` at a time, each written at its offset by the worker that read it; the
    parts are hashed in file order as they come, and `record(prefix)` journals each. The first `landed` bytes (a
    whole number of parts left by an earlier attempt) are hashed from disk instead."""
    digest = hashlib.sha256()
    if landed:
        _hash_landed(target, landed, digest, progress, stop)
    parts = [(offset, length) for offset, length in parts_of(size) if offset >= landed]
    ahead: deque[tuple[int, int, Future[bytes]]] = deque()
    with open(target, "r+b" if landed else "wb", buffering=0) as dst:
        def part(offset: int, length: int) -> bytes:
            data = _retrying(f"{key} bytes {offset}-{offset + length - 1}", lambda: read_range(key, offset, length),
                             lambda answer: len(answer) == length, stop)
            if len(data) == length:
                os.pwrite(dst.fileno(), data, offset)
            return data

        def submit(offset: int, length: int) -> None:
            ahead.append((offset, length, workers.submit(part, offset, length)))

        waiting = iter(parts)
        try:
            for offset, length in itertools.islice(waiting, PARTS_AHEAD):
                submit(offset, length)
            while ahead:
                offset, length, future = ahead.popleft()
                if (following := next(waiting, None)) is not None:
                    submit(*following)
                data = future.result()
                if stop.is_set():
                    raise _Stopped(key)
                if len(data) != length:
                    raise ArtifactError(f"{key}: the store answered {len(data)} bytes for bytes {offset}-{offset + length - 1} "
                                        f"of a {size}-byte file (changed while fetched?)")
                digest.update(data)
                progress(length)
                record(offset + length)
        finally:
            for _, _, future in ahead:
                future.cancel()
            wait([future for _, _, future in ahead])  # no worker writes into the file once it is closed
    return digest.hexdigest(), len(parts)


def move_files(store: ArtifactStore, listing: dict[str, int], staging: Path, progress: Callable[[int], object],
               check: Callable[[str, str], None], journal: Path | None = None, resume: Mapping[str, int] | None = None) -> Moved:
    """Copy every listed key into `staging`, hashing as the bytes land; `check(key, sha256)` runs as each file
    ends, and what it raises ends the fetch: the files still moving stop at their next chunk or part.
    `journal`: where what lands is journalled; `resume`: bytes per file an earlier attempt left (`Landed.read`)."""
    resume = dict(resume or {})
    landed = Landed(journal, listing, resume) if journal is not None else None
    read_range: Callable[[str, int, int], bytes] | None = getattr(store, "read_range", None)
    workers = max(1, min(FILES_AT_ONCE, store.concurrency, len(listing) or 1))
    for key in listing:
        target = staging / key
        if not target.resolve().is_relative_to(staging.resolve()):
            raise ArtifactError(f"{key}: would be written outside the cache")
        target.parent.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def one(key: str, part_workers: ThreadPoolExecutor) -> tuple[str, int]:
        try:
            if stop.is_set():
                raise _Stopped(key)
            size, earlier = listing[key], resume.get(key, 0)

            def record(prefix: int) -> None:
                if landed is not None:
                    landed.record(key, prefix)

            if read_range is not None and size >= 2 * PART_BYTES:
                sha, parts = _in_parts(read_range, key, size, staging / key, part_workers, progress, stop, earlier, record)
            elif earlier == size:
                digest = hashlib.sha256()
                _hash_landed(staging / key, size, digest, progress, stop)
                sha, parts = digest.hexdigest(), 0
            else:
                sha, parts = _retrying(key, lambda: _stream(store, key, staging / key, progress, stop), lambda _: True, stop), 0
                record(size)
            check(key, sha)
            return sha, parts
        except BaseException:
            stop.set()
            raise

    largest_first = sorted(listing, key=lambda k: (-listing[k], k))  # the largest file bounds the fetch: start it first
    with ThreadPoolExecutor(workers, thread_name_prefix="fetch-file") as files, \
            ThreadPoolExecutor(workers * PARTS_AHEAD, thread_name_prefix="fetch-part") as part_workers:
        futures = {key: files.submit(one, key, part_workers) for key in largest_first}
        wait(futures.values(), return_when=FIRST_EXCEPTION)
        if stop.is_set():
            wait(futures.values())  # the others stop at their next chunk
            errors = [f.exception() for f in futures.values() if f.done() and not f.cancelled() and f.exception() is not None]
            first = next((e for e in errors if not isinstance(e, _Stopped)), errors[0] if errors else None)
            if first is not None:
                raise first
        results = {key: future.result() for key, future in futures.items()}
    return Moved({key: sha for key, (sha, _) in sorted(results.items())}, sum(parts for _, parts in results.values()),
                 sum(resume.values()))


def local_concurrency() -> int:
    """Files a local store moves at once: one per core (each file's hash is one core's work)."""
    return max(1, min(FILES_AT_ONCE, os.cpu_count() or 1))
