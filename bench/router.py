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

The floor: a bare Serve app of two deployments (`bench/floor_app.py`, proxy →
ingress → echo, empty body) deployed beside the demo on the same Serve and
called in the same alternating blocks, so what the layout costs and what our
code adds to it read apart: ours over the floor = HTTP − in-process − floor.
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
from bench.ray_head import HOST, HTTP_PORT, SERVE_URL
from bench.report import Figure, Goal, ratio
from bench.traffic import GENERATE, percentile_ms, sequential
from controller.apply.drift import carried

REQUESTS, QUICK_REQUESTS = 200, 40
BLOCK = 10
GOAL = Goal("≤ 3 ms p50", "value", at_most=3.0)
METRICS_GOAL = Goal("≤ 1 ms p50", "value", at_most=1.0)
FLOOR = "floor"
FLOOR_URL = f"{SERVE_URL}/{FLOOR}"
FLOOR_APP = {"name": FLOOR, "route_prefix": f"/{FLOOR}", "import_path": "bench.floor_app:app",
             "runtime_env": {"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}}}


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


def floor_latencies(client: httpx.Client, requests: int) -> list[float]:
    """Empty-body calls of the bare two-hop app: Serve's proxy and two handle hops, nothing of ours."""
    latencies = []
    for _ in range(requests):
        started = time.perf_counter()
        response = client.post(FLOOR_URL, content=b"")
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"the bare two-hop app answered {response.status_code}: {response.text[:200]}")
    return latencies


def measure(runner: Any, generation: dict[str, Any], threads: int, requests: int) -> dict[str, list[float]]:
    """Latencies in seconds: `http` (ours end to end), `local` (in-process) and `floor` (the bare two-hop app) in
    alternating blocks, then `rejected` (422 at the router)."""
    bodies = [{"prompt": "a red cube", "seed": seed} for seed in range(requests)]
    out: dict[str, list[float]] = {"http": [], "local": [], "floor": []}
    with httpx.Client(timeout=60) as client, in_process.torch_threads(threads):
        sequential(bodies[:5], client)  # warm-up, every path
        floor_latencies(client, 5)
        for body in bodies[:5]:
            in_process.generate_seconds(runner, body, generation)
        for start in range(0, requests, BLOCK):
            block = bodies[start:start + BLOCK]
            out["http"] += sequential(block, client)
            out["local"] += [in_process.generate_seconds(runner, body, generation) for body in block]
            out["floor"] += floor_latencies(client, len(block))
        out["rejected"] = rejected_latencies(client, min(requests, 50))
    return out


def quantiles(seconds: list[float]) -> dict[str, float]:
    return {f"p{q}": round(percentile_ms(seconds, q), 2) for q in (50, 99)}


def figures(batch: int, measured: dict[str, list[float]], threads: int) -> list[Figure]:
    http, local = measured["http"], measured["local"]
    detail = {"requests": len(http), "torch_threads": threads, "http_ms": quantiles(http), "in_process_ms": quantiles(local),
              "router_422_ms": quantiles(measured["rejected"]), "floor_ms": quantiles(measured["floor"])}
    out = []
    for q in (50, 99):
        http_ms, local_ms = percentile_ms(http, q), percentile_ms(local, q)
        out.append(Figure("router", f"router overhead p{q}, max_batch_size {batch}", http_ms - local_ms, "ms",
                          f"in-process p{q}", local_ms, ratio(http_ms, local_ms), GOAL if q == 50 else None, detail))
    if batch == 1:
        floor_ms, overhead_ms = percentile_ms(measured["floor"], 50), percentile_ms(http, 50) - percentile_ms(local, 50)
        out.append(Figure("router", "ours over the floor p50, max_batch_size 1", overhead_ms - floor_ms, "ms",
                          "bare two-hop Serve app p50 (the floor)", floor_ms, ratio(overhead_ms, floor_ms), None, detail))
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


def deploy_floor(live: LiveDemo, present: bool) -> None:
    """Add (or remove) the bare two-hop app beside the demo's apps, which the PUT carries as Ray reports them; the
    controller carries it in turn as another owner's app."""
    apps = live.serve.observe()
    others = carried({name: app for name, app in apps.items() if name != FLOOR})
    live.serve.apply({"proxy_location": "HeadOnly", "http_options": {"host": HOST, "port": HTTP_PORT},
                      "applications": [*others, *([FLOOR_APP] if present else [])]})

    def done() -> bool:
        floor = (live.serve.observe() or {}).get(FLOOR)
        return floor is not None and floor.status == "RUNNING" if present else floor is None

    live.wait(done, f"the bare two-hop app {'to run' if present else 'to go'}", timeout_s=120)


def run(live: LiveDemo, workdir: Path, say: Say, requests: int) -> list[Figure]:
    stable = live.stable()
    spec = stable.spec.model_dump(mode="json")  # as the gate input carries it
    model_dir = in_process.fetch_model(spec["model"], workdir / "cache", live.repo.path, stable.commit)
    runner = in_process.load_runner(model_dir, spec)
    threads = in_process.replica_threads(spec["replicas"]["cpus"])
    say("the floor: deploying a bare two-hop Serve app (proxy → ingress → echo) beside the demo")
    deploy_floor(live, present=True)
    out = []
    for batch in (1, 4):
        say(f"max_batch_size {batch}: committing it and waiting until Serve runs it")
        live.set_field("max_batch_size", batch)
        say(f"max_batch_size {batch}: {requests} requests one at a time, HTTP, in-process and the floor in alternating blocks")
        measured = measure(runner, spec["generation"], threads, requests)
        out += figures(batch, measured, threads)
        if batch == 1:
            metrics_on = measured["http"]
    live.set_field("max_batch_size", 1)
    say("serving metrics: restarting the controller with --serving-metrics off; the same requests again")
    set_serving_metrics(live, say, on=False)
    metrics_off = measure(runner, spec["generation"], threads, requests)["http"]
    say("serving metrics: back on")
    set_serving_metrics(live, say, on=True)
    deploy_floor(live, present=False)
    return out + metrics_figures(metrics_on, metrics_off)


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.live(), ctx.workdir, ctx.say, QUICK_REQUESTS if ctx.quick else REQUESTS)
