"""Read release files from git objects at a revision, never from the work tree.

First step of a reconcile. A `ReleaseSource` wraps a local repository, or a
mirror clone of a remote URL kept in the state dir and fetched on `refresh()`
(which also pushes back what the controller wrote: notes, revert commits; see
`git_remote`). Credentials in the URL never reach the mirror's config, an argv
or a message (`credentials`).
`snapshot(rev, base=...)` parses `releases/*.yaml` at a revision; given the
previous snapshot it re-reads only the files whose blobs changed, so the cost
of a reconcile grows with what a commit changed, not with the repo.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import git
from gitdb.exc import BadName, BadObject

from controller.parse.loader import InvalidRelease, ReleaseError, parse_release
from controller.parse.release import Release
from controller.parse.safe_yaml import MAX_BYTES
from controller.source import git_remote
from controller.source.credentials import Credentials, env_credentials, git_env, private_dir, redact, split_credentials

__all__ = ["EMPTY_TREE", "ReleaseFile", "ReleaseSource", "Snapshot", "SourceError", "read_release_file"]

RELEASES_DIR = "releases"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"
SHA_RE = re.compile(r"[0-9a-f]{40}")
log = logging.getLogger("diffops.controller")
URL_RE = re.compile(r"^([a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)


class SourceError(Exception):
    """The repository or revision cannot be read."""


@dataclass(frozen=True)
class ReleaseFile:
    path: str
    blob: str
    release: Release | None
    errors: tuple[ReleaseError, ...] = ()


@dataclass(frozen=True)
class Snapshot:
    """Every release file at one revision: valid releases and per-file errors."""

    revision: str  # commit sha, or a tree sha for the empty tree
    tree: str | None  # sha of releases/ at that revision
    files: dict[str, ReleaseFile] = field(default_factory=dict)
    parsed: int = 0  # blobs parsed to build this snapshot (the rest came from the base)

    @property
    def releases(self) -> dict[str, Release]:
        return {f.release.name: f.release for f in self.files.values() if f.release is not None}

    @property
    def errors(self) -> list[ReleaseError]:
        return [error for name in sorted(self.files) for error in self.files[name].errors]


def read_release_file(path: str, blob: git.Blob) -> ReleaseFile:
    if not path.endswith(".yaml"):
        return ReleaseFile(path, blob.hexsha, None, (ReleaseError(path, 1, 1, "release files end in .yaml; rename it"),))
    if blob.size > MAX_BYTES:
        message = f"file is {blob.size} bytes; release files are capped at {MAX_BYTES} bytes"
        return ReleaseFile(path, blob.hexsha, None, (ReleaseError(path, 1, 1, message),))
    try:
        return ReleaseFile(path, blob.hexsha, parse_release(blob.data_stream.read(), path))
    except InvalidRelease as err:
        return ReleaseFile(path, blob.hexsha, None, tuple(err.errors))


def _mirror_path(state_dir: Path, url: str) -> Path:
    return Path(state_dir) / "repos" / (hashlib.sha256(url.encode()).hexdigest()[:16] + ".git")


class ReleaseSource:
    def __init__(self, repo: git.Repo, *, branch: str | None = None, url: str | None = None,
                 credentials: Credentials | None = None):
        self.repo, self.branch, self.url = repo, branch, url  # url: without credentials
        self.secrets = credentials.secrets if credentials else ()
        self._blobs: tuple[str, dict[str, git.Blob | None]] = ("", {})  # one revision's looked-up blobs

    @classmethod
    def open(cls, location: str | Path, *, state_dir: Path | None = None, branch: str | None = None) -> ReleaseSource:
        """A local repository path, or a URL mirrored under `<state_dir>/repos/` (a 0700 directory).

        Credentials come from the URL (`https://user:token@host/...`, stored nowhere) or from
        `DIFFOPS_GIT_PASSWORD`/`DIFFOPS_GIT_USERNAME`; without either, git's own credential helpers apply.
        """
        location = str(location)
        if not URL_RE.match(location):
            try:
                return cls(git.Repo(location), branch=branch)
            except (git.NoSuchPathError, git.InvalidGitRepositoryError):
                raise SourceError(f"{redact(location)}: not a git repository (pass --repo PATH or URL)") from None
        url, credentials = split_credentials(location)
        credentials = credentials or env_credentials()
        secrets = credentials.secrets if credentials else ()
        if state_dir is None:
            raise SourceError(f"{redact(url)}: a remote repository needs a state dir to clone into")
        private_dir(Path(state_dir))
        mirror = _mirror_path(state_dir, url)
        legacy = _mirror_path(state_dir, location)  # older diffops keyed mirrors on the URL as given, secret included
        if legacy != mirror and legacy.is_dir() and not mirror.exists():
            legacy.rename(mirror)
            log.info("source: mirror of %s moved to %s and its stored URL stripped of credentials; next: fetch", url, mirror)
        env = git_env(credentials)
        try:
            if mirror.is_dir():
                repo = git.Repo(mirror)
            else:
                repo = git.Repo.clone_from(url, mirror, mirror=True, env=env)
        except git.GitCommandError as err:
            shutil.rmtree(mirror, ignore_errors=True)  # a half-made mirror would be taken for a clone next time
            raise SourceError(f"{url}: clone failed: {redact(str(err.stderr).strip(), secrets)}; check the URL, "
                              "and the credentials (in the URL, DIFFOPS_GIT_PASSWORD or a git credential helper)") from None
        except (git.InvalidGitRepositoryError, git.NoSuchPathError):
            raise SourceError(f"{mirror} is not a git mirror; remove it and start again (it is re-cloned)") from None
        repo.git.update_environment(**env)  # every later git command on the mirror (fetch, push) gets them
        git_remote.configure(repo, url)
        return cls(repo, branch=branch, url=url, credentials=credentials)

    @property
    def path(self) -> Path:
        return Path(self.repo.working_tree_dir or self.repo.git_dir)

    def refresh(self) -> None:
        """Fetch a remote's branches, tags and notes into the mirror, then push what waits for it; local
        repositories need nothing. A failed fetch is a SourceError (temporary); a failed push is logged and
        retried later (`git_remote.publish`), never fatal to the tick."""
        if self.url:
            try:
                git_remote.fetch(self.repo)
            except git.GitCommandError as err:
                raise SourceError(f"{self.url}: fetch failed: {redact(str(err.stderr).strip(), self.secrets)}") from None
            self.publish()

    def publish(self) -> git_remote.Pushed:
        """Push the controller's notes and queued revert commits to the remote (a local repository: nothing)."""
        if not self.url:
            return git_remote.Pushed()
        try:
            return git_remote.publish(self.repo, self.url, self.secrets)
        except git.GitCommandError as err:  # push failures are handled inside; this is the mirror failing locally
            log.warning("git: could not push to %s (%s); next: retry on the next fetch", self.url,
                        redact(str(err.stderr).strip(), self.secrets))
            return git_remote.Pushed()

    def resolve(self, rev: str | None = None) -> git.Commit | git.Tree:
        """A commit (or the empty tree) by revision; default: the tracked branch head."""
        if rev is None:
            rev = f"refs/heads/{self.branch}" if self.branch else "HEAD"
        if rev == EMPTY_TREE:
            return self.repo.tree(EMPTY_TREE)
        try:
            obj = self.repo.rev_parse(rev)
        except (BadName, BadObject, ValueError, IndexError):
            raise SourceError(f"unknown revision {rev!r} in {self.path}") from None
        if obj.type == "tag":
            obj = obj.object
        if obj.type not in ("commit", "tree"):
            raise SourceError(f"{rev!r} is a {obj.type}, not a commit")
        return obj

    def holds(self, sha: str) -> bool:
        """Whether the repository holds this commit (`resolve` takes a full hex id on trust)."""
        try:
            self.repo.git.cat_file("-e", f"{sha}^{{commit}}")
        except git.GitCommandError:
            return False
        return True

    def parent_of(self, rev: str) -> str:
        """The first parent of a commit, or the empty tree for a root commit."""
        commit = self.resolve(rev)
        parents = getattr(commit, "parents", ())
        return parents[0].hexsha if parents else EMPTY_TREE

    def blob(self, rev: str, path: str) -> git.Blob | None:
        """The blob at `path` in a revision's tree, or None when there is none.

        Lookups at the latest commit sha asked for are remembered (a sha never changes what it names): a tick
        asks once per release for the same commit, and each fresh lookup re-reads the trees on the way.
        """
        if not SHA_RE.fullmatch(rev):
            return self._find_blob(rev, path)
        if self._blobs[0] != rev:
            self._blobs = (rev, {})
        found = self._blobs[1]
        if path not in found:
            found[path] = self._find_blob(rev, path)
        return found[path]

    def _find_blob(self, rev: str, path: str) -> git.Blob | None:
        obj = self.resolve(rev)
        tree = obj.tree if obj.type == "commit" else obj
        try:
            item = tree / path
        except KeyError:
            return None
        return item if item.type == "blob" else None

    def snapshot(self, rev: str | None = None, base: Snapshot | None = None) -> Snapshot:
        obj = self.resolve(rev)
        tree = obj.tree if obj.type == "commit" else obj
        try:
            releases_tree = tree / RELEASES_DIR
        except KeyError:
            return Snapshot(obj.hexsha, None)
        if base is not None and base.tree == releases_tree.hexsha:
            return Snapshot(obj.hexsha, base.tree, base.files, 0)
        reuse = base.files if base is not None else {}
        files, parsed = {}, 0
        for blob in releases_tree.blobs:
            if not blob.name.endswith((".yaml", ".yml")):
                continue
            path = os.fspath(blob.path)
            known = reuse.get(path)
            if known is not None and known.blob == blob.hexsha:
                files[path] = known
            else:
                files[path] = read_release_file(path, blob)
                parsed += 1
        return Snapshot(obj.hexsha, releases_tree.hexsha, files, parsed)
