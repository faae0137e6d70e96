"""Property tests: nothing a user commits crashes the reader, the schema, a reconcile tick or `diffops lint`.

Inputs are raw bytes, the demo release with bytes spliced in, and the demo
release as data with fields deleted, added or replaced by hostile values
(5000-digit and 65-bit integers, overflowing durations, control characters,
tags, anchors, deep nesting, wrong types), emitted as YAML. The only outcomes
allowed: a valid `Release`, or `Invalid` with every error at `file:line:col`
and no internal error. The tick runs on a real git repository and a real
SQLite store, with Ray Serve and the gate faked at our boundary.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fakes import InstantServe, PassingGate
from controller.apply.serve_config import RenderSettings
from controller.parse import safe_yaml
from controller.parse.loader import InvalidRelease, parse_release
from controller.parse.release import Release
from controller.reconciler import Reconciler
from controller.source.git_source import ReleaseSource
from controller.state.store import Store
from tests.conftest import DEMO_RELEASE, ReleaseRepo, demo_repo
from tests.live import wait_for

DIFFOPS = str(Path(sys.executable).parent / "diffops")
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BASE: dict[str, Any] = yaml.safe_load(DEMO_RELEASE)


class Raw(str):
    """Text emitted into the YAML verbatim, where a value goes."""


RAW_TOKENS = [
    "9" * 5000, "-" + "9" * 4400, "0x" + "f" * 5000, "1:" * 3000 + "1", "1" + "0" * 5000 + ".5",
    str(2**63), str(-(2**63) - 1), str(2**63 - 1), "1e999", "1.0e+999", ".inf", "-.inf", ".nan",
    "99999999999999d", "99999999999999h", "9" * 40 + "ms", "365d", "366d", "0s", "1ms", "2d12h", "-5s", "10",
    "!!int abc", "!!bool maybe", "!!float x", "!!int 1:2:::", "!!python/object/apply:os.system ['true']",
    "!secret x", "&a 1", "*a", '"\\x07"', '"\\ud800"', '"\\x00"', "x\x07y", "\x00", "\x1b[31m", "\ufeff",
    "[" * 40 + "]" * 40, "{" * 20 + "}" * 20, "{a: 1, a: 2}", "[1, 2", "'", ": :", "? [a]\n: 1",
    "demo--v1", "Demo", "a" * 64, "''", "~", "yes", "2024-01-01", "sha256:" + "0" * 64, "file://../../etc",
]
leaf = st.recursive(
    st.one_of(
        st.sampled_from(RAW_TOKENS).map(Raw),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(), st.none(),
        st.text(max_size=30),
    ),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into the demo release's data, containers included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*prefix, index))
    return found


BASE_PATHS = paths(BASE)


def mutate(doc: Any, path: tuple, how: str, value: Any) -> Any:
    """A copy of `doc` with the value at `path` replaced, deleted, given a sibling, or wrapped."""
    if not path:
        return value if how == "replace" else doc
    doc = dict(doc) if isinstance(doc, dict) else list(doc)
    head, rest = path[0], path[1:]
    if rest:
        doc[head] = mutate(doc[head], rest, how, value)
    elif how == "replace":
        doc[head] = value
    elif how == "delete":
        del doc[head]
    elif how == "wrap":
        doc[head] = [doc[head]] if isinstance(value, bool) else {"value": doc[head]}
    elif how == "add" and isinstance(doc, dict):
        doc[f"x{len(doc)}"] = value
    return doc


def emit(doc: Any) -> bytes:
    """Block YAML for `doc`; `Raw` values land verbatim (they may break the syntax, and should be refused if so)."""
    raws: list[str] = []

    def placeholders(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(str(value))
            return f"RAWTOKEN{len(raws) - 1}END"
        if isinstance(value, dict):
            return {str(k): placeholders(v) for k, v in value.items()}
        if isinstance(value, list):
            return [placeholders(v) for v in value]
        return value

    text = yaml.safe_dump(placeholders(doc), sort_keys=False, allow_unicode=True, width=1_000_000)
    text = re.sub(r"RAWTOKEN(\d+)END", lambda m: raws[int(m.group(1))], text)
    return text.encode("utf-8", "surrogatepass")


mutation = st.tuples(st.sampled_from(BASE_PATHS), st.sampled_from(["replace", "replace", "delete", "add", "wrap"]), leaf)


DURATION_FIELDS = {"scale_down_delay", "progress_deadline", "interval", "pause", "timeout"}
EDGES = {
    int: st.sampled_from([0, 1, 2, 8, 64, 100, 1000, 2**31, 2**63 - 1]),
    float: st.sampled_from([0.0, 1e-9, 0.5, 1.0, 16.0, 50.0, 1e308]),
    str: st.sampled_from(["0s", "1ms", "365d", "2d12h", "8760h"]),
}


def _edge(path: tuple) -> st.SearchStrategy[tuple]:
    value = _get(BASE, path)
    kind = str if path[-1] in DURATION_FIELDS else type(value)
    return st.tuples(st.just(path), st.just("replace"), EDGES[kind])


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


EDGE_PATHS = [p for p in BASE_PATHS if p and (type(_get(BASE, p)) in (int, float) or p[-1] in DURATION_FIELDS)]
edge = st.sampled_from(EDGE_PATHS).flatmap(_edge)  # same type, extreme value: often still valid


def documents(name: str = "demo") -> st.SearchStrategy[bytes]:
    """The demo release named `name`, with one to three mutations (hostile or merely extreme), as YAML bytes."""
    return st.lists(mutation | edge, min_size=1, max_size=3).map(lambda ms: emit(_apply(ms, name)))


def _apply(mutations: list[tuple[tuple, str, Any]], name: str = "demo") -> Any:
    doc: Any = {**BASE, "metadata": {"name": name}}
    for path, how, value in mutations:
        try:
            doc = mutate(doc, path, how, value)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or replaced the path
            pass
    return doc


def spliced(name: str = "demo") -> st.SearchStrategy[bytes]:
    """The demo release named `name` with up to 8 bytes replaced by 1 to 16 arbitrary ones."""
    text = DEMO_RELEASE.replace("name: demo", f"name: {name}").encode()
    return st.tuples(st.integers(0, len(text)), st.integers(0, 8), st.binary(min_size=1, max_size=16)).map(
        lambda t: text[: t[0]] + t[2] + text[t[0] + t[1]:]
    )


raw_bytes = st.binary(max_size=600)
any_input = st.one_of(raw_bytes, spliced(), documents())


def lines_in(raw: bytes) -> int:
    return max(raw.count(b"\n"), len(raw.decode("utf-8", "replace").splitlines())) + 1


def outcome(raw: bytes, file: str) -> Release | None:
    """Parse; assert the outcome is a valid release named after its file, or errors each at file:line:col."""
    at = re.compile(rf"^{re.escape(file)}:(\d+):(\d+): ")
    try:
        release = parse_release(raw, file)
    except InvalidRelease as err:
        assert err.errors
        for error in err.errors:
            where = at.match(str(error))
            assert where, str(error)
            assert 1 <= int(where.group(1)) <= lines_in(raw) and int(where.group(2)) >= 1, str(error)
            assert "bug in diffops" not in error.message, error.message
            assert len(error.message) < 1000, error.message[:200]
        return None
    assert release.name == Path(file).stem
    release.model_dump_json()  # what the controller records and hashes
    return release


@FUZZ
@given(any_input)
def test_reader_gives_data_or_a_positioned_refusal(raw):
    try:
        doc = safe_yaml.load(raw)
    except safe_yaml.YamlError as err:
        assert 1 <= err.line <= lines_in(raw) and err.column >= 1 and err.message
        return
    for line, column in [*doc.values.values(), *doc.keys.values()]:
        assert 1 <= line <= lines_in(raw) and column >= 1


@FUZZ
@given(any_input)
def test_schema_gives_a_release_or_positioned_errors(raw):
    outcome(raw, "releases/demo.yaml")


def test_the_document_strategy_reaches_both_outcomes():
    """The mutations are plausible enough that some still validate and most do not (else the fuzz proves little)."""
    assert outcome(emit(_apply([(("spec", "replicas", "count"), "replace", 3)])), "releases/demo.yaml") is not None
    assert outcome(emit(_apply([(("spec", "rollout", "scale_down_delay"), "replace", Raw("99999999999999d"))])), "releases/demo.yaml") is None
    assert outcome(emit(_apply([(("spec", "generation", "steps"), "replace", Raw("9" * 5000))])), "releases/demo.yaml") is None


class Tracebacks(logging.Handler):
    """Log records that carry a traceback: an exception nobody classified."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)


@pytest.fixture(scope="module")
def ticking(tmp_path_factory) -> Iterator[tuple[ReleaseRepo, Reconciler, InstantServe, Tracebacks]]:
    """A real repo with the demo release Healthy under a reconciler (real git, real SQLite, real model verification)."""
    base = tmp_path_factory.mktemp("fuzz-tick")
    repo = demo_repo(base / "repo")
    serve = InstantServe()
    settings_ = RenderSettings(repo=str(repo.path), cache_dir=str(base / "state" / "models"))
    rec = Reconciler(ReleaseSource.open(repo.path), Store(base / "state" / "state.db"), serve, settings_, gate=PassingGate())

    def healthy() -> bool:
        rec.reconcile()
        demo = rec.state.releases.get("demo")
        return demo is not None and demo.phase == "Healthy"

    wait_for(healthy, 60, "demo Healthy under the fuzz reconciler", every=0.05)
    tracebacks = Tracebacks()
    logging.getLogger("diffops").addHandler(tracebacks)
    yield repo, rec, serve, tracebacks
    logging.getLogger("diffops").removeHandler(tracebacks)
    rec.close()


STEMS = ["fuzz", "fuzz", "a--b", "Upper", "x.y", "ünï", "-"]
named_input = st.sampled_from(STEMS).flatmap(
    lambda stem: st.tuples(st.just(stem), st.one_of(raw_bytes, spliced(stem), documents(stem), documents(stem)))
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(named_input)
def test_a_tick_survives_any_committed_file(ticking, named):
    stem, raw = named
    repo, rec, serve, tracebacks = ticking
    path = f"releases/{stem}.yaml"
    repo.write(path, raw)
    repo.commit(f"fuzz {stem}")
    valid = outcome(raw, path) is not None

    result = rec.reconcile()

    assert result.ok, [(r.name, r.phase, r.message) for r in rec.state.releases.values()]
    demo = rec.state.releases["demo"]
    assert demo.phase == "Healthy", demo.message
    assert "demo" in {app["name"] for app in serve.config["applications"]}
    record = rec.state.releases[stem]
    if not valid:
        assert record.phase == "Invalid", (record.phase, record.message)
        assert re.match(rf"{re.escape(path)}:\d+:\d+: ", record.message), record.message
    assert not tracebacks.records, [r.getMessage() for r in tracebacks.records]


GARBAGE = {
    "control": "apiVersion: diffops/v1\nkind: Release\nmetadata: {name: control}\nspec: \x07\n",
    "hugeint": DEMO_RELEASE.replace("name: demo", "name: hugeint").replace("steps: 4", "steps: " + "9" * 5000),
    "overflow": DEMO_RELEASE.replace("name: demo", "name: overflow").replace("scale_down_delay: 10m", "scale_down_delay: 99999999999999d"),
    "junk": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xfd",
    "a--b": DEMO_RELEASE.replace("name: demo", "name: a--b"),
}


def test_lint_answers_garbage_with_positions_and_no_traceback(model_repo: ReleaseRepo, tmp_path):
    for name, content in GARBAGE.items():
        model_repo.write(f"releases/{name}.yaml", content)
    model_repo.commit("garbage beside the demo")

    result = subprocess.run([DIFFOPS, "lint", "--repo", str(model_repo.path), "--state-dir", str(tmp_path / "state")],
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for name in GARBAGE:
        assert re.search(rf"^releases/{re.escape(name)}\.yaml:\d+:\d+: ", result.stdout, re.MULTILINE), (name, result.stdout)
    assert "1 valid, 5 invalid" in result.stderr
    assert "contains '--'" in result.stdout
