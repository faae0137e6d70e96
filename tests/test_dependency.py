"""The image pin: what a replica must show to prove it runs `runtime.image`, and how a release opts out.

A decision table for `judge_image` (pin x policy x what the replica reports),
the dependency check reading a real environment mapping, and the release field
as a user meets it: schema, `diffops diff`, version ids, `diffops status`.
"""

from __future__ import annotations

import json

import pytest

from checks import dependency
from controller.cli.status_view import status_json, status_text
from controller.parse.release import Spec
from controller.plan.changes import diff_releases
from controller.plan.report import as_text
from controller.plan.versions import version_id
from controller.state.records import ReleaseRecord, VersionRecord
from controller.state.store import ControllerRecord, State
from tests.conftest import DEMO_RELEASE, make_release

DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32
IMAGE = f"ghcr.io/acme/serving@{DIGEST}"
POLICY_LINE = next(line for line in DEMO_RELEASE.splitlines(keepends=True) if line.startswith("    image_policy: unverified"))

TABLE = [
    # (case, policy, DIFFOPS_IMAGE_DIGEST, passes?, verified?, message fragment)
    ("verify, digest matches", "verify", DIGEST, True, True, "image sha256:abababababab… verified"),
    ("verify, full reference matches", "verify", IMAGE, True, True, "verified"),
    ("verify, mirror name, same digest", "verify", f"registry.internal/mirror/serving@{DIGEST}", True, True, "verified"),
    ("verify, surrounding whitespace", "verify", f" {DIGEST}\n", True, True, "verified"),
    ("verify, not set", "verify", None, False, False, f"this replica cannot prove it runs {IMAGE}: DIFFOPS_IMAGE_DIGEST is not set"),
    ("verify, empty (the image's default)", "verify", "", False, False, "or set spec.runtime.image_policy: unverified"),
    ("verify, other digest", "verify", OTHER, False, False, f"this replica runs image {OTHER}; the release pins {DIGEST}"),
    ("verify, a tag is no proof", "verify", "ghcr.io/acme/serving:latest", False, False, "is not an image digest"),
    ("verify, uppercase hex", "verify", DIGEST.upper(), False, False, "is not an image digest"),
    ("verify, short digest", "verify", DIGEST[:-1], False, False, "is not an image digest"),
    ("unverified, not set", "unverified", None, True, False, "image not verified (DIFFOPS_IMAGE_DIGEST not set; runtime.image_policy: unverified)"),
    ("unverified, empty", "unverified", "  ", True, False, "image not verified"),
    ("unverified, digest matches", "unverified", DIGEST, True, True, "verified"),
    ("unverified, other digest still fails", "unverified", OTHER, False, False, f"this replica runs image {OTHER}"),
    ("unverified, garbage still fails", "unverified", "latest", False, False, "is not an image digest"),
]


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_image_decision_table(case):
    _, policy, reported, ok, verified, fragment = case
    verdict = dependency.judge_image(IMAGE, policy, reported)
    assert (verdict.ok, verdict.verified) == (ok, verified)
    assert fragment in verdict.message


@pytest.mark.parametrize("case", TABLE, ids=[c[0] for c in TABLE])
def test_dependency_check_reads_the_replica_environment(case):
    _, policy, reported, ok, verified, fragment = case
    environ = {} if reported is None else {"DIFFOPS_IMAGE_DIGEST": reported}
    result = dependency.run({"packaging": ">=20"}, IMAGE, policy, environ=environ)
    assert result.outcome == ("passed" if ok else "failed")
    assert fragment in result.message
    assert result.figures["image_policy"] == policy and result.figures["image_verified"] is verified
    assert result.figures["image_pinned"] == DIGEST and result.figures["image_reported"] == (reported or None)


def test_package_problems_and_image_problems_are_both_reported():
    result = dependency.run({"packaging": "<1"}, IMAGE, "verify", environ={})
    assert result.outcome == "failed"
    assert "release requires packaging<1" in result.message and "cannot prove it runs" in result.message


def test_the_process_environment_is_what_a_replica_reports(monkeypatch):
    monkeypatch.setenv("DIFFOPS_IMAGE_DIGEST", DIGEST)
    assert dependency.run({}, IMAGE, "verify").outcome == "passed"
    monkeypatch.delenv("DIFFOPS_IMAGE_DIGEST")
    assert dependency.run({}, IMAGE, "verify").outcome == "failed"


# --- the release field ---------------------------------------------------------------------------------------------

def verified_demo():
    """The demo release with its explicit `image_policy: unverified` line removed: the default, verify."""
    return make_release((POLICY_LINE, ""))


def test_demo_release_says_unverified_explicitly():
    assert make_release().spec.runtime.image_policy == "unverified"
    assert verified_demo().spec.runtime.image_policy == "verify"


def test_unknown_policy_is_refused_with_its_line():
    from controller.parse.loader import InvalidRelease

    with pytest.raises(InvalidRelease) as refused:
        make_release((POLICY_LINE, "    image_policy: trust-me\n"))
    text = str(refused.value)
    assert "spec.runtime.image_policy" in text and "'verify' or 'unverified'" in text


def test_diff_shows_a_policy_change_as_a_new_version():
    [change] = diff_releases({"demo": verified_demo()}, {"demo": make_release()})
    assert change.change_class == "version"
    assert [(f.path, f.old, f.new, f.change_class) for f in change.fields] == [("spec.runtime.image_policy", "verify", "unverified", "version")]
    assert change.old_version != change.new_version
    text = as_text([change], [])
    assert '~ spec.runtime.image_policy: "verify" → "unverified"  (version)' in text
    assert "new version: gate checks, then rollout" in text


def test_leaving_the_default_keeps_existing_version_ids():
    # A release written before image_policy existed hashes exactly as it did: sha256 of its other version fields.
    import hashlib
    import json

    from controller.plan.versions import field_class, leaves

    release = verified_demo()
    late = ("spec.runtime.image_policy", "spec.quality.safety")  # fields added after ids existed, here at their defaults
    before = {p: v for p, v in leaves(release).items() if field_class(p) == "version" and p not in late}
    expected = hashlib.sha256(json.dumps(before, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]
    assert version_id(release) == expected
    assert version_id(make_release((POLICY_LINE, "    image_policy: verify\n"))) == expected
    assert version_id(make_release()) != expected


def state_with(spec_runtime: dict) -> State:
    recorded = make_release().spec.model_dump(mode="json")
    spec = Spec.model_validate_json(json.dumps({**recorded, "runtime": spec_runtime}))  # as the state store reads it
    release = ReleaseRecord("demo", "Healthy", "v1 serving 100%", "c1", "v1", spec, 10.0)
    versions = [VersionRecord("demo", "v1", "stable", 100, "ready", "c1" * 6, spec, 5.0, ready_at=9.0)]
    return State(ControllerRecord("c1", 10.0, "c1", 10.0), {"demo": release}, versions, {})


STATUS = [
    # (case, recorded runtime, image_policy in JSON, shown in text?)
    ("unverified", {"image": IMAGE, "image_policy": "unverified"}, "unverified", True),
    ("verify", {"image": IMAGE, "image_policy": "verify"}, "verify", False),
    ("recorded before the field existed", {"image": IMAGE}, "verify", False),
]


@pytest.mark.parametrize("case", STATUS, ids=[c[0] for c in STATUS])
def test_status_shows_the_image_policy(case):
    _, runtime, policy, shown = case
    state = state_with(runtime)
    [row] = status_json(state)["releases"][0]["versions"]
    assert row["image_policy"] == policy
    assert ("image unverified" in status_text(state, now=20.0)) is shown
