"""The `diffops` console script as a release author runs it, in real git repositories."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ReleaseRepo

DIFFOPS = str(Path(sys.executable).with_name("diffops"))


def run(*args: str, cwd: Path, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    env_state = ["--state-dir", str(state)] if state and args[0] in ("lint", "diff", "model") and args[:2] != ("model", "digest") else []
    return subprocess.run([DIFFOPS, *args, *env_state], cwd=cwd, capture_output=True, text=True, timeout=120)


COMMANDS = [[], ["lint"], ["diff"], ["schema"], ["model"], ["model", "digest"], ["model", "fetch"], ["check"], ["golden"],
            ["controller"], ["controller", "run"], ["status"], ["history"], ["generate"], ["promote"], ["abort"], ["retry"],
            ["ray"], ["ray", "start"], ["ray", "stop"], ["model", "register"], ["model", "promote"], ["model", "pin"],
            ["experiment"], ["experiment", "run"], ["experiment", "reproduce"], ["experiment", "promote"], ["experiment", "schema"]]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "diffops")
def test_every_command_has_help(command: list[str], tmp_path: Path) -> None:
    result = run(*command, "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert "Usage: diffops" in result.stdout


def test_lint_reports_each_broken_file_with_position(release_repo: ReleaseRepo, tmp_path: Path) -> None:
    release_repo.release("unknown", **{"    dtype: float32\n": "    dtype: float32\n    precision: 16\n"})
    release_repo.release("dupkey", **{"    count: 1\n": "    count: 1\n    count: 2\n"})
    release_repo.release("anchor", **{"  generation:\n": "  generation: &gen\n"})
    release_repo.release("numdigest", **{'"sha256:2b30c6ef7b43b8a62eb17faac4ed5a57d221d7b7d29409f0587ecf2af91b4199"': "1234567"})
    release_repo.release("toomany", **{"steps: 4": "steps: 51"})
    release_repo.commit()
    result = run("lint", cwd=release_repo.path, state=tmp_path / "state")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert lines == [
        "releases/anchor.yaml:11:15: anchor '&gen' is not allowed in release files; write the value out",
        "releases/dupkey.yaml:32:5: duplicate key 'count' (first defined on line 31)",
        "releases/numdigest.yaml:9:13: spec.model.digest: a digest must be a quoted string like 'sha256:<64 hex>'; YAML read 1234567 as int",
        "releases/toomany.yaml:13:5: spec.generation.steps: 51 exceeds limits.max_steps (50)",
        "releases/unknown.yaml:11:5: spec.model.precision: unknown field 'precision' (allowed: uri, digest, dtype)",
    ]
    assert "0 valid, 5 invalid" in result.stderr


def test_lint_passes_valid_files_and_reads_a_revision(release_repo: ReleaseRepo, tmp_path: Path) -> None:
    release_repo.release()
    good = release_repo.commit()
    release_repo.release(**{"steps: 4": "steps: 51"})
    release_repo.commit()
    assert run("lint", cwd=release_repo.path, state=tmp_path).returncode == 1
    result = run("lint", "--rev", good, cwd=release_repo.path, state=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 valid, 0 invalid" in result.stderr
    assert run("lint", "--rev", "no-such-rev", cwd=release_repo.path, state=tmp_path).returncode == 2


def test_diff_classifies_version_and_light_changes(release_repo: ReleaseRepo, tmp_path: Path) -> None:
    release_repo.release()
    release_repo.commit("add demo")
    release_repo.release(**{"steps: 4": "steps: 8"})
    release_repo.commit("more steps")

    result = run("diff", "HEAD~1..HEAD", "--format", "json", cwd=release_repo.path, state=tmp_path)
    assert result.returncode == 0, result.stderr
    [change] = json.loads(result.stdout)["changes"]
    assert change["change_class"] == "version"
    assert change["old_version"] != change["new_version"]
    assert [f["path"] for f in change["fields"]] == ["spec.generation.steps"]
    stepped_version = change["new_version"]

    release_repo.release(**{"steps: 4": "steps: 8", "count: 1": "count: 2"})
    release_repo.commit("scale out")
    [change] = json.loads(run("diff", "HEAD~1..HEAD", "--format", "json", cwd=release_repo.path, state=tmp_path).stdout)["changes"]
    assert change["change_class"] == "light"
    assert change["old_version"] == change["new_version"] == stepped_version
    assert change["impact"]["replicas_to_start"] == 1

    text = run("diff", cwd=release_repo.path, state=tmp_path).stdout  # default: the last commit
    assert "demo: change [light]" in text and "spec.replicas.count: 1 → 2" in text
    markdown = run("diff", "HEAD~2", "--format", "markdown", cwd=release_repo.path, state=tmp_path).stdout
    assert "| `demo` | change | **version** |" in markdown and "`spec.replicas.count`" in markdown


def test_diff_of_a_pull_request_branch_uses_the_merge_base(release_repo: ReleaseRepo, tmp_path: Path) -> None:
    release_repo.release()
    release_repo.commit()
    release_repo.repo.git.checkout("-b", "feature")
    release_repo.release("second")
    release_repo.commit()
    release_repo.repo.git.checkout("main")
    release_repo.release(**{"count: 1": "count: 5"})  # main moved on meanwhile
    release_repo.commit()
    release_repo.repo.git.checkout("feature")
    changes = json.loads(run("diff", "main...feature", "--format", "json", cwd=release_repo.path, state=tmp_path).stdout)["changes"]
    assert [(c["name"], c["action"]) for c in changes] == [("second", "add")]


def test_diff_first_commit_and_invalid_target(release_repo: ReleaseRepo, tmp_path: Path) -> None:
    release_repo.release()
    release_repo.commit()
    result = run("diff", cwd=release_repo.path, state=tmp_path)
    assert result.returncode == 0 and "demo: add [version]" in result.stdout
    release_repo.release("broken", **{"steps: 4": "steps: 99"})
    release_repo.commit()
    result = run("diff", cwd=release_repo.path, state=tmp_path)
    assert result.returncode == 1
    assert "invalid: releases/broken.yaml:13:5: spec.generation.steps: 99 exceeds" in result.stdout


def test_model_digest_matches_the_pin_and_writes_a_manifest(tmp_path: Path) -> None:
    from tests.conftest import DEMO_MODEL, DEMO_RELEASE

    copy = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, copy)
    (copy / "MODEL.sha256").unlink()
    result = run("model", "digest", str(copy), cwd=tmp_path)
    assert result.returncode == 0
    assert f'"{result.stdout.strip()}"' in DEMO_RELEASE
    run("model", "digest", "--write", str(copy), cwd=tmp_path)
    assert (copy / "MODEL.sha256").read_text() == (DEMO_MODEL / "MODEL.sha256").read_text()
    (copy / "unet" / "weights.bin").write_bytes(b"pickle")
    refused = run("model", "digest", str(copy), cwd=tmp_path)
    assert refused.returncode == 1 and "unet/weights.bin: .bin files are refused" in refused.stderr


def test_model_fetch_verifies_then_hits_the_cache(model_repo: ReleaseRepo, tmp_path: Path) -> None:
    first = run("model", "fetch", "demo", cwd=model_repo.path, state=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "verified 10 files, transferred" in first.stderr
    second = run("model", "fetch", "demo", cwd=model_repo.path, state=tmp_path)
    assert "cache hit, nothing transferred" in second.stderr
    assert second.stdout == first.stdout
    assert (Path(first.stdout.strip()) / "unet" / "diffusion_pytorch_model.safetensors").is_file()


def test_schema_command_prints_the_committed_schema(tmp_path: Path) -> None:
    from tests.conftest import ROOT

    result = run("schema", cwd=tmp_path)
    assert result.stdout == (ROOT / "releases" / "release.schema.json").read_text()
