"""Make git agree again after an automatic rollback: commit a revert of the release file.

Optional (`diffops controller run --revert-on-abort branch|tracked`). The new
commit restores `releases/<name>.yaml` as it was at the last fully applied
commit, built with git plumbing (a temporary index, `commit-tree`), so no work
tree is touched. `branch` puts it on `diffops/revert-<release>-<shortsha>` for a
pull request; `tracked` moves the followed branch itself, only if it still
points at the commit that was rolled back. In the mirror of a `--repo URL`
the commit is pushed to the remote (the mirror's branches are the remote's:
the next fetch would drop a local one); until a push succeeds it waits in the
mirror's outbox and is retried (`git_remote`).
"""

from __future__ import annotations

import os
import tempfile

import git

from controller.source import git_remote

__all__ = ["RevertError", "revert_release"]

AUTHOR = git_remote.IDENTITY


class RevertError(Exception):
    pass


def revert_release(repo: git.Repo, head: str, release: str, good: str, reason: str, mode: str, branch: str | None) -> tuple[str, str]:
    """Commit `releases/<release>.yaml` as of `good` on top of `head`; return (commit sha, ref)."""
    path = f"releases/{release}.yaml"
    try:
        blob = repo.commit(good).tree / path
    except KeyError:
        raise RevertError(f"{path} does not exist at {good[:12]}") from None
    with tempfile.TemporaryDirectory() as tmp:
        env = {**AUTHOR, "GIT_INDEX_FILE": os.path.join(tmp, "index")}
        with repo.git.custom_environment(**env):
            repo.git.read_tree(head)
            repo.git.update_index("--cacheinfo", f"100644,{blob.hexsha},{path}")
            tree = repo.git.write_tree()
            message = f"diffops: revert {release} to {good[:12]} after an automatic rollback\n\n{reason}\n"
            commit = repo.git.commit_tree(tree, "-p", head, "-m", message)
    if mode == "tracked" and not branch:
        raise RevertError("--revert-on-abort tracked needs --branch")
    ref = f"refs/heads/{branch}" if mode == "tracked" else f"refs/heads/diffops/revert-{release}-{head[:7]}"
    if git_remote.is_mirror(repo):
        git_remote.queue(repo, commit, ref)
        if ref in git_remote.publish(repo, repo.remotes.origin.url).refused:
            raise RevertError(f"{branch} moved on since {head[:12]} on the remote; the revert {commit[:12]} was not pushed")
        return commit, ref  # pushed, or waiting in the mirror's outbox for the next try
    if mode == "tracked":
        try:
            repo.git.update_ref(ref, commit, head)  # only if the branch still points at the rolled-back commit
        except git.GitCommandError:
            raise RevertError(f"{branch} moved on since {head[:12]}; the revert is left at {commit[:12]}") from None
    else:
        repo.git.update_ref(ref, commit)
    return commit, ref
