"""Quality check: the version draws the release's prompt set, and the pinned quality models judge the images.

Run by the gate (`checks.gate`) after the performance check when `checks.quality` is set: every prompt of the
prompt set (a text file in the repo, read by the controller at the checks commit, at most `MAX_PROMPTS` prompts in
`MAX_PROMPT_FILE_BYTES`) with every seed, through the same pipeline runner serving uses. The mean CLIP score against
`min_clip_score`, the share of images the safety checker flags against `max_nsfw_rate`, and the Frechet distance of
the images' CLIP features to the previous gated version's on the same prompts and seeds against `max_distance` (a
regression distance on the pinned CLIP, not the published FID). The features travel back as an artifact
(`FEATURES_NAME`) for the next version's gate.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from checks.report import CheckResult
from serving.generator import PipelineRunner, resolve

__all__ = ["FEATURES_NAME", "MAX_PROMPTS", "SAMPLE_ARTIFACTS", "MAX_PROMPT_FILE_BYTES", "PromptSetError", "parse_prompts", "run"]

MAX_PROMPT_FILE_BYTES = 64 * 1024
MAX_PROMPTS = 64
MAX_PROMPT_CHARS = 2000
FEATURES_NAME = "quality-features.json"
BATCH = 8  # images per pipeline and scorer call
SAMPLE_ARTIFACTS = 4  # the first images of the prompt set travel back with the report (tracking logs them)


class PromptSetError(ValueError):
    """A prompt set the check will not use; the message names the cause and what to do."""


def parse_prompts(text: str | bytes, max_prompts: int = MAX_PROMPTS) -> list[str]:
    """Prompts from the prompt set file: one per line, blank lines and `#` comments skipped (an experiment's prompts file
    has the same format with its own cap on the count)."""
    data = text.encode() if isinstance(text, str) else text
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise PromptSetError(f"is {len(data):,} bytes; the cap is {MAX_PROMPT_FILE_BYTES:,} bytes (64 KiB)")
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise PromptSetError(f"is not UTF-8 text ({err}); save it as UTF-8") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not prompts:
        raise PromptSetError("holds no prompt; write one prompt per line")
    if len(prompts) > max_prompts:
        raise PromptSetError(f"holds {len(prompts)} prompts; the cap is {max_prompts}")
    long = [n for n, p in enumerate(prompts, 1) if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise PromptSetError(f"prompt {long[0]} is longer than {MAX_PROMPT_CHARS} characters")
    return prompts


def _key(prompts: list[str], seeds: list[int], generation: dict[str, Any]) -> str:
    """What two feature sets must share to be compared: the prompts, seeds and drawing size."""
    shape = {k: generation.get(k) for k in ("width", "height")}
    return hashlib.sha256(json.dumps([prompts, seeds, shape], sort_keys=True).encode()).hexdigest()[:16]


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _draw(runner: PipelineRunner, requests: list[dict[str, Any]]) -> list[Image.Image]:
    images = []
    for start in range(0, len(requests), BATCH):
        for result in runner.run(requests[start:start + BATCH]):
            with Image.open(io.BytesIO(result["images"][0])) as image:
                images.append(image.convert("RGB"))
    return images


def run(runner: PipelineRunner, check: dict[str, Any] | None, generation: dict[str, Any], prompt_set: str | bytes | None,
        clip: Any = None, safety: Any = None, baseline: dict[str, Any] | None = None,
        distance: Callable[[Any, Any], float] | None = None) -> tuple[CheckResult, dict[str, str]]:
    """The check's result and artifacts. `clip`: a `serving.quality_models.ClipScorer`; `safety`: a `SafetyChecker`;
    `baseline`: the previous version's features artifact (decoded JSON); `distance`: the Frechet distance."""
    if check is None:
        return CheckResult("quality", "skipped", "no quality check configured"), {}
    path = check["prompts"]
    if prompt_set is None:
        return CheckResult("quality", "failed", f"prompt set {path} not found in the repo at the checks commit; commit it"), {}
    try:
        prompts = parse_prompts(prompt_set)
    except PromptSetError as err:
        return CheckResult("quality", "failed", f"prompt set {path} {err}"), {}
    seeds = [int(seed) for seed in check.get("seeds") or [0]]
    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    images = _draw(runner, [resolve({"prompt": prompt, "seed": seed}, generation) for prompt, seed in pairs])
    texts = [prompt for prompt, _ in pairs]
    figures: dict[str, Any] = {"images": len(images), "prompts": len(prompts), "seeds": len(seeds)}
    thresholds = {k: check.get(k) for k in ("min_clip_score", "max_nsfw_rate", "max_distance") if check.get(k) is not None}
    reasons, notes = [], []
    artifacts = {f"quality-sample-{i}.png": _png_b64(image) for i, image in enumerate(images[:SAMPLE_ARTIFACTS])}
    if clip is not None:
        scores = [float(s) for start in range(0, len(images), BATCH)
                  for s in clip.score(images[start:start + BATCH], texts[start:start + BATCH])]
        mean = sum(scores) / len(scores)
        figures.update(mean_clip_score=round(mean, 3), lowest_clip_score=round(min(scores), 3))
        if check.get("min_clip_score") is not None and mean < check["min_clip_score"]:
            reasons.append(f"mean CLIP score {mean:.2f} < {check['min_clip_score']} over {len(images)} images "
                           f"({len(prompts)} prompts x {len(seeds)} seeds; lowest {min(scores):.2f})")
        features = clip.image_features(images)
        key = _key(prompts, seeds, generation)
        artifacts[FEATURES_NAME] = base64.b64encode(json.dumps({"key": key, "features": features.tolist()}).encode()).decode()
        if check.get("max_distance") is not None:
            if baseline is None or baseline.get("key") != key or distance is None:
                notes.append("distance not judged: no earlier version's images on this prompt set")
            else:
                gap = float(distance(features, np.asarray(baseline["features"], dtype=np.float64)))
                figures["distance"] = round(gap, 4)
                if gap > check["max_distance"]:
                    reasons.append(f"Frechet distance to the previous version's images {gap:.3f} > {check['max_distance']} "
                                   "(CLIP image features, same prompts and seeds)")
    if safety is not None:
        flags = [flag for start in range(0, len(images), BATCH) for flag in safety.check(images[start:start + BATCH])]
        rate = sum(flags) / len(flags)
        figures.update(nsfw_rate=round(rate, 4), nsfw_images=sum(flags))
        if check.get("max_nsfw_rate") is not None and rate > check["max_nsfw_rate"]:
            reasons.append(f"NSFW rate {rate:.2f} > {check['max_nsfw_rate']} ({sum(flags)} of {len(flags)} images flagged)")
    if reasons:
        return CheckResult("quality", "failed", "; ".join(reasons), figures, thresholds), artifacts
    said = ", ".join(f"{k} {v}" for k, v in figures.items() if k in ("mean_clip_score", "nsfw_rate", "distance"))
    message = f"{len(images)} images ({len(prompts)} prompts x {len(seeds)} seeds): {said or 'drawn'}"
    return CheckResult("quality", "passed", "; ".join([message, *notes]), figures, thresholds), artifacts
