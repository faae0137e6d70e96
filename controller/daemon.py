"""`diffops controller run`: one process, one loop, one state dir.

Holds the state dir's lock (a second controller exits with a clear message),
then reconciles in a loop: at once when a local repo's refs change (watchfiles
on `.git`, so a commit starts a reconcile within a second), every 0.5 s while a
rollout is in progress, and every `--interval` otherwise (the poll for remote
URLs). A tick that ends early on an error waits the delay the reconciler
mapped it to (capped exponential backoff with jitter, `controller.errors`).
SIGTERM / SIGINT stop the loop; Ray Serve keeps serving.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

from filelock import FileLock, Timeout

from controller.reconciler import Reconciler

__all__ = ["BUSY_TICK_S", "StateDirLocked", "install_signal_handlers", "lock_state_dir", "run_loop", "watch_refs"]

log = logging.getLogger("diffops.controller")
BUSY_TICK_S = 0.5


class StateDirLocked(Exception):
    pass


def lock_state_dir(state_dir: Path) -> FileLock:
    """Take the state dir for this controller; raise StateDirLocked naming the holder."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(state_dir / "controller.lock"))
    pid_file = state_dir / "controller.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = pid_file.read_text().strip() if pid_file.exists() else "unknown"
        raise StateDirLocked(
            f"another controller (pid {holder}) is running on state dir {state_dir}; stop it first, or pass another --state-dir"
        ) from None
    pid_file.write_text(str(os.getpid()))
    return lock


def watch_refs(git_dir: Path, wake: threading.Event, stop: threading.Event) -> threading.Thread:
    """Wake the loop when a branch, HEAD or packed-refs changes under `git_dir`."""
    from watchfiles import watch

    def relevant(_change: object, path: str) -> bool:
        return "/refs/" in path or path.endswith(("HEAD", "packed-refs")) and not path.endswith("ORIG_HEAD")

    def run() -> None:
        changes = watch(git_dir, watch_filter=relevant, stop_event=stop, debounce=50, step=20, rust_timeout=500, yield_on_timeout=False)
        for _changes in changes:
            wake.set()

    thread = threading.Thread(target=run, name="watch-refs", daemon=True)
    thread.start()
    return thread


def run_loop(reconciler: Reconciler, *, interval_s: float, git_dir: Path | None, stop: threading.Event, wake: threading.Event) -> None:
    if git_dir is not None:
        watch_refs(git_dir, wake, stop)
        log.info("controller: watching %s for new commits; polling every %.0fs as well", git_dir, interval_s)
    else:
        log.info("controller: polling the remote every %.0fs", interval_s)
    while not stop.is_set():
        result = reconciler.reconcile()
        wait = result.retry_in if result.retry_in else BUSY_TICK_S if result.busy else interval_s
        wake.wait(wait)
        wake.clear()
    log.info("controller: stopped; Ray Serve keeps serving what was applied")


def install_signal_handlers(stop: threading.Event, wake: threading.Event) -> None:
    def handle(signum: int, _frame: object) -> None:
        log.info("controller: %s received; next: finish this reconcile and exit", signal.Signals(signum).name)
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
