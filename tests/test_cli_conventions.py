"""The command-line conventions kubectl, argocd and flux users expect, as they meet them in `diffops`:
`-o text|json|yaml`, `diffops completion`, DIFFOPS_<OPTION> variables, `diff --exit-code`, `--no-color` and
NO_COLOR, tables that fit the terminal, progress only on a terminal, and `diffops version`."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from rich.console import Console

from controller.cli.main import main
from controller.cli.status_view import history_rows, status_json
from controller.cli.tables import history_table, status_table
from controller.cli.terminal import color_wanted, progress, render_text
from controller.state.records import Event, ObservedApp, ReleaseRecord, VersionRecord
from controller.state.store import SCHEMA_VERSION, ControllerRecord, State, Store
from tests.conftest import DEMO_MODEL, ROOT, ReleaseRepo, make_release, respec

DIFFOPS = str(Path(sys.executable).with_name("diffops"))
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SPEC = respec(make_release().spec, replicas={"count": 2},
              rollout={"strategy": "canary", "steps": [{"weight": 25}, {"pause": "30s"}, {"weight": 100}]})
EVENTS = [
    Event("demo", "rollout-started", "rolling out v2", "v2", "c2", 100.0),
    Event("demo", "prepared", "verified", "v2", "c2", 101.0),
    Event("demo", "promoted", "v2 ready", "v2", "c2", 107.5),
    Event("demo", "rollout-started", "rolling out v3", "v3", "c3", 300.0),
    Event("demo", "failed", "v3 failed: digest mismatch", "v3", "c3", 301.0),
]


def sample_state() -> State:
    release = ReleaseRecord("demo", "Progressing", "canary v3 at 25%, analysing a long message that has to wrap somewhere",
                            "c3", "v3", SPEC, 10.0, step=0)
    versions = [
        VersionRecord("demo", "v2", "stable", 75, "ready", "c2" * 10, SPEC, 5.0, ready_at=9.0),
        VersionRecord("demo", "v3", "canary", 25, "ready", "c3" * 10, SPEC, 6.0, ready_at=9.5),
    ]
    apps = {"demo--v2": ObservedApp("demo--v2", "RUNNING", "", 2, 2), "demo--v3": ObservedApp("demo--v3", "RUNNING", "", 1, 2)}
    return State(ControllerRecord("c3", 10.0, "c2", 10.0), {"demo": release}, versions, apps)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "state"
    store = Store(directory / "state.db")
    store.save(sample_state(), EVENTS)
    store.close()
    return directory


def invoke(*args: str, env: dict[str, str] | None = None, color: bool = False) -> Result:
    return CliRunner().invoke(main, list(args), env=env, color=color)


def diffops(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DIFFOPS, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


# -o / --output ------------------------------------------------------------------------------------------------


def test_status_prints_the_same_data_as_json_yaml_and_the_json_alias(state_dir: Path) -> None:
    as_json = invoke("status", "--state-dir", str(state_dir), "-o", "json")
    as_yaml = invoke("status", "--state-dir", str(state_dir), "--output", "yaml")
    alias = invoke("status", "--state-dir", str(state_dir), "--json")
    assert as_json.exit_code == as_yaml.exit_code == alias.exit_code == 0, as_yaml.output
    data = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == data == json.loads(alias.stdout)
    assert list(yaml.safe_load(as_yaml.stdout)) == ["commit", "applied_commit", "refused_commit", "releases"]  # same keys, same order
    [release] = data["releases"]
    assert (release["name"], release["phase"], release["step"]) == ("demo", "Progressing", "1/3")
    assert [(v["id"], v["role"], v["weight"], v["ready_replicas"]) for v in release["versions"]] == [("v2", "stable", 75, 2),
                                                                                                   ("v3", "canary", 25, 1)]


def test_status_piped_stays_plain_text(state_dir: Path) -> None:
    result = invoke("status", "--state-dir", str(state_dir))
    assert result.exit_code == 0
    assert result.stdout.startswith("reconciled c3 (fully live: c2)\n")
    assert "  v3           canary   weight  25%  replicas 1/2  from c3c3c3c3c3c3" in result.stdout
    assert "STATUS" not in result.stdout and not ANSI.search(result.stdout)


def test_history_as_json_and_yaml(state_dir: Path) -> None:
    as_json = invoke("history", "demo", "--state-dir", str(state_dir), "-o", "json")
    as_yaml = invoke("history", "demo", "--state-dir", str(state_dir), "-o", "yaml")
    rows = json.loads(as_json.stdout)
    assert yaml.safe_load(as_yaml.stdout) == rows == json.loads(invoke("history", "demo", "--state-dir", str(state_dir), "--json").stdout)
    assert [(r["version"], r["outcome"], r["finished_at"] - r["started_at"]) for r in rows] == [("v2", "promoted", 7.5), ("v3", "failed", 1.0)]
    assert [item["event"] for item in rows[0]["timeline"]] == ["prepared", "promoted"]


def test_version_prints_diffops_the_schemas_and_the_runtime(tmp_path: Path) -> None:
    as_json = invoke("version", "-o", "json")
    assert as_json.exit_code == 0
    info = json.loads(as_json.stdout)
    schema = json.loads((ROOT / "releases" / "release.schema.json").read_text())
    assert info == {
        "diffops": metadata.version("diffops"),
        "release_api_version": schema["properties"]["apiVersion"]["const"],
        "state_schema_version": SCHEMA_VERSION,
        "python": ".".join(map(str, sys.version_info[:3])),
        "torch": metadata.version("torch"),
        "diffusers": metadata.version("diffusers"),
        "ray": metadata.version("ray"),
    }
    assert yaml.safe_load(invoke("version", "-o", "yaml").stdout) == info
    text = invoke("version").stdout
    assert f"torch               {metadata.version('torch')}" in text and "release apiVersion  diffops/v1" in text


def test_version_reads_versions_without_importing_torch() -> None:
    probe = ("import sys; from click.testing import CliRunner, Result; from controller.cli.main import main; "
             "result = CliRunner().invoke(main, ['version']); assert result.exit_code == 0, result.output; "
             "print(sorted(m for m in ('torch', 'diffusers', 'ray') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr


# diff --exit-code, and lint / diff output formats -----------------------------------------------------------------


def _no_release_change(repo: ReleaseRepo) -> str:
    repo.write("README.md", "notes, not a release\n")
    repo.commit("docs")
    return "HEAD~1..HEAD"


def _a_release_change(repo: ReleaseRepo) -> str:
    repo.release(**{"steps: 4": "steps: 8"})
    repo.commit("more steps")
    return "HEAD~1..HEAD"


def _an_invalid_file(repo: ReleaseRepo) -> str:
    repo.release("broken", **{"steps: 4": "steps: 99"})
    repo.commit("broken")
    return "HEAD~1..HEAD"


def _an_unknown_revision(repo: ReleaseRepo) -> str:
    return "HEAD..no-such-branch"


@pytest.mark.parametrize(("make", "with_flag", "without_flag"), [
    (_no_release_change, 0, 0),
    (_a_release_change, 1, 0),
    (_an_invalid_file, 1, 1),
    (_an_unknown_revision, 2, 2),
], ids=lambda v: getattr(v, "__name__", str(v)))
def test_diff_exit_code(release_repo: ReleaseRepo, tmp_path: Path, make: Callable[[ReleaseRepo], str], with_flag: int, without_flag: int) -> None:
    release_repo.release()
    release_repo.commit("add demo")
    revisions = make(release_repo)
    state = ["--state-dir", str(tmp_path / "state")]
    assert diffops("diff", revisions, "--exit-code", *state, cwd=release_repo.path).returncode == with_flag
    assert diffops("diff", revisions, *state, cwd=release_repo.path).returncode == without_flag


def test_diff_exit_code_on_an_unreadable_repository(tmp_path: Path) -> None:
    result = diffops("diff", "--exit-code", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "state"), cwd=tmp_path)
    assert result.returncode == 2 and "not a git repository" in result.stderr


def test_diff_as_yaml_carries_the_json_and_format_stays_an_alias(release_repo: ReleaseRepo, tmp_path: Path) -> None:
    release_repo.release()
    release_repo.commit()
    _a_release_change(release_repo)
    state = ["--state-dir", str(tmp_path / "state")]
    as_yaml = yaml.safe_load(diffops("diff", "-o", "yaml", *state, cwd=release_repo.path).stdout)
    as_json = json.loads(diffops("diff", "-o", "json", *state, cwd=release_repo.path).stdout)
    assert as_yaml == as_json == json.loads(diffops("diff", "--format", "json", *state, cwd=release_repo.path).stdout)
    assert [(c["name"], c["change_class"]) for c in as_json["changes"]] == [("demo", "version")]


def test_lint_as_json_and_yaml(release_repo: ReleaseRepo, tmp_path: Path) -> None:
    release_repo.release()
    release_repo.release("toomany", **{"steps: 4": "steps: 51"})
    head = release_repo.commit()
    state = ["--state-dir", str(tmp_path / "state")]
    result = diffops("lint", "-o", "json", *state, cwd=release_repo.path)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report == yaml.safe_load(diffops("lint", "-o", "yaml", *state, cwd=release_repo.path).stdout)
    assert (report["revision"], report["valid"], report["invalid"]) == (head, 1, 1)
    [error] = report["errors"]
    assert (error["file"], error["line"], error["column"], error["field"]) == ("releases/toomany.yaml", 13, 5, "spec.generation.steps")
    assert error["text"] == "releases/toomany.yaml:13:5: spec.generation.steps: 51 exceeds limits.max_steps (50)"


# DIFFOPS_<OPTION> --------------------------------------------------------------------------------------------------


def test_options_come_from_the_environment_and_the_command_line_wins(release_repo: ReleaseRepo, tmp_path: Path, state_dir: Path) -> None:
    release_repo.release()
    good = release_repo.commit()
    release_repo.release(**{"steps: 4": "steps: 51"})
    release_repo.commit()
    env = {"DIFFOPS_REPO": str(release_repo.path), "DIFFOPS_REV": good, "DIFFOPS_STATE_DIR": str(tmp_path / "s")}
    assert diffops("lint", cwd=tmp_path, env=env).returncode == 0  # the repo and the revision from the environment
    assert diffops("lint", "--rev", "HEAD", cwd=tmp_path, env=env).returncode == 1  # the flag wins

    yaml_env = {"DIFFOPS_OUTPUT": "yaml", "DIFFOPS_STATE_DIR": str(state_dir)}
    from_env = invoke("status", env=yaml_env)
    assert from_env.exit_code == 0 and yaml.safe_load(from_env.stdout)["releases"][0]["name"] == "demo"
    assert json.loads(invoke("status", "-o", "json", env=yaml_env).stdout)["commit"] == "c3"

    release_repo.release(**{"steps: 4": "steps: 8"})
    release_repo.commit()
    flag_env = {"DIFFOPS_EXIT_CODE": "1", "DIFFOPS_STATE_DIR": str(tmp_path / "s")}
    assert diffops("diff", cwd=release_repo.path, env=flag_env).returncode == 1  # a flag from the environment


def test_help_names_each_variable_and_a_file_destination_has_none(tmp_path: Path) -> None:
    assert "env var: DIFFOPS_REPO" in invoke("lint", "--help").stdout
    assert "DIFFOPS_OUTPUT" in invoke("status", "--help").stdout
    generate_help = invoke("generate", "--help").stdout
    assert "DIFFOPS_URL" in generate_help and "DIFFOPS_OUTPUT" not in generate_help
    # DIFFOPS_OUTPUT=json is a format for the commands that print state, never the file `generate` writes
    result = invoke("generate", "demo", "a cube", "--url", "http://127.0.0.1:9", env={"DIFFOPS_OUTPUT": "json"})
    assert result.exit_code == 2 and "Missing option '-o'" in result.output
    assert not (tmp_path / "json").exists() and not Path("json").exists()


# completion --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shell", "marker"), [
    ("bash", "complete -o nosort -F _diffops_completion diffops"),
    ("zsh", "#compdef diffops"),
    ("fish", "complete --no-files --command diffops"),
])
def test_completion_prints_the_script(shell: str, marker: str) -> None:
    result = invoke("completion", shell)
    assert result.exit_code == 0 and marker in result.stdout and "_DIFFOPS_COMPLETE" in result.stdout


@pytest.mark.parametrize(("words", "cword", "expected"), [
    ("diffops sta", "1", ["status"]),
    ("diffops status -o ", "3", ["text", "json", "yaml"]),
    ("diffops completion ", "2", ["bash", "fish", "zsh"]),
])
def test_the_shell_completes_commands_and_choices(tmp_path: Path, words: str, cword: str, expected: list[str]) -> None:
    env = {"_DIFFOPS_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": cword}
    result = diffops(cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert [line.split(",", 1)[1] for line in result.stdout.splitlines()] == expected


# colour --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "environ", "wanted"), [
    (False, {}, True),
    (True, {}, False),
    (False, {"NO_COLOR": "1"}, False),
    (False, {"NO_COLOR": ""}, True),  # no-color.org: set and not empty
    (True, {"NO_COLOR": "1"}, False),
])
def test_color_wanted(flag: bool, environ: dict[str, str], wanted: bool) -> None:
    assert color_wanted(flag, environ) is wanted


def test_no_color_and_NO_COLOR_turn_the_red_error_off(tmp_path: Path) -> None:
    empty = str(tmp_path)
    colored = invoke("status", "--state-dir", empty, color=True)
    assert colored.exit_code == 1 and "\x1b[31m" in colored.output and "no controller state" in colored.output
    for args, env in [(["--no-color"], {}), ([], {"NO_COLOR": "1"}), ([], {"DIFFOPS_NO_COLOR": "true"})]:
        plain = invoke(*args, "status", "--state-dir", empty, env=env, color=True)
        assert plain.exit_code == 1 and "error: no controller state" in plain.output and not ANSI.search(plain.output), (args, env)


# tables and progress -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [60, 80, 140])
def test_status_and_history_tables_fit_the_terminal(width: int) -> None:
    status = render_text(status_table(status_json(sample_state()), now=70.0), width)
    lines = status.splitlines()
    assert max(len(line) for line in lines) <= width
    assert lines[0].startswith("reconciled c3")
    assert all(word in status for word in ("NAME", "STATUS", "demo", "Progressing", "60s", "v2", "stable", "canary",
                                             "75%", "2/2", "1/2", "canary step 1/3", "from c3c3c3c3c3c3"))
    history = render_text(history_table("demo", history_rows(EVENTS)), width)
    assert max(len(line) for line in history.splitlines()) <= width
    assert all(word in history for word in ("promoted", "failed", "+7.5s", "1970-01-01", "00:01:40", "verified"))


def test_status_on_a_terminal_is_a_coloured_table_of_its_width(state_dir: Path) -> None:
    primary, secondary = pty.openpty()
    env = {**os.environ, "COLUMNS": "72", "LINES": "40", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([DIFFOPS, "status", "--state-dir", str(state_dir)], stdout=secondary, stderr=subprocess.PIPE, env=env)
    os.close(secondary)
    chunks = []
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the other end closed: the command has finished
            break
        if not chunk:
            break
        chunks.append(chunk)
    assert process.wait(timeout=60) == 0
    os.close(primary)
    raw = b"".join(chunks).decode()
    assert ANSI.search(raw)  # coloured on a terminal
    lines = ANSI.sub("", raw).replace("\r", "").splitlines()
    assert any(line.split()[:4] == ["NAME", "STATUS", "WEIGHT", "READY"] for line in lines if line.strip())
    assert max(len(line) for line in lines) <= 72


def test_progress_shows_on_a_terminal_and_stays_silent_when_piped(tmp_path: Path) -> None:
    terminal = io.StringIO()
    with progress("demo: fetching file://models/tiny-sd", console=Console(file=terminal, force_terminal=True, width=80)):
        pass
    assert "demo: fetching file://models/tiny-sd" in terminal.getvalue()

    copy = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, copy)
    result = diffops("model", "digest", str(copy), cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""  # no spinner, no control characters in a pipe
    assert result.stdout.startswith("sha256:")
