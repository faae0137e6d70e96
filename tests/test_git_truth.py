"""Git tells the truth: notes on decided commits, and revert commits after an automatic rollback.

Against a local repository, and against a remote (`--repo URL`, here a bare repo over file://) where both must
reach the remote and survive the mirror's fetches."""

from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path

import git
import pytest

from controller.source import git_remote
from controller.source.git_source import ReleaseSource
from controller.state.git_notes import annotate
from controller.state.git_revert import RevertError, revert_release
from controller.state.records import Event
from tests.conftest import ReleaseRepo


@pytest.fixture
def two_commits(release_repo: ReleaseRepo):
    release_repo.release()
    good = release_repo.commit("good")
    release_repo.release(**{"steps: 4": "steps: 9"})
    bad = release_repo.commit("bad")
    return release_repo, good, bad


def test_notes_record_each_decision(two_commits):
    repo, good, bad = two_commits
    annotate(repo.repo, [Event("demo", "promoted", "v1 ready", "v1", good, 1.0), Event("demo", "aborted", "error rate 0.50 > 0.05", "v2", bad, 2.0),
                         Event("demo", "step", "not a decision", "v2", bad, 3.0)])
    log = repo.repo.git.log("--notes=diffops", "--format=%H %N")
    assert "demo v1: live: v1 ready" in log and "demo v2: rolled back: error rate 0.50 > 0.05" in log
    assert "not a decision" not in log


def test_revert_on_a_branch_leaves_the_work_tree_alone(two_commits):
    repo, good, bad = two_commits
    before = (repo.path / "releases" / "demo.yaml").read_text()
    commit, ref = revert_release(repo.repo, bad, "demo", good, "canary rolled back: error rate 0.5 > 0.05", "branch", None)
    assert ref == f"refs/heads/diffops/revert-demo-{bad[:7]}"
    reverted = repo.repo.commit(commit)
    assert reverted.parents[0].hexsha == bad and "error rate 0.5 > 0.05" in reverted.message
    assert (reverted.tree / "releases/demo.yaml").hexsha == (repo.repo.commit(good).tree / "releases/demo.yaml").hexsha
    assert repo.repo.head.commit.hexsha == bad and (repo.path / "releases" / "demo.yaml").read_text() == before


def test_revert_on_the_tracked_branch_only_if_it_did_not_move(two_commits):
    repo, good, bad = two_commits
    commit, ref = revert_release(repo.repo, bad, "demo", good, "rolled back", "tracked", "main")
    assert ref == "refs/heads/main" and repo.repo.commit("main").hexsha == commit
    with pytest.raises(RevertError, match="moved on"):
        revert_release(repo.repo, bad, "demo", good, "rolled back", "tracked", "main")


@pytest.fixture
def remote(two_commits, tmp_path):
    """The release repo published as a bare remote (file://), the author pushing to it, and a controller's mirror."""
    author, good, bad = two_commits
    bare = tmp_path / "remote.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(author.path), str(bare)], check=True)
    author.repo.create_remote("origin", str(bare))
    source = ReleaseSource.open(f"file://{bare}", state_dir=tmp_path / "state", branch="main")
    return author, git.Repo(bare), source, good, bad


def notes_at(repo: git.Repo, commit: str) -> str:
    return repo.git.log("--notes=diffops", "-1", "--format=%N", commit)


def test_notes_on_a_url_repo_reach_the_remote_and_survive_fetches(remote):
    author, bare, source, good, bad = remote
    annotate(source.repo, [Event("demo", "promoted", "v1 ready", "v1", good, 1.0)])
    assert "demo v1: live: v1 ready" in notes_at(bare, good)  # pushed right away

    other = git.Repo.clone_from(str(bare.git_dir), author.path.parent / "other")  # someone else notes the same commit
    other.git.fetch("origin", "refs/notes/diffops:refs/notes/diffops")
    other.git.notes("--ref=diffops", "append", "-m", "reviewed by ops", good)
    other.git.push("origin", "refs/notes/diffops")
    # our push is rejected (the remote's notes moved on): theirs are fetched and merged, then the union is pushed
    annotate(source.repo, [Event("demo", "failed", "golden: ssim 0.5 < 0.9", "v2", bad, 2.0)])
    for _ in range(2):  # and fetches keep both
        for repo in (source.repo, bare):
            assert "demo v1: live: v1 ready" in notes_at(repo, good) and "reviewed by ops" in notes_at(repo, good)
            assert "demo v2: held back: golden: ssim 0.5 < 0.9" in notes_at(repo, bad)
        source.refresh()


def test_a_push_that_fails_is_kept_and_retried(remote, caplog):
    _, bare, source, good, _ = remote
    away = Path(bare.git_dir).with_suffix(".away")
    Path(bare.git_dir).rename(away)  # the remote is unreachable
    with caplog.at_level(logging.WARNING, logger="diffops.controller"):
        annotate(source.repo, [Event("demo", "promoted", "v1 ready", "v1", good, 1.0)])
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("git: could not push notes refs/notes/diffops (") and "they stay in the mirror; next: retry in" in line
    assert "to fix: give these credentials push access" in line
    away.rename(bare.git_dir)
    assert source.publish().waiting == ("refs/notes/diffops",)  # backing off: not tried yet
    assert git_remote.publish(source.repo, source.url, now=time.monotonic() + git_remote.MAX_RETRY_S).pushed == ("refs/notes/diffops",)
    assert "demo v1: live: v1 ready" in notes_at(git.Repo(bare.git_dir), good)


def test_revert_branch_on_a_url_repo_is_pushed_and_survives_fetches(remote):
    _, bare, source, good, bad = remote
    commit, ref = revert_release(source.repo, bad, "demo", good, "rolled back", "branch", None)
    assert ref == f"refs/heads/diffops/revert-demo-{bad[:7]}"
    assert bare.git.rev_parse(ref) == commit and bare.git.rev_parse("refs/heads/main") == bad
    source.refresh()
    assert source.repo.git.rev_parse(ref) == commit and git_remote.pending(source.repo) == []


def test_revert_tracked_on_a_url_repo_moves_the_remote_branch_only_if_it_did_not_move(remote):
    author, bare, source, good, bad = remote
    commit, ref = revert_release(source.repo, bad, "demo", good, "rolled back", "tracked", "main")
    assert ref == "refs/heads/main" and bare.git.rev_parse("main") == commit
    source.refresh()
    assert source.resolve().hexsha == commit  # the controller now follows the revert

    author.repo.git.pull("-q", "origin", "main")
    author.release(**{"steps: 4": "steps: 5"})
    moved = author.commit("meanwhile")
    author.repo.git.push("-q", "origin", "main")
    with pytest.raises(RevertError, match="moved on since"):
        revert_release(source.repo, commit, "demo", good, "rolled back again", "tracked", "main")
    assert bare.git.rev_parse("main") == moved and git_remote.pending(source.repo) == []


@pytest.mark.parametrize("attempt, rand, expected", [
    (1, 1.0, 5.0),  # first failure: the first delay
    (1, 0.0, 2.5),  # jitter: down to half
    (2, 1.0, 10.0),  # doubled
    (3, 0.5, 15.0),
    (7, 1.0, 300.0),  # capped
    (30, 0.0, 150.0),  # capped, then jittered
])
def test_push_retry_backoff_table(attempt, rand, expected):
    assert git_remote.next_delay(attempt, rand) == pytest.approx(expected)
