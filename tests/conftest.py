"""Shared fixtures: real temporary git repositories holding release files and the demo model."""

from __future__ import annotations

import shutil
from pathlib import Path

import git
import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_RELEASE = (ROOT / "releases" / "demo.yaml").read_text()
DEMO_MODEL = ROOT / "models" / "tiny-sd"


class ReleaseRepo:
    """A real git repository in a temp dir, with helpers to write and commit files."""

    def __init__(self, path: Path):
        self.path = path
        self.repo = git.Repo.init(path, initial_branch="main")
        with self.repo.config_writer() as config:
            config.set_value("user", "name", "Release Author")
            config.set_value("user", "email", "author@example.com")
            config.set_value("commit", "gpgsign", "false")

    def write(self, relpath: str, content: str | bytes) -> Path:
        target = self.path / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
        return target

    def remove(self, relpath: str) -> None:
        self.repo.index.remove([relpath], working_tree=True)

    def commit(self, message: str = "change") -> str:
        self.repo.git.add("-A")
        self.repo.git.commit("-m", message, "--allow-empty")
        return self.repo.head.commit.hexsha

    def release(self, name: str = "demo", text: str = DEMO_RELEASE, **replacements: str) -> Path:
        text = text.replace("name: demo", f"name: {name}")
        for old, new in replacements.items():
            text = text.replace(old.replace("__", " "), new)
        return self.write(f"releases/{name}.yaml", text)


@pytest.fixture
def release_repo(tmp_path: Path) -> ReleaseRepo:
    return ReleaseRepo(tmp_path / "repo")


@pytest.fixture
def model_repo(release_repo: ReleaseRepo) -> ReleaseRepo:
    """A release repo holding the demo release and the demo model, committed."""
    shutil.copytree(DEMO_MODEL, release_repo.path / "models" / "tiny-sd")
    release_repo.release()
    release_repo.commit("demo release")
    return release_repo


def edit(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} not in release text"
    return text.replace(old, new, 1)
