"""Drivers for tests against the real thing: a local Ray head with token auth and the controller process.

One Ray head serves the whole test session on its own ports (free ports found
when the session starts, so two suites on one machine never meet each other or
a demo on the defaults).
It advertises 2 GPUs it does not have: GPU replicas schedule, and the pipeline
falls back to CPU.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

from controller.apply.serve_client import ServeClient

DIFFOPS = str(Path(sys.executable).with_name("diffops"))


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now, all different (held open together while chosen)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


GCS_PORT, DASHBOARD_PORT, METRICS_PORT, AGENT_PORT, HTTP_PORT, CLIENT_PORT = _free_ports(6)
DASHBOARD = f"http://127.0.0.1:{DASHBOARD_PORT}"
SERVE_URL = f"http://127.0.0.1:{HTTP_PORT}"


_T = TypeVar("_T")


def status_document(state_dir: Path) -> dict[str, Any]:
    """`diffops status --json` of a state dir, as JSON carries it; no releases while the controller has not made it."""
    from controller.cli.operate import status_inputs
    from controller.cli.output import dump
    from controller.cli.status_view import status_json
    from controller.state.store import Store

    path = state_dir / "state.db"
    if not path.exists():
        return {"releases": []}
    try:
        store = Store(path, readonly=True)
    except sqlite3.Error:
        return {"releases": []}
    try:
        document: dict[str, Any] = json.loads(dump(status_json(*status_inputs(store)), "json"))
        return document
    except sqlite3.Error:  # the controller has created the file but not its tables yet
        return {"releases": []}
    finally:
        store.close()


def wait_for(predicate: Callable[[], _T | None], timeout: float, what: str, every: float = 0.2) -> _T:
    """The predicate's first truthy answer, polled every `every` seconds; an AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: _T | None = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


class Controller:
    """`diffops controller run` as a child process, with its own log kept for assertions."""

    started = 0

    def __init__(self, repo: Path, state_dir: Path, *extra: str):
        self.repo, self.state_dir, self.extra = repo, state_dir, extra
        self.process: subprocess.Popen[bytes] | None = None
        Controller.started += 1
        self.log_path = state_dir.parent / f"{state_dir.name}-controller-{Controller.started}.log"

    def start(self) -> Controller:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "a")
        metrics = () if "--metrics-port" in self.extra else ("--metrics-port", "0")  # the default 9464 may be a demo's
        metrics += () if "--review-port" in self.extra else ("--review-port", "0")  # and 9465 the demo's review page
        self.process = subprocess.Popen(
            [DIFFOPS, "controller", "run", "--repo", str(self.repo), "--state-dir", str(self.state_dir),
             "--ray-address", DASHBOARD, "--http-port", str(HTTP_PORT), "--interval", "2", *metrics, *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    @property
    def logs(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def status(self) -> dict[str, Any]:
        """What `diffops status --json` prints, made by the command's own functions in this process: a poll every
        0.2 s costs a read of the state file, not a Python start (a core's worth of CPU the Ray tests need)."""
        return status_document(self.state_dir)

    def release(self, name: str = "demo") -> dict[str, Any]:
        return next((r for r in self.status()["releases"] if r["name"] == name), {})

    def wait_release(self, check: Callable[[dict[str, Any]], bool], timeout: float = 90, name: str = "demo") -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"controller exited {self.process.returncode}:\n{self.logs[-3000:]}")
            release = self.release(name)
            return release if release and check(release) else None

        try:
            return wait_for(ready, timeout, f"release {name}")
        except AssertionError as err:
            raise AssertionError(f"{err}\nstatus: {self.release(name)}\ncontroller log:\n{self.logs[-3000:]}") from None


WARM_OWNER = "diffops-tests-warm"  # the controller id of every warm test (`warm=True`)
# the flags of a warm controller started by hand; warm tests are about rollouts and serving, and log no gate runs:
# tracking has tests of its own, and an MLflow store costs each new version's gate about 7 s of CPU beside its replica
# start (the import and a new SQLite store)
WARM = ("--controller-id", WARM_OWNER, "--no-tracking")
warm_version: list[str] = []  # the demo release's first version, once a warm controller has served it


@contextmanager
def running_controller(repo: Path, state_dir: Path, *flags: str, warm: bool = False) -> Iterator[tuple[Controller, dict[str, Any]]]:
    """A controller on `repo` until its release is Healthy: (controller, its status entry); stopped on exit. A `warm`
    controller runs as WARM_OWNER: it adopts the demo release's first version where an earlier warm test left it
    running (`keep_warm`), the product's own path for a controller that lost its state, instead of gating and
    starting it again (a minute or more each on 2 cores)."""
    controller = Controller(repo, state_dir, *flags, *(WARM if warm else ())).start()
    try:
        release = controller.wait_release(healthy_on(), timeout=240)  # gate + start: minutes on a busy box
        if warm and not warm_version:
            warm_version.append(stable_version(release))
        yield controller, release
    finally:
        if controller.process and controller.process.poll() is None:
            controller.stop()


def keep_warm() -> None:
    """Leave on Serve only the demo release's warm first version (its model app), when it runs ready under WARM_OWNER;
    every other application is deleted, the release's router too: the next controller deploys a new one, so no
    traffic figures or remembered requests cross from one test to the next."""
    from controller.apply.drift import owner_of

    client = serve_client()
    apps = client.observe()
    warm = apps.get(f"demo--{warm_version[0]}") if warm_version else None
    if warm is None or not warm.ready or owner_of(warm.config) != WARM_OWNER:
        clear_serve()
        return
    if set(apps) == {warm.name}:
        return
    client.apply({"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": HTTP_PORT}, "applications": [warm.config]})
    wait_for(lambda: set(client.observe()) == {warm.name}, 60, "Serve to delete all but the warm demo version", every=0.5)


def healthy_on(version: str | None = None) -> Callable[[dict[str, Any]], bool]:
    def check(release: dict[str, Any]) -> bool:
        return release["phase"] == "Healthy" and (version is None or release["desired_version"] == version) and any(
            v["role"] == "stable" and v["weight"] == 100 and v["ready_replicas"] >= 1 for v in release["versions"]
        )
    return check


def stable_version(release: dict[str, Any]) -> str:
    return str(next(v["id"] for v in release["versions"] if v["role"] == "stable"))


def generate(release: str = "demo", body: dict[str, Any] | None = None, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{SERVE_URL}/{release}/generate", json=body or {"prompt": "a red cube"}, timeout=60, **kwargs)


LOAD_REQUEST = {"prompt": "load", "steps": 2, "seed": 1}


@dataclass
class Load:
    """A client sending requests back to back from a thread, recording every answer."""

    release: str = "demo"
    pin: str | None = None  # send every request to this version (X-Diffops-Version)
    codes: Counter[int | str] = field(default_factory=Counter)  # HTTP status, or "transport"
    answers: list[tuple[float, int, str, bytes]] = field(default_factory=list)  # (at, status, version, body)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    timeout: float = 60  # seconds a request may take before the client gives up (a transport error)
    url: str = SERVE_URL  # Serve's HTTP endpoint

    @property
    def versions(self) -> list[tuple[float, str]]:
        """(at, version) of every answer so far."""
        return [(at, version) for at, _, version, _ in list(self.answers)]

    def __enter__(self) -> Load:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while not self.stop.is_set():
                try:
                    headers = {"X-Diffops-Version": self.pin} if self.pin else {}
                    response = client.post(f"{self.url}/{self.release}/generate", json=LOAD_REQUEST, headers=headers)
                    self.codes[response.status_code] += 1
                    version = response.headers.get("X-Diffops-Version", "")
                    self.answers.append((time.time(), response.status_code, version, response.content))
                    if response.status_code != 200:
                        self.errors.append(response.text[:300])
                except httpx.HTTPError as err:
                    self.codes["transport"] += 1
                    self.errors.append(repr(err))


def serve_client() -> ServeClient:
    from controller.apply.serve_client import ray_token

    return ServeClient(DASHBOARD, ray_token(), serve_url=SERVE_URL)


def clear_serve() -> None:
    """Delete every application but keep Serve's proxy running for the next test."""
    client = serve_client()
    client.apply({"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": HTTP_PORT}, "applications": []})
    wait_for(lambda: not client.observe(), 60, "Serve applications to be deleted", every=0.5)


def pixels(png: bytes) -> Any:  # a float32 numpy array (height, width, 3)
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def misattributed(answers: list[tuple[float, int, str, bytes]], references: dict[str, bytes]) -> list[str]:
    """Answers whose image is not the one their `X-Diffops-Version` makes for the load request (nearest reference)."""
    refs = {version: pixels(png) for version, png in references.items()}
    wrong = []
    for at, status, version, body in answers:
        if status != 200:
            continue
        image = pixels(body)
        nearest = min(refs, key=lambda v: float(abs(refs[v] - image).mean()))
        if nearest != version:
            wrong.append(f"{at:.2f}: header says {version}, image is {nearest}'s")
    return wrong



def attempted_at(state_dir: Path) -> float | None:
    """When the controller on `state_dir` last finished a reconcile (`attempted_at` in its store), or None."""
    from controller.state.store import Store

    if not (state_dir / "state.db").exists():
        return None
    store = Store(state_dir / "state.db", readonly=True)
    try:
        return store.load().controller.attempted_at
    finally:
        store.close()


def wait_ticks(state_dir: Path, count: int, timeout: float = 60, after: float | None = None) -> float:
    """Wait until the controller has finished `count` reconciles (after `after`, default now); the last one's time."""
    seen: set[float] = set()
    since = time.time() if after is None else after

    def ticked() -> float | None:
        at = attempted_at(state_dir)
        if at is not None and at > since:
            seen.add(at)
        return max(seen) if len(seen) >= count else None

    return wait_for(ticked, timeout, f"{count} reconciles of the controller on {state_dir}", every=0.1)


def send_in_background(path: str, body: dict[str, Any], timeout: float = 300) -> tuple[threading.Thread, list[tuple[float, httpx.Response]]]:
    """POST `body` to SERVE_URL + path from a thread; the answer lands in the list as (at, response)."""
    answers: list[tuple[float, httpx.Response]] = []

    def send() -> None:
        response = httpx.post(f"{SERVE_URL}{path}", json=body, timeout=timeout, headers={"Accept": "application/json"})
        answers.append((time.time(), response))

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread, answers


MLFLOW_QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def gate_runs(uri: str, release: str, version: str) -> list[Any]:
    """The gate runs of a release's version in a tracking store, read with MLflow's own client."""
    import mlflow

    os.environ.update(MLFLOW_QUIET)
    mlflow.set_tracking_uri(uri)
    where = f"tags.`diffops.release` = '{release}' and tags.`diffops.version` = '{version}' and tags.`diffops.kind` = 'gate'"
    return mlflow.search_runs(experiment_names=[f"diffops/{release}"], filter_string=where, output_format="list")
