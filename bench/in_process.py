"""The demo pipeline called in this process: the baseline of the router and gate figures.

Fetched with `serving.artifacts.fetch`, built with `serving.pipeline.load_pipeline`
and run by `serving.generator.PipelineRunner`, exactly as a replica does, with
a release's generation config; only Serve, HTTP and the router are missing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serving.artifacts import ModelCache, fetch
from serving.generator import PipelineRunner, resolve
from serving.pipeline import load_pipeline


def replica_threads(cpus: float) -> int:
    """Torch threads in a replica with `cpus`: Ray sets OMP_NUM_THREADS to floor(num_cpus), at least 1."""
    return max(math.floor(cpus), 1)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fetch_model(model: dict[str, Any], cache_dir: Path, repo: Path, commit: str) -> Path:
    return fetch(model["uri"], model["digest"], ModelCache(cache_dir), repo=repo, commit=commit).path


def load_runner(model_dir: Path, spec: dict[str, Any]) -> PipelineRunner:
    dtype, sampler = spec["model"].get("dtype", "float32"), spec["generation"]["sampler"]
    pipeline = load_pipeline(model_dir, dtype=dtype, sampler=sampler, device="cpu")
    return PipelineRunner(pipeline, "cpu")


def generate_seconds(runner: PipelineRunner, body: dict[str, Any], generation: dict[str, Any]) -> float:
    """One request's time through the runner (generation and PNG encoding, as in a replica)."""
    started = time.perf_counter()
    runner.run([resolve(body, generation)])
    return time.perf_counter() - started
