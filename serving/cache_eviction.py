"""Pure decisions for keeping the model cache bounded: what to evict, which scratch dirs are litter.

Sits under `serving.model_cache`, which scans the disk, takes the locks and
removes what these functions name. Nothing here touches the file system.

- `plan_eviction`: least-recently-used entries first, never one in `keep`,
  until the cache fits its cap; when the kept entries alone exceed the cap the
  plan says so and keeps them.
- `classify_scratch`: a name under the cache root (`.staging-<hex>-<tag>`,
  `.hub-<hex>-<tag>`, `.trash-<hex>-<tag>`, `.partial-<hex>`) → remove now,
  remove if nobody holds that digest's lock, remove if old, or not ours.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

__all__ = ["CacheEntry", "EvictionPlan", "HEX64", "STALE_AFTER_S", "Scratch", "ScratchAction", "classify_scratch", "plan_eviction"]

HEX64 = re.compile(r"[0-9a-f]{64}")
SCRATCH = re.compile(r"\.(staging|hub|trash)-([0-9a-f]+)-[0-9a-z]+")
PARTIAL = re.compile(r"\.partial-([0-9a-f]{64})")
STALE_AFTER_S = 6 * 3600  # scratch we cannot lock (an older name format), or a partial download nobody resumed: litter after this long


@dataclass(frozen=True)
class CacheEntry:
    digest: str  # "sha256:<hex>"
    bytes: int
    last_used: float  # unix seconds


@dataclass(frozen=True)
class EvictionPlan:
    victims: tuple[CacheEntry, ...]  # in eviction order, least recently used first
    total_bytes: int  # before eviction
    after_bytes: int  # after evicting every victim
    kept_bytes: int  # held by entries in `keep`
    over_cap: bool  # still above the cap after the plan: only kept entries are left to evict


def plan_eviction(entries: Iterable[CacheEntry], keep: Iterable[str], max_bytes: int) -> EvictionPlan:
    """Victims, least recently used first, until the cache fits `max_bytes`; never an entry in `keep`."""
    entries, keep = list(entries), set(keep)
    total = sum(entry.bytes for entry in entries)
    kept = sum(entry.bytes for entry in entries if entry.digest in keep)
    candidates = sorted((e for e in entries if e.digest not in keep), key=lambda e: (e.last_used, e.digest))
    victims, after = [], total
    for entry in candidates:
        if after <= max_bytes:
            break
        victims.append(entry)
        after -= entry.bytes
    return EvictionPlan(tuple(victims), total, after, kept, after > max_bytes)


class ScratchAction(Enum):
    REMOVE = "remove"  # trash (already moved out of the cache) or old scratch of an older name format
    REMOVE_IF_UNLOCKED = "remove if unlocked"  # a fetch's scratch: in progress while its digest's lock is held
    KEEP = "keep"  # not ours, or too young to judge


@dataclass(frozen=True)
class Scratch:
    action: ScratchAction
    digest: str | None = None  # whose lock guards it (REMOVE_IF_UNLOCKED)


def classify_scratch(name: str, age_s: float) -> Scratch:
    """What to do with one name found directly under the cache root."""
    if (partial := PARTIAL.fullmatch(name)) is not None:  # resumable while young; its fetch holds the digest's lock
        return Scratch(ScratchAction.REMOVE_IF_UNLOCKED, "sha256:" + partial.group(1)) if age_s > STALE_AFTER_S \
            else Scratch(ScratchAction.KEEP)
    match = SCRATCH.fullmatch(name)
    if match is None:
        return Scratch(ScratchAction.KEEP)
    kind, hex_ = match.groups()
    if kind == "trash":
        return Scratch(ScratchAction.REMOVE)
    if HEX64.fullmatch(hex_):
        return Scratch(ScratchAction.REMOVE_IF_UNLOCKED, "sha256:" + hex_)
    return Scratch(ScratchAction.REMOVE if age_s > STALE_AFTER_S else ScratchAction.KEEP)
