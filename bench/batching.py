"""Batching: images/s at concurrency 8 with max_batch_size 4 and 8, against max_batch_size 1.

Through Serve HTTP on the live demo (one replica, the release's CPUs).
`max_ongoing_requests` is raised to 8 so eight requests can reach the replica
at once, and `batch_wait_timeout_s` to 50 ms so a batch waits for the clients
whose answers just went out (a round trip through the proxy and the router
takes ~15 ms here; the default 10 ms starts a batch before they are back);
all three are light changes, committed and applied in place. Per level: eight warm-up requests, then N requests from 8 client
threads; images/s = N / wall time. The mean batch size the replica reports
(JSON metadata `batch_size`) is kept as evidence that batching happened.
The same levels in-process (`serving.generator.PipelineRunner` with the
replica's torch threads, batches handed over whole) give the pipeline's own
gain from batching on this hardware: the ceiling the served figure can reach.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from bench import in_process
from bench.context import Context
from bench.live import LiveDemo
from bench.progress import Say
from bench.report import Figure, Goal, ratio
from bench.traffic import concurrent
from serving.generator import resolve

REQUESTS, QUICK_REQUESTS = 96, 32
CONCURRENCY = 8
LEVELS = (1, 4, 8)
BATCH_WAIT_S = 0.05
GOAL_AT_8 = Goal("≥ 1.5× at 8", "ratio", at_least=1.5)


def in_process_rates(live: LiveDemo, workdir: Path, requests: int) -> dict[int, float]:
    """Images/s of the pipeline itself at each batch size, best of three (no Serve, no HTTP)."""
    stable = live.stable()
    spec = stable.spec.model_dump(mode="json")  # as the gate input carries it
    model_dir = in_process.fetch_model(spec["model"], workdir / "cache", live.repo.path, stable.commit)
    runner = in_process.load_runner(model_dir, spec)
    generation = spec["generation"]
    rates = {}
    with in_process.torch_threads(in_process.replica_threads(spec["replicas"]["cpus"])):
        runner.run([resolve({"prompt": "a red cube", "seed": 0}, generation)])
        for level in LEVELS:
            batches = [[resolve({"prompt": "a red cube", "seed": seed}, generation) for seed in range(start, start + level)]
                       for start in range(0, requests, level)]
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                for batch in batches:
                    runner.run(batch)
                best = min(best, time.perf_counter() - started)
            rates[level] = sum(map(len, batches)) / best
    return rates


def run(live: LiveDemo, workdir: Path, say: Say, requests: int, concurrency: int = CONCURRENCY) -> list[Figure]:
    live.set_field("max_ongoing_requests", concurrency)
    live.set_field("batch_wait_timeout_s", BATCH_WAIT_S)
    rates: dict[int, float] = {}
    batch_sizes: dict[int, float] = {}
    for level in LEVELS:
        say(f"max_batch_size {level}: committing it and waiting until Serve runs it")
        live.set_field("max_batch_size", level)
        bodies = [{"prompt": "a red cube", "seed": seed} for seed in range(requests)]
        concurrent(bodies[:concurrency], concurrency)
        say(f"max_batch_size {level}: {requests} requests at concurrency {concurrency}")
        wall, metadata = concurrent(bodies, concurrency)
        rates[level] = requests / wall
        batch_sizes[level] = statistics.mean(m["batch_size"] for m in metadata)
        say(f"max_batch_size {level}: {rates[level]:.1f} images/s, mean batch {batch_sizes[level]:.1f}")
    say(f"in-process: the pipeline alone at batch sizes {', '.join(map(str, LEVELS))}")
    local = in_process_rates(live, workdir, requests)
    detail = {"requests": requests, "concurrency": concurrency, "batch_wait_timeout_s": BATCH_WAIT_S,
              "in_process_images_per_s": {str(k): round(v, 2) for k, v in local.items()},
              "images_per_s": {str(k): round(v, 2) for k, v in rates.items()},
              "mean_batch_size": {str(k): round(v, 2) for k, v in batch_sizes.items()}}
    return [Figure("batching", f"images/s, max_batch_size {level}, concurrency {concurrency}", rates[level], "images/s",
                   "max_batch_size 1", rates[1], ratio(rates[level], rates[1]), GOAL_AT_8 if level == 8 else None, detail)
            for level in LEVELS[1:]] + [
        Figure("batching", "images/s in-process, batch 8 (the pipeline's own gain)", local[8], "images/s",
               "in-process batch 1", local[1], ratio(local[8], local[1]), detail=detail)]


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.live(), ctx.workdir, ctx.say, QUICK_REQUESTS if ctx.quick else REQUESTS)
