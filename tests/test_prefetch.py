"""Prefetch beside the gate (controller/gate/prefetch.py, serving/prefetch.py): which nodes a model goes to, what the
job's log says node by node, that the prefetch starts before the gate and is read back after it (by the order of
events at the preparations' boundary, never by timing). The real job on Ray: tests/test_prefetch_e2e.py; on several
nodes, end to end: tests/test_cluster_e2e.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest

from bench.fakes import PassingGate
from checks.report import GateReport
from controller.apply.model_store import Placement, published_uri
from controller.gate.prefetch import MAX_ARGUMENT_BYTES, Prefetching, job_request, outcome_text
from controller.source.git_source import ReleaseSource
from controller.state.store import Store
from controller.tick.decide import Policy, decide
from controller.tick.observe import Observer
from controller.tick.prepare import Preparations
from serving.artifacts import ModelCache
from serving.manifest import manifest_of
from serving.prefetch import PREFIX, Target, targets
from serving.schema import ModelSpec
from tests.conftest import DEMO_MODEL, ReleaseRepo
from tests.emulators import _s3_bucket, s3_endpoint  # noqa: F401 (a fixture)
from tests.live import wait_for
from tests.test_reconciler import FakeServe

DIGEST = manifest_of(DEMO_MODEL).digest


def node(address: str, alive: bool = True, **resources: float) -> dict[str, Any]:
    return {"NodeID": f"id-{address}", "NodeManagerAddress": address, "Alive": alive, "Resources": resources}


TARGETS = [
    # (case, nodes as ray.nodes() lists them, cpus, gpus, the nodes chosen)
    ("a GPU replica: only the GPU nodes", [node("198.18.0.2", CPU=4), node("198.18.0.3", CPU=4, GPU=4)], 1, 1, ["198.18.0.3"]),
    ("a CPU replica: every node with the CPUs", [node("198.18.0.3", CPU=4, GPU=4), node("198.18.0.2", CPU=4)], 1, 0,
     ["198.18.0.2", "198.18.0.3"]),
    ("too few GPUs on the node", [node("198.18.0.3", CPU=4, GPU=1)], 1, 2, []),
    ("too few CPUs", [node("198.18.0.3", CPU=0.5, GPU=1)], 1, 1, []),
    ("fractional CPUs fit", [node("198.18.0.3", CPU=1)], 0.25, 0, ["198.18.0.3"]),
    ("a dead node", [node("198.18.0.3", alive=False, CPU=4, GPU=4)], 1, 1, []),
    ("no resources listed", [node("198.18.0.3")], 0.5, 0, []),
]


@pytest.mark.parametrize("case", TARGETS, ids=[c[0] for c in TARGETS])
def test_the_model_goes_to_the_alive_nodes_that_hold_one_replica(case):
    _, nodes, cpus, gpus, chosen = case
    assert targets(nodes, cpus, gpus) == [Target(f"id-{address}", address) for address in chosen]


def said(**fields: Any) -> str:
    return PREFIX + json.dumps(fields)


OUTCOMES = [
    # (case, the job's log, the log line's words)
    ("not started", "", "the job has not started yet"),
    ("no node fits", said(nodes=[]), "no alive node has the resources of one replica"),
    ("one fetched, one cached, one still going",
     "\n".join([said(nodes=["198.18.0.3", "198.18.0.4", "198.18.0.5"]), "some other output",
                said(node="198.18.0.4", cached=True, bytes=0, seconds=0.01),
                said(node="198.18.0.3", cached=False, bytes=1_200_000_000, seconds=9.13)]),
     "198.18.0.3 fetched 1200.0 MB in 9.1s, 198.18.0.4 already cached, 198.18.0.5 still fetching"),
    ("resumed", "\n".join([said(nodes=["198.18.0.3"]), said(node="198.18.0.3", cached=False, bytes=10_000_000, resumed=5_000_000,
                                                            seconds=1)]),
     "198.18.0.3 fetched 10.0 MB in 1.0s, 5.0 MB resumed"),
    ("a node failed", "\n".join([said(nodes=["198.18.0.3"]), said(node="198.18.0.3", error="TransferError: gone", seconds=3)]),
     "198.18.0.3 failed (TransferError: gone)"),
    ("a broken line is skipped", PREFIX + "{not json\n" + said(nodes=["198.18.0.3"]), "198.18.0.3 still fetching"),
    ("figures of another type read as 0", "\n".join([said(nodes=["198.18.0.3"]), said(node="198.18.0.3", bytes="x", seconds=None)]),
     "198.18.0.3 fetched 0.0 MB in 0.0s"),
]


@pytest.mark.parametrize("case", OUTCOMES, ids=[c[0] for c in OUTCOMES])
def test_what_the_prefetch_log_says_node_by_node(case):
    _, logs, text = case
    assert outcome_text(logs) == text


def test_the_job_carries_the_model_as_replicas_fetch_it_and_reserves_no_cpu():
    model = ModelSpec(uri="s3://models/sha256-ab it's", digest=DIGEST)
    body = job_request("diffops-prefetch-demo-v1-abc123", "/opt/venv/bin/python", model, 0.5, 1)
    assert body["entrypoint"].startswith("/opt/venv/bin/python -m serving.prefetch '")
    assert body["entrypoint_num_cpus"] == 0 and body["submission_id"] == "diffops-prefetch-demo-v1-abc123"
    import shlex

    argument = json.loads(shlex.split(body["entrypoint"])[-1])
    assert argument == {"uri": model.uri, "digest": DIGEST, "cpus": 0.5, "gpus": 1}
    with pytest.raises(ValueError, match="too long to prefetch"):
        job_request("j", "python", ModelSpec(uri="s3://b/" + "x" * MAX_ARGUMENT_BYTES, digest=DIGEST), 1, 0)


# --- the order of events beside the gate -------------------------------------------------------------------------------


class Events:
    def __init__(self) -> None:
        self.said: list[str] = []
        self.lock = threading.Lock()

    def add(self, event: str) -> None:
        with self.lock:
            self.said.append(event)


class RecordingPrefetch:
    def __init__(self, events: Events) -> None:
        self.events, self.models = events, []

    def start(self, release: str, version: str, model: ModelSpec, cpus: float, gpus: float) -> Prefetching | None:
        self.events.add("prefetch started")
        self.models.append((model, cpus, gpus))
        return Prefetching(release, version, model.digest, "job", 0.0)

    def report(self, prefetching: Prefetching) -> None:
        self.events.add("prefetch reported")


class RecordingGate(PassingGate):
    def __init__(self, events: Events) -> None:
        super().__init__()
        self.events = events

    def run(self, gate: dict[str, Any], cpus: float, gpus: float) -> GateReport:
        self.events.add("gate started")
        report = super().run(gate, cpus, gpus)
        self.events.add("gate ended")
        return report


def prepare_once(repo: ReleaseRepo, state_dir: Path, placement: Placement, events: Events):
    """Start the preparation of the repo's demo release on a fresh state and wait for its result."""
    source = ReleaseSource.open(repo.path)
    store = Store(state_dir / "state.db")
    prefetch = RecordingPrefetch(events)
    preparations = Preparations(source, store, RecordingGate(events), ModelCache(state_dir / "models"), str(state_dir / "models"),
                                state_dir / "gate", placement=placement, prefetch=prefetch)
    try:
        head = source.resolve().hexsha
        seen = Observer(source, FakeServe(), "ctl-a", Policy()).observe(head, source.snapshot(head), store.load(), set(), store,
                                                                          preparations)
        [(version, desired)] = decide(seen.tick).prepare
        preparations.start(version, desired)
        [(_, result)] = wait_for(preparations.collect, 120, "the preparation to finish", every=0.05)
        return result, prefetch
    finally:
        preparations.close()
        store.close()


def test_on_a_cluster_the_prefetch_starts_before_the_gate_and_is_read_back_after_it(model_repo: ReleaseRepo, tmp_path,
                                                                                     s3_endpoint):  # noqa: F811 (the fixture)
    _s3_bucket("published", s3_endpoint)
    events = Events()
    placement = Placement(store="s3://published/models", local=False)
    result, prefetch = prepare_once(model_repo, tmp_path, placement, events)
    assert result.ok, result.message
    assert events.said == ["prefetch started", "gate started", "gate ended", "prefetch reported"]
    [(model, cpus, gpus)] = prefetch.models
    assert model.uri == published_uri("s3://published/models", DIGEST) and model.digest == DIGEST  # as replicas fetch it
    assert (cpus, gpus) == (0.5, 0)


def test_no_prefetch_where_the_nodes_share_this_machines_cache(model_repo: ReleaseRepo, tmp_path):
    events = Events()
    result, _ = prepare_once(model_repo, tmp_path / "local", Placement(), events)  # a local cluster reads this cache
    assert result.ok and events.said == ["gate started", "gate ended"]
