"""Model load: a large synthetic model fetched into the verified cache and loaded from it, against raw reads.

Figures (sizes from `--model-mb`, about 1 GB by default):
- load from the cache: `serving.artifacts.fetch` (a cache hit), then
  `serving.pipeline.load_pipeline` on CPU, then one byte read from every
  4 KiB page of every weight, since diffusers maps safetensors lazily and a
  weight is only in memory once touched (the replica's warm-up would fault
  them in). In GB/s, against a raw sequential read of the same cached files
  (8 MiB `readinto` calls into one reused buffer, like `cat > /dev/null`);
  once with the page cache warm (a replica starting right after the
  controller fetched the model) and once cold (every file synced and dropped
  with posix_fadvise(DONTNEED) before each run). Ratio: load throughput /
  raw-read throughput. Median of a few runs.
(The cold fetch's own speed, against a plain copy, is the `fetch` family.)
- cache hit: the bytes read from the store, counted at the store boundary
  (every store `fetch` opens is wrapped), against the cold fetch's bytes.
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bench import synthetic_model
from bench.context import Context
from bench.gitrepo import DEMO_MODEL
from bench.progress import Say
from bench.report import Figure, Goal, ratio
from serving import artifacts, stores
from serving.artifacts import ModelCache, fetch
from serving.pipeline import load_pipeline

SIZE_MB, QUICK_SIZE_MB = 1000, 200
REPEATS, QUICK_REPEATS = 5, 2
READ_CHUNK = 8 << 20
PAGE = 4096
LOAD_GOAL = Goal("≥ 70% of raw read", "ratio", at_least=0.7)
ZERO_BYTES = Goal("0 B", "value", at_most=0)


@dataclass
class StoreCounter:
    opened_stores: int = 0
    opened_files: int = 0
    bytes_read: int = 0


class CountingFile:
    def __init__(self, inner: IO[bytes], counter: StoreCounter):
        self.inner, self.counter = inner, counter

    def read(self, size: int = -1) -> bytes:
        chunk = self.inner.read(size)
        self.counter.bytes_read += len(chunk)
        return chunk

    def __enter__(self) -> CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        close = getattr(self.inner, "close", None)
        if close is not None:
            close()


class CountingStore:
    """A store that counts what it hands over; it moves files as the store it wraps does (`concurrency`, and byte
    ranges where that store reads them)."""

    def __init__(self, inner: Any, counter: StoreCounter):
        self.inner, self.counter = inner, counter
        self.concurrency = int(getattr(inner, "concurrency", 1))
        if hasattr(inner, "read_range"):
            self.read_range = self._read_range

    def _read_range(self, key: str, offset: int, length: int) -> bytes:
        data: bytes = self.inner.read_range(key, offset, length)
        self.counter.bytes_read += len(data)
        return data

    def list(self) -> list[tuple[str, int]]:
        listed: list[tuple[str, int]] = self.inner.list()
        return listed

    def open(self, key: str) -> CountingFile:
        self.counter.opened_files += 1
        return CountingFile(self.inner.open(key), self.counter)


@contextmanager
def counting_stores() -> Iterator[StoreCounter]:
    """Count what every store opened by `serving.artifacts.fetch` hands over, while in the block."""
    counter, original = StoreCounter(), stores.open_store

    def counted(*args: Any, **kwargs: Any) -> CountingStore:
        counter.opened_stores += 1
        return CountingStore(original(*args, **kwargs), counter)

    setattr(artifacts, "open_store", counted)  # swapped where fetch looks it up, for this block only  # noqa: B010
    try:
        yield counter
    finally:
        setattr(artifacts, "open_store", original)  # noqa: B010


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def drop_page_cache(root: Path) -> None:
    """Write back and evict every file under `root` from the page cache (no root privileges needed)."""
    for path in files_under(root):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read_seconds(root: Path) -> float:
    buffer = bytearray(READ_CHUNK)
    started = time.perf_counter()
    for path in files_under(root):
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass
    return time.perf_counter() - started


def make_resident(pipeline: Any) -> int:
    """Read one byte of every page of every weight and buffer; return the bytes they cover."""
    import torch

    covered = 0
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for tensor in itertools.chain(component.parameters(), component.buffers()):
                data = tensor.detach().reshape(-1).view(torch.uint8).numpy()
                int(data[::PAGE].sum())
                covered += data.nbytes
    return covered


def copy_seconds(source: Path, target: Path) -> float:
    started = time.perf_counter()
    for path in files_under(source):
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    seconds = time.perf_counter() - started
    shutil.rmtree(target)
    return seconds


def load_seconds(uri: str, digest: str, cache: ModelCache, allowed: Path) -> tuple[float, int]:
    """Seconds from fetch (a cache hit) to every weight in memory, and the bytes of weights made resident."""
    started = time.perf_counter()
    fetched = fetch(uri, digest, cache, allowed_roots=(allowed,))
    pipeline = load_pipeline(fetched.path, sampler="ddim", device="cpu")
    covered = make_resident(pipeline)
    seconds = time.perf_counter() - started
    del pipeline
    gc.collect()
    return seconds, covered


def run(workdir: Path, say: Say, size_mb: float = SIZE_MB, repeats: int = REPEATS) -> list[Figure]:
    source, cache = workdir / "models" / "synthetic", ModelCache(workdir / "cache")
    say(f"building a {size_mb:.0f} MB synthetic diffusers model (random weights)")
    digest = synthetic_model.build(source, int(size_mb * 1e6))
    uri = f"file://{source}"
    source_bytes = sum(p.stat().st_size for p in files_under(source))
    say(f"model is {source_bytes / 1e9:.2f} GB; warming up imports with the demo model")
    load_pipeline(DEMO_MODEL, device="cpu")
    say("cold fetch into the cache (copy + sha256 of every byte)")
    with counting_stores() as cold:
        result = fetch(uri, digest, cache, allowed_roots=(workdir,))
    if result.cached or cold.bytes_read == 0:
        raise RuntimeError(f"the first fetch of {digest[:19]} was not a cold fetch (cached={result.cached})")
    with counting_stores() as hit:
        again = fetch(uri, digest, cache, allowed_roots=(workdir,))
    if not again.cached:
        raise RuntimeError("the second fetch of a digest must be a cache hit")
    cached_bytes = sum(p.stat().st_size for p in files_under(result.path))
    loads: dict[str, list[float]] = {"warm": [], "cold": []}
    raws: dict[str, list[float]] = {"warm": [], "cold": []}
    resident = 0
    for page_cache in ("warm", "cold"):
        for attempt in range(repeats):
            say(f"load from the cache, page cache {page_cache}: run {attempt + 1}/{repeats}")
            if page_cache == "cold":
                drop_page_cache(result.path)
            raws[page_cache].append(raw_read_seconds(result.path))
            if page_cache == "cold":
                drop_page_cache(result.path)
            seconds, resident = load_seconds(uri, digest, cache, workdir)
            loads[page_cache].append(seconds)
    gb = cached_bytes / 1e9
    detail = {"model_bytes": cached_bytes, "weights_made_resident_bytes": resident, "files": len(files_under(result.path)),
              "repeats": repeats,
              "load_s": {k: [round(s, 3) for s in v] for k, v in loads.items()},
              "raw_read_s": {k: [round(s, 3) for s in v] for k, v in raws.items()},
              "cold_fetch_s": round(result.seconds, 3),
              "cold_fetch_store": vars(cold), "cache_hit_store": vars(hit)}
    figures = []
    for page_cache in ("warm", "cold"):
        load_rate, raw_rate = gb / statistics.median(loads[page_cache]), gb / statistics.median(raws[page_cache])
        figures.append(Figure("model_load", f"model load from cache, {page_cache} page cache", load_rate, "GB/s",
                              "raw read", raw_rate, ratio(load_rate, raw_rate), LOAD_GOAL, detail))
    figures.append(Figure("model_load", "cache hit: bytes read from the store", float(hit.bytes_read), "B", "cold fetch",
                          float(cold.bytes_read), ratio(hit.bytes_read, cold.bytes_read), ZERO_BYTES, detail))
    return figures


def bench(ctx: Context) -> list[Figure]:
    size_mb = ctx.model_mb or (QUICK_SIZE_MB if ctx.quick else SIZE_MB)
    return run(ctx.workdir, ctx.say, size_mb, QUICK_REPEATS if ctx.quick else REPEATS)
