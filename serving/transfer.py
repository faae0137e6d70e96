"""Moving a model's files from a store into a fetch's staging directory, every byte hashed as it lands.

Called by `serving.artifacts.fetch`, which decides what to fetch and judges the hashes this returns. Files move in
parallel (`ArtifactStore.concurrency` at a time: one for a git tree, whose object stream is one process); a large file of a
store that serves byte ranges (`read_range`: S3, GCS, Azure, a local folder) moves as parts read and written
in place by parallel workers (parallel connections to an object store), and hashed in order by the file's own thread.
sha256 cannot be split, so one file's hash is one core's work: the largest file bounds a fetch at that core's hash
rate (about 1.3 GB/s on this project's 2-core test machine).

Memory: at most `FILES_AT_ONCE` files x `PARTS_AHEAD` parts x `PART_BYTES` of part buffers (4 x 4 x 16 MiB = 256 MiB)
plus `CHUNK` per streamed file.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from serving.manifest import CHUNK, ArtifactError

if TYPE_CHECKING:
    from serving.stores import ArtifactStore

__all__ = ["FILES_AT_ONCE", "PARTS_AHEAD", "PART_BYTES", "Moved", "local_concurrency", "move_files", "parts_of"]

PART_BYTES = 16 << 20  # one ranged read
PARTS_AHEAD = 4  # ranged reads in flight per file
FILES_AT_ONCE = 4  # files moving at once, at most (a store may ask for fewer)


class _Stopped(Exception):
    """Another file of the same fetch failed: this one stops where it is."""


@dataclass(frozen=True)
class Moved:
    """What `move_files` did: per-file sha256, and how the bytes travelled."""

    hashes: dict[str, str]
    ranged_parts: int  # ranged reads made (0: every file streamed)


def parts_of(size: int, part: int = PART_BYTES) -> list[tuple[int, int]]:
    """(offset, length) of the ranged reads that cover a file of `size` bytes. Pure."""
    return [(offset, min(part, size - offset)) for offset in range(0, size, part)]


def _stream(store: ArtifactStore, key: str, target: Path, progress: Callable[[int], object], stop: threading.Event) -> str:
    digest = hashlib.sha256()
    with store.open(key) as src, open(target, "wb", buffering=0) as dst:
        while chunk := src.read(CHUNK):
            if stop.is_set():
                raise _Stopped(key)
            digest.update(chunk)
            dst.write(chunk)
            progress(len(chunk))
    return digest.hexdigest()


def _in_parts(read_range: Callable[[str, int, int], bytes], key: str, size: int, target: Path,
              workers: ThreadPoolExecutor, progress: Callable[[int], object], stop: threading.Event) -> tuple[str, int]:
    """Ranged reads in flight `PARTS_AHEAD` at a time, each written at its offset by the worker that read it; the
    parts are hashed in file order as they come."""
    digest = hashlib.sha256()
    parts = parts_of(size)
    ahead: deque[tuple[int, int, Future[bytes]]] = deque()
    with open(target, "wb", buffering=0) as dst:
        def part(offset: int, length: int) -> bytes:
            data = read_range(key, offset, length)
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
        finally:
            for _, _, future in ahead:
                future.cancel()
            wait([future for _, _, future in ahead])  # no worker writes into the file once it is closed
    return digest.hexdigest(), len(parts)


def move_files(store: ArtifactStore, listing: dict[str, int], staging: Path, progress: Callable[[int], object],
               check: Callable[[str, str], None]) -> Moved:
    """Copy every listed key into `staging`, hashing as the bytes land; `check(key, sha256)` runs as each file
    ends, and what it raises ends the fetch: the files still moving stop at their next chunk or part."""
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
            size = listing[key]
            if read_range is not None and size >= 2 * PART_BYTES:
                sha, parts = _in_parts(read_range, key, size, staging / key, part_workers, progress, stop)
            else:
                sha, parts = _stream(store, key, staging / key, progress, stop), 0
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
    return Moved({key: sha for key, (sha, _) in sorted(results.items())}, sum(parts for _, parts in results.values()))


def local_concurrency() -> int:
    """Files a local store moves at once: one per core (each file's hash is one core's work)."""
    return max(1, min(FILES_AT_ONCE, os.cpu_count() or 1))
