"""Hosts for the multi-node tests: Linux network namespaces on a bridge, with addresses from 198.18.0.0/15.

Where it sits: under `tests/netcluster.py`, which starts Ray on these hosts. Names carry a random cluster id
(`dxn-<id>-<host>` namespaces, `dxn<id>*` links) and a record in /run/diffops-netcluster names the process that
owns them, so a start first removes what owners that died left behind and two test sessions never collide.
Needs root, iproute2's `ip` and util-linux's `unshare`, `nsenter` and `setpriv`; `preflight` names what is missing.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

__all__ = ["PREFIX", "RECORDS", "SUPERNET", "Layout", "NetClusterError", "allocate", "clean_stale", "network_commands",
           "pick_subnet", "preflight", "quiet", "read_record", "record_is_stale", "sh", "tail", "teardown", "wait_until"]

PREFIX = "dxn"
SUPERNET = ipaddress.IPv4Network("198.18.0.0/15")  # RFC 2544 benchmarking addresses: routed nowhere
RECORDS = Path("/run/diffops-netcluster")
_T = TypeVar("_T")


class NetClusterError(RuntimeError):
    """The cluster could not be built, did not come up in time, or left something behind; the message says what."""


@dataclass(frozen=True)
class Layout:  # names and addresses of one cluster; nothing here touches the machine
    cluster_id: str  # 6 hex digits
    subnet: ipaddress.IPv4Network
    workers: int = 1

    worker_hosts = property(lambda self: ["worker" if i == 1 else f"worker{i}" for i in range(1, self.workers + 1)])
    hosts = property(lambda self: ["head", "controller", *self.worker_hosts])
    bridge = property(lambda self: f"{PREFIX}{self.cluster_id}br")

    def _index(self, host: str) -> int:
        if host not in self.hosts:
            raise NetClusterError(f"no host {host!r} in this cluster; its hosts are {', '.join(self.hosts)}")
        return {"head": 2, "controller": 3}.get(host) or 11 + self.worker_hosts.index(host)

    def netns(self, host: str) -> str:
        return f"{PREFIX}-{self.cluster_id}-{host}" if self._index(host) else ""

    def veth(self, host: str) -> str:  # the bridge's side; the namespace's side is eth0
        return f"{PREFIX}{self.cluster_id}" + {2: "h", 3: "c"}.get(index := self._index(host), f"w{index - 10}")

    def ip(self, host: str) -> str:
        return str(self.subnet.network_address + self._index(host))


def pick_subnet(used: Sequence[ipaddress.IPv4Network], rng: random.Random) -> ipaddress.IPv4Network:
    """A /24 of SUPERNET overlapping none of `used`, at random."""
    if free := [net for net in SUPERNET.subnets(new_prefix=24) if not any(net.overlaps(other) for other in used)]:
        return rng.choice(free)
    raise NetClusterError(f"every /24 of {SUPERNET} is in use on this machine; see `ip -br addr`")


def record_is_stale(record: Mapping[str, Any], started_at: Callable[[int], float | None]) -> bool:
    """Whether the process that wrote `record` is gone (no such pid, or the pid reused by a later process)."""
    started = started_at(int(record["pid"]))
    return started is None or abs(started - float(record["started"])) > 1.0


def network_commands(layout: Layout) -> list[list[str]]:
    """The `ip` commands that build the bridge and, per host, a namespace with eth0 on the bridge and lo up."""
    bridge_ip = f"{layout.subnet.network_address + 1}/24"
    commands = [["link", "add", layout.bridge, "type", "bridge"], ["addr", "add", bridge_ip, "dev", layout.bridge],
                ["link", "set", layout.bridge, "up"]]
    for host in layout.hosts:
        ns, veth, ip = layout.netns(host), layout.veth(host), f"{layout.ip(host)}/24"
        commands += [["netns", "add", ns], ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns],
                     ["link", "set", veth, "master", layout.bridge, "up"], ["-n", ns, "addr", "add", ip, "dev", "eth0"],
                     ["-n", ns, "link", "set", "eth0", "up"], ["-n", ns, "link", "set", "lo", "up"]]
    return [["ip", *command] for command in commands]


def wait_until(predicate: Callable[[], _T | None], timeout: float, what: str, detail: Callable[[], str] = str, every: float = 0.25) -> _T:
    """The predicate's first truthy answer, polled; after `timeout` a NetClusterError with its last answer and `detail()`."""
    deadline = time.monotonic() + timeout
    while not (last := predicate()):
        if time.monotonic() > deadline:
            raise NetClusterError(f"{what}: not within {timeout:.0f}s (last: {last!r})\n{detail()}")
        time.sleep(every)
    return last


def sh(*argv: str, check: bool = True) -> str:
    result = subprocess.run(argv, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise NetClusterError(f"`{' '.join(argv)}` exited {result.returncode}: {result.stderr.strip()[-1000:]}")
    return result.stdout


def quiet(call: Callable[[], _T], default: _T) -> _T:  # `default` when what `call` reads is gone
    try:
        return call()
    except (OSError, ValueError, psutil.Error):
        return default


def read_record(path: Path) -> dict[str, Any]:
    return quiet(lambda: dict(json.loads(path.read_text())), {})


def tail(path: str | Path, lines: int) -> str:
    return quiet(lambda: "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:]).strip(), "")


def preflight() -> None:
    """Raise naming the reason when this machine cannot build namespaced hosts."""
    tools = {"ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux", "setpriv": "util-linux"}
    if missing := [f"`{tool}` (apt-get install {package})" for tool, package in tools.items() if shutil.which(tool) is None]:
        raise NetClusterError(f"the multi-node test cluster needs {', '.join(missing)}")
    if os.geteuid() != 0:
        raise NetClusterError("the multi-node test cluster needs root (network and mount namespaces); run the tests as root")


def teardown(netns: Sequence[str], links: Sequence[str], timeout: float = 15) -> None:
    """Kill every process in `netns`, then delete the links and the namespaces; names already gone are fine."""
    present = [ns for ns in netns if ns in sh("ip", "netns", "list").split()]
    def emptied() -> bool:
        pids = [int(pid) for ns in present for pid in sh("ip", "netns", "pids", ns, check=False).split()]
        return not [quiet(functools.partial(os.kill, pid, signal.SIGKILL), None) for pid in pids]
    wait_until(emptied, timeout, f"the processes in {', '.join(present)} to end")
    for link in links:
        sh("ip", "link", "del", link, check=False)
    for ns in present:
        sh("ip", "netns", "del", ns)


def clean_stale() -> None:
    """Remove the namespaces, links and processes of clusters whose owning process has died."""
    for path in RECORDS.glob("*.json"):
        if (record := read_record(path)) and record_is_stale(record, lambda pid: quiet(lambda: psutil.Process(pid).create_time(), None)):
            teardown(record["netns"], record["links"])
            path.unlink(missing_ok=True)


def allocate(workers: int) -> tuple[Layout, Path]:
    """A layout whose id and /24 no other cluster on this machine holds, claimed by writing its record first."""
    RECORDS.mkdir(parents=True, exist_ok=True)
    rng = random.Random(secrets.randbits(64))
    for _ in range(20):
        used = [ipaddress.IPv4Interface(line.split()[3]).network for line in sh("ip", "-o", "-4", "addr", "show").splitlines()]
        used += [ipaddress.IPv4Network(r["subnet"]) for r in map(read_record, RECORDS.glob("*.json")) if "subnet" in r]
        layout = Layout(secrets.token_hex(3), pick_subnet(used, rng), workers)
        path = RECORDS / f"{layout.cluster_id}.json"
        record = {"pid": os.getpid(), "started": psutil.Process().create_time(), "subnet": str(layout.subnet),
                  "netns": [layout.netns(h) for h in layout.hosts], "links": [layout.bridge, *map(layout.veth, layout.hosts)]}
        with contextlib.suppress(FileExistsError), open(path, "x") as handle:
            json.dump(record, handle)
            return layout, path
    raise NetClusterError(f"no free cluster id and /24 in {SUPERNET} after 20 tries; see {RECORDS}")
