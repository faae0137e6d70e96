"""Router overhead: latency through Ray Serve's HTTP proxy and the release's router vs the pipeline in-process.

The same requests (the demo's generation config, a fixed seed each) go one at
a time to `POST /demo/generate` on the bench's Serve and, in alternating blocks
so background load hits both alike, through `serving.generator.PipelineRunner`
in this process with the torch threads a replica gets. Added milliseconds =
HTTP percentile − in-process percentile; ratio = HTTP / in-process.
Measured at max_batch_size 1 (proxy, router and the handle call only) and at
the demo's max_batch_size 4, where a lone request also waits up to the batch
timeout (`batch_wait_timeout_s`, 10 ms) for company. The detail also keeps
the latency of requests the router itself rejects (422, no replica hop): the
proxy + router share of the overhead. Last, the cost of serving metrics: the
same requests at max_batch_size 1 with the controller restarted under
`--serving-metrics off` (routers and replicas told in place, no restart),
against the metrics-on figures of the same run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from bench import in_process
from bench.context import Context
from bench.live import LiveDemo
from bench.progress import Say
from bench.report import Figure, Goal, ratio
from bench.traffic import GENERATE, percentile_ms, sequential

REQUESTS, QUICK_REQUESTS = 200, 40
BLOCK = 10
GOAL = Goal("≤ 3 ms p50", "value", at_most=3.0)
METRICS_GOAL = Goal("≤ 1 ms p50", "value", at_most=1.0)


def rejected_latencies(client: httpx.Client, requests: int) -> list[float]:
    """Requests the router answers 422 before any pipeline work: Serve's proxy and the router alone."""
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.post(GENERATE, json={"prompt": "a red cube", "steps": 10_000})
        latencies.append(time.perf_counter() - started)
        if response.status_code != 422:
            raise RuntimeError(f"expected 422 for steps over the limit, got {response.status_code}")
    return latencies


def measure(runner: Any, generation: dict[str, Any], threads: int,
            requests: int) -> tuple[list[float], list[float], list[float]]:
    """(HTTP latencies, in-process latencies, 422 latencies), seconds."""
    bodies = [{"prompt": "a red cube", "seed": seed} for seed in range(requests)]
    with httpx.Client(timeout=60) as client, in_process.torch_threads(threads):
        sequential(bodies[:5], client)  # warm-up, both paths
        for body in bodies[:5]:
            in_process.generate_seconds(runner, body, generation)
        http: list[float] = []
        local: list[float] = []
        for start in range(0, requests, BLOCK):
            block = bodies[start:start + BLOCK]
            http += sequential(block, client)
            local += [in_process.generate_seconds(runner, body, generation) for body in block]
        rejected = rejected_latencies(client, min(requests, 50))
    return http, local, rejected


def quantiles(seconds: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile_ms(seconds, q), 2) for q in (50, 99)}


def figures(batch: int, http: list[float], local: list[float], rejected: list[float], threads: int) -> list[Figure]:
    detail = {"requests": len(http), "torch_threads": threads, "http_ms": quantiles(http), "in_process_ms": quantiles(local),
              "router_422_ms": quantiles(rejected)}
    out = []
    for q in (50, 99):
        http_ms, local_ms = percentile_ms(http, q), percentile_ms(local, q)
        out.append(Figure("router", f"router overhead p{q}, max_batch_size {batch}", http_ms - local_ms, "ms",
                          f"in-process p{q}", local_ms, ratio(http_ms, local_ms), GOAL if q == 50 else None, detail))
    return out


def metrics_figures(on: list[float], off: list[float]) -> list[Figure]:
    """Latency added by request metrics (router + replica): metrics-on HTTP percentile − metrics-off, same requests."""
    detail = {"requests": len(on), "metrics_on_ms": quantiles(on), "metrics_off_ms": quantiles(off)}
    out = []
    for q in (50, 99):
        on_ms, off_ms = percentile_ms(on, q), percentile_ms(off, q)
        out.append(Figure("router", f"serving metrics cost p{q}, max_batch_size 1", on_ms - off_ms, "ms", f"metrics off p{q}",
                          off_ms, ratio(on_ms, off_ms), METRICS_GOAL if q == 50 else None, detail))
    return out


def set_serving_metrics(live: LiveDemo, say: Say, on: bool) -> None:
    """Restart the controller with request metrics on or off and wait until every deployment was told."""
    live.restart_controller("--serving-metrics", "on" if on else "off")

    def told() -> bool:
        apps = live.serve.observe()
        configs = [app.user_config or {} for name, app in apps.items() if name == "demo" or name.startswith("demo--")]
        return bool(configs) and all(config.get("metrics", True) == on for config in configs)

    live.wait(told, f"routers and replicas to record metrics {'on' if on else 'off'}")
    time.sleep(1)  # the reconfigure reaches the replicas within ~0.3 s of the applied config


def run(live: LiveDemo, workdir: Path, say: Say, requests: int) -> list[Figure]:
    stable = live.stable()
    spec = stable.spec.model_dump(mode="json")  # as the gate input carries it
    model_dir = in_process.fetch_model(spec["model"], workdir / "cache", live.repo.path, stable.commit)
    runner = in_process.load_runner(model_dir, spec)
    threads = in_process.replica_threads(spec["replicas"]["cpus"])
    out = []
    for batch in (1, 4):
        say(f"max_batch_size {batch}: committing it and waiting until Serve runs it")
        live.set_field("max_batch_size", batch)
        say(f"max_batch_size {batch}: {requests} requests one at a time, HTTP and in-process in alternating blocks")
        http, local, rejected = measure(runner, spec["generation"], threads, requests)
        out += figures(batch, http, local, rejected, threads)
        if batch == 1:
            metrics_on = http
    live.set_field("max_batch_size", 1)
    say("serving metrics: restarting the controller with --serving-metrics off; the same requests again")
    set_serving_metrics(live, say, on=False)
    metrics_off, _, _ = measure(runner, spec["generation"], threads, requests)
    say("serving metrics: back on")
    set_serving_metrics(live, say, on=True)
    return out + metrics_figures(metrics_on, metrics_off)


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.live(), ctx.workdir, ctx.say, QUICK_REQUESTS if ctx.quick else REQUESTS)
