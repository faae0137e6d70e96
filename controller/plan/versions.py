"""What a release field change costs, and the version id it yields.

Pure; used by `controller.plan.changes`. One table says which fields make a new version
(a new Ray Serve app that goes through the gate and the rollout), which apply
in place without restarts (`light`), and which only steer the controller
(`policy`). The version id hashes exactly the `version` fields, so the two can
never disagree. A field missing from the table counts as `version`: unknown
changes are treated as the expensive, safe kind. A field added after releases
already had version ids (`HASHED_ONLY_WHEN_SET`) counts only when it differs
from its default, so upgrading diffops does not re-version every release.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any, Literal

from controller.parse.release import Release

__all__ = ["COST_ORDER", "FIELD_CLASSES", "HASHED_ONLY_WHEN_SET", "ChangeClass", "field_class", "flatten", "leaves", "version_id"]

ChangeClass = Literal["version", "light", "policy"]

FIELD_CLASSES: tuple[tuple[str, ChangeClass], ...] = (
    ("spec.model.digest", "version"),
    ("spec.model.dtype", "version"),
    ("spec.model.uri", "policy"),  # same digest, new location: running replicas keep what they loaded
    ("spec.generation", "version"),
    ("spec.runtime", "version"),
    # what the gate accepts as proof of the image: a version judged under one policy is a different version under the
    # other, so a changed policy is gated again (the gate's cached results are keyed by version and checks only)
    ("spec.runtime.image_policy", "version"),
    ("spec.replicas.gpus", "version"),
    ("spec.replicas.cpus", "version"),
    ("spec.replicas.count", "light"),
    ("spec.replicas.max_batch_size", "light"),
    ("spec.replicas.batch_wait_timeout_s", "light"),
    ("spec.replicas.max_ongoing_requests", "light"),
    ("spec.replicas.max_queued_requests", "light"),
    ("spec.limits", "light"),
    ("spec.ingress", "light"),
    ("spec.rollout", "policy"),
    ("spec.checks", "policy"),
    ("spec.cost", "policy"),
    ("spec.quality.safety", "version"),  # replicas check every image with it: a new checker is a new version, gated
    ("spec.quality.clip", "light"),  # the release's scorer (beside its routers) reloads it in place
    ("spec.quality.review", "light"),
    ("spec.faults", "version"),  # a drill makes its own version, so the stable one stays healthy
)
HASHED_ONLY_WHEN_SET: dict[str, Any] = {"spec.runtime.image_policy": "verify", "spec.quality.safety": None}
COST_ORDER: dict[ChangeClass, int] = {"policy": 0, "light": 1, "version": 2}


def field_class(path: str) -> ChangeClass:
    """The class of a dotted field path: the longest matching prefix in the table."""
    best: tuple[int, ChangeClass] = (-1, "version")
    for prefix, change_class in FIELD_CLASSES:
        if (path == prefix or path.startswith(prefix + ".")) and len(prefix) > best[0]:
            best = (len(prefix), change_class)
    return best[1]


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of nested dicts/lists as {dotted path: value}; empty containers are leaves."""
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, child in items:
        out.update(flatten(child, f"{prefix}.{key}" if prefix else str(key)))
    return out


def leaves(release: Release) -> dict[str, Any]:
    """Every field of a release as {dotted path: value}, as the field-class table and `diffops diff` name them."""
    return flatten(release.model_dump(mode="json"))


def version_id(release: Release) -> str:
    """10 hex chars of sha256 over every `version`-class field (model digest, runtime, generation, resources)."""
    identity = {path: value for path, value in leaves(release).items()
                if field_class(path) == "version" and HASHED_ONLY_WHEN_SET.get(path, object()) != value}
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]
