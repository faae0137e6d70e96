"""Options and helpers shared by every `diffops` command."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal, NoReturn, overload

import click

from controller.parse.release import Release
from controller.source.credentials import private_dir, redact
from controller.source.git_source import ReleaseSource, SourceError
from controller.state.store import StateFileError, Store
from controller.tracking.mlflow_store import Tracker
from controller.tracking.tracker import TRACKERS, RunTracker, open_tracker

__all__ = ["default_state_dir", "fail", "open_source", "release_at", "repo_option", "state_dir_option",
           "store_at", "tracker_at", "tracker_option", "tracking_option"]


def default_state_dir() -> Path:
    if os.environ.get("DIFFOPS_STATE_DIR"):
        return Path(os.environ["DIFFOPS_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "diffops"


def _private_state_dir(_ctx: click.Context, _param: click.Parameter, value: Path) -> Path:
    """An existing state dir is tightened to 0700 (it holds the state file, mirrors, models); none is created here."""
    private_dir(value, create=False)
    return value


repo_option = click.option(
    "--repo", default=".", show_default=True, metavar="PATH|URL", help="Release repository: a local path or a git URL."
)
state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=default_state_dir,
    show_default="$DIFFOPS_STATE_DIR or ~/.local/state/diffops",
    help="Controller state: SQLite store, model cache, mirrors of remote repos (kept 0700).",
    callback=_private_state_dir,
)


tracking_option = click.option(
    "--tracking-uri", default=None, metavar="URI",
    help="MLflow tracking and registry store (default: sqlite:///<state-dir>/mlflow.db, artifacts beside it).",
)


tracker_option = click.option(
    "--tracker", type=click.Choice(TRACKERS), default="mlflow", show_default=True,
    help="Where runs are logged: MLflow (at --tracking-uri), or W&B / Neptune configured by their own environment "
         "(WANDB_MODE, NEPTUNE_MODE...; offline under the state dir unless it says otherwise). models:/ URIs always "
         "resolve through the MLflow registry at --tracking-uri.",
)


@overload
def tracker_at(state_dir: Path, uri: str | None) -> Tracker: ...


@overload
def tracker_at(state_dir: Path, uri: str | None, kind: Literal["mlflow"]) -> Tracker: ...


@overload
def tracker_at(state_dir: Path, uri: str | None, kind: str) -> RunTracker: ...


def tracker_at(state_dir: Path, uri: str | None, kind: str = "mlflow") -> Tracker | RunTracker:
    """The tracking backend `kind` (--tracker): MLflow at `uri` (an MLflow server or store URI, else the state dir's
    embedded SQLite store), or W&B / Neptune writing under the state dir unless their environment says otherwise."""
    if kind == "mlflow":
        return Tracker.for_state_dir(state_dir, uri)
    return open_tracker(kind, state_dir, uri)


def fail(message: str, code: int = 1) -> NoReturn:
    """Say what went wrong and what to do on stderr (`error:` in red on a terminal), and exit with `code`."""
    click.echo(f"{click.style('error:', fg='red', bold=True)} {message}", err=True)
    sys.exit(code)


def open_source(repo: str, state_dir: Path) -> ReleaseSource:
    try:
        source = ReleaseSource.open(repo, state_dir=state_dir)
        source.refresh()
        return source
    except SourceError as err:
        fail(redact(str(err)), 2)


def store_at(path: Path, readonly: bool = True) -> Store:
    """The state store at `path`; a file this diffops cannot use (a newer schema) is an error with what to do."""
    try:
        return Store(path, readonly=readonly)
    except StateFileError as err:
        fail(str(err), 2)


def release_at(source: ReleaseSource, name: str, rev: str | None) -> tuple[Release, str]:
    try:
        snapshot = source.snapshot(rev)
    except SourceError as err:
        fail(str(err), 2)
    release = snapshot.releases.get(name)
    if release is None:
        problems = [str(e) for e in snapshot.errors if Path(e.file).stem == name]
        fail("\n".join(problems) or f"no release {name!r} at {snapshot.revision[:12]}")
    return release, snapshot.revision
