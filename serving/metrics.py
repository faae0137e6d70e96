"""Serving metrics, exported by Ray's metrics agent in Prometheus format.

Router and model replicas record through these; Ray exposes them (prefixed
`ray_`) on each node's metrics export port. GPU figures come from NVML when a
driver is present; without one, NVML is skipped once, with a log line.
"""

from __future__ import annotations

import logging
import os
from functools import cache
from typing import TypedDict

from ray.util import metrics

__all__ = ["Nvml", "ServingMetrics", "serving_metrics"]

log = logging.getLogger("ray.serve")

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class ServingMetrics(TypedDict):
    requests: metrics.Counter
    latency: metrics.Histogram
    images: metrics.Counter
    in_flight: metrics.Gauge
    load_seconds: metrics.Gauge
    gpu_utilization: metrics.Gauge
    gpu_memory: metrics.Gauge
    cost: metrics.Counter
    cost_per_image: metrics.Gauge


@cache
def serving_metrics() -> ServingMetrics:
    version = ("release", "version")
    return {
        "requests": metrics.Counter("diffops_requests", "Requests answered, by HTTP status code.", tag_keys=(*version, "code")),
        "latency": metrics.Histogram(
            "diffops_request_latency_seconds", "End-to-end request latency at the router.", boundaries=LATENCY_BUCKETS, tag_keys=version
        ),
        "images": metrics.Counter("diffops_images_generated", "Images generated.", tag_keys=version),
        "in_flight": metrics.Gauge("diffops_requests_in_flight", "Requests inside a model replica (queued for or in a batch).",
                                   tag_keys=version),
        "load_seconds": metrics.Gauge("diffops_model_load_seconds", "Fetch + load + warm-up time of a replica.", tag_keys=version),
        "gpu_utilization": metrics.Gauge("diffops_gpu_utilization_ratio", "GPU utilization seen by a replica (NVML).",
                                         tag_keys=(*version, "gpu")),
        "gpu_memory": metrics.Gauge("diffops_gpu_memory_used_bytes", "GPU memory used (NVML).", tag_keys=(*version, "gpu")),
        "cost": metrics.Counter("diffops_gpu_cost_usd", "GPU cost of generation time, from spec.cost.gpu_hour_usd.", tag_keys=version),
        "cost_per_image": metrics.Gauge("diffops_cost_per_image_usd", "GPU cost per image of the latest batch.", tag_keys=version),
    }


class Nvml:
    """NVML reader for the GPUs visible to this process; inert without a driver."""

    def __init__(self) -> None:
        self.handles: list[tuple[str, object]] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
            indices = [int(i) for i in visible.split(",") if i.strip().isdigit()] or range(pynvml.nvmlDeviceGetCount())
            self.handles = [(str(i), pynvml.nvmlDeviceGetHandleByIndex(i)) for i in indices]
        except Exception as err:  # pynvml.NVMLError without a driver, ImportError without the package
            log.info("NVML unavailable (%s); GPU utilization and memory metrics are off", err)

    def read(self) -> list[tuple[str, float, int]]:
        """(gpu index, utilization 0..1, memory used bytes) per visible GPU."""
        import pynvml

        out = []
        for index, handle in self.handles:
            try:
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle).used
                out.append((index, util, memory))
            except pynvml.NVMLError:
                continue
        return out
