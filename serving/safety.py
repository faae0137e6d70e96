"""The NSFW safety filter: the release's pinned safety checker on every image a replica draws, and its action.

Built by the model deployment (`serving.model_server`) when the release sets `quality.safety`; the checker is fetched
and verified through the node's model cache like the diffusion model, and loaded by `serving.quality_models`. The
pipeline runner (`serving.generator`) applies it to each batch, on the request path (the only quality work that is:
a blocked image must never leave the replica): `flag` serves the image and counts it, `blur` serves it blurred,
`block` withholds it (the router answers 451). Each flagged image counts in `diffops_nsfw_total{action}`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ACTIONS", "SafetyFilter", "load_filter"]

ACTIONS = ("flag", "blur", "block")


@dataclass(frozen=True)
class SafetyFilter:
    check: Callable[[list[Any]], list[bool]]  # images -> NSFW per image
    action: str
    blur: Callable[[Any], Any] = lambda image: image
    on_flagged: Callable[[int], None] = lambda count: None

    def apply(self, images: list[Any]) -> tuple[list[Any], list[bool]]:
        """The images to encode (the flagged ones blurred for `blur`) and the NSFW flag of each."""
        flags = [bool(flag) for flag in self.check(list(images))]
        if len(flags) != len(images):
            raise RuntimeError(f"the safety checker answered {len(flags)} flags for {len(images)} images")
        if any(flags):
            self.on_flagged(sum(flags))
        if self.action == "blur":
            return [self.blur(image) if flag else image for image, flag in zip(images, flags, strict=True)], flags
        return list(images), flags


def load_filter(model_dir: Path, action: str, device: str, on_flagged: Callable[[int], None] = lambda count: None) -> SafetyFilter:
    """The filter of a verified safety checker directory."""
    from serving.quality_models import blur, load_safety

    if action not in ACTIONS:
        raise ValueError(f"unknown safety action {action!r}; use one of {', '.join(ACTIONS)}")
    checker = load_safety(model_dir, device)
    return SafetyFilter(checker.check, action, blur, on_flagged)
