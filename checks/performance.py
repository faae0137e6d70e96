"""Performance check: N requests at a concurrency on the target resources, against the release's limits.

Requests go through the same runner serving uses, so latency includes the
wait for the pipeline just as a replica's queue does. Peak memory is the
allocator peak (and NVML) on a GPU, the process's peak RSS on CPU.
"""

from __future__ import annotations

import resource
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from checks.report import CheckResult, Outcome
from serving.generator import PipelineRunner, resolve
from serving.stats import percentile

__all__ = ["run"]


def _peak_memory_gb(device: str) -> tuple[float, str]:
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 1e9, "cuda allocator peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, "process peak RSS"


def run(runner: PipelineRunner, performance: dict[str, Any] | None, generation: dict[str, Any]) -> CheckResult:
    if performance is None:
        return CheckResult("performance", "skipped", "no checks.performance configured")
    if runner.device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
    requests = [resolve({"prompt": "performance check", "seed": i}, generation) for i in range(performance["requests"])]

    def timed(request: dict[str, Any]) -> float:
        started = time.monotonic()
        runner.run([request])
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(performance["concurrency"]) as pool:
        latencies = list(pool.map(timed, requests))
    wall = time.monotonic() - started
    memory, memory_kind = _peak_memory_gb(runner.device)
    figures = {
        "requests": len(latencies), "concurrency": performance["concurrency"], "device": runner.device,
        "p50_latency_s": round(percentile(latencies, 50) or 0.0, 4),
        "p95_latency_s": round(percentile(latencies, 95) or 0.0, 4),  # nearest rank, as the canary analysis
        "images_per_s": round(len(latencies) / wall, 3),
        "peak_memory_gb": round(memory, 3), "peak_memory_kind": memory_kind,
    }
    thresholds = {k: performance.get(k) for k in ("max_p95_latency_s", "max_peak_memory_gb", "min_images_per_s")}
    problems = []
    if figures["p95_latency_s"] > performance["max_p95_latency_s"]:
        problems.append(f"p95 latency {figures['p95_latency_s']:.3f}s > {performance['max_p95_latency_s']}s")
    if performance.get("max_peak_memory_gb") is not None and memory > performance["max_peak_memory_gb"]:
        problems.append(f"peak memory {memory:.2f} GB ({memory_kind}) > {performance['max_peak_memory_gb']} GB")
    if performance.get("min_images_per_s") is not None and figures["images_per_s"] < performance["min_images_per_s"]:
        problems.append(f"{figures['images_per_s']:.2f} images/s < {performance['min_images_per_s']}")
    summary = (f"p50 {figures['p50_latency_s']:.3f}s, p95 {figures['p95_latency_s']:.3f}s, {figures['images_per_s']:.2f} images/s, "
               f"peak {memory:.2f} GB")
    outcome: Outcome = "failed" if problems else "passed"
    return CheckResult("performance", outcome, "; ".join(problems) + f" ({summary})" if problems else summary, figures, thresholds, wall)
