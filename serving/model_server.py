"""The model deployment: one per version application, `<release>--<version>`.

Each replica fetches and verifies its model (a cache hit when the controller
prepared it), builds the pipeline with the release's sampler, runs one warm-up
generation, and only then reports ready. Requests arrive from the release's
router, are batched by `@serve.batch`, grouped by shape, and run one pipeline
call at a time in a worker thread (diffusers schedulers are not thread-safe).
"""

from __future__ import annotations

import asyncio
import io
import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from serving.artifacts import ModelCache, fetch
from serving.metrics import Nvml, serving_metrics
from serving.pipeline import load_pipeline, pick_device

log = logging.getLogger("ray.serve")

SHAPE_KEYS = ("steps", "width", "height", "guidance_scale", "num_images")


def resolve(params: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """Fill unset request fields from the version's generation config; draw a seed if none is fixed."""
    out = {key: params.get(key) if params.get(key) is not None else generation.get(key) for key in generation}
    out["prompt"] = params["prompt"]
    out["num_images"] = params.get("num_images") or 1
    if out.get("seed") is None:
        out["seed"] = random.randrange(2**32)
    return out


def png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class ModelServer:
    def __init__(self, release: str, version: str, model: dict, generation: dict, repo: str | None, commit: str | None,
                 cache_dir: str, gpus: float = 0):
        started = time.monotonic()
        self.release, self.version, self.generation = release, version, generation
        self.tags = {"release": release, "version": version}
        self.gpus, self.gpu_hour_usd = gpus, None
        self.metrics = serving_metrics()
        fetched = fetch(model["uri"], model["digest"], ModelCache(Path(cache_dir)), repo=Path(repo) if repo else None, commit=commit)
        self.device = pick_device()
        if self.device == "cpu":
            log.info("%s--%s: no CUDA device visible (gpus=%s); running on CPU in float32", release, version, gpus)
        self.pipeline = load_pipeline(fetched.path, dtype=model.get("dtype", "float32"), sampler=generation["sampler"], device=self.device)
        self.lock = threading.Lock()
        self.nvml = Nvml()
        self.in_flight = 0
        warm_up = resolve({"prompt": "warm-up", "steps": min(2, generation["steps"]), "seed": 0}, generation)
        self._run([warm_up])
        self.load_seconds = time.monotonic() - started
        self.metrics["load_seconds"].set(self.load_seconds, tags=self.tags)
        log.info(
            "%s--%s: ready on %s after %.2fs (fetch %s, %.2fs); next: serving requests",
            release, version, self.device, self.load_seconds, "cache hit" if fetched.cached else "downloaded", fetched.seconds,
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Light settings from the rendered `user_config`: applied in place, no restart."""
        self.gpu_hour_usd = config.get("gpu_hour_usd")
        self._batch.set_max_batch_size(int(config.get("max_batch_size", 4)))
        self._batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        self.in_flight += 1
        self.metrics["in_flight"].set(self.in_flight, tags=self.tags)
        try:
            return await self._batch(resolve(params, self.generation))
        finally:
            self.in_flight -= 1
            self.metrics["in_flight"].set(self.in_flight, tags=self.tags)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self._run, requests)

    def _run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Generate for a batch: one pipeline call per group of requests with the same shape."""
        import torch

        results: list[dict[str, Any] | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(tuple(request[k] for k in SHAPE_KEYS), []).append(index)
        with self.lock:
            for (steps, width, height, guidance, count), members in groups.items():
                started = time.monotonic()
                batch = [requests[i] for i in members]
                generators = [torch.Generator(self.device).manual_seed(r["seed"] + n) for r in batch for n in range(count)]
                output = self.pipeline(
                    prompt=[r["prompt"] for r in batch],
                    negative_prompt=[r["negative_prompt"] or "" for r in batch],
                    num_inference_steps=steps, width=width, height=height, guidance_scale=guidance,
                    num_images_per_prompt=count, generator=generators,
                )
                seconds = time.monotonic() - started
                for position, index in enumerate(members):
                    images = output.images[position * count : (position + 1) * count]
                    params = {k: requests[index][k] for k in ("seed", *SHAPE_KEYS)}
                    results[index] = {"images": [png(i) for i in images], "params": params, "seconds": seconds, "batch_size": len(batch)}
                self._record(len(batch) * count, seconds)
        return results  # type: ignore[return-value]

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
    """Serve application builder named in the rendered config (`serving.model_server:build_model_app`)."""
    return serve.deployment(ModelServer, name="Model").bind(**args)
