"""Draw an experiment's cells on one model: the production pipeline path, loaded once, sampler swapped per cell.

Third step of `diffops experiment run` (and of `reproduce`): after `serving.artifacts.fetch` verified the model
into the cache, `load` builds the pipeline with `serving.pipeline.load_pipeline` and keeps the model's own
scheduler config, so `draw` builds each cell's sampler exactly as a replica does (`serving.samplers.build_scheduler`
on the model's config). Every prompt is one request at the cell's seed through `serving.generator.PipelineRunner`,
timed alone: the latency of one image. Imports only `serving`, so the same code runs in a Ray job.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serving.generator import PipelineRunner, resolve
from serving.pipeline import load_pipeline, pick_device
from serving.samplers import build_scheduler

__all__ = ["Drawn", "Loaded", "draw", "load"]


@dataclass(frozen=True)
class Loaded:
    """A loaded pipeline and the scheduler config it came with (the base of every sampler swap)."""

    runner: PipelineRunner
    scheduler_config: dict[str, Any]
    load_seconds: float


@dataclass(frozen=True)
class Drawn:
    """One cell's images (PNG bytes, in prompt order) and the seconds each took; `environment`: the hardware tags of
    the node that drew it when that was not this process (a Ray job)."""

    images: tuple[bytes, ...]
    latencies: tuple[float, ...]
    wall_s: float
    device: str
    environment: dict[str, str] = field(default_factory=dict)


def _model_scheduler_config(model_dir: Path) -> dict[str, Any]:
    """The scheduler config as the pipeline loads it from the model directory (before any sampler swap)."""
    import diffusers

    index = json.loads((model_dir / "model_index.json").read_text())
    class_name = index["scheduler"][1]
    scheduler = getattr(diffusers, class_name).from_pretrained(str(model_dir), subfolder="scheduler", local_files_only=True)
    return dict(scheduler.config)


def load(model_dir: Path, dtype: str, sampler: str, device: str | None = None) -> Loaded:
    """Load the model once (the production path) and warm it up with one untimed image."""
    started = time.monotonic()
    device = device or pick_device()
    pipeline = load_pipeline(model_dir, dtype=dtype, sampler=sampler, device=device)
    loaded = Loaded(PipelineRunner(pipeline, device), _model_scheduler_config(model_dir), 0.0)
    loaded.runner.run([resolve({"prompt": "warm-up", "seed": 0}, {"steps": 1, "guidance_scale": 7.5, "width": 64, "height": 64,
                                                                    "negative_prompt": "", "seed": 0})])
    return Loaded(loaded.runner, loaded.scheduler_config, round(time.monotonic() - started, 3))


def draw(loaded: Loaded, generation: dict[str, Any], prompts: list[str] | tuple[str, ...]) -> Drawn:
    """Every prompt at the generation config's seed and sampler, one request each; latency per image."""
    runner = loaded.runner
    runner.pipeline.scheduler = build_scheduler(generation["sampler"], loaded.scheduler_config)
    images, latencies = [], []
    started = time.monotonic()
    for prompt in prompts:
        request = resolve({"prompt": prompt, "seed": generation["seed"]}, generation)
        began = time.monotonic()
        images.append(runner.run([request])[0]["images"][0])
        latencies.append(time.monotonic() - began)
    return Drawn(tuple(images), tuple(latencies), time.monotonic() - started, runner.device)
