"""The bench's own Ray head: token auth, 127.0.0.1, ports that no test session or demo uses.

GCS 6401, dashboard 8301, metrics 8302, dashboard agent 8303, client server
9301 (Serve's HTTP proxy listens on 8201, set in the config the controller
renders), a `dbench-` temp dir and a token file of its own
($RAY_AUTH_TOKEN_PATH), started by `controller.apply.ray_cluster.start_head`.
`stop()` is `ray_cluster.kill_head`: only this head's processes, never
`ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from controller.apply import ray_cluster
from controller.apply.serve_client import ServeClient

GCS_PORT, DASHBOARD_PORT, METRICS_PORT, AGENT_PORT, HTTP_PORT, CLIENT_PORT = 6401, 8301, 8302, 8303, 8201, 9301
HOST = "127.0.0.1"
DASHBOARD = f"http://{HOST}:{DASHBOARD_PORT}"
SERVE_URL = f"http://{HOST}:{HTTP_PORT}"
LOGICAL_CPUS = 4  # replicas and gate jobs ask for fractions of these; the machine's cores are shared by all
START_TIMEOUT_S = 90


HEAD = ray_cluster.RayHead(gcs_port=GCS_PORT, dashboard_port=DASHBOARD_PORT, metrics_port=METRICS_PORT,
                          client_port=CLIENT_PORT, agent_port=AGENT_PORT, host=HOST)


class BenchHead:
    def __init__(self) -> None:
        self.head: ray_cluster.RayHead | None = None
        self.token_dir: str | None = None

    def start(self) -> str:
        """Start the head with token auth and a fresh token; return its dashboard URL."""
        self.token_dir = tempfile.mkdtemp(prefix="dbench-token-")
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(self.token_dir) / "auth_token")
        os.environ.pop("RAY_AUTH_TOKEN", None)
        token = ray_cluster.ensure_token()  # sets RAY_AUTH_MODE=token for this process and its children
        client = ServeClient(DASHBOARD, token)
        alive = client.alive()
        client.close()
        if alive:
            raise RuntimeError(f"something already answers on {DASHBOARD}; is another bench running?")
        self.head = replace(HEAD, temp_dir=tempfile.mkdtemp(prefix="dbench-"))
        return ray_cluster.start_head(self.head, num_cpus=LOGICAL_CPUS, num_gpus=0, timeout_s=START_TIMEOUT_S)

    def client(self) -> ServeClient:
        return ServeClient(DASHBOARD, ray_cluster.ensure_token(), serve_url=SERVE_URL)

    def stop(self) -> None:
        if self.head is None:
            return
        ray_cluster.kill_head(self.head)
        shutil.rmtree(self.head.temp_dir or "", ignore_errors=True)
        shutil.rmtree(self.token_dir or "", ignore_errors=True)
        self.head = self.token_dir = None
