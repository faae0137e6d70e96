"""Which answered generations the router sends to the release's scorer, and what a sample carries. Pure.

The router (`serving.router`) calls `draw` once per answered generation with the release's rates from its
`user_config` (`quality.review.sample_rate`, `quality.clip.sample_rate`): a sample for review carries the image to
keep; a sample for scoring is scored with CLIP by the scorer (`serving.scorer`). One draw decides both, so a
reviewed sample is also scored whenever the CLIP rate is at least the review rate.
"""

from __future__ import annotations

import random
import time
from typing import Any

__all__ = ["draw", "sample"]


def draw(rng: random.Random, review_rate: float, clip_rate: float) -> tuple[bool, bool]:
    """(kept for review, scored with CLIP) for one answer."""
    if review_rate <= 0 and clip_rate <= 0:
        return False, False
    roll = rng.random()
    return roll < review_rate, roll < clip_rate


def sample(request_id: str, version: str, params: dict[str, Any], result: dict[str, Any], review: bool, score: bool,
           at: float | None = None) -> dict[str, Any]:
    """What the scorer gets for one answer: its first image, the prompt it was drawn for, the parameters it drew with."""
    answered = dict(result.get("params") or {})
    return {"request_id": request_id, "version": version, "prompt": str(params.get("prompt") or ""),
            "negative_prompt": params.get("negative_prompt"), "seed": answered.get("seed"),
            "params": {k: v for k, v in answered.items() if k != "seed"}, "png": result["images"][0],
            "nsfw": bool((result.get("nsfw") or [False])[0]), "at": time.time() if at is None else at, "review": review, "score": score}
