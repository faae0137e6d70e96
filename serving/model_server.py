"""The model deployment: one per version application, `<release>--<version>`.

Each replica fetches its model, re-hashing every file of a cached copy first
(a damaged copy is downloaded again, never loaded), builds the pipeline with
the release's sampler, runs one warm-up generation, and only then reports
ready. Requests arrive from the release's router, are batched by
`@serve.batch`, and run by `serving.generator` in a worker thread: grouped by
shape, one pipeline call at a time (diffusers schedulers are not thread-safe).
Each batch is measured (`serving.metrics`: images, seconds per image) and
reported to the release's tally (busy seconds, for the controller's cost
accounting); start phases, queue, node cache and NVML figures are gauges.
With `quality.safety` set, the release's safety checker (fetched and verified
like the model) checks every image of a batch (`serving.safety`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving import code_pin
from serving.artifacts import ModelCache, fetch
from serving.generator import PipelineRunner, resolve
from serving.metrics import Nvml, Ticker, recorder, serving_metrics, set_gpu_gauges, store_of
from serving.model_cache import node_cache_dir
from serving.pipeline import load_pipeline, pick_device
from serving.safety import SafetyFilter, load_filter

__all__ = ["CONSTRUCTOR_RETRIES", "InjectedFault", "ModelServer", "build_model_app", "load_phases"]

log = logging.getLogger("ray.serve")
CONSTRUCTOR_RETRIES = 3  # a replica that fails to start is retried this often, then the version is failed
TELL_LOAD_TIMEOUT_S = 5.0  # the wait for the release's tally to take a replica's start phases (on the ticker's thread)


def load_phases(cached: bool, fetch_s: float, load_s: float, warmup_s: float) -> dict[str, float]:
    """A replica's start by phase: a download hashes as it streams (fetch), a cache hit is re-hashed (verify)."""
    return {"fetch": 0.0 if cached else fetch_s, "verify": fetch_s if cached else 0.0, "load": load_s, "warmup": warmup_s}


class InjectedFault(RuntimeError):
    """A failure a drill asked for (`spec.faults`)."""


class ModelServer:
    def __init__(self, release: str, version: str, model: dict[str, Any], generation: dict[str, Any], repo: str | None,
                 commit: str | None, cache_dir: str | None, gpus: float = 0, faults: dict[str, Any] | None = None,
                 safety: dict[str, Any] | None = None):
        started = time.monotonic()
        code_pin.check(f"{release}--{version}")  # the serving code the controller pinned, or refuse to start
        self.release, self.version, self.generation = release, version, generation
        self.tags = {"release": release, "version": version}
        self.gpus = gpus
        self.faults = faults or {}
        self.answered = 0  # generate calls so far (spec.faults.error_after_requests)
        if self.faults:
            log.warning("%s--%s: fault injection on (%s); this version is a drill", release, version, self.faults)
        if self.faults.get("startup_error"):
            raise InjectedFault(f"{release}--{version}: injected startup failure (spec.faults.startup_error)")
        self.metrics = serving_metrics()
        self.cache = ModelCache(node_cache_dir(cache_dir))  # the controller's own on a local head, else this node's
        fetched = fetch(model["uri"], model["digest"], self.cache, repo=Path(repo) if repo else None, commit=commit, reverify=True)
        if fetched.bytes_transferred:  # a Ray counter refuses an increment of 0 (a cache hit transfers nothing)
            self.metrics["fetched_bytes"].inc(fetched.bytes_transferred, tags={**self.tags, "store": store_of(model["uri"])})
        self._cache_size()
        self.device = pick_device()
        if self.device == "cpu":
            log.info("%s--%s: no CUDA device visible (gpus=%s); running on CPU in float32", release, version, gpus)
        loading = time.monotonic()
        self.pipeline = load_pipeline(fetched.path, dtype=model.get("dtype", "float32"), sampler=generation["sampler"], device=self.device)
        checker = self._safety(safety, repo, commit) if safety else None
        self.runner = PipelineRunner(self.pipeline, self.device)  # the warm-up is no image anyone asked for: not counted
        self.in_flight = self.running = 0
        self.tally: DeploymentHandle[Any] | None = None
        warming = time.monotonic()
        warm_up = resolve({"prompt": "warm-up", "steps": min(2, generation["steps"]), "seed": 0}, generation)
        self.runner.run([warm_up])
        self.runner.on_batch, self.runner.safety = self._record, checker
        self.load_seconds = time.monotonic() - started
        phases = load_phases(fetched.cached, fetched.seconds, warming - loading, time.monotonic() - warming)
        self.phases = phases
        self.nvml = Nvml()
        self._refresh_gauges()
        self.load_told = False  # the release's tally has this replica's start phases (`_tell_load`)
        self.ticker = Ticker(f"{release}--{version}", self._tick).start()
        log.info(
            "%s--%s: ready on %s after %.2fs (fetch %s, %.2fs; load %.2fs; warm-up %.2fs); next: serving requests",
            release, version, self.device, self.load_seconds,
            "cache hit, re-verified" if fetched.cached else "downloaded" + (" to replace a damaged cached copy" if fetched.healed else ""),
            fetched.seconds, phases["load"], phases["warmup"],
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        """Light settings from the rendered `user_config`: applied in place, no restart."""
        # serve.batch's typing drops the setters its wrapper carries at run time
        self._batch.set_max_batch_size(int(config.get("max_batch_size", 4)))  # type: ignore[attr-defined]
        self._batch.set_batch_wait_timeout_s(float(config.get("batch_wait_timeout_s", 0.01)))  # type: ignore[attr-defined]
        self.metrics = recorder(bool(config.get("metrics", True)))  # start phases, cache size and NVML: kept either way

    async def generate(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.faults.get("added_latency_s"):
            await asyncio.sleep(self.faults["added_latency_s"])
        self.answered += 1
        if self.answered > self.faults.get("error_after_requests", 0) and random.random() < self.faults.get("error_rate", 0):
            raise InjectedFault(f"{self.release}--{self.version}: injected fault (spec.faults.error_rate {self.faults['error_rate']}"
                                f"{self._after()})")
        self.in_flight += 1
        self._gauge_queue()
        try:
            return await self._batch(resolve(params, self.generation))
        finally:
            self.in_flight -= 1
            self._gauge_queue()

    def _safety(self, spec: dict[str, Any], repo: str | None, commit: str | None) -> SafetyFilter:
        """The release's safety checker (quality.safety), fetched and verified through the node cache like the model."""
        fetched = fetch(spec["uri"], spec["digest"], self.cache, repo=Path(repo) if repo else None, commit=commit, reverify=True)
        action = str(spec.get("action") or "flag")
        tags = {**self.tags, "action": action}
        log.info("%s--%s: safety checker %s loaded; every image is checked (action %s)", self.release, self.version, spec["uri"], action)
        return load_filter(fetched.path, action, self.device, lambda count: self.metrics["nsfw"].inc(count, tags=tags))

    def _after(self) -> str:
        after = self.faults.get("error_after_requests", 0)
        return f", after {after} good requests" if after else ""

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.01)
    async def _batch(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.running = len(requests)
        self._gauge_queue()
        try:
            return await asyncio.to_thread(self.runner.run, requests)
        finally:
            self.running = 0
            self._gauge_queue()

    def _gauge_queue(self) -> None:
        tags = {**self.tags, "where": "replica"}
        self.metrics["in_flight"].set(self.in_flight, tags=tags)
        self.metrics["queue_length"].set(max(0, self.in_flight - self.running), tags=tags)

    def _cache_size(self) -> None:
        serving_metrics()["cache_bytes"].set(self.cache.size(), tags=self.tags)  # a gauge on a timer: kept with metrics off

    def _refresh_gauges(self) -> None:
        """Every gauge again, on the ticker: Ray exports a gauge only for a while after it was last set, so one
        set once (the start phases) or only on change (an idle queue) would vanish from Prometheus."""
        set_gpu_gauges(self.tags, self.nvml.read())
        self._cache_size()
        for phase, seconds in self.phases.items():
            serving_metrics()["load_seconds"].set(seconds, tags={**self.tags, "phase": phase})
        self._gauge_queue()

    def _tick(self) -> None:
        self._refresh_gauges()
        self._tell_load()

    def _tell_load(self) -> None:
        """Give the release's tally this replica's start by phase, once (the controller keeps it for `diffops status`);
        on the ticker's thread, tried again each tick until the tally answers (a first rollout starts it beside us)."""
        if self.load_told:
            return
        try:
            tally = serve.get_deployment_handle("Tally", app_name=self.release)
            tally.loaded.remote(self.version, self.phases).result(timeout_s=TELL_LOAD_TIMEOUT_S)
        except Exception as err:  # no router app yet, or it is busy: the next tick tries again
            log.debug("%s--%s: start phases not told to the tally yet (%s); next: again in the next tick", self.release,
                      self.version, err)
            return
        self.load_told = True

    def _record(self, images: int, seconds: float) -> None:
        """A batch generated: images counted, time per image observed, the work reported to the release's tally."""
        if not images:
            return
        self.metrics["images"].inc(images, tags=self.tags)
        self.metrics["image_seconds"].observe(seconds / images, tags=self.tags)
        try:
            if self.tally is None:
                self.tally = serve.get_deployment_handle("Tally", app_name=self.release)
            self.tally.work.remote(self.version, seconds, images)  # fire and forget: a request never waits on it
        except Exception as err:  # no router app (yet): the controller counts held time as serving meanwhile
            log.debug("%s--%s: work not reported to the tally (%s)", self.release, self.version, err)

    def check_health(self) -> None:
        if self.pipeline is None:
            raise RuntimeError(f"{self.release}--{self.version}: pipeline not loaded")


def build_model_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder named in the rendered config (`serving.model_server:build_model_app`). The constructor
    retry count is set here: Ray's config schema has no such field (it would be dropped silently)."""
    return serve.deployment(name="Model", max_constructor_retry_count=CONSTRUCTOR_RETRIES)(ModelServer).bind(**args)
