"""The model registry on MLflow: `models:/` URIs, the resolution and drift decisions as tables, and `diffops model
register|promote|pin|fetch` against a real MLflow SQLite store and a real release repo (read back with MLflow's own
client; the pinned file passes `diffops lint` with its comments kept)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from controller.cli.main import main
from controller.state.records import ReleaseRecord, VersionRecord
from controller.tick.registry import Resolved, attach, drift_changes, serving_refs
from controller.tracking.registry import RegisteredVersion, RegistryRef, drift, refusal, registry_ref
from serving.manifest import MANIFEST_NAME, manifest_of
from serving.schema import ModelSpec
from tests.conftest import DEMO_MODEL, DEMO_RELEASE, ReleaseRepo, edit, make_release
from tests.live import gate_runs

D1, D2 = "sha256:" + "a1" * 32, "sha256:" + "b2" * 32

REFS = [
    ("models:/tiny@production", RegistryRef("tiny", alias="production")),
    ("models:/tiny/3", RegistryRef("tiny", version="3")),
    ("models:/sd-1.5_ft@canary-2", RegistryRef("sd-1.5_ft", alias="canary-2")),
    ("file://models/tiny-sd", None),
    ("s3://bucket/m", None),
]


@pytest.mark.parametrize("uri, ref", REFS, ids=[r[0] for r in REFS])
def test_registry_uris_parse_to_a_name_and_an_alias_or_a_version(uri, ref):
    assert registry_ref(uri) == ref
    assert ModelSpec(uri=uri, digest=D1).uri == uri  # what parses here, the release schema accepts
    if ref is not None:
        assert ref.uri == uri


@pytest.mark.parametrize("uri", ["models:/tiny", "models:/tiny/0", "models:/tiny/latest", "models:/tiny@", "models:/@prod",
                                 "models:/tiny@prod/1", "models:/../x@a"])
def test_malformed_registry_uris_are_refused_with_the_two_forms(uri):
    with pytest.raises(ValidationError, match=r"models:/NAME@ALIAS .* models:/NAME/VERSION"):
        ModelSpec(uri=uri, digest=D1)
    with pytest.raises(ValueError):
        registry_ref(uri)


def registered(version: str = "2", digest: str | None = D2) -> RegisteredVersion:
    return RegisteredVersion("tiny", version, "s3://m/sha256-b2", digest, {"diffops.digest": digest} if digest else {})


ALIAS, NUMBERED = RegistryRef("tiny", alias="production"), RegistryRef("tiny", version="2")
RESOLUTIONS = [
    # (case, ref, pinned, registered, refused, words in the message)
    ("alias at the pinned digest: used", ALIAS, D2, registered(), False, []),
    ("alias moved to another digest: refused", ALIAS, D1, registered(),
     True, [D1, D2, "models:/tiny/2", "diffops model pin demo", "promote tiny VERSION --alias production"]),
    ("numbered version, other digest: refused, no alias to move", NUMBERED, D1, registered(),
     True, [D1, D2, "models:/tiny/2", "diffops model pin demo"]),
    ("registered without a digest tag: refused", ALIAS, D1, registered(digest=None),
     True, ["no diffops.digest tag", "diffops model register PATH --name tiny"]),
]


@pytest.mark.parametrize("case", RESOLUTIONS, ids=[c[0] for c in RESOLUTIONS])
def test_a_registered_digest_other_than_the_pin_is_refused(case):
    _, ref, pinned, found, refused, words = case
    message = refusal(ref, pinned, found, "demo")
    assert (message is not None) is refused
    for word in words:
        assert word in (message or "")
    if ref.version:
        assert "--alias" not in (message or "")


def test_drift_says_what_the_registry_says_now_and_that_serving_is_unchanged():
    assert drift(ALIAS, D2, registered(), None, "demo") is None
    moved = drift(ALIAS, D1, registered(), None, "demo")
    assert moved is not None and all(w in moved for w in (D1, D2, "models:/tiny/2", "serving is unchanged", "diffops model pin demo"))
    unreachable = drift(ALIAS, D1, None, "registry at http://x: unreachable", "demo")
    assert unreachable == "cannot check models:/tiny@production: registry at http://x: unreachable; serving is unchanged"


CHANGES = [
    # (case, recorded, found now, started, ended)
    ("nothing recorded, agrees", {}, {"demo": None}, {}, []),
    ("drift starts", {}, {"demo": "moved"}, {"demo": "moved"}, []),
    ("same drift again: said once", {"demo": "moved"}, {"demo": "moved"}, {}, []),
    ("drift changes (moved again)", {"demo": "moved"}, {"demo": "moved again"}, {"demo": "moved again"}, []),
    ("drift ends", {"demo": "moved"}, {"demo": None}, {}, ["demo"]),
    ("release no longer checked: ends", {"demo": "moved"}, {}, {}, ["demo"]),
]


@pytest.mark.parametrize("case", CHANGES, ids=[c[0] for c in CHANGES])
def test_drift_is_reported_when_it_starts_changes_and_ends(case):
    _, recorded, found, started, ended = case
    assert drift_changes(recorded, found) == (started, ended)


def version(release: str = "demo", uri: str = "models:/tiny@production", weight: int = 100, status: str = "ready") -> VersionRecord:
    spec = make_release(("uri: file://models/tiny-sd", f"uri: {uri}")).spec
    return VersionRecord(release, "v1", "stable", weight, status, "c" * 40, spec, 0.0)  # type: ignore[arg-type]


def test_only_serving_releases_with_a_registry_uri_are_watched_and_a_resolution_is_attached_once():
    registry = make_release(("uri: file://models/tiny-sd", "uri: models:/tiny@production")).spec
    plain = make_release().spec
    releases = [ReleaseRecord("demo", "Healthy", "", None, None, registry, 0.0), ReleaseRecord("other", "Healthy", "", None, None, plain, 0.0),
                ReleaseRecord("idle", "Failed", "", None, None, registry, 0.0)]
    versions = [version(), version("other", "file://models/tiny-sd"), version("idle", weight=0, status="preparing")]
    assert serving_refs(releases, versions) == [("demo", ALIAS, registry.model.digest)]
    resolved = {("idle", "v1"): Resolved("models:/tiny@production", "models:/tiny/1", "file:///srv/tiny")}
    attached = attach(versions, resolved)
    assert attached[2].spec.model.uri == "file:///srv/tiny" and attached[2].spec.model.digest == registry.model.digest
    assert attached[:2] == versions[:2]
    assert attach(attached, resolved) == attached  # a recorded source is never resolved again


# -- the CLI against a real MLflow store and a real repo ------------------------------------------------------------------


def variant(tmp: Path, tweak: str = " ") -> Path:
    """A copy of the tiny model with config bytes appended: the same pipeline, another digest."""
    target = tmp / f"tiny-variant-{len(tweak)}"
    shutil.copytree(DEMO_MODEL, target)
    (target / MANIFEST_NAME).unlink(missing_ok=True)
    index = target / "model_index.json"
    index.write_text(index.read_text() + tweak)
    return target


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state dir whose embedded MLflow store holds tiny/1 (the tiny model) and tiny/2 (a variant), made once for the
    module (the store's schema takes seconds); each test moves its own alias."""
    tmp = tmp_path_factory.mktemp("registry")
    for path, extra in ((DEMO_MODEL, ["--base-model", "tiny-sd-base", "--training-run", "run-123"]), (variant(tmp), [])):
        result = CliRunner().invoke(main, ["model", "register", str(path), "--name", "tiny", "--state-dir", str(tmp / "state"), *extra])
        assert result.exit_code == 0, result.output
    return tmp / "state"


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_register_prints_the_uri_and_digest_to_pin_and_is_idempotent(store, tmp_path):
    digest = manifest_of(DEMO_MODEL).digest
    code, out, err = cli("model", "register", str(DEMO_MODEL), "--name", "tiny", "--state-dir", str(store), "-o", "json")
    assert code == 0, err
    again = json.loads(out)
    assert again["version"] == "1" and again["created"] is False and again["digest"] == digest
    assert "already registered (same digest), kept version 1" in err
    third = variant(tmp_path, "  ")
    code, out, err = cli("model", "register", str(third), "--name", "tiny", "--state-dir", str(store))
    assert code == 0, err
    uri, printed = out.split()
    assert uri.startswith("models:/tiny/") and int(uri.rsplit("/", 1)[1]) >= 3
    assert printed == manifest_of(third).digest != digest
    assert f"registered version {uri.rsplit('/', 1)[1]} ({uri}) from {third.resolve().as_uri()}" in err


def test_provenance_tags_read_back_with_mlflows_own_client(store):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}", registry_uri=f"sqlite:///{store / 'mlflow.db'}")
    found = client.get_model_version("tiny", "1")
    assert found.source == DEMO_MODEL.resolve().as_uri()
    tags = found.tags
    assert tags["diffops.digest"] == manifest_of(DEMO_MODEL).digest
    assert tags["diffops.source_uri"] == DEMO_MODEL.resolve().as_uri()
    assert tags["diffops.base_model"] == "tiny-sd-base" and tags["diffops.training_run"] == "run-123"
    assert tags["diffops.registered_by"] and tags["diffops.registered_at"].endswith("+00:00")


def test_promote_says_where_the_alias_moved_from(store):
    code, out, err = cli("model", "promote", "tiny", "1", "--alias", "qa", "--state-dir", str(store))
    assert code == 0, err
    assert "tiny: alias qa set to version 1" in out and "new" in out
    code, out, err = cli("model", "promote", "tiny", "2", "--alias", "qa", "--state-dir", str(store))
    assert code == 0 and "tiny: alias qa moved from version 1 (sha256:" in out and "to 2 (sha256:" in out
    code, out, err = cli("model", "promote", "tiny", "99", "--alias", "qa", "--state-dir", str(store))
    assert code == 1 and "models:/tiny/99: not in the registry" in err


def test_pin_rewrites_the_digest_keeping_comments_and_the_result_lints(store, release_repo: ReleaseRepo):
    assert cli("model", "promote", "tiny", "2", "--alias", "staging", "--state-dir", str(store))[0] == 0
    shutil.copytree(DEMO_MODEL, release_repo.path / "models" / "tiny-sd")
    text = edit(DEMO_RELEASE, "uri: file://models/tiny-sd", "uri: models:/tiny@staging  # follows the staging alias")
    release_repo.write("releases/demo.yaml", text)
    release_repo.commit("demo on the registry")
    code, out, err = cli("model", "pin", "demo", "--repo", str(release_repo.path), "--state-dir", str(store))
    assert code == 0, err
    pinned = (release_repo.path / "releases" / "demo.yaml").read_text()
    assert "uri: models:/tiny@staging  # follows the staging alias" in pinned  # the alias stays, its comment too
    assert pinned.startswith("# yaml-language-server") and pinned.count("\n") == text.count("\n")
    assert f"-    digest: \"{manifest_of(DEMO_MODEL).digest}\"" in out and "+    digest: " in out
    assert "now pins models:/tiny/2" in err and "git -C" in err and "commit -m" in err
    release_repo.commit("pin demo")
    code, _, err = cli("lint", "--repo", str(release_repo.path), "--state-dir", str(store))
    assert code == 0 and "1 valid, 0 invalid" in err
    code, _, err = cli("model", "pin", "demo", "--repo", str(release_repo.path), "--state-dir", str(store))
    assert code == 0 and "already pinned to models:/tiny/2" in err


def test_fetch_resolves_a_registry_uri_and_refuses_a_digest_the_registry_does_not_have(store, release_repo: ReleaseRepo):
    release_repo.write("releases/demo.yaml", edit(DEMO_RELEASE, "uri: file://models/tiny-sd", "uri: models:/tiny/1"))
    release_repo.commit("demo on tiny/1")
    code, out, err = cli("model", "fetch", "demo", "--repo", str(release_repo.path), "--state-dir", str(store))
    assert code == 0, err
    assert "models:/tiny/1 is models:/tiny/1 at file://" in err and Path(out.strip()).is_dir()
    release_repo.write("releases/demo.yaml", edit(DEMO_RELEASE, "uri: file://models/tiny-sd", "uri: models:/tiny/2"))
    release_repo.commit("demo on tiny/2 with tiny/1's digest")
    code, out, err = cli("model", "fetch", "demo", "--repo", str(release_repo.path), "--state-dir", str(store))
    assert code == 1 and "models:/tiny/2 is models:/tiny/2 with digest sha256:" in err and "diffops model pin demo" in err


def test_check_gates_a_registered_model_and_tracks_the_release_uri(store, model_repo: ReleaseRepo):
    model_repo.release(**{"uri: file://models/tiny-sd": "uri: models:/tiny/1"})
    model_repo.commit("demo on tiny/1")
    code, out, err = cli("check", "demo", "--repo", str(model_repo.path), "--state-dir", str(store), "--track", "-o", "json")
    assert code == 0, out + err
    report = json.loads(out)
    assert report["ok"] and "models:/tiny/1 is models:/tiny/1 at file://" in err
    [run] = gate_runs(f"sqlite:///{store / 'mlflow.db'}", "demo", report["version"])
    assert run.data.params["model.uri"] == "models:/tiny/1" and run.data.tags["diffops.where"] == "local"
    model_repo.release(**{"uri: file://models/tiny-sd": "uri: models:/tiny/2"})
    model_repo.commit("tiny/2 with tiny/1's digest")
    code, out, err = cli("check", "demo", "--repo", str(model_repo.path), "--state-dir", str(store))
    assert code == 1 and "model refused: models:/tiny/2 is models:/tiny/2 with digest sha256:" in err
