"""The multi-node test cluster (tests/netcluster.py): its names and commands as tables, then a real head and worker in
namespaces on this machine, seen from the controller's host. Run under `flock /tmp/diffops-ray.lock`: it starts Ray."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.netcluster import (
    DASHBOARD_PORT,
    GCS_PORT,
    SUPERNET,
    Layout,
    NetCluster,
    NetClusterError,
    Options,
    clean_stale,
    kept_paths,
    network_commands,
    node_argv,
    node_init,
    parse_nodes,
    pick_subnet,
    record_is_stale,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = Layout("a1b2c3", ipaddress.IPv4Network("198.19.7.0/24"), workers=3)

# --- names, addresses and commands (pure) -------------------------------------------------------------------


@pytest.mark.parametrize("host, netns, veth, ip", [
    ("head", "dxn-a1b2c3-head", "dxna1b2c3h", "198.19.7.2"),
    ("controller", "dxn-a1b2c3-controller", "dxna1b2c3c", "198.19.7.3"),
    ("worker", "dxn-a1b2c3-worker", "dxna1b2c3w1", "198.19.7.11"),
    ("worker3", "dxn-a1b2c3-worker3", "dxna1b2c3w3", "198.19.7.13"),
])
def test_each_host_has_its_namespace_link_and_address(host, netns, veth, ip):
    assert (LAYOUT.netns(host), LAYOUT.veth(host), LAYOUT.ip(host)) == (netns, veth, ip)


def test_names_fit_the_kernels_limit_and_no_two_hosts_share_one():
    links = [LAYOUT.bridge, *map(LAYOUT.veth, LAYOUT.hosts)]
    assert max(map(len, links)) <= 15  # IFNAMSIZ - 1
    assert len(set(links)) == len(links) and len({LAYOUT.ip(h) for h in LAYOUT.hosts}) == len(LAYOUT.hosts) == 5
    assert all(ipaddress.IPv4Address(LAYOUT.ip(h)) in LAYOUT.subnet for h in LAYOUT.hosts)


def test_an_unknown_host_is_an_error_naming_the_hosts():
    with pytest.raises(NetClusterError, match="no host 'worker4' in this cluster; its hosts are "
                                              "head, controller, worker, worker2, worker3$"):
        LAYOUT.ip("worker4")


@pytest.mark.parametrize("used, inside", [
    ([], SUPERNET),
    ([ipaddress.IPv4Network("198.18.0.0/16")], ipaddress.IPv4Network("198.19.0.0/16")),  # another user of half the block
    ([ipaddress.IPv4Network("198.18.0.0/15")], None),  # all taken: an error
    ([ipaddress.IPv4Network(f"198.18.{i}.0/24") for i in range(256)] + [ipaddress.IPv4Network("198.19.0.0/17")],
     ipaddress.IPv4Network("198.19.128.0/17")),
])
def test_a_subnet_is_a_free_24_of_the_benchmarking_block(used, inside):
    for seed in range(20):
        if inside is None:
            with pytest.raises(NetClusterError, match="every /24 of 198.18.0.0/15 is in use"):
                pick_subnet(used, random.Random(seed))
            continue
        subnet = pick_subnet(used, random.Random(seed))
        assert subnet.prefixlen == 24 and subnet.subnet_of(inside) and not any(subnet.overlaps(u) for u in used)


@pytest.mark.parametrize("case, now_started, stale", [
    ("owner alive", 1000.0, False),
    ("owner gone", None, True),
    ("pid reused by a later process", 1500.0, True),
])
def test_a_record_is_stale_only_when_its_owner_is_gone(case, now_started, stale):
    assert record_is_stale({"pid": 4242, "started": 1000.0}, lambda pid: now_started if pid == 4242 else None) is stale


def test_nodes_are_read_from_the_state_api_answer():
    answer = {"result": True, "data": {"result": {"total": 2, "result": [
        {"node_id": "aa", "node_ip": "198.19.7.11", "state": "DEAD", "is_head_node": False, "start_time_ms": 5,
         "resources_total": {"GPU": 2.0, "diffops-gpu-node": 1.0}},
        {"node_id": "bb", "node_ip": "198.19.7.2", "state": "ALIVE", "is_head_node": True, "start_time_ms": 3}]}}}
    worker, head = parse_nodes(answer)
    assert (worker.node_id, worker.ip, worker.alive, worker.is_head, worker.started_ms) == ("aa", "198.19.7.11", False, False, 5)
    assert worker.resources == {"GPU": 2.0, "diffops-gpu-node": 1.0} and head.alive and head.is_head and head.resources == {}


def test_every_node_is_pid_1_of_its_own_namespaces_with_a_private_tmp():
    head, worker = node_argv(LAYOUT, "head", Options(), keep=[]), node_argv(LAYOUT, "worker", Options(), keep=[])
    for argv, netns in ((head, "dxn-a1b2c3-head"), (worker, "dxn-a1b2c3-worker")):
        assert argv[:14] == ["setpriv", "--pdeathsig=KILL", "--", "ip", "netns", "exec", netns,
                             "unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c"]
        assert argv[14] == 'mount -t tmpfs -o mode=1777 tmpfs /tmp && cd / && exec "$@"'
        assert "--block" in argv and "--object-store-memory=100000000" in argv
    assert {"--head", "--node-ip-address=198.19.7.2", "--dashboard-host=198.19.7.2", "--num-cpus=1", "--num-gpus=0"} <= set(head)
    assert not [a for a in head if a.startswith(("--address", "--resources"))]
    assert {"--address=198.19.7.2:6379", "--node-ip-address=198.19.7.11", "--num-cpus=2", "--num-gpus=2",
            '--resources={"diffops-gpu-node": 1}'} <= set(worker) and "--head" not in worker


def test_a_checkout_under_tmp_stays_visible_to_the_nodes_and_the_tests_files_do_not():
    assert kept_paths(Path("/work/x"), Path("/work/x/.venv")) == []  # nothing of ours under /tmp: nothing to keep
    assert kept_paths(Path("/tmp/tmp.ab12/clone"), Path("/tmp/tmp.ab12/clone/.venv")) == [Path("/tmp/tmp.ab12/clone")]
    assert kept_paths(Path("/tmp/a"), Path("/tmp/b/venv")) == [Path("/tmp/a"), Path("/tmp/b/venv")]
    assert node_init("/run/k", [Path("/tmp/a b")]) == (
        "mkdir -p /run/k/0 && mount --bind '/tmp/a b' /run/k/0 && mount -t tmpfs -o mode=1777 tmpfs /tmp && "
        "mkdir -p '/tmp/a b' && mount --bind /run/k/0 '/tmp/a b' && cd / && exec \"$@\"")


def test_the_network_is_one_bridge_with_each_host_on_it():
    commands = network_commands(Layout("a1b2c3", ipaddress.IPv4Network("198.19.7.0/24")))
    assert commands[:3] == [["ip", "link", "add", "dxna1b2c3br", "type", "bridge"],
                            ["ip", "addr", "add", "198.19.7.1/24", "dev", "dxna1b2c3br"], ["ip", "link", "set", "dxna1b2c3br", "up"]]
    assert ["ip", "link", "set", "dxna1b2c3w1", "master", "dxna1b2c3br", "up"] in commands
    assert ["ip", "-n", "dxn-a1b2c3-controller", "addr", "add", "198.19.7.3/24", "dev", "eth0"] in commands
    assert [c[3] for c in commands if c[1:3] == ["netns", "add"]] == ["dxn-a1b2c3-head", "dxn-a1b2c3-controller", "dxn-a1b2c3-worker"]


@pytest.mark.parametrize("how, reason", [
    ("as nobody", "the multi-node test cluster needs root (network and mount namespaces); run the tests as root"),
    ("without ip on PATH", "the multi-node test cluster needs `ip` (apt-get install iproute2)"),
])
def test_without_root_or_its_tools_a_start_fails_naming_why(how, reason, tmp_path):
    code = "from pathlib import Path; from tests.netcluster import NetCluster; NetCluster.start(Path('/nonexistent'))"
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if how == "as nobody" else []
    env = {**os.environ, "PATH": str(tmp_path)} if how != "as nobody" else None
    result = subprocess.run([*prefix, sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and f"NetClusterError: {reason}" in result.stderr, result.stderr[-2000:]


CRASHED_OWNER = """
import json, os, signal, subprocess
from tests.netns import allocate, network_commands, sh
layout, record = allocate(1)
for command in network_commands(layout):
    sh(*command)
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # the runner waits for no output of it
sleeper = subprocess.Popen(["ip", "netns", "exec", layout.netns("worker"), "sleep", "300"], **quiet)
print(json.dumps({"id": layout.cluster_id, "record": str(record), "pid": sleeper.pid}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _leftovers_of(cluster_id: str) -> list[str]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout.splitlines()
    return [n for n in netns if cluster_id in n] + [line.split()[0] for line in links if cluster_id in line]


def test_what_a_killed_owner_left_is_removed_and_a_live_owners_cluster_kept():
    from tests.netns import allocate  # a record of this (live) process, with nothing built

    kept, kept_record = allocate(1)
    try:
        run = subprocess.run([sys.executable, "-c", CRASHED_OWNER], cwd=ROOT, capture_output=True, text=True, timeout=60)
        crashed = json.loads(run.stdout)
        assert run.returncode == -9 and len(_leftovers_of(crashed["id"])) == 7  # 3 namespaces, bridge, 3 links
        clean_stale()
        assert _leftovers_of(crashed["id"]) == [] and not Path(crashed["record"]).exists()
        assert not psutil.pid_exists(crashed["pid"]) or psutil.Process(crashed["pid"]).status() == psutil.STATUS_ZOMBIE
        assert kept_record.exists()
    finally:
        kept_record.unlink()


# --- a real cluster -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetCluster]:
    with NetCluster.start(tmp_path_factory.mktemp("netcluster")) as started:
        print(f"\nnetcluster: head {started.timings['head']:.1f}s, worker {started.timings['worker']:.1f}s, "
              f"up in {started.timings['start']:.1f}s at {started.dashboard_url}")
        yield started
    print(f"\nnetcluster: stopped in {started.timings['stop']:.1f}s")


NODES_FROM_CONTROLLER = """
import json, sys
from controller.apply.dashboard import DashboardClient, ray_token
nodes = DashboardClient(sys.argv[1], ray_token()).request("GET", "/api/v0/nodes", params={"detail": "true"}).json()
print(json.dumps({"without_token": DashboardClient(sys.argv[1], None).alive(), "nodes": nodes["data"]["result"]["result"]}))
"""


def test_both_nodes_are_alive_at_their_addresses_in_the_dashboard_seen_from_the_controller_host(cluster):
    seen = json.loads(cluster.run("controller", [sys.executable, "-c", NODES_FROM_CONTROLLER, cluster.dashboard_url], cwd=ROOT).stdout)
    nodes = {n["node_ip"]: n for n in seen["nodes"]}
    assert {(ip, n["state"], n["is_head_node"]) for ip, n in nodes.items()} == {
        (cluster.head_ip, "ALIVE", True), (cluster.worker_ips[0], "ALIVE", False)}
    assert all(ipaddress.IPv4Address(ip) in SUPERNET for ip in nodes) and cluster.dashboard_url == f"http://{cluster.head_ip}:8265"
    worker, head = nodes[cluster.worker_ips[0]]["resources_total"], nodes[cluster.head_ip]["resources_total"]
    assert (worker["CPU"], worker["GPU"], worker["diffops-gpu-node"]) == (2.0, 2.0, 1.0)
    assert head["CPU"] == 1.0 and "GPU" not in head and "diffops-gpu-node" not in head
    assert seen["without_token"] is False  # token auth is on: the same request without the token is refused


DRIVER = """
import json, os, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
marker, note = sys.argv[2], "/tmp/" + sys.argv[3]

@ray.remote(num_cpus=0.5, num_gpus=1, resources={"diffops-gpu-node": 0.1})
def on_worker():
    open(note, "w").close()
    return {"ip": ray.util.get_node_ip_address(), "marker": os.path.exists(marker), "gpus": len(ray.get_gpu_ids()),
            "tmp": sorted(os.listdir("/tmp"))}

@ray.remote(num_cpus=0.5, resources={"node:__internal_head__": 0.01})
def on_head():
    return {"ip": ray.util.get_node_ip_address(), "marker": os.path.exists(marker), "note": os.path.exists(note)}

print(json.dumps({"worker": ray.get(on_worker.remote(), timeout=60), "head": ray.get(on_head.remote(), timeout=60)}))
"""


def test_tasks_see_their_own_nodes_private_tmp_and_none_of_the_controllers_files(cluster, tmp_path):
    marker, note = tmp_path / "controller-side-file", f"note-{uuid.uuid4().hex}"
    marker.write_text("the controller's repo, state dir and cache live under /tmp like this file")
    assert cluster.run("controller", ["test", "-f", marker], check=False).returncode == 0  # the controller's host sees it
    seen = json.loads(cluster.run("head", [sys.executable, "-c", DRIVER, cluster.gcs_address, marker, note], timeout=120).stdout)
    worker_tmp = set(seen["worker"].pop("tmp"))
    assert seen["worker"] == {"ip": cluster.worker_ips[0], "marker": False, "gpus": 1}
    kept = {p.relative_to("/tmp").parts[0] for p in kept_paths()}  # this checkout, when it lives under /tmp (a CI clone)
    assert {"ray", note} <= worker_tmp and worker_tmp & set(os.listdir("/tmp")) <= {"ray"} | kept  # nothing else of this /tmp
    assert seen["head"] == {"ip": cluster.head_ip, "marker": False, "note": False}  # each node its own /tmp
    assert not (Path("/tmp") / note).exists()


CONNECT = """
import json, socket, sys
seen = {}
for address in sys.argv[1:]:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        seen[address] = "connected"
    except OSError as err:
        seen[address] = type(err).__name__
print(json.dumps(seen))
"""


def test_the_controller_host_reaches_the_head_but_not_this_machines_loopback(cluster):
    with socket.create_server(("127.0.0.1", 0)) as server:
        loopback = f"127.0.0.1:{server.getsockname()[1]}"
        socket.create_connection(("127.0.0.1", server.getsockname()[1]), timeout=3).close()  # it listens, here
        head = [f"{cluster.head_ip}:{DASHBOARD_PORT}", f"{cluster.head_ip}:{GCS_PORT}"]
        seen = json.loads(cluster.run("controller", [sys.executable, "-c", CONNECT, loopback, *head]).stdout)
    assert seen == {loopback: "ConnectionRefusedError", head[0]: "connected", head[1]: "connected"}


def test_a_server_on_the_heads_address_answers_the_controller_and_the_worker(cluster):
    url = f"http://{cluster.head_ip}:9000"
    s3 = cluster.popen("head", [Path(sys.executable).with_name("moto_server"), "-H", cluster.head_ip, "-p", "9000"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(url) or s3.poll() is not None, 30, f"moto_server at {url}")
        assert s3.poll() is None
        code = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)"
        assert [cluster.run(host, [sys.executable, "-c", code, url]).stdout.strip() for host in ("controller", "worker")] == ["200"] * 2
    finally:
        s3.kill()
        s3.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _ray_processes_at(ips: list[str]) -> list[str]:
    """Processes anywhere on this machine whose command line names one of these node addresses (gcs_server, raylet...)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(arg.endswith((f"={ip}", f"={ip}:{GCS_PORT}")) for arg in process.info["cmdline"] or [] for ip in ips):
            found.append(f"{process.info['pid']} {' '.join(process.info['cmdline'])[:120]}")
    return found


def test_a_killed_worker_is_dead_in_the_dashboard_within_bounds_and_stop_leaves_nothing(tmp_path):
    cluster = NetCluster.start(tmp_path)
    try:
        ips, first = [cluster.head_ip, *cluster.worker_ips], cluster.wait_node("worker")
        assert cluster.processes("worker") and _ray_processes_at(ips)  # what the checks below look for is there now
        killed = time.monotonic()
        cluster.kill_node("worker")
        assert cluster.processes("worker") == []  # every process of the node ended with its unshare
        dead = cluster.wait_node("worker", alive=False, timeout=30)
        dead_after = time.monotonic() - killed
        assert dead.node_id == first.node_id and [n.ip for n in cluster.nodes() if n.alive] == [cluster.head_ip]
        again = cluster.restart_node("worker")
        assert again.alive and again.node_id != first.node_id and len(cluster.wait_nodes(2)) == 2
    finally:
        cluster.stop()
    print(f"\nnetcluster: up in {cluster.timings['start']:.1f}s, worker dead in the dashboard {dead_after:.1f}s after "
          f"its kill, restarted in {cluster.timings['worker']:.1f}s, stopped in {cluster.timings['stop']:.1f}s")
    cluster_id = cluster.layout.cluster_id
    assert [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split() if cluster_id in n] == []
    assert [line for line in subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout.splitlines()
            if cluster_id in line] == []
    assert _ray_processes_at(ips) == [] and cluster.processes() == [] and not cluster.record.exists()
