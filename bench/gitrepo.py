"""Git repositories for the benchmarks: a release repo to commit to, and large histories built fast.

`ReleaseRepo` is a temporary work tree holding the demo model, the golden
reference and release files, committed with the git CLI (the controller
watches its refs, as it would a real checkout). `build_history` writes N
release files and an H-commit history in one `git fast-import` stream (seconds
even at 1000 × 1000); `append_commit` adds one commit the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "tiny-sd"
GOLDEN = ROOT / "releases" / "golden"
DEMO_RELEASE = ROOT / "releases" / "demo.yaml"
IDENTITY = {"GIT_AUTHOR_NAME": "diffops bench", "GIT_AUTHOR_EMAIL": "bench@diffops.invalid",
            "GIT_COMMITTER_NAME": "diffops bench", "GIT_COMMITTER_EMAIL": "bench@diffops.invalid"}
HISTORY_EPOCH = 1_700_000_000


def git(repo: Path, *args: str, stdin: bytes | None = None) -> str:
    result = subprocess.run(["git", "-C", str(repo), "-c", "commit.gpgsign=false", *args], input=stdin,
                            capture_output=True, env={**os.environ, **IDENTITY})
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args[:2])} failed in {repo}: {result.stderr.decode().strip()[-1000:]}")
    return result.stdout.decode().strip()


def demo_release(name: str = "demo") -> str:
    """The repo's demo release file, renamed."""
    return DEMO_RELEASE.read_text().replace("name: demo", f"name: {name}", 1)


def edit(text: str, replacements: dict[str, str]) -> str:
    """Replace each `old` (which must be there) once."""
    for old, new in replacements.items():
        if old not in text:
            raise ValueError(f"{old!r} is not in the release text")
        text = text.replace(old, new, 1)
    return text


class ReleaseRepo:
    """A work tree with the demo model and golden reference, committed on `main`."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "-q", "-b", "main")
        shutil.copytree(DEMO_MODEL, path / "models" / "tiny-sd")
        shutil.copytree(GOLDEN, path / "releases" / "golden")

    def release_text(self, name: str = "demo") -> str:
        return (self.path / "releases" / f"{name}.yaml").read_text()

    def write_release(self, text: str, name: str = "demo") -> None:
        (self.path / "releases" / f"{name}.yaml").write_text(text)

    def commit(self, message: str) -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "-m", message)
        return git(self.path, "rev-parse", "HEAD")

    def revert_head(self) -> str:
        git(self.path, "revert", "--no-edit", "HEAD")
        return git(self.path, "rev-parse", "HEAD")


def _data(payload: bytes) -> bytes:
    return b"data %d\n" % len(payload) + payload + b"\n"


def _commit(message: str, when: int, changes: dict[str, bytes], parent: str | None) -> bytes:
    head = [b"commit refs/heads/main\n", b"author diffops bench <bench@diffops.invalid> %d +0000\n" % when,
            b"committer diffops bench <bench@diffops.invalid> %d +0000\n" % when, _data(message.encode())]
    if parent:
        head.append(f"from {parent}\n".encode())
    body = [b"M 100644 inline " + path.encode() + b"\n" + _data(content) for path, content in sorted(changes.items())]
    return b"".join(head + body) + b"\n"


def fixture_files() -> dict[str, bytes]:
    """The demo model and the golden reference, as repo paths."""
    files = {}
    for folder, prefix in ((DEMO_MODEL, "models/tiny-sd"), (GOLDEN, "releases/golden")):
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                files[f"{prefix}/{path.relative_to(folder).as_posix()}"] = path.read_bytes()
    return files


def release_name(index: int) -> str:
    return f"r{index:04d}"


def build_history(path: Path, releases: int, commits: int) -> str:
    """A repo with `releases` release files and `commits` commits; each later commit edits one release's limits."""
    path.mkdir(parents=True, exist_ok=True)
    git(path, "init", "-q", "-b", "main")
    texts = {release_name(i): demo_release(release_name(i)) for i in range(releases)}
    first = {**fixture_files(), **{f"releases/{name}.yaml": text.encode() for name, text in texts.items()}}
    stream = [_commit(f"{releases} releases", HISTORY_EPOCH, first, None)]
    for number in range(1, commits):
        name = release_name(number % releases)
        texts[name] = re.sub(r"max_prompt_chars: \d+", f"max_prompt_chars: {1000 + number}", texts[name])
        stream.append(_commit(f"{name}: limits", HISTORY_EPOCH + number, {f"releases/{name}.yaml": texts[name].encode()}, None))
    git(path, "fast-import", "--quiet", stdin=b"".join(stream))
    return git(path, "rev-parse", "refs/heads/main")


def append_commit(path: Path, changes: dict[str, bytes], message: str) -> str:
    """One more commit on main (no work tree involved)."""
    count = int(git(path, "rev-list", "--count", "refs/heads/main"))
    git(path, "fast-import", "--quiet", stdin=_commit(message, HISTORY_EPOCH + count, changes, "refs/heads/main^0"))
    return git(path, "rev-parse", "refs/heads/main")


def blob_text(path: Path, repo_path: str) -> str:
    return git(path, "show", f"refs/heads/main:{repo_path}") + "\n"
