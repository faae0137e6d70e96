"""Run generation requests on one pipeline: defaults, seeds, shape groups, one call at a time.

Shared by the model deployment (`serving.model_server`) and the gate's golden
and performance checks, so a check measures exactly what serving runs.
"""

from __future__ import annotations

import io
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from serving.safety import SafetyFilter

__all__ = ["SHAPE_KEYS", "PipelineRunner", "png", "resolve"]

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


class PipelineRunner:
    """Generates for batches of resolved requests; the pipeline is never used by two threads at once."""

    def __init__(self, pipeline: Any, device: str, on_batch: Callable[[int, float], None] = lambda images, seconds: None,
                 safety: SafetyFilter | None = None):
        """`safety`: the release's NSFW filter on every image (flags, blurs or withholds them; `serving.safety`)."""
        self.pipeline, self.device, self.on_batch, self.safety = pipeline, device, on_batch, safety
        self.lock = threading.Lock()

    def run(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One pipeline call per group of requests with the same shape; results in request order."""
        import torch

        results: dict[int, dict[str, Any]] = {}
        groups: dict[tuple[Any, ...], list[int]] = {}
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
                drawn, nsfw = self.safety.apply(output.images) if self.safety else (output.images, [False] * len(output.images))
                for position, index in enumerate(members):
                    mine = slice(position * count, (position + 1) * count)
                    params = {k: requests[index][k] for k in ("seed", *SHAPE_KEYS)}
                    results[index] = {"images": [self._encoded(i, flagged) for i, flagged in zip(drawn[mine], nsfw[mine], strict=True)],
                                      "params": params, "seconds": seconds, "batch_size": len(batch), "nsfw": nsfw[mine],
                                      "nsfw_action": self.safety.action if self.safety else None}
                self.on_batch(len(batch) * count, seconds)
        return [results[index] for index in range(len(requests))]

    def _encoded(self, image: Any, flagged: bool) -> bytes:
        """The PNG to send; a blocked image is never encoded, so it never leaves the replica."""
        return b"" if flagged and self.safety is not None and self.safety.action == "block" else png(image)
