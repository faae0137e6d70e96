"""The shape of the code: the README's layout table matches the tree, every module says what it is, imports run
one way (controller -> checks -> serving), and modules stay small. Read from the files with `ast`; nothing is
imported or run."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("controller", "serving", "checks", "bench", "scripts", "tests")
MAX_LINES = 400

# Directories the layout table does not list yet; each must leave this set once the README gains its row.
NOT_IN_TABLE_YET: set[str] = set()
# Modules over MAX_LINES today; each must leave this set once it is split below the limit.
LONG_MODULES = {"tests/test_signed_commits.py", "tests/test_canary.py"}

# What a package may import of ours: serving stands alone, checks runs on serving, the controller uses both.
MAY_IMPORT = {"serving": {"serving"}, "checks": {"checks", "serving"}}


def _files() -> list[str]:
    """Tracked and new (not ignored) files, as git sees the work tree."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout.splitlines()
    return [path for path in listed if (ROOT / path).is_file()]


FILES = _files()
MODULES = sorted(path for path in FILES if path.endswith(".py") and path.split("/")[0] in CODE)


def _table_paths() -> set[str]:
    """The first column of the README's "## Layout" table, without backticks or a trailing slash."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    return {match.group(1).rstrip("/") for match in re.finditer(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)}


def _directories() -> set[str]:
    """Every visible top-level directory holding files, and every sub-package of `controller`."""
    top = {path.split("/")[0] for path in FILES if "/" in path and not path.startswith(".")}
    subpackages = {str(PurePosixPath(path).parent) for path in FILES if re.fullmatch(r"controller/[^/]+/__init__\.py", path)}
    return top | subpackages


def _imported(path: str, root: Path = ROOT) -> set[str]:
    """The top-level names of every module `path` imports, anywhere in it (functions and TYPE_CHECKING included)."""
    tree = ast.parse((root / path).read_text(), filename=path)
    package = path.split("/")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else (node.module or "").split(".")[0])
    return names


def test_the_layout_table_lists_exactly_the_directories():
    listed, present = _table_paths(), _directories()
    assert listed, "README.md has no '## Layout' table"
    missing_on_disk = sorted(path for path in listed if not (ROOT / path).is_dir())
    assert not missing_on_disk, f"the README's layout table lists directories that do not exist: {missing_on_disk}"
    covered = listed | {path.split("/")[0] for path in listed}  # `models/tiny-sd/` stands for `models/`
    unlisted = sorted(present - covered - NOT_IN_TABLE_YET)
    assert not unlisted, f"add a row to the README's layout table for: {unlisted}"
    now_listed = sorted(NOT_IN_TABLE_YET & listed)
    assert not now_listed, f"the layout table lists {now_listed} now: remove them from NOT_IN_TABLE_YET"


def test_the_table_shows_the_controller_steps_in_flow_order():
    readme = (ROOT / "README.md").read_text()
    steps = re.findall(r"^\| `controller/([a-z_]+)/` \| (\d)\. ", readme, flags=re.MULTILINE)
    assert [name for name, _ in steps] == ["source", "parse", "plan", "gate", "rollout", "apply", "state"]
    assert [int(number) for _, number in steps] == list(range(1, 8))


@pytest.mark.parametrize("path", MODULES)
def test_every_module_and_package_has_a_docstring(path):
    tree = ast.parse((ROOT / path).read_text(), filename=path)
    assert ast.get_docstring(tree), f"{path}: start it with a docstring saying where it sits in the flow"


@pytest.mark.parametrize("path", [m for m in MODULES if m.split("/")[0] in MAY_IMPORT])
def test_imports_run_one_way(path):
    package = path.split("/")[0]
    ours = {"controller", "serving", "checks", "bench", "tests"}
    wrong = sorted((_imported(path) & ours) - MAY_IMPORT[package])
    assert not wrong, f"{path} imports {wrong}; {package}/ may only import {sorted(MAY_IMPORT[package])} of this project"


def test_the_import_check_sees_every_form_of_import(tmp_path):
    source = ("import controller.errors\nfrom checks import gate\nfrom . import stores\n"
              "def later():\n    from bench.report import Figure\n")
    (tmp_path / "serving").mkdir()
    (tmp_path / "serving" / "probe.py").write_text(source)
    assert _imported("serving/probe.py", tmp_path) == {"controller", "checks", "serving", "bench"}


@pytest.mark.parametrize("path", MODULES)
def test_modules_stay_under_the_line_limit(path):
    lines = len((ROOT / path).read_text().splitlines())
    if path in LONG_MODULES:
        assert lines > MAX_LINES, f"{path} is {lines} lines now: remove it from LONG_MODULES"
    else:
        assert lines <= MAX_LINES, f"{path} is {lines} lines; split it by concern (modules stay under {MAX_LINES})"
