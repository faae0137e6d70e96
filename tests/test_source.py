"""Reading releases from git objects: revisions, incremental re-reads, remote mirrors."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from controller.source.git_source import EMPTY_TREE, ReleaseSource, SourceError
from tests.conftest import ReleaseRepo


def test_reads_committed_blobs_not_the_work_tree(release_repo: ReleaseRepo):
    release_repo.release()
    first = release_repo.commit()
    release_repo.release(**{"steps: 4": "steps: 9"})  # edited, not committed
    source = ReleaseSource.open(release_repo.path)
    assert source.snapshot().releases["demo"].spec.generation.steps == 4
    release_repo.commit()
    assert source.snapshot().releases["demo"].spec.generation.steps == 9
    assert source.snapshot(first).releases["demo"].spec.generation.steps == 4


def test_one_bad_file_never_hides_another(release_repo: ReleaseRepo):
    release_repo.release("good")
    release_repo.release("bad1", **{"    dtype: float32\n": "    dtype: float32\n    x: 1\n"})
    release_repo.release("bad2", **{"steps: 4": "steps: 99"})
    release_repo.write("releases/old.yml", "apiVersion: diffops/v1\n")
    release_repo.write("releases/README.md", "not a release")
    release_repo.commit()
    snapshot = ReleaseSource.open(release_repo.path).snapshot()
    assert set(snapshot.releases) == {"good"}
    assert sorted({e.file for e in snapshot.errors}) == ["releases/bad1.yaml", "releases/bad2.yaml", "releases/old.yml"]


def test_only_changed_blobs_are_reparsed(release_repo: ReleaseRepo):
    for i in range(20):
        release_repo.release(f"r{i}")
    first = release_repo.commit()
    source = ReleaseSource.open(release_repo.path)
    base = source.snapshot(first)
    assert base.parsed == 20

    release_repo.release("r7", **{"count: 1": "count: 2"})
    one_change = source.snapshot(release_repo.commit(), base=base)
    assert one_change.parsed == 1
    assert one_change.releases["r7"].spec.replicas.count == 2
    assert one_change.releases["r3"] is base.releases["r3"]

    release_repo.write("README.md", "unrelated")
    unrelated = source.snapshot(release_repo.commit(), base=one_change)
    assert unrelated.parsed == 0 and len(unrelated.releases) == 20

    release_repo.remove("releases/r0.yaml")
    removed = source.snapshot(release_repo.commit(), base=unrelated)
    assert removed.parsed == 0 and "r0" not in removed.releases


def test_empty_tree_and_repo_without_releases(release_repo: ReleaseRepo):
    release_repo.write("README.md", "nothing yet")
    release_repo.commit()
    source = ReleaseSource.open(release_repo.path)
    assert source.snapshot().releases == {}
    assert source.snapshot(EMPTY_TREE).releases == {}
    assert source.parent_of("HEAD") == EMPTY_TREE


def test_unknown_revision_and_non_repo(release_repo: ReleaseRepo, tmp_path):
    release_repo.release()
    release_repo.commit()
    source = ReleaseSource.open(release_repo.path)
    with pytest.raises(SourceError, match="unknown revision 'nope'"):
        source.snapshot("nope")
    with pytest.raises(SourceError, match="not a git repository"):
        ReleaseSource.open(tmp_path / "empty-dir")


def test_remote_url_is_mirrored_and_fetched(release_repo: ReleaseRepo, tmp_path):
    release_repo.release()
    release_repo.commit()
    url = f"file://{release_repo.path}"
    source = ReleaseSource.open(url, state_dir=tmp_path / "state", branch="main")
    assert source.snapshot().releases["demo"].spec.generation.steps == 4
    assert (tmp_path / "state" / "repos").is_dir()

    release_repo.release(**{"steps: 4": "steps: 6"})
    release_repo.commit()
    assert source.snapshot().releases["demo"].spec.generation.steps == 4  # not fetched yet
    source.refresh()
    assert source.snapshot().releases["demo"].spec.generation.steps == 6
    reopened = ReleaseSource.open(url, state_dir=tmp_path / "state", branch="main")
    assert reopened.repo.git_dir == source.repo.git_dir


def test_mirror_fetch_prunes_branches_but_keeps_what_the_controller_wrote(release_repo: ReleaseRepo, tmp_path):
    release_repo.release()
    first = release_repo.commit()
    release_repo.repo.git.branch("feature")
    source = ReleaseSource.open(f"file://{release_repo.path}", state_dir=tmp_path / "state", branch="main")
    mirror = source.repo
    assert mirror.git.config("--get-all", "remote.origin.fetch").splitlines() == [
        "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*", "+refs/notes/*:refs/notes/origin/*"]
    assert mirror.git.config("--get", "remote.origin.mirror", with_exceptions=False) == ""  # no push --mirror
    mirror.git.notes("--ref=diffops", "add", "-m", "live", first)  # what the controller writes locally
    mirror.git.update_ref("refs/diffops/outbox/heads/diffops/revert-demo-1234567", first)

    release_repo.repo.git.branch("-D", "feature")
    source.refresh()
    refs = mirror.git.for_each_ref("--format=%(refname)").splitlines()
    assert "refs/heads/feature" not in refs and "refs/heads/main" in refs  # the remote is the truth for branches
    # the fetch left what the controller wrote in place, and the push after it delivered both to the remote
    assert "refs/notes/diffops" in refs and "refs/heads/diffops/revert-demo-1234567" in refs
    assert release_repo.repo.git.notes("--ref=diffops", "show", first) == "live"
    assert release_repo.repo.git.rev_parse("diffops/revert-demo-1234567") == first


def test_a_mirror_made_by_an_older_diffops_is_healed(release_repo: ReleaseRepo, tmp_path):
    release_repo.release()
    release_repo.commit()
    url = f"file://{release_repo.path}"
    old = ReleaseSource.open(url, state_dir=tmp_path / "state").repo.git_dir
    git_dir = Path(old)
    subprocess.run(["git", "-C", old, "config", "remote.origin.mirror", "true"], check=True)  # `clone --mirror` config
    subprocess.run(["git", "-C", old, "config", "--replace-all", "remote.origin.fetch", "+refs/*:refs/*"], check=True)
    ReleaseSource.open(url, state_dir=tmp_path / "state")
    config = (git_dir / "config").read_text()
    assert "mirror = true" not in config and "+refs/*:refs/*" not in config


def test_unreachable_remote_says_so(tmp_path):
    with pytest.raises(SourceError, match="clone failed"):
        ReleaseSource.open(f"file://{tmp_path}/missing.git", state_dir=tmp_path / "state")
