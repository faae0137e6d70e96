"""Cold fetch: a large synthetic model fetched into an empty cache (every byte hashed), against a plain copy of the
same files from the same store, in the same run.

Two stores (sizes from `--model-mb`, about 1 GB by default):
- local disk (`file:///…`): the plain copy is `shutil.copyfile` of every file;
- an S3-compatible server on loopback (moto, in memory): the plain copy is s3fs's own recursive `get` (its
  parallel downloads, no hashing).
Each figure is the median of a few runs; every fetch goes into a fresh cache, every copy into a fresh dir.
Ratio: fetch throughput / plain-copy throughput. Goal: at least 0.7x.
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from bench import synthetic_model
from bench.context import Context
from bench.model_load import copy_seconds, files_under
from bench.progress import Say
from bench.report import Figure, Goal, ratio
from serving.artifacts import ModelCache, fetch

SIZE_MB, QUICK_SIZE_MB = 1000, 200
REPEATS, QUICK_REPEATS = 3, 1
FETCH_GOAL = Goal("≥ 0.7× plain copy", "ratio", at_least=0.7)


def _runs(work: Callable[[int], float], repeats: int) -> list[float]:
    return [work(attempt) for attempt in range(repeats)]


@contextmanager
def s3_server(say: Say) -> Iterator[None]:
    """moto's S3 server on a free loopback port, reached through the AWS_* environment like any S3 endpoint."""
    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    values = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
              "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    s3fs.S3FileSystem.clear_instance_cache()
    say(f"S3-compatible server (moto) on 127.0.0.1:{port}")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def run(workdir: Path, say: Say, size_mb: float = SIZE_MB, repeats: int = REPEATS) -> list[Figure]:
    source = workdir / "models" / "synthetic"
    say(f"building a {size_mb:.0f} MB synthetic diffusers model (random weights)")
    digest = synthetic_model.build(source, int(size_mb * 1e6))
    size = sum(p.stat().st_size for p in files_under(source))
    gb = size / 1e9

    def fetch_seconds(uri: str, allowed: tuple[Path, ...]) -> Callable[[int], float]:
        def once(attempt: int) -> float:
            cache = ModelCache(workdir / f"cache-{time.monotonic_ns()}")
            say(f"cold fetch from {uri.split(':')[0]}: run {attempt + 1}/{repeats}")
            result = fetch(uri, digest, cache, allowed_roots=allowed)
            if result.cached:
                raise RuntimeError("a fetch into an empty cache must transfer the model")
            shutil.rmtree(cache.root)
            return result.seconds
        return once

    figures = []
    say("local disk: plain copy, then cold fetches")
    copies = _runs(lambda attempt: copy_seconds(source, workdir / "copy"), repeats)
    fetches = _runs(fetch_seconds(f"file://{source}", (workdir,)), repeats)
    figures.append(_figure("cold fetch, local disk", gb, fetches, copies, {"model_bytes": size}))

    import s3fs

    with s3_server(say):
        fs = s3fs.S3FileSystem()
        fs.mkdir("bench")
        say(f"uploading {gb:.2f} GB to the S3-compatible server")
        fs.put(str(source), "bench/model", recursive=True)

        def s3_copy(attempt: int) -> float:
            target = workdir / "s3-copy"
            started = time.perf_counter()
            fs.get("bench/model", str(target), recursive=True)
            seconds = time.perf_counter() - started
            copied = sum(p.stat().st_size for p in files_under(target))
            shutil.rmtree(target)
            if copied != size:
                raise RuntimeError(f"the plain copy from S3 brought {copied} bytes of {size}")
            return seconds

        say("S3-compatible server: plain copy (s3fs get), then cold fetches")
        copies = _runs(s3_copy, repeats)
        fetches = _runs(fetch_seconds("s3://bench/model", ()), repeats)
    figures.append(_figure("cold fetch, S3-compatible server", gb, fetches, copies, {"model_bytes": size}))
    return figures


def _figure(name: str, gb: float, fetches: list[float], copies: list[float], detail: dict[str, object]) -> Figure:
    fetch_rate, copy_rate = gb / statistics.median(fetches), gb / statistics.median(copies)
    detail = {**detail, "fetch_s": [round(s, 3) for s in fetches], "plain_copy_s": [round(s, 3) for s in copies]}
    return Figure("fetch", name, fetch_rate, "GB/s", "plain copy", copy_rate, ratio(fetch_rate, copy_rate), FETCH_GOAL, detail)


def bench(ctx: Context) -> list[Figure]:
    size_mb = ctx.model_mb or (QUICK_SIZE_MB if ctx.quick else SIZE_MB)
    return run(ctx.workdir, ctx.say, size_mb, QUICK_REPEATS if ctx.quick else REPEATS)
