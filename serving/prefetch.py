"""Prefetch a model into the node-local cache of every node that can run its replicas: the Ray job the controller
starts beside a version's gate (`controller.gate.prefetch`), so replicas that start after the gate find it cached.

`python -m serving.prefetch '{"uri": ..., "digest": ..., "cpus": ..., "gpus": ...}'` connects to the cluster it runs
in, picks the alive nodes whose resources hold one replica (`targets`), and fetches the model on each: one task
pinned to the node, reserving no CPU, through `serving.artifacts.fetch` into the node's cache (`node_cache_dir`, the
one its replicas read), every byte verified. A node already holding it is a cache hit; a replica or gate job that
starts there while the prefetch runs waits on the entry's lock and then finds it cached. It prints one
`DIFFOPS-PREFETCH {json}` line when it knows its nodes and one per node as it ends (what the controller logs), and a
node that fails does not fail the job: a replica there fetches the model itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PREFIX", "Target", "fetch_here", "main", "targets"]

PREFIX = "DIFFOPS-PREFETCH "


@dataclass(frozen=True)
class Target:
    node_id: str
    address: str


def targets(nodes: Iterable[Mapping[str, Any]], cpus: float, gpus: float) -> list[Target]:
    """The alive nodes (as `ray.nodes()` lists them) whose total resources hold one replica of `cpus` and `gpus`,
    by address. Pure."""
    found = []
    for node in nodes:
        total = node.get("Resources") or {}
        if not node.get("Alive") or float(total.get("CPU", 0)) < cpus or (gpus > 0 and float(total.get("GPU", 0)) < gpus):
            continue
        found.append(Target(str(node.get("NodeID")), str(node.get("NodeManagerAddress"))))
    return sorted(found, key=lambda target: target.address)


def fetch_here(uri: str, digest: str) -> dict[str, Any]:
    """Fetch the model into this node's cache; what happened, as the controller logs it (an error is an outcome)."""
    from serving.artifacts import ModelCache, fetch
    from serving.model_cache import node_cache_dir

    started = time.monotonic()
    try:
        result = fetch(uri, digest, ModelCache(node_cache_dir()))
    except Exception as err:  # the store, the disk, a refused copy: reported, the replica fetches it itself later
        return {"error": f"{type(err).__name__}: {err}"[:500], "seconds": round(time.monotonic() - started, 2)}
    return {"cached": result.cached, "bytes": result.bytes_transferred, "resumed": result.resumed_bytes,
            "seconds": round(time.monotonic() - started, 2)}


def main(argv: list[str]) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    spec = json.loads(argv[0])
    ray.init(address="auto", logging_level=logging.WARNING, log_to_driver=False)
    chosen = targets(ray.nodes(), float(spec["cpus"]), float(spec["gpus"]))  # type: ignore[no-untyped-call]
    print(PREFIX + json.dumps({"nodes": [target.address for target in chosen]}), flush=True)
    on_node = ray.remote(num_cpus=0, max_retries=0)(fetch_here)
    pending = {on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(target.node_id, soft=False))
               .remote(spec["uri"], spec["digest"]): target for target in chosen}
    while pending:
        [done], _ = ray.wait(list(pending), num_returns=1)
        target = pending.pop(done)
        try:
            outcome = ray.get(done)
        except Exception as err:  # the node died under the task
            outcome = {"error": f"{type(err).__name__}: {err}"[:500]}
        print(PREFIX + json.dumps({"node": target.address, **outcome}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
