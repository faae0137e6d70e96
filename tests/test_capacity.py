"""Capacity arithmetic as tables, each expected value worked out by hand from the resources in the row."""

from __future__ import annotations

import pytest

from controller.rollout.capacity import PerReplica, effective_replicas, fitting, free_resources, held, per_replica, shortfall
from controller.state.records import VersionRecord
from tests.conftest import make_release, respec


def version(name="v1", release="demo", count=2, cpus=0.5, gpus=1.0, replicas=None, status="ready", routers=1) -> VersionRecord:
    spec = respec(make_release().spec, replicas={"count": count, "cpus": cpus, "gpus": gpus}, ingress={"replicas": routers})
    return VersionRecord(release, name, "stable", 100, status, "c1", spec, 0.0, replicas=replicas)


def test_per_replica_reads_the_recorded_spec():
    assert per_replica(respec(make_release().spec, replicas={"count": 3, "cpus": 2.0, "gpus": 0.0})) == PerReplica(cpus=2.0, gpus=0.0)


@pytest.mark.parametrize("case, record, expected", [
    ("the spec's count", version(count=3), 3),
    ("a surge's own count wins", version(count=3, replicas=1), 1),
    ("a surge down to zero", version(count=3, replicas=0), 0),
])
def test_effective_replicas(case, record, expected):
    assert effective_replicas(record) == expected


GPU_REPLICA = PerReplica(cpus=0.5, gpus=1.0)
CPU_REPLICA = PerReplica(cpus=1.5, gpus=0.0)

FITTING = [
    ("unknown free resources: the limit", GPU_REPLICA, None, 4, 4),
    ("2 GPUs / 1 = 2; 8 CPUs / 0.5 = 16", GPU_REPLICA, {"GPU": 2.0, "CPU": 8.0}, 4, 2),
    ("never more than the limit", GPU_REPLICA, {"GPU": 8.0, "CPU": 8.0}, 3, 3),
    ("CPUs short first: 0.75 / 0.5 = 1", GPU_REPLICA, {"GPU": 4.0, "CPU": 0.75}, 4, 1),
    ("no GPU reported: none fit", GPU_REPLICA, {"CPU": 8.0}, 4, 0),
    ("no GPUs asked: GPUs do not limit; 3 CPUs / 1.5 = 2", CPU_REPLICA, {"CPU": 3.0}, 4, 2),
    ("0.3 CPUs hold 3 replicas of 0.1 despite float rounding", PerReplica(cpus=0.1, gpus=0.0), {"CPU": 0.3}, 5, 3),
    ("nothing asked: the limit", PerReplica(cpus=0.0, gpus=0.0), {}, 2, 2),
]


@pytest.mark.parametrize("case, need, free, limit, expected", FITTING, ids=[c[0] for c in FITTING])
def test_fitting(case, need, free, limit, expected):
    assert fitting(need, free, limit) == expected


SHORTFALL = [
    ("unknown free resources never block", GPU_REPLICA, 2, None, None),
    ("exactly enough", GPU_REPLICA, 2, {"GPU": 2.0, "CPU": 1.0}, None),
    ("GPUs short: 3 x 1 = 3 > 2", GPU_REPLICA, 3, {"GPU": 2.0, "CPU": 8.0}, "needs 3 GPUs, 2 free"),
    ("every resource short, GPUs first: 2 GPUs > 1, 2 x 0.5 = 1 CPU > 0.5", GPU_REPLICA, 2, {"GPU": 1.0, "CPU": 0.5},
     "needs 2 GPUs, 1 free; needs 1 CPU, 0.5 free"),
    ("one GPU is singular", GPU_REPLICA, 1, {"GPU": 0.0, "CPU": 4.0}, "needs 1 GPU, 0 free"),
    ("a resource not reported is not free", CPU_REPLICA, 1, {"GPU": 4.0}, "needs 1.5 CPUs, 0 free"),
]


@pytest.mark.parametrize("case, need, replicas, free, expected", SHORTFALL, ids=[c[0] for c in SHORTFALL])
def test_shortfall(case, need, replicas, free, expected):
    assert shortfall(need, replicas, free) == expected


def test_held_counts_live_replicas_routers_and_gate_jobs():
    live = [version("v1", count=2, cpus=0.5, gpus=1.0),  # 1 CPU, 2 GPUs
            version("v2", count=3, cpus=0.5, gpus=1.0, replicas=1, status="starting", routers=3),  # a surge: 0.5 CPU, 1 GPU
            version("v9", release="other", count=1, cpus=2.0, gpus=0.0, status="retiring")]  # holds until deleted: 2 CPUs
    preparing = [version("v3", count=4, cpus=1.0, gpus=1.0)]  # a gate job asks one replica: 1 CPU, 1 GPU
    # CPU: 1 + 0.5 + 2 + 1 + (3 routers of demo, the most any of its versions asks, + 1 of other) x 0.05 = 4.7;
    # GPU: 2 + 1 + 0 + 1 = 4
    assert held(live, preparing, router_cpus=0.05) == pytest.approx({"CPU": 4.7, "GPU": 4.0})
    assert held([], [], router_cpus=0.05) == {"CPU": 0.0, "GPU": 0.0}


FREE = [
    ("Ray's report when it sees more use than we hold", {"CPU": (3.0, 8.0), "GPU": (1.0, 2.0)}, {"CPU": 1.0, "GPU": 0.0},
     {"CPU": 5.0, "GPU": 1.0}),
    ("what we hold when Ray's report lags behind", {"CPU": (0.0, 8.0), "GPU": (0.0, 2.0)}, {"CPU": 2.5, "GPU": 2.0},
     {"CPU": 5.5, "GPU": 0.0}),
    ("never below zero", {"GPU": (0.0, 2.0)}, {"GPU": 3.0}, {"GPU": 0.0}),
    ("only resources Ray reports", {"CPU": (1.0, 4.0)}, {"CPU": 0.0, "GPU": 1.0}, {"CPU": 3.0}),
]


@pytest.mark.parametrize("case, usage, ours, expected", FREE, ids=[c[0] for c in FREE])
def test_free_resources(case, usage, ours, expected):
    assert free_resources(usage, ours) == expected
