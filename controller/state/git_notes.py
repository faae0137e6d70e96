"""Git tells the truth: each decision about a commit is written as a note under `refs/notes/diffops`.

`git log --notes=diffops` then shows which commits went live, were held back
or were rolled back. Record step, after the state is saved; a note that cannot
be written is logged, never fatal. In the mirror of a `--repo URL` the notes
are pushed to the remote right away, and again on every fetch until a push
succeeds (`git_remote`); fetches merge the remote's notes, never drop ours.
"""

from __future__ import annotations

import logging
import time

import git

from controller.source import git_remote
from controller.state.records import Event

__all__ = ["NOTES_REF", "annotate"]

log = logging.getLogger("diffops.controller")
NOTES_REF = "diffops"
NOTED = {"promoted": "live", "rolled-back": "live again (warm standby)", "failed": "held back", "aborted": "rolled back"}


def _note_line(event: Event) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event.at or time.time()))
    return f"{when} {event.release} {event.version or '-'}: {NOTED[event.kind]}: {event.message}"


def annotate(repo: git.Repo, events: list[Event]) -> None:
    written = False
    for event in events:
        if event.kind not in NOTED or not event.commit:
            continue
        try:
            repo.git.notes(f"--ref={NOTES_REF}", "append", "-m", _note_line(event), event.commit)
            written = True
        except git.GitCommandError as err:
            log.warning("%s: could not write a git note on %s (%s); next: carry on", event.release, event.commit[:12], err.stderr.strip())
    if written and git_remote.is_mirror(repo):
        try:
            git_remote.publish(repo, repo.remotes.origin.url)
        except git.GitCommandError as err:  # publish logs push failures itself; this is the mirror failing locally
            log.warning("git: could not push notes from %s (%s); next: retry on the next fetch", repo.git_dir, err.stderr.strip())
