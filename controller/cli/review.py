"""`diffops review`: the review page for the samples the controller kept, served until interrupted.

Starts `controller.review.ReviewServer` on the state dir's state file and waits; the controller daemon serves the
same page beside its reconcile loop, this command is for a machine (or a time) without one.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import click

from controller import logs
from controller.cli.common import fail, state_dir_option, store_at
from controller.review.server import STATE_FILE, ReviewServer

__all__ = ["review"]


@click.command()
@state_dir_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind; anything but loopback lets anyone who can reach it review (and read prompts).")
@click.option("--port", default=9465, show_default=True, type=click.IntRange(0, 65535), help="Port to bind (0: any free one).")
def review(state_dir: Path, host: str, port: int) -> None:
    """Serve the review page: rate the kept samples of each release, blind to the version, until interrupted.

    Reviews are stored in the controller's state file as feedback with
    source `review`; `diffops quality RELEASE` counts them per version.
    """
    path = state_dir / STATE_FILE
    if not path.exists():
        fail(f"no state file at {path}; run `diffops controller run` (or pass --state-dir)", 2)
    store_at(path).close()  # a state file from a newer diffops is refused here, with what to do
    try:
        server = ReviewServer(state_dir, host, port)
    except OSError as err:
        fail(f"could not bind {host}:{port}: {err.strerror or err}; pick another --port (0: any free one)", 2)
    stop = threading.Event()
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    logs.configure()
    server.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    click.echo("review: stopped; the reviews stored so far stay in the state file", err=True)
