"""The mirror of a `--repo URL`: fetched without losing what the controller wrote, and pushed back.

Sits under `source.ReleaseSource` (refresh) and behind `git_notes` and
`git_revert`. The mirror fetches branches and tags (pruned, forced: the
remote is the truth for them) and the remote's notes into
`refs/notes/origin/*`, which are merged into the controller's own
`refs/notes/diffops` (cat_sort_uniq: every line kept once), so a fetch never
deletes a note. What the controller writes for the remote waits in
`refs/diffops/outbox/...` (a namespace no fetch touches) until a push
succeeds; a push that fails is retried with capped exponential backoff, and
one the remote rejects for good (the branch moved on) is dropped with a log
line saying where the commit is.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass

import git

from controller import errors
from controller.source.credentials import redact

__all__ = ["IDENTITY", "MAX_RETRY_S", "Pushed", "configure", "fetch", "is_mirror", "next_delay", "pending", "publish", "queue"]

log = logging.getLogger("diffops.controller")

NOTES, NOTES_TRACKING = "refs/notes/diffops", "refs/notes/origin/diffops"
OUTBOX = "refs/diffops/outbox/"
OWN_BRANCHES = "refs/heads/diffops/"  # revert branches: ours to force-push
FETCH_REFSPECS = ("+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "+refs/notes/*:refs/notes/origin/*")
IDENTITY = {"GIT_AUTHOR_NAME": "diffops controller", "GIT_AUTHOR_EMAIL": "diffops@localhost",
            "GIT_COMMITTER_NAME": "diffops controller", "GIT_COMMITTER_EMAIL": "diffops@localhost"}
FIRST_RETRY_S, MAX_RETRY_S = 5.0, 300.0


@dataclass
class Backoff:
    """When the next push may be tried, per mirror; longer on each failure, reset on success."""

    attempt: int = 0
    not_before: float = 0.0


_backoff: dict[str, Backoff] = {}


@dataclass(frozen=True)
class Pushed:
    """What one `publish` did, by remote ref."""

    pushed: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()  # failed or not tried yet (backoff): pushed again later
    refused: tuple[str, ...] = ()  # the remote moved on: dropped, with a log line


def next_delay(attempt: int, rand: float) -> float:
    """Seconds before push try `attempt + 1`: the taxonomy's capped exponential backoff with jitter."""
    return errors.backoff(FIRST_RETRY_S, attempt, lambda: rand, cap=MAX_RETRY_S)


def is_mirror(repo: git.Repo) -> bool:
    return repo.bare and repo.config_reader().get_value("diffops", "mirror", False) is True


def configure(repo: git.Repo, url: str) -> None:
    """Point the mirror at `url` (no credentials in it) with the refspecs above; heals mirrors made by `clone --mirror`."""
    with repo.config_writer() as config:
        config.set_value('remote "origin"', "url", url)
        if config.has_option('remote "origin"', "mirror"):
            config.remove_option('remote "origin"', "mirror")  # mirror=true would make every push a --mirror push
        config.set_value("diffops", "mirror", True)
    repo.git.config("--replace-all", "remote.origin.fetch", FETCH_REFSPECS[0])
    for refspec in FETCH_REFSPECS[1:]:
        repo.git.config("--add", "remote.origin.fetch", refspec)


def _sha(repo: git.Repo, ref: str) -> str | None:
    try:
        return repo.git.rev_parse("--verify", "--quiet", ref) or None
    except git.GitCommandError:
        return None


def fetch(repo: git.Repo) -> None:
    """Fetch branches, tags and notes; keep the controller's notes (merged with the remote's)."""
    repo.git.fetch("--prune", "origin")
    theirs, ours = _sha(repo, NOTES_TRACKING), _sha(repo, NOTES)
    if theirs is None or theirs == ours:
        return
    if ours is None:
        repo.git.update_ref(NOTES, theirs)
        return
    with repo.git.custom_environment(**IDENTITY):
        repo.git.notes("--ref=diffops", "merge", "--quiet", "-s", "cat_sort_uniq", NOTES_TRACKING)


def queue(repo: git.Repo, commit: str, remote_ref: str) -> None:
    """Leave `commit` for the remote's `remote_ref`; `publish` pushes it."""
    repo.git.update_ref(OUTBOX + remote_ref.removeprefix("refs/"), commit)


def pending(repo: git.Repo) -> list[tuple[str, str]]:
    """(outbox ref, remote ref) for every commit still waiting to be pushed."""
    out = repo.git.for_each_ref("--format=%(refname)", OUTBOX)
    return [(ref, "refs/" + ref.removeprefix(OUTBOX)) for ref in out.splitlines() if ref]


def _rejected(err: git.GitCommandError) -> bool:
    text = f"{err.stdout or ''}\n{err.stderr or ''}"
    return "[rejected]" in text or "stale info" in text or "[remote rejected]" in text


def _reason(err: git.GitCommandError, secrets: tuple[str, ...]) -> str:
    """git's own words for a failed push, on one line: the porcelain status line, else the last stderr line."""
    lines = [line for line in f"{err.stdout or ''}\n{err.stderr or ''}".splitlines() if line.strip()]
    status = [line.split("\t")[-1] for line in lines if line.startswith("!")]
    text = status[0] if status else (lines[-1] if lines else f"exit {err.status}")
    return redact(text.strip().removeprefix("stderr: ").strip("'"), secrets)


def publish(repo: git.Repo, url: str, secrets: tuple[str, ...] = (), now: float | None = None) -> Pushed:
    """Push the notes and every queued commit. Failures are logged and retried on a later call (backoff)."""
    now = time.monotonic() if now is None else now
    backoff = _backoff.setdefault(os.fspath(repo.git_dir), Backoff())
    notes_ahead = _sha(repo, NOTES) not in (None, _sha(repo, NOTES_TRACKING))
    if now < backoff.not_before:
        return Pushed(waiting=(*[NOTES] * notes_ahead, *(remote for _, remote in pending(repo))))
    pushed: list[str] = []
    waiting: list[str] = []
    refused: list[str] = []
    failures: list[str] = []
    if notes_ahead:
        try:
            try:
                repo.git.push("--porcelain", "origin", f"{NOTES}:{NOTES}")
            except git.GitCommandError as err:
                if not _rejected(err):
                    raise
                fetch(repo)  # someone else pushed notes meanwhile: merge theirs, then push the union
                repo.git.push("--porcelain", "origin", f"{NOTES}:{NOTES}")
            repo.git.update_ref(NOTES_TRACKING, _sha(repo, NOTES))
            pushed.append(NOTES)
        except git.GitCommandError as err:
            waiting.append(NOTES)
            failures.append(f"notes {NOTES} ({_reason(err, secrets)})")
    for outbox, remote in pending(repo):
        commit = _sha(repo, outbox)
        assert commit is not None
        if remote.startswith(OWN_BRANCHES):
            args = [f"+{outbox}:{remote}"]
        else:  # someone else's branch: only if it still points at the commit the revert was made on
            args = [f"--force-with-lease={remote}:{_sha(repo, commit + '^')}", f"{outbox}:{remote}"]
        try:
            repo.git.push("--porcelain", "origin", *args)
        except git.GitCommandError as err:
            if _rejected(err):
                repo.git.update_ref("-d", outbox)
                refused.append(remote)
                log.warning("git: %s refused %s for %s (%s); next: not retried; to keep it, push %s from the mirror %s "
                            "to a branch by hand", redact(url, secrets), commit[:12], remote, _reason(err, secrets),
                            commit, repo.git_dir)
                continue
            waiting.append(remote)
            failures.append(f"{commit[:12]} to {remote} ({_reason(err, secrets)})")
            continue
        repo.git.update_ref("-d", outbox)
        pushed.append(remote)
        log.info("git: pushed %s to %s of %s; next: carry on", commit[:12], remote, redact(url, secrets))
    if failures:
        backoff.attempt += 1
        delay = next_delay(backoff.attempt, random.random())
        backoff.not_before = now + delay
        log.warning("git: could not push %s to %s; they stay in the mirror; next: retry in %.0fs; to fix: give these "
                    "credentials push access to the repository (notes and revert commits are pushed there)", "; ".join(failures),
                    redact(url, secrets), delay)
    else:
        _backoff.pop(os.fspath(repo.git_dir), None)
    return Pushed(tuple(pushed), tuple(waiting), tuple(refused))
