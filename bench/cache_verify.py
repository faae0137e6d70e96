"""What re-verifying a cached model costs a replica on start (`fetch(..., reverify=True)`).

Builds a synthetic diffusers model of about `--model-mb` of safetensors
(`bench.synthetic_model`), fetches it into a fresh cache, then times, median
of `--repeats` runs each:
- presence check only (the controller's cache hit): manifest + file list;
- full re-hash (a replica's start), page cache warm and cold (files synced and
  dropped with posix_fadvise(DONTNEED) first);
- a raw sequential read of the same files, for scale.

    python -m bench.cache_verify [--model-mb 1000] [--repeats 3] [--workdir DIR]

Prints one JSON object (MB/s are 10^6 bytes per second of model bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import synthetic_model
from bench.model_load import drop_page_cache, files_under, raw_read_seconds
from serving.artifacts import ModelCache, fetch


def timed(work: Callable[[], object], before: Callable[[], None], repeats: int) -> float:
    runs = []
    for _ in range(repeats):
        before()
        started = time.perf_counter()
        work()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def run(workdir: Path, size_mb: float, repeats: int) -> dict[str, object]:
    source = workdir / "models" / "synthetic"
    digest = synthetic_model.build(source, int(size_mb * 1e6))
    cache = ModelCache(workdir / "cache")
    uri = f"file://{source}"
    cold = fetch(uri, digest, cache, allowed_roots=(workdir,))
    entry = cold.path
    size = sum(p.stat().st_size for p in files_under(entry))
    safetensors = sum(p.stat().st_size for p in files_under(entry) if p.suffix == ".safetensors")

    def hit(reverify: bool) -> Callable[[], object]:
        def work() -> object:
            result = fetch(uri, digest, cache, allowed_roots=(workdir,), reverify=reverify)
            assert result.cached, "a cache hit was expected"
            return result
        return work

    def warm() -> None:
        raw_read_seconds(entry)

    def drop() -> None:
        drop_page_cache(entry)

    seconds = {
        "presence_check": timed(hit(False), warm, repeats),
        "rehash_warm": timed(hit(True), warm, repeats),
        "rehash_cold": timed(hit(True), drop, repeats),
        "raw_read_warm": timed(lambda: raw_read_seconds(entry), warm, repeats),
        "raw_read_cold": timed(lambda: raw_read_seconds(entry), drop, repeats),
    }
    return {
        "model_bytes": size, "safetensors_bytes": safetensors, "files": len(files_under(entry)),
        "cold_fetch_s": round(cold.seconds, 3), "cpus": os.cpu_count(), "repeats": repeats,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "mb_per_s": {k: round(size / 1e6 / v, 1) for k, v in seconds.items() if k != "presence_check"},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cache_verify", description=__doc__.splitlines()[0])
    parser.add_argument("--model-mb", type=float, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffops-bench-", dir=args.workdir) as workdir:
        print(json.dumps(run(Path(workdir), args.model_mb, args.repeats), indent=2))


if __name__ == "__main__":
    main()
