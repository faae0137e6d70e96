"""Git tells the truth: notes on decided commits, and revert commits after an automatic rollback."""

from __future__ import annotations

import pytest

from controller.git_notes import annotate
from controller.git_revert import RevertError, revert_release
from controller.records import Event
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
