"""The release's scorer: sampled outputs scored off the request path, and kept for the controller to read.

A deployment beside the routers and the tally in the release's router application, present when the release sets
`quality.clip` or `quality.review.sample_rate`. Routers send it a sample of their answered generations (`take`:
fire and forget, after the answer is sent on its way; the image, prompt, seed, parameters and version); it scores
each against its prompt with the pinned CLIP model (`serving.quality_models`, fetched and verified through the
node cache like any model) on a worker thread, one at a time, records `diffops_clip_score`, and keeps the sample
in a `SampleBook` until the controller reads it through `GET /<release>/samples` (`controller.quality`). The image
travels only for samples drawn for review. A scorer behind on its work drops the newest samples (counted in the log),
never slows a request.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import uuid
from collections import deque
from pathlib import Path
from typing import Any

from serving.metrics import recorder

__all__ = ["MAX_PENDING", "PAGE_BYTES", "SAMPLES_KEPT", "SampleBook", "Scorer"]

log = logging.getLogger("ray.serve")

SAMPLES_KEPT = 2000  # samples held for the controller at most (oldest dropped first)
KEPT_BYTES = 256 * 2**20  # image bytes held at most (a 1024 px PNG is ~1.5 MB)
PAGE_BYTES = 8 * 2**20  # image bytes in one page the controller reads
MAX_PENDING = 64  # samples waiting to be scored at most; past it new ones are dropped

Sample = dict[str, Any]


class SampleBook:
    """Scored samples, numbered, until read; bounded by count and by image bytes. Pure."""

    def __init__(self, kept: int = SAMPLES_KEPT, kept_bytes: int = KEPT_BYTES, epoch: str | None = None):
        self.kept, self.kept_bytes = kept, kept_bytes
        self.epoch = epoch or uuid.uuid4().hex[:12]
        self.samples: deque[Sample] = deque()
        self.seq = self.bytes = 0

    def add(self, sample: Sample) -> None:
        self.seq += 1
        self.samples.append({**sample, "seq": self.seq})
        self.bytes += len(sample.get("png") or b"")
        while self.samples and (len(self.samples) > self.kept or self.bytes > self.kept_bytes):
            self.bytes -= len(self.samples.popleft().get("png") or b"")

    def since(self, epoch: str | None, after: int, limit: int = 200, page_bytes: int = PAGE_BYTES) -> dict[str, Any]:
        """Samples past `after` (all when `epoch` is another book's), oldest first: at most `limit`, and past the first
        at most `page_bytes` of images; images as base64. `first`: the oldest seq still held."""
        after = after if epoch == self.epoch else 0
        out: list[dict[str, Any]] = []
        size = 0
        for sample in self.samples:
            if sample["seq"] <= after:
                continue
            png = sample.get("png") or b""
            if len(out) >= max(1, limit) or (out and size + len(png) > page_bytes):
                break
            size += len(png)
            out.append({**{k: v for k, v in sample.items() if k != "png"}, "png": base64.b64encode(png).decode() if png else None})
        first = self.samples[0]["seq"] if self.samples else self.seq + 1
        return {"epoch": self.epoch, "first": first, "last": self.seq, "samples": out}


class Scorer:
    """One release's scorer replica (`num_replicas: 1`)."""

    def __init__(self, release: str) -> None:
        self.release = release
        self.book = SampleBook()
        self.clip: Any = None
        self.clip_pin: tuple[str, str] | None = None
        self.pending = self.dropped = 0
        self.metrics = recorder(True)
        self.lock = asyncio.Lock()

    def reconfigure(self, config: dict[str, Any]) -> None:
        """`{clip: {uri, digest} | None, repo, commit, cache_dir, metrics}`: a new CLIP pin is fetched, verified and loaded."""
        self.metrics = recorder(bool(config.get("metrics", True)))
        clip = config.get("clip")
        pin = (str(clip["uri"]), str(clip["digest"])) if clip else None
        if pin != self.clip_pin:
            self.clip = self._load(pin, config) if pin else None
            self.clip_pin = pin

    def _load(self, pin: tuple[str, str], config: dict[str, Any]) -> Any:
        from serving.artifacts import ModelCache, fetch
        from serving.model_cache import node_cache_dir
        from serving.pipeline import pick_device
        from serving.quality_models import load_clip

        repo = config.get("repo")
        fetched = fetch(pin[0], pin[1], ModelCache(node_cache_dir(config.get("cache_dir"))), repo=Path(repo) if repo else None,
                        commit=config.get("commit"), reverify=True)
        log.info("scorer %s: CLIP model %s verified and loaded from %s; next: scoring sampled outputs", self.release, pin[0],
                 fetched.path)
        return load_clip(fetched.path, pick_device())

    async def take(self, sample: Sample) -> None:
        """One sampled answer: `{request_id, version, prompt, negative_prompt, seed, params, png, at, review, score}`."""
        if self.pending >= MAX_PENDING:
            self.dropped += 1
            if self.dropped in (1, 10, 100) or self.dropped % 1000 == 0:
                log.warning("scorer %s: %d samples dropped, %d waiting to be scored; next: lower quality sample rates or give "
                            "the scorer more CPU", self.release, self.dropped, self.pending)
            return
        self.pending += 1
        try:
            async with self.lock:  # one scoring at a time: the model is not shared between threads
                score = await asyncio.to_thread(self._score, sample) if sample.get("score") and self.clip is not None else None
        finally:
            self.pending -= 1
        if score is not None:
            self.metrics["clip_score"].observe(score, tags={"release": self.release, "version": str(sample["version"])})
        png = sample.get("png") if sample.get("review") else None
        self.book.add({**{k: v for k, v in sample.items() if k not in ("png", "review", "score")}, "clip_score": score,
                       "png": png, "review": bool(sample.get("review"))})

    def _score(self, sample: Sample) -> float:
        import io

        from PIL import Image

        with Image.open(io.BytesIO(sample["png"])) as image:
            return round(float(self.clip.score([image.convert("RGB")], [str(sample["prompt"])])[0]), 4)

    def samples_since(self, epoch: str | None, after: int, limit: int) -> dict[str, Any]:
        return self.book.since(epoch, after, limit)
