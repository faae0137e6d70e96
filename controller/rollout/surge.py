"""`strategy: auto` when blue/green does not fit: a surge-limited rollout. Pure.

The new version starts with as many replicas as fit; once they are ready the
router splits traffic by replica count; then, one replica at a time, it grows
while there is room, and the old version shrinks (never below one replica
while it is the only one serving) to make room. When the new version has all
its replicas it becomes stable; the old version is deleted, since there is no
room to keep it warm. Replica counts are recorded per version
(`VersionRecord.replicas`), so a restarted controller resumes mid-surge.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from controller.apply.serve_config import router_weights
from controller.rollout import canary
from controller.state.records import Event, ObservedApp, VersionRecord, with_phase


def replicas_of(version: VersionRecord | None) -> int:
    if version is None or version.status == "retiring":
        return 0
    return version.replicas if version.replicas is not None else version.spec["replicas"]["count"]


def fitting(spec: dict[str, Any], free: dict[str, float] | None, limit: int) -> int:
    """How many replicas of `spec` fit in `free`, at most `limit`."""
    if free is None:
        return limit
    counts = [limit]
    for resource, per_replica in (("GPU", spec["replicas"]["gpus"]), ("CPU", spec["replicas"]["cpus"])):
        if per_replica > 0:
            counts.append(int((free.get(resource, 0.0) + 1e-9) // per_replica))
    return max(0, min(counts))


class Surge:
    """One tick of a surge-limited rollout; mutates the rollout `Step` it is given."""

    def __init__(self, out: Any, canary: VersionRecord, stable: VersionRecord | None, now: float):
        self.out, self.canary, self.stable, self.now = out, canary, stable, now

    def put(self, version: VersionRecord) -> None:
        self.out.versions = [version if v.version == version.version else v for v in self.out.versions]
        if version.version == self.canary.version:
            self.canary = version
        elif self.stable is not None and version.version == self.stable.version:
            self.stable = version

    def note(self, kind: str, message: str) -> None:
        self.out.events.append(Event(self.canary.release, kind, message, self.canary.version))

    def say(self, message: str) -> None:
        self.out.release = with_phase(self.out.release, "Progressing", f"{self.canary.version} (auto, surge-limited): {message}", self.now)

    def make_room(self, why: str) -> bool:
        """Shrink the old version by one replica, if it keeps at least one."""
        count = replicas_of(self.stable)
        if self.stable is None or count <= 1:
            self.say(f"{why}; the old version {self.stable.version} is down to 1 replica and cannot shrink without downtime")
            return False
        self.put(replace(self.stable, replicas=count - 1))
        self.note("surge", f"{self.stable.version} shrinks to {count - 1} replica(s) to make room for {self.canary.version} ({why})")
        self.say(f"making room: {self.stable.version} down to {count - 1} replica(s)")
        return True

    def start(self, free: dict[str, float] | None) -> None:
        """Start the new version with what fits, or shrink the old one first."""
        target = self.canary.spec["replicas"]["count"]
        count = fitting(self.canary.spec, free, target)
        if count == 0:
            self.make_room("no room for one new replica")
            return
        self.put(replace(self.canary, status="starting", created_at=self.now, replicas=count))
        beside = f" beside {self.stable.version}" if self.stable else ""
        self.note("surge", f"blue/green does not fit; starting {count}/{target} replica(s) of {self.canary.version}{beside}")
        self.say(f"starting {count}/{target} replica(s)")

    def retire_old(self) -> None:
        """The old version leaves: weight 0 now, its app deleted once in-flight requests finish; no warm standby."""
        if self.stable is not None and self.stable.status != "retiring":
            self.put(replace(canary.retire(self.stable, self.now), role="standby"))

    def weigh(self) -> None:
        new, old = replicas_of(self.canary), replicas_of(self.stable)
        weight = round(100 * new / (new + old)) if new + old else 100
        self.put(replace(self.canary, weight=weight))
        if self.stable is not None:
            self.put(replace(self.stable, weight=100 - weight))

    def advance(self, app: ObservedApp | None, router: ObservedApp | None, free: dict[str, float] | None) -> str:
        """Returns 'promote' once the new version runs all its replicas and carries all traffic, else 'surging'."""
        target, current = self.canary.spec["replicas"]["count"], replicas_of(self.canary)
        if self.canary.status == "starting":
            if app is None or app.running < current:
                self.say(f"{app.running if app else 0}/{current} new replica(s) running")
                return "surging"
            self.put(replace(self.canary, status="ready", ready_at=self.now))
            self.weigh()
            self.note("surge", f"{current}/{target} replica(s) of {self.canary.version} ready; traffic by replicas: {self.canary.weight}% new")
            return "surging"
        if router is None or router.weights != router_weights(self.out.versions):
            self.say(f"waiting for the router to take {self.canary.weight}% new")
            return "surging"
        if current >= target and self.canary.weight == 100:
            return "promote"
        if current >= target:
            self.retire_old()
            self.weigh()
            return "surging"
        if fitting(self.canary.spec, free, 1) == 1:
            self.put(replace(self.canary, status="starting", replicas=current + 1))
            self.say(f"growing to {current + 1}/{target} replica(s)")
            return "surging"
        if replicas_of(self.stable) > 1:
            self.make_room("no room to grow")
            self.weigh()
        elif self.stable is not None and self.stable.status != "retiring":
            self.note("surge", f"{self.stable.version} stops serving so {self.canary.version} can grow; it is deleted once in-flight requests finish")
            self.retire_old()
            self.weigh()
        else:
            self.say("waiting for the old version's resources to free up")
        return "surging"
