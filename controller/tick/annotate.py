"""Annotate: git says what happened to each commit, and agrees again after an automatic rollback.

The last phase of a reconcile (`controller.tick`), after the plan is recorded
and applied. Each decision about a commit becomes a git note on it
(`controller.state.git_notes`); with --revert-on-abort, an automatic rollback
commits a revert of the release file (`controller.state.git_revert`). In the
mirror of a `--repo URL` both are pushed. Nothing here is fatal: what cannot be
written is logged with what to do by hand.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import git
from git import GitCommandError

from controller.state import git_notes, git_revert
from controller.state.records import Event

__all__ = ["Reverts", "annotate", "revert_aborted"]

log = logging.getLogger("diffops.controller")


@dataclass(frozen=True)
class Reverts:
    """--revert-on-abort: `off`, `branch` (a branch for a pull request) or `tracked` (the followed branch itself)."""

    mode: str = "off"
    branch: str | None = None  # the followed branch (--branch)


def annotate(repo: git.Repo, events: Sequence[Event], head: str, good: str | None, reverts: Reverts) -> None:
    """Note each decision on its commit; revert what was rolled back automatically. `good`: the last fully applied
    commit before this tick."""
    git_notes.annotate(repo, list(events))
    if reverts.mode != "off":
        revert_aborted(repo, events, head, good, reverts)


def revert_aborted(repo: git.Repo, events: Sequence[Event], head: str, good: str | None, reverts: Reverts) -> None:
    """After an automatic rollback, commit a revert so desired and live state agree again."""
    for event in events:
        if event.kind != "aborted" or "aborted by" in event.message:
            continue
        if good is None:
            log.warning("%s: no fully applied commit to revert to; next: revert the commit by hand", event.release)
            continue
        try:
            commit, ref = git_revert.revert_release(repo, head, event.release, good, event.message, reverts.mode, reverts.branch)
        except (git_revert.RevertError, GitCommandError) as err:
            log.warning("%s: could not commit a revert (%s); next: revert the commit by hand", event.release, err)
            continue
        log.info("%s: committed revert %s on %s (releases/%s.yaml as of %s); next: merge it so git matches what serves",
                 event.release, commit[:12], ref, event.release, good[:12], extra={"subject": event.release, "event": "reverted"})
