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

from controller.apply.serve_config import router_weights
from controller.rollout import canary
from controller.rollout.capacity import Resources, effective_replicas, fitting, per_replica
from controller.rollout.outcomes import Continue, Promote, StepResult
from controller.state.records import Event, ObservedApp, VersionRecord, with_phase

__all__ = ["Surge", "serving_replicas"]


def serving_replicas(version: VersionRecord | None) -> int:
    """Replicas a version serves with in the surge's traffic split: none once it is retiring (or absent)."""
    if version is None or version.status == "retiring":
        return 0
    return effective_replicas(version)


class Surge:
    """One tick of a surge-limited rollout; updates the rollout `StepResult` it is given."""

    def __init__(self, out: StepResult, canary: VersionRecord, stable: VersionRecord | None, now: float):
        self.out, self.canary, self.stable, self.now = out, canary, stable, now
        self.need = per_replica(canary.spec)
        self.target = canary.spec.replicas.count

    def make_room(self, why: str) -> bool:
        """Shrink the old version by one replica, if it keeps at least one."""
        if self.stable is None:
            self._say(f"{why}; there is no old version to shrink")
            return False
        count = serving_replicas(self.stable)
        if count <= 1:
            self._say(f"{why}; the old version {self.stable.version} is down to 1 replica and cannot shrink without downtime")
            return False
        self._put(replace(self.stable, replicas=count - 1))
        self._note("surge", f"{self.stable.version} shrinks to {count - 1} replica(s) to make room for {self.canary.version} ({why})")
        self._say(f"making room: {self.stable.version} down to {count - 1} replica(s)")
        return True

    def start(self, free: Resources | None) -> None:
        """Start the new version with what fits, or shrink the old one first."""
        count = fitting(self.need, free, self.target)
        if count == 0:
            self.make_room("no room for one new replica")
            return
        self._put(replace(self.canary, status="starting", created_at=self.now, replicas=count))
        beside = f" beside {self.stable.version}" if self.stable else ""
        self._note("surge", f"blue/green does not fit; starting {count}/{self.target} replica(s) of {self.canary.version}{beside}")
        self._say(f"starting {count}/{self.target} replica(s)")

    def advance(self, app: ObservedApp | None, router: ObservedApp | None, free: Resources | None) -> Continue | Promote:
        """`Promote` once the new version runs all its replicas and carries all traffic, else `Continue`."""
        target, current = self.target, serving_replicas(self.canary)
        if self.canary.status == "starting":
            if app is None or app.running < current:
                self._say(f"{app.running if app else 0}/{current} new replica(s) running")
                return Continue()
            self._put(replace(self.canary, status="ready", ready_at=self.now))
            self._weigh()
            self._note("surge", f"{current}/{target} replica(s) of {self.canary.version} ready; "
                                f"traffic by replicas: {self.canary.weight}% new")
            return Continue()
        if router is None or router.weights != router_weights(self.out.versions):
            self._say(f"waiting for the router to take {self.canary.weight}% new")
            return Continue()
        if current >= target and self.canary.weight == 100:
            return Promote()
        if current >= target:
            self._retire_old()
            self._weigh()
            return Continue()
        if fitting(self.need, free, 1) == 1:
            self._put(replace(self.canary, status="starting", replicas=current + 1))
            self._say(f"growing to {current + 1}/{target} replica(s)")
            return Continue()
        if serving_replicas(self.stable) > 1:
            self.make_room("no room to grow")
            self._weigh()
        elif self.stable is not None and self.stable.status != "retiring":
            self._note("surge", f"{self.stable.version} stops serving so {self.canary.version} can grow; "
                                "it is deleted once in-flight requests finish")
            self._retire_old()
            self._weigh()
        else:
            self._say("waiting for the old version's resources to free up")
        return Continue()

    def _put(self, version: VersionRecord) -> None:
        self.out.versions = [version if v.version == version.version else v for v in self.out.versions]
        if version.version == self.canary.version:
            self.canary = version
        elif self.stable is not None and version.version == self.stable.version:
            self.stable = version

    def _note(self, kind: str, message: str) -> None:
        self.out.events.append(Event(self.canary.release, kind, message, self.canary.version))

    def _say(self, message: str) -> None:
        assert self.out.release is not None  # a surge runs for a release that exists
        self.out.release = with_phase(self.out.release, "Progressing", f"{self.canary.version} (auto, surge-limited): {message}", self.now)

    def _retire_old(self) -> None:
        """The old version leaves: weight 0 now, its app deleted once in-flight requests finish; no warm standby."""
        if self.stable is not None and self.stable.status != "retiring":
            self._put(replace(canary.retire(self.stable, self.now), role="standby"))

    def _weigh(self) -> None:
        new, old = serving_replicas(self.canary), serving_replicas(self.stable)
        weight = round(100 * new / (new + old)) if new + old else 100
        self._put(replace(self.canary, weight=weight))
        if self.stable is not None:
            self._put(replace(self.stable, weight=100 - weight))
