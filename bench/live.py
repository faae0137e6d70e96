"""The demo release served live, for the end-to-end benchmarks.

A temporary release repo (the demo model, golden reference and
releases/demo.yaml), the bench's Ray head, and `diffops controller run` as a
child process, as an operator runs it. Changes are git commits (the
controller watches the repo's refs); the controller's state is read from its
SQLite store (read-only), Ray Serve through `controller.apply.serve_client`.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from bench.gitrepo import ReleaseRepo, demo_release
from bench.progress import Say
from bench.ray_head import DASHBOARD, HTTP_PORT, BenchHead
from controller.apply.serve_client import ServeClient, ServeError
from controller.state.records import ObservedApp, ReleaseRecord, VersionRecord
from controller.state.store import State, Store

DIFFOPS = str(Path(sys.executable).with_name("diffops"))
RELEASE = "demo"


def field_pattern(name: str) -> re.Pattern[str]:
    """A scalar field of the release file by its key (the first at line start, so `steps` is not `max_steps`)."""
    return re.compile(rf"^(\s+{re.escape(name)}:) (.*)$", re.MULTILINE)


def field_edit(name: str, value: object) -> Callable[[str], str]:
    return lambda text: field_pattern(name).sub(rf"\g<1> {value}", text, count=1)


class LiveDemo:
    def __init__(self, workdir: Path, head: BenchHead, say: Say):
        self.workdir, self.head, self.say = workdir, head, say
        self.repo = ReleaseRepo(workdir / "repo")
        self.state_dir = workdir / "state"
        self.log_path = workdir / "controller.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.serve: ServeClient = head.client()
        self.first_rollout_s: float | None = None
        self.log: IO[str] | None = None

    def start(self) -> None:
        self.repo.write_release(demo_release())
        commit = self.repo.commit("demo release")
        started = time.monotonic()
        self.log = open(self.log_path, "a")
        self._spawn()
        self.say("controller started on a temporary repo; waiting for the demo release (gate as a Ray job, then a replica)")
        self.wait_applied(commit, timeout_s=300)
        self.first_rollout_s = time.monotonic() - started

    def _spawn(self, *flags: str) -> None:
        self.process = subprocess.Popen(
            [DIFFOPS, "controller", "run", "--repo", str(self.repo.path), "--state-dir", str(self.state_dir),
             "--ray-address", DASHBOARD, "--http-port", str(HTTP_PORT), "--interval", "2", "--metrics-port", "0", "--review-port", "0",
             *flags],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def restart_controller(self, *flags: str) -> None:
        """The controller again with `flags`; it adopts the apps Serve runs (nothing restarts that `flags` leave alone)."""
        self._terminate()
        self._spawn(*flags)

    def stop(self) -> None:
        self._terminate()
        if self.log is not None:
            self.log.close()
        self.serve.close()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    # --- changes, as git commits

    def commit_edit(self, edit: Callable[[str], str], message: str) -> tuple[str, float]:
        """Edit releases/demo.yaml, commit; return the commit and the monotonic time it existed."""
        self.repo.write_release(edit(self.repo.release_text()))
        commit = self.repo.commit(message)
        return commit, time.monotonic()

    def revert_head(self) -> tuple[str, float]:
        commit = self.repo.revert_head()
        return commit, time.monotonic()

    def field(self, name: str) -> str:
        match = field_pattern(name).search(self.repo.release_text())
        if match is None:
            raise ValueError(f"{name} is not in releases/demo.yaml")
        return match.group(2)

    def set_field(self, name: str, value: object) -> str | None:
        """Commit one scalar field's new value and wait until it is applied; None if it had that value."""
        if self.field(name) == str(value):
            return None
        commit, _ = self.commit_edit(field_edit(name, value), f"{name}: {value}")
        self.wait_applied(commit)
        return commit

    # --- what the controller recorded and what Serve runs

    def state(self) -> State | None:
        path = self.state_dir / "state.db"
        if not path.exists():
            return None
        store = Store(path, readonly=True)
        try:
            return store.load()
        except sqlite3.OperationalError:  # the controller has created the file but not its tables yet
            return None
        finally:
            store.close()

    def release(self) -> ReleaseRecord | None:
        state = self.state()
        return state.releases.get(RELEASE) if state else None

    def stable(self) -> VersionRecord:
        state = self.state()
        assert state is not None
        return next(v for v in state.versions if v.release == RELEASE and v.role == "stable")

    def wait(self, predicate: Callable[[], bool], what: str, timeout_s: float = 120, every_s: float = 0.2) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"the controller exited ({self.process.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                release = self.release()
                where = f"{release.phase}: {release.message}" if release else "no state yet"
                raise RuntimeError(f"timed out after {timeout_s:.0f}s waiting for {what}; demo {where}\n{self.log_tail()}")
            time.sleep(every_s)

    def wait_applied(self, commit: str, timeout_s: float = 180) -> None:
        """Until the controller has applied `commit` (Healthy, router confirmed) and Serve runs the app steadily."""
        def applied() -> bool:
            state = self.state()
            release = state.releases.get(RELEASE) if state else None
            if not (state and release and release.phase == "Healthy" and state.controller.last_applied_commit == commit):
                return False
            version = next(v for v in state.versions if v.release == RELEASE and v.role == "stable")
            app = (self.observe() or {}).get(version.app)
            batch = version.spec.replicas.max_batch_size
            return bool(app and app.ready and (app.user_config or {}).get("max_batch_size") == batch)
        self.wait(applied, f"commit {commit[:12]} to be applied", timeout_s)

    def observe(self) -> dict[str, ObservedApp] | None:
        """Serve's applications, or None while the dashboard does not answer."""
        try:
            return self.serve.observe()
        except ServeError:
            return None

    def app_gone(self, version: str) -> bool:
        apps = self.observe()
        return apps is not None and f"{RELEASE}--{version}" not in apps
