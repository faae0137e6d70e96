"""The model deployment: one per version application, `<release>--<version>`.

Each replica fetches its model, re-hashing every file of a cached copy first
(a damaged copy is downloaded again, never loaded), builds the pipeline with
the release's sampler, runs one warm-up generation, and only then reports
ready. Requests arrive from the release's router, are batched by
`@serve.batch`, and run by `serving.generator` in a worker thread: grouped by
shape, one pipeline call at a time (diffusers schedulers are not thread-safe).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any

from ray import serve

from serving import code_pin
from serving.artifacts import ModelCache, fetch
from serving.generator import PipelineRunner, resolve
from serving.metrics import Nvml, serving_metrics
from serving.model_cache import node_cache_dir
from serving.pipeline import load_pipeline, pick_device

__all__ = ["CONSTRUCTOR_RETRIES", "InjectedFault", "ModelServer", "build_model_app"]

log = logging.getLogger("ray.serve")
CONSTRUCTOR_RETRIES = 3  # a replica that fails to start is retried this often, then the version is failed


class InjectedFault(RuntimeError):
    """A failure a drill asked for (`spec.faults`)."""


class ModelServer:
    def __init__(self, release: str, version: str, model: dict[str, Any], generation: dict[str, Any], repo: str | None,
                 commit: str | None, cache_dir: str | None, gpus: float = 0, faults: dict[str, Any] | None = None):
        started = time.monotonic()
        code_pin.check(f"{release}--{version}")  # the serving code the controller pinned, or refuse to start
        self.release, self.version, self.generation = release, version, generation
        self.tags = {"release": release, "version": version}
        self.gpus, self.gpu_hour_usd = gpus, None
        self.faults = faults or {}
        self.answered = 0  # generate calls so far (spec.faults.error_after_requests)
        if self.faults:
            log.warning("%s--%s: fault injection on (%s); this version is a drill", release, version, self.faults)
        if self.faults.get("startup_error"):
            raise InjectedFault(f"{release}--{version}: injected startup failure (spec.faults.startup_error)")
        self.metrics = serving_metrics()
        cache = ModelCache(node_cache_dir(cache_dir))  # the controller's own on a local head, else this node's
        fetched = fetch(model["uri"], model["digest"], cache, repo=Path(repo) if repo else None, commit=commit, reverify=True)
        self.device = pick_device()
        if self.device == "cpu":
            log.info("%s--%s: no CUDA device visible (gpus=%s); running on CPU in float32", release, version, gpus)
        self.pipeline = load_pipeline(fetched.path, dtype=model.get("dtype", "float32"), sampler=generation["sampler"], device=self.device)
        self.runner = PipelineRunner(self.pipeline, self.device, on_batch=self._record)
        self.nvml = Nvml()
        self.in_flight = 0
        warm_up = resolve({"prompt": "warm-up", "steps": min(2, generation["steps"]), "seed": 0}, generation)
        self.runner.run([warm_up])
        self.load_seconds = time.monotonic() - started
        self.metrics["load_seconds"].set(self.load_seconds, tags=self.tags)
        log.info(
            "%s--%s: ready on %s after %.2fs (fetch %s, %.2fs); next: serving requests",
            release, version, self.device, self.load_seconds,
            "cache hit, re-verified" if fetched.cached else "downloaded" + (" to replace a damaged cached copy" if fetched.healed else ""),
            fetched.seconds,
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Light settings from the rendered `user_config`: applied in place, no restart."""
        self.gpu_hour_usd = config.get("gpu_hour_usd")
        # serve.batch's typing drops the setters its wrapper carries at run time
        self._batch.set_max_batch_size(int(config.get("max_batch_size", 4)))  # type: ignore[attr-defined]
        self._batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))  # type: ignore[attr-defined]

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.faults.get("added_latency_s"):
            await asyncio.sleep(self.faults["added_latency_s"])
        self.answered += 1
        if self.answered > self.faults.get("error_after_requests", 0) and random.random() < self.faults.get("error_rate", 0):
            raise InjectedFault(f"{self.release}--{self.version}: injected fault (spec.faults.error_rate {self.faults['error_rate']}"
                                f"{self._after()})")
        self.in_flight += 1
        self.metrics["in_flight"].set(self.in_flight, tags=self.tags)
        try:
            return await self._batch(resolve(params, self.generation))
        finally:
            self.in_flight -= 1
            self.metrics["in_flight"].set(self.in_flight, tags=self.tags)

    def _after(self) -> str:
        after = self.faults.get("error_after_requests", 0)
        return f", after {after} good requests" if after else ""

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.runner.run, requests)

    def _record(self, images: int, seconds: float) -> None:
        self.metrics["images"].inc(images, tags=self.tags)
        if self.gpu_hour_usd and self.gpus:
            cost = self.gpu_hour_usd * self.gpus * seconds / 3600
            self.metrics["cost"].inc(cost, tags=self.tags)
            self.metrics["cost_per_image"].set(cost / images, tags=self.tags)
        for gpu, utilization, memory in self.nvml.read():
            self.metrics["gpu_utilization"].set(utilization, tags={**self.tags, "gpu": gpu})
            self.metrics["gpu_memory"].set(memory, tags={**self.tags, "gpu": gpu})

    def check_health(self) -> None:
        if self.pipeline is None:
            raise RuntimeError(f"{self.release}--{self.version}: pipeline not loaded")


def build_model_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder named in the rendered config (`serving.model_server:build_model_app`). The constructor
    retry count is set here: Ray's config schema has no such field (it would be dropped silently)."""
    return serve.deployment(name="Model", max_constructor_retry_count=CONSTRUCTOR_RETRIES)(ModelServer).bind(**args)
