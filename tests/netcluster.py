"""A real multi-node Ray cluster on this one machine, for the tests of running on a cluster (DESIGN.md): hosts
made of Linux namespaces, Ray on them; the test starts the controller on `controller` with `NetCluster.popen`.

    this process ── bridge dxn<id>br at x.x.x.1/24, a random /24 of 198.18.0.0/15 per cluster
        ├── head        x.x.x.2   Ray head: GCS :6379, dashboard :8265 on its own address, Serve's proxy :8000
        ├── controller  x.x.x.3   no Ray: this machine's files, its own loopback, the others over the bridge
        └── worker      x.x.x.11  joins the head; {"diffops-gpu-node": 1} and 2 fake GPUs (worker2 .12, ...)

A Ray node is `ray start --block`, PID 1 of its own PID namespace, with a private tmpfs on /tmp (none of the
controller's files, all under /tmp in tests); SIGKILL of its `unshare` (`kill_node`) ends all of it. All get
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN. A record in /run/diffops-netcluster names each cluster's owner; a start
removes what dead owners left first. Needs root, iproute2, util-linux.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from tests.netns import (
    RECORDS,
    SUPERNET,
    Layout,
    NetClusterError,
    allocate,
    clean_stale,
    network_commands,
    pick_subnet,
    preflight,
    quiet,
    read_record,
    record_is_stale,
    sh,
    tail,
    teardown,
    wait_until,
)

__all__ = ["DASHBOARD_PORT", "GCS_PORT", "SERVE_PORT", "SUPERNET", "Layout", "NetCluster", "NetClusterError", "Options", "RayNode",
           "clean_stale", "kept_paths", "network_commands", "node_argv", "node_init", "parse_nodes", "pick_subnet", "record_is_stale", "wait_until"]

GCS_PORT, DASHBOARD_PORT, SERVE_PORT = 6379, 8265, 8000  # the same in every cluster: each host has its own ports
BIN = Path(sys.executable).parent
PRIVATE_TMP = "mount -t tmpfs -o mode=1777 tmpfs /tmp"
START = 'cd / && exec "$@"'  # a cwd under the hidden /tmp breaks Ray's forkserver
DROPPED_ENV = ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "TMPDIR")  # TMPDIR: kept for `controller`
RAY_LOGS = ("raylet.out", "raylet.err", "gcs_server.out", "dashboard.log", "dashboard.err", "dashboard_agent.log")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Options:  # how `NetCluster.start` sizes the cluster
    head_cpus: float = 1
    worker_cpus: float = 2
    worker_gpus: int = 2  # advertised, not real: GPU replicas schedule and run on CPU
    worker_resources: Mapping[str, float] = field(default_factory=lambda: {"diffops-gpu-node": 1})
    health_check_period_ms: int = 1000  # a killed node is DEAD after ~5 periods (Ray's default 3000: ~15 s)
    object_store_bytes: int = 100_000_000  # per node; Ray's floor is 75 MB
    timeout: float = 90  # seconds each node may take to show alive in the dashboard
    node_env: Mapping[str, str] = field(default_factory=dict)  # more environment for every node; "{head}" is the head's address


@dataclass(frozen=True)
class RayNode:
    node_id: str
    ip: str
    alive: bool
    is_head: bool
    started_ms: int
    resources: dict[str, float] = field(default_factory=dict)


def parse_nodes(payload: Mapping[str, Any]) -> list[RayNode]:
    """The nodes in an answer of the dashboard's state API (`GET /api/v0/nodes`)."""
    return [RayNode(node_id=n["node_id"], ip=n["node_ip"], alive=n["state"] == "ALIVE", is_head=bool(n["is_head_node"]),
                    started_ms=int(n.get("start_time_ms") or 0), resources=dict(n.get("resources_total") or {}))
            for n in payload["data"]["result"]["result"]]


CHECKOUT, PYTHON_ENV = Path(__file__).resolve().parents[1], Path(sys.prefix).resolve()


def kept_paths(root: Path = CHECKOUT, prefix: Path = PYTHON_ENV) -> list[Path]:
    """What a node must still see under /tmp: this checkout and its Python environment, when they live there (a CI
    clone in a temp dir); the tests' own files (pytest's temp dirs) stay hidden."""
    under = [p for p in (root, prefix) if p.is_relative_to("/tmp")]
    return [p for p in under if not any(p != q and p.is_relative_to(q) for q in under)]


def node_init(stash: str, keep: Sequence[Path]) -> str:
    """The node's start: `keep` bound aside to `stash`, a private tmpfs on /tmp, `keep` bound back, then Ray."""
    aside = [f"mkdir -p {stash}/{i} && mount --bind {shlex.quote(str(p))} {stash}/{i}" for i, p in enumerate(keep)]
    back = [f"mkdir -p {shlex.quote(str(p))} && mount --bind {stash}/{i} {shlex.quote(str(p))}" for i, p in enumerate(keep)]
    return " && ".join([*aside, PRIVATE_TMP, *back, START])


def node_argv(layout: Layout, host: str, options: Options, keep: Sequence[Path] | None = None) -> list[str]:
    """The command that runs Ray on `host` until SIGKILL: PID 1 of its own PID namespace, a private /tmp, and
    killed with this process (pdeathsig) should it die without `stop`."""
    ip, head = layout.ip(host), host == "head"
    ray = [str(BIN / "ray"), "start", "--block", f"--node-ip-address={ip}", "--disable-usage-stats",
           f"--num-cpus={options.head_cpus if head else options.worker_cpus:g}", f"--num-gpus={0 if head else options.worker_gpus}",
           f"--object-store-memory={options.object_store_bytes}"]
    if head:
        ray += ["--head", f"--port={GCS_PORT}", f"--dashboard-host={ip}", f"--dashboard-port={DASHBOARD_PORT}", "--include-dashboard=true"]
    else:
        ray += [f"--address={layout.ip('head')}:{GCS_PORT}", f"--resources={json.dumps(dict(options.worker_resources))}"]
    return ["setpriv", "--pdeathsig=KILL", "--", "ip", "netns", "exec", layout.netns(host),
            "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
            node_init(f"{RECORDS}/{layout.netns(host)}", kept_paths() if keep is None else keep), host, *ray]


@dataclass
class _Node:
    process: subprocess.Popen[bytes]  # `unshare`: SIGKILL ends the node
    pid1: int  # `ray start`, PID 1 of the node's PID namespace, numbered as this machine sees it


class NetCluster(contextlib.AbstractContextManager["NetCluster"]):
    """Hosts on a bridge with a Ray head and workers; `with NetCluster.start(tmp_dir) as cluster: ...`."""

    def __init__(self, layout: Layout, record: Path, tmp_dir: Path, options: Options):
        self.layout, self.record, self.tmp_dir, self.options = layout, record, tmp_dir, options
        self.token = secrets.token_hex(32)
        self.timings: dict[str, float] = {}  # seconds: head, worker..., start, stop
        self._nodes: dict[str, _Node] = {}
        self._procs: list[subprocess.Popen[Any]] = []
        self._netns: dict[str, int] = {}  # host -> its namespace's inode: every process of a host is in it, even after stop

    head_ip = property(lambda self: self.layout.ip("head"))
    controller_ip = property(lambda self: self.layout.ip("controller"))
    worker_ips = property(lambda self: [self.layout.ip(h) for h in self.layout.worker_hosts])
    gcs_address = property(lambda self: f"{self.head_ip}:{GCS_PORT}")
    dashboard_url = property(lambda self: f"http://{self.head_ip}:{DASHBOARD_PORT}")
    serve_url = property(lambda self: f"http://{self.head_ip}:{SERVE_PORT}")  # once Serve runs with http_options.host=head_ip
    env = property(lambda self: {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token})  # what a client needs

    @classmethod
    def start(cls, tmp_dir: Path, workers: int = 1, **options: Any) -> NetCluster:
        """Build the hosts, start the head, then each worker; return once all nodes are alive in the dashboard.
        `options`: the fields of `Options`. On any failure everything built so far is removed before the error rises."""
        began = time.monotonic()
        preflight()
        clean_stale()
        cluster = cls(*allocate(workers), Path(tmp_dir), Options(**options))
        atexit.register(cluster.stop)
        try:
            for command in network_commands(cluster.layout):
                sh(*command)
            cluster._netns = {host: os.stat(f"/run/netns/{cluster.layout.netns(host)}").st_ino for host in cluster.layout.hosts}
            for host in ["head", *cluster.layout.worker_hosts]:
                cluster._start_node(host)
            cluster.wait_nodes(1 + workers)
        except BaseException:
            with contextlib.suppress(Exception):
                cluster.stop()
            raise
        cluster.timings["start"] = time.monotonic() - began
        return cluster

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_node(self, host: str) -> None:
        """Start Ray on `host`; return once the dashboard shows the node alive."""
        began = time.monotonic()
        env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
        env.update(self.env, RAY_health_check_period_ms=str(self.options.health_check_period_ms), PYTHONUNBUFFERED="1")
        env.update({key: value.format(head=self.head_ip) for key, value in self.options.node_env.items()})
        with open(self.tmp_dir / f"{host}.log", "ab") as log:
            process = subprocess.Popen(node_argv(self.layout, host, self.options), stdout=log, stderr=subprocess.STDOUT,
                                       env=env, start_new_session=True)
        pid1 = wait_until(lambda: next((c.pid for c in psutil.Process(process.pid).children()), None), 10,
                          f"{host}: the first process of its PID namespace")
        self._nodes[host] = _Node(process, pid1)
        self.wait_node(host, alive=True, timeout=self.options.timeout)
        self.timings[host] = time.monotonic() - began

    def popen(self, host: str, argv: Sequence[str | Path], *, env: Mapping[str, str] | None = None,
              cwd: str | Path | None = None, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `argv` on `host` with the cluster's env (and `env`); `stop` kills it. On `controller`: by `ip netns exec`, so
        the Popen is the process itself (signals reach it) and sees this machine's files. On a Ray node: in all the node's
        namespaces (its private /tmp; `cwd` default /); the Popen is `nsenter`: any signal to it, or the node's end, kills it."""
        full_env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV or (host == "controller" and k == "TMPDIR")}
        full_env.update(self.env, **(env or {}))
        command = ["ip", "netns", "exec", self.layout.netns(host), *map(str, argv)]
        if host != "controller":
            if (node := self._nodes.get(host)) is None or node.process.poll() is not None:
                raise NetClusterError(f"{host} runs no Ray node now (nodes: {', '.join(self._nodes)}); restart_node it first")
            command = ["nsenter", f"--target={node.pid1}", "--net", "--mount", "--pid", f"--wd={cwd or '/'}", "setpriv",
                       "--pdeathsig=KILL", "--", *map(str, argv)]
        self._procs.append(process := subprocess.Popen(command, env=full_env, cwd=cwd if host == "controller" else None, **kwargs))
        return process

    def run(self, host: str, argv: Sequence[str | Path], *, timeout: float = 60, check: bool = True,
            env: Mapping[str, str] | None = None, cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run `argv` on `host` to its end, output as text; a NetClusterError on a timeout or (`check`) a failure."""
        process = self.popen(host, argv, env=env, cwd=cwd, text=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            raise NetClusterError(f"{argv[0]} on {host}: still running after {timeout:.0f}s; killed") from None
        if check and process.returncode != 0:
            raise NetClusterError(f"{' '.join(map(str, argv))[:300]} on {host} exited {process.returncode}: {err[-3000:]}")
        return subprocess.CompletedProcess(list(map(str, argv)), process.returncode, out, err)

    def nodes(self) -> list[RayNode]:
        """Every node the head's dashboard knows, dead ones included (`GET /api/v0/nodes`, the token as Bearer)."""
        try:
            response = httpx.get(f"{self.dashboard_url}/api/v0/nodes", params={"limit": "1000", "detail": "true"}, timeout=5,
                                 headers={"Authorization": f"Bearer {self.token}"})
            return parse_nodes(response.raise_for_status().json())
        except (httpx.HTTPError, ValueError, KeyError) as err:
            raise NetClusterError(f"the dashboard at {self.dashboard_url} gave no node list: {err!r}") from None

    def _await_nodes(self, test: Callable[[list[RayNode]], _T | None], timeout: float, what: str, host: str) -> _T:
        seen: list[RayNode] | str = "no answer"
        def attempt() -> _T | None:
            nonlocal seen
            if dead := [h for h, node in self._nodes.items() if node.process.poll() not in (None, -signal.SIGKILL)]:
                raise NetClusterError(f"{dead[0]}'s `ray start` exited while waiting for {what}\n{self.logs(dead[0])}")
            try:
                seen = self.nodes()
            except NetClusterError as err:
                seen = str(err)
            return test(seen) if isinstance(seen, list) else None
        return wait_until(attempt, timeout, what, lambda: f"dashboard: {seen}\n{self.logs(host)}")

    def wait_nodes(self, count: int, timeout: float = 60) -> list[RayNode]:
        """Wait until exactly `count` nodes are alive; those nodes."""
        return self._await_nodes(lambda nodes: [n for n in nodes if n.alive] if sum(n.alive for n in nodes) == count else None,
                                 timeout, f"{count} alive Ray nodes", "head")

    def wait_node(self, host: str, alive: bool = True, timeout: float = 60) -> RayNode:
        """Wait until the latest node at `host`'s address is alive (or dead, `alive=False`); that node."""
        def reached(nodes: list[RayNode]) -> RayNode | None:
            latest = max((n for n in nodes if n.ip == self.layout.ip(host)), key=lambda n: n.started_ms, default=None)
            return latest if latest and latest.alive == alive else None
        return self._await_nodes(reached, timeout, f"{host} ({self.layout.ip(host)}) {'alive' if alive else 'dead'}", host)

    def kill_node(self, host: str) -> None:
        """SIGKILL the node's `unshare`: every process of the node ends at once, like a machine losing power."""
        (node := self._nodes[host]).process.kill()
        node.process.wait()
        wait_until(lambda: not self.processes(host), 10, f"{host}'s processes to end", lambda: "\n".join(self.processes(host)))

    def restart_node(self, host: str) -> RayNode:
        """Start Ray again on a killed node's host (with a fresh /tmp); the new node, alive in the dashboard."""
        if self._nodes[host].process.poll() is None:
            raise NetClusterError(f"{host} still runs its node; kill_node({host!r}) first")
        self._start_node(host)
        return self.wait_node(host)

    def logs(self, host: str, lines: int = 25) -> str:
        """The tail of `host`'s `ray start` output and of its Ray logs (read through the node's private /tmp)."""
        parts = [f"--- {host}: ray start ---\n{tail(self.tmp_dir / f'{host}.log', lines)}"]
        if (node := self._nodes.get(host)) is not None and node.process.poll() is None:
            for session in sorted(Path(f"/proc/{node.pid1}/root/tmp/ray").glob("session_2*"))[-1:]:
                parts += [f"--- {host}: {name} ---\n{text}" for name in RAY_LOGS if (text := tail(session / "logs" / name, lines))]
        return "\n".join(parts)

    def processes(self, *hosts: str) -> list[str]:
        """'pid cmdline' of each process on these hosts (default: all), killed nodes' and those left after `stop` too."""
        inodes, found = {self._netns[h] for h in hosts or self._netns}, []
        for proc in Path("/proc").glob("[0-9]*"):
            if quiet(lambda: (proc / "ns" / "net").stat().st_ino, None) in inodes:  # noqa: B023 (called at once)
                found.append(f"{proc.name} {quiet((proc / 'cmdline').read_bytes, b'').replace(bytes(1), b' ').decode()[:160]}")
        return found

    def stop(self) -> None:
        """Kill every process of the cluster, delete its namespaces, links and record; raise if one stays. Idempotent."""
        if not self.record.exists():
            return
        began = time.monotonic()
        atexit.unregister(self.stop)
        for process in [*self._procs, *(node.process for node in self._nodes.values())]:
            process.kill()
            process.wait()
        teardown(*(read_record(self.record).get(key, []) for key in ("netns", "links")))
        wait_until(lambda: not self.processes(), 10, "this cluster's processes to end", lambda: "\n".join(self.processes()))
        self.record.unlink(missing_ok=True)
        self.timings["stop"] = time.monotonic() - began
