"""Rollout timings on a two-node cluster beside the same changes on one machine, from one run.

The cluster is the multi-node tests' (`tests/netcluster.py`): a Ray head and a worker node in network
namespaces on this machine, the controller on a third host that reaches the head only by address. The demo
release asks for 1 GPU (the worker advertises fake ones), so its gate job and replica run on the worker, and
its `file://` model reaches the worker through `--model-store` (an S3-compatible server on the head's host).
Figures, from the commit to the first answer that shows it: a version change (`generation.steps` + 1:
publish, gate job, replica start and warm-up on the worker, switch) and a warm revert (`git revert` while the
old version is the standby). Baselines: the same two changes on the single-node live demo (the bench's local
head), measured in this run. Needs root, iproute2 and util-linux, like the tests that use the cluster.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.context import Context
from bench.gitrepo import demo_release, edit
from bench.live import DIFFOPS, LiveDemo, field_edit
from bench.progress import Say
from bench.report import Figure, ratio
from bench.rollout import WARM_REVERT_GOAL, first_answer_showing, served_by, served_by_other_than
from bench.traffic import GENERATE
from controller.apply.serve_client import ServeClient
from tests.netcluster import NetCluster, wait_until

S3_PORT = 9000
STORE = "s3://diffops-models/published"
AWS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
ON_THE_WORKER = {"    gpus: 0\n": "    gpus: 1\n"}


class _ClusterHead:
    """What `LiveDemo` asks of a head: a Serve client, here the cluster's (dashboard by address, token, Serve URL)."""

    def __init__(self, cluster: NetCluster):
        self.cluster = cluster

    def client(self) -> ServeClient:
        return ServeClient(self.cluster.dashboard_url, self.cluster.token, serve_url=self.cluster.serve_url)


class ClusterDemo(LiveDemo):
    """The live demo's controller on the cluster's `controller` host, publishing the model to the store."""

    def __init__(self, workdir: Path, cluster: NetCluster, say: Say):
        super().__init__(workdir, _ClusterHead(cluster), say)  # type: ignore[arg-type]  # a head as LiveDemo uses one
        self.cluster = cluster

    def start(self) -> None:
        self.repo.write_release(edit(demo_release(), ON_THE_WORKER))
        commit = self.repo.commit("demo release on the worker's GPU")
        started = time.monotonic()
        self.log = open(self.log_path, "a")
        argv = [DIFFOPS, "controller", "run", "--repo", str(self.repo.path), "--state-dir", str(self.state_dir),
                "--ray-address", self.cluster.dashboard_url, "--model-store", STORE, "--http-host", "0.0.0.0",
                "--proxy-location", "EveryNode", "--interval", "2"]
        env = {**AWS, "AWS_ENDPOINT_URL": f"http://{self.cluster.head_ip}:{S3_PORT}", "PYTHONUNBUFFERED": "1"}
        self.process = self.cluster.popen("controller", argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.say("cluster: controller started on its own host; waiting for the demo on the worker (publish, gate job, replica)")
        self.wait_applied(commit, timeout_s=600)
        self.first_rollout_s = time.monotonic() - started


def _s3_ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code < 500
    except httpx.HTTPError:
        return False


def two_changes(demo: LiveDemo, url: str, say: Say, where: str) -> dict[str, float]:
    """A version change and its warm revert on `demo`, timed at `url` (seconds from each commit to traffic)."""
    if demo.field("scale_down_delay") != "10m":  # an earlier family may have turned the standby off
        demo.set_field("scale_down_delay", "10m")
    old, steps = demo.stable().version, int(demo.field("steps"))
    say(f"{where}: version change (generation.steps {steps} -> {steps + 1})")
    change: Callable[[], tuple[str, float]] = lambda: demo.commit_edit(field_edit("steps", steps + 1), "one more step")  # noqa: E731
    version_s, version_failures, commit = first_answer_showing(change, served_by_other_than(old), 600, url)
    demo.wait_applied(commit, timeout_s=600)
    say(f"{where}: warm revert while {old} is the standby")
    warm_s, warm_failures, commit = first_answer_showing(demo.revert_head, served_by(old), 300, url)
    demo.wait_applied(commit, timeout_s=300)
    return {"version_change_s": round(version_s, 3), "warm_revert_s": round(warm_s, 3),
            "failed_answers": version_failures + warm_failures}


def run(workdir: Path, say: Say, local: LiveDemo) -> list[Figure]:
    one_node = two_changes(local, GENERATE, say, "one node")
    say("cluster: starting a head and a worker in network namespaces, and an S3-compatible server on the head's host")
    node_env = {**AWS, "AWS_ENDPOINT_URL": f"http://{{head}}:{S3_PORT}"}
    (workdir / "netcluster").mkdir(parents=True, exist_ok=True)
    with NetCluster.start(workdir / "netcluster", worker_cpus=4, worker_gpus=4, node_env=node_env) as cluster:
        cluster.popen("head", [Path(sys.executable).with_name("moto_server"), "-H", cluster.head_ip, "-p", str(S3_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        endpoint = f"http://{cluster.head_ip}:{S3_PORT}"
        wait_until(lambda: _s3_ready(endpoint), 60, "the S3-compatible server on the head's host")
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name=AWS["AWS_DEFAULT_REGION"], aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="diffops-models")
        demo = ClusterDemo(workdir / "cluster", cluster, say)
        try:
            demo.start()
            two_nodes = two_changes(demo, f"{cluster.serve_url}/demo/generate", say, "cluster")
        finally:
            demo.stop()
    detail = {"one_node": one_node, "two_nodes": two_nodes, "first_rollout_on_the_cluster_s": round(demo.first_rollout_s or 0, 3)}
    return [
        Figure("cluster", "version change on 2 nodes: commit to traffic", two_nodes["version_change_s"], "s",
               "the same on one node", one_node["version_change_s"],
               ratio(two_nodes["version_change_s"], one_node["version_change_s"]), detail=detail),
        Figure("cluster", "warm revert on 2 nodes: commit to traffic", two_nodes["warm_revert_s"], "s",
               "the same on one node", one_node["warm_revert_s"], ratio(two_nodes["warm_revert_s"], one_node["warm_revert_s"]),
               WARM_REVERT_GOAL, detail),
    ]


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.workdir, ctx.say, ctx.live())
