"""Capacity arithmetic: how many replicas a version runs, what it needs, what is free, what is short. Pure.

Asked before a version's checks run and before its replicas start
(`controller.rollout.steps`: blue/green waits until every replica fits), by
the surge-limited rollout (`controller.rollout.surge`: grow while one more
replica fits), by the renderer (`controller.apply.serve_config`: the replica
count a version app runs) and by the reconciler, which turns Ray's resource
report into free resources (`free_resources`). Resources are Ray's logical
resource names and amounts (`{"CPU": 3.5, "GPU": 1.0}`); a resource Ray does
not report is not free.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.parse.release import Spec
from controller.state.records import VersionRecord

__all__ = ["PerReplica", "Resources", "Usage", "effective_replicas", "fitting", "free_resources", "held", "per_replica", "shortfall"]

Resources = dict[str, float]  # Ray resource name -> amount
Usage = Mapping[str, tuple[float, float]]  # Ray resource name -> (used, total), as Ray's autoscaler reports it
_EPSILON = 1e-9  # 3 x 0.1 CPUs fit in 0.3 free

@dataclass(frozen=True)
class PerReplica:
    """What one replica of a version asks Ray for."""

    cpus: float
    gpus: float

    def amounts(self) -> tuple[tuple[str, float], ...]:
        """(Ray resource name, amount) pairs, GPUs first: the scarce resource is named first."""
        return ("GPU", self.gpus), ("CPU", self.cpus)

def per_replica(spec: Spec) -> PerReplica:
    """One replica's resources, from a version's recorded spec (`spec.replicas`)."""
    return PerReplica(cpus=spec.replicas.cpus, gpus=spec.replicas.gpus)

def effective_replicas(version: VersionRecord) -> int:
    """The replicas a version runs: its own count mid-surge (`VersionRecord.replicas`), else `spec.replicas.count`."""
    return version.replicas if version.replicas is not None else version.spec.replicas.count

def fitting(need: PerReplica, free: Mapping[str, float] | None, limit: int) -> int:
    """How many replicas needing `need` fit in `free`, at most `limit`; `free` unknown (None): `limit`."""
    if free is None:
        return limit
    counts = [limit]
    for resource, amount in need.amounts():
        if amount > 0:
            counts.append(int((free.get(resource, 0.0) + _EPSILON) // amount))
    return max(0, min(counts))

def shortfall(need: PerReplica, replicas: int, free: Mapping[str, float] | None) -> str | None:
    """Why `replicas` replicas do not fit in `free`, naming every resource short; None when they fit or `free` is unknown."""
    if free is None:
        return None
    short = []
    for resource, amount in need.amounts():
        wanted, have = replicas * amount, free.get(resource, 0.0)
        if wanted > have + _EPSILON:
            short.append(f"needs {wanted:g} {resource}{'s' * (wanted != 1)}, {have:g} free")
    return "; ".join(short) or None

def held(live: Iterable[VersionRecord], preparing: Iterable[VersionRecord], router_cpus: float) -> Resources:
    """What our own apps and gate jobs hold now: every live version app's replicas (retiring ones too, until deleted),
    the routers of each release with a live version (`spec.ingress.replicas`), and one replica's resources per gate
    job being prepared."""
    total: Resources = {"CPU": 0.0, "GPU": 0.0}
    routers: dict[str, int] = {}
    for version in live:
        routers[version.release] = max(routers.get(version.release, 0), version.spec.ingress.replicas)
        need, count = per_replica(version.spec), effective_replicas(version)
        total["CPU"] += count * need.cpus
        total["GPU"] += count * need.gpus
    for version in preparing:
        need = per_replica(version.spec)
        total["CPU"] += need.cpus
        total["GPU"] += need.gpus
    total["CPU"] += router_cpus * sum(routers.values())
    return total

def free_resources(usage: Usage, ours: Mapping[str, float]) -> Resources:
    """Free resources: each total minus the larger of Ray's reported use (seconds old) and what we know we hold
    (`held`), so a lagging report never lets a replica be overcommitted; never below zero."""
    return {name: max(0.0, total - max(used, ours.get(name, 0.0))) for name, (used, total) in usage.items()}
