"""Release file edits for pull requests (`controller.parse.edit.set_fields`): the text a reviewer will read."""

from __future__ import annotations

import pytest

from controller.parse.edit import EditError, Scalar, set_fields
from controller.parse.loader import parse_release
from tests.conftest import DEMO_RELEASE

BLOCK = "a:\n  b: 1  # why one\n  c: x\nd: 2\n"

EDITS: list[tuple[str, str, dict[str, Scalar], str]] = [
    ("a number keeps its trailing comment", BLOCK, {"a.b": 8}, "a:\n  b: 8  # why one\n  c: x\nd: 2\n"),
    ("a plain string stays plain", BLOCK, {"a.c": "euler"}, "a:\n  b: 1  # why one\n  c: euler\nd: 2\n"),
    ("a string that reads as a number is quoted", BLOCK, {"a.c": "1.5"}, 'a:\n  b: 1  # why one\n  c: "1.5"\nd: 2\n'),
    ("a string that reads as a bool is quoted", BLOCK, {"a.c": "no"}, 'a:\n  b: 1  # why one\n  c: "no"\nd: 2\n'),
    ("a string with spaces is quoted", BLOCK, {"a.c": "blurry, low quality"},
     'a:\n  b: 1  # why one\n  c: "blurry, low quality"\nd: 2\n'),
    ("an empty string is quoted", BLOCK, {"a.c": ""}, 'a:\n  b: 1  # why one\n  c: ""\nd: 2\n'),
    ("a quoted string stays quoted", 'a:\n  c: "sha256:aa"  # pinned\n', {"a.c": "sha256:bb"}, 'a:\n  c: "sha256:bb"  # pinned\n'),
    ("a single-quoted string becomes double-quoted", "a:\n  c: 'x'\n", {"a.c": "y"}, 'a:\n  c: "y"\n'),
    ("an escaped quote is not the end of the old value", 'a:\n  c: "say \\" #not a comment"  # a comment\n', {"a.c": "z"},
     'a:\n  c: "z"  # a comment\n'),
    ("'' is not the end of a single-quoted value", "a:\n  c: 'it''s #not a comment'  # a comment\n", {"a.c": "z"},
     'a:\n  c: "z"  # a comment\n'),
    ("a # without a space before it is part of the value", "a:\n  c: x#y  # a comment\n", {"a.c": "z"}, "a:\n  c: z  # a comment\n"),
    ("null to a number", "a:\n  seed: null\n", {"a.seed": 7}, "a:\n  seed: 7\n"),
    ("a number to null", "a:\n  seed: 7\n", {"a.seed": None}, "a:\n  seed: null\n"),
    ("a bool", "a:\n  enabled: false\n", {"a.enabled": True}, "a:\n  enabled: true\n"),
    ("a float", "a:\n  cfg: 7.5\n", {"a.cfg": 5.0}, "a:\n  cfg: 5.0\n"),
    ("a large float is written so YAML reads a float", "a:\n  cfg: 7.5\n", {"a.cfg": 1e20}, "a:\n  cfg: 1.0e+20\n"),
    ("a small float too", "a:\n  cfg: 7.5\n", {"a.cfg": 1e-5}, "a:\n  cfg: 1.0e-05\n"),
    ("a missing key goes after the last key of its mapping", BLOCK, {"a.e": 3}, "a:\n  b: 1  # why one\n  c: x\n  e: 3\nd: 2\n"),
    ("an added string is plain when it can be", BLOCK, {"a.e": "ddim"}, "a:\n  b: 1  # why one\n  c: x\n  e: ddim\nd: 2\n"),
    ("an added key at the top level", BLOCK, {"f": 4}, BLOCK + "f: 4\n"),
    ("an added key after a block scalar goes after its last line", "a:\n  b: |\n    one\n\n    two\nd: 2\n", {"a.e": 3},
     "a:\n  b: |\n    one\n\n    two\n  e: 3\nd: 2\n"),
    ("an added key after a list", "a:\n  b:\n    - x\n    - y\nd: 2\n", {"a.e": 3}, "a:\n  b:\n    - x\n    - y\n  e: 3\nd: 2\n"),
    ("a comment after the mapping stays after the added key", "a:\n  b: 1\n  # the end of a\nd: 2\n", {"a.e": 3},
     "a:\n  b: 1\n  e: 3\n  # the end of a\nd: 2\n"),
    ("missing mappings are added with the file's indent", "spec:\n    model: 1\nd: 2\n", {"spec.generation.steps": 8},
     "spec:\n    model: 1\n    generation:\n        steps: 8\nd: 2\n"),
    ("several fields at once", BLOCK, {"a.b": 2, "a.c": "y", "a.e": None}, "a:\n  b: 2  # why one\n  c: y\n  e: null\nd: 2\n"),
    ("setting the value it has changes nothing", BLOCK, {"a.b": 1}, BLOCK),
]


@pytest.mark.parametrize(("text", "changes", "expected"), [case[1:] for case in EDITS], ids=[case[0] for case in EDITS])
def test_set_fields_writes_what_a_reviewer_expects(text: str, changes: dict[str, Scalar], expected: str) -> None:
    assert set_fields(text, changes) == expected


REFUSALS: list[tuple[str, str, dict[str, Scalar], str]] = [
    ("a mapping is not a scalar", BLOCK, {"a": 3}, "a: not a one-line scalar"),
    ("a block scalar", "a:\n  b: |\n    text\n", {"a.b": "x"}, "a.b: not a one-line scalar"),
    ("a value on the line after its key", "a:\n  b:\n    x\n", {"a.b": "y"}, "a.b: not a one-line scalar"),
    ("a flow mapping", "a: {b: 1, c: 2}\n", {"a.b": 3}, "a.b: inside a flow mapping"),
    ("a key added to a flow mapping", "a: {b: 1}\n", {"a.c": 3}, "a: not a block mapping with keys; add a.c by hand"),
    ("a key added under a scalar", BLOCK, {"d.e": 3}, "d: not a block mapping with keys"),
    ("a key added to an empty mapping", "a: {}\n", {"a.b": 1}, "a: not a block mapping with keys"),
    ("a file that does not parse", "a: [\n", {"a": 1}, "the file does not parse (line 2)"),
    ("a value YAML cannot hold as written", BLOCK, {"a.b": float("nan")}, "did not give the values asked for; edit a.b by hand"),
]


@pytest.mark.parametrize(("text", "changes", "message"), [case[1:] for case in REFUSALS], ids=[case[0] for case in REFUSALS])
def test_set_fields_refuses_what_it_cannot_do_safely(text: str, changes: dict[str, Scalar], message: str) -> None:
    with pytest.raises(EditError) as refused:
        set_fields(text, changes)
    assert message in str(refused.value)


def test_the_demo_release_edited_keeps_its_comments_and_validates() -> None:
    edited = set_fields(DEMO_RELEASE, {"spec.generation.sampler": "euler", "spec.generation.steps": 8,
                                       "spec.generation.guidance_scale": 5.0, "spec.generation.negative_prompt": "blurry",
                                       "spec.model.digest": "sha256:" + "ab" * 32})
    changed = [(old, new) for old, new in zip(DEMO_RELEASE.splitlines(), edited.splitlines(), strict=True) if old != new]
    assert changed == [
        ('    digest: "sha256:2b30c6ef7b43b8a62eb17faac4ed5a57d221d7b7d29409f0587ecf2af91b4199"', f'    digest: "sha256:{"ab" * 32}"'),
        ("    sampler: ddim", "    sampler: euler"),
        ("    steps: 4", "    steps: 8"),
        ("    guidance_scale: 7.5", "    guidance_scale: 5.0"),
        ('    negative_prompt: ""', '    negative_prompt: "blurry"'),
    ]
    assert "image_policy: unverified  # the demo's replicas run" in edited
    spec = parse_release(edited.encode(), "releases/demo.yaml").spec
    assert (spec.generation.sampler, spec.generation.steps, spec.model.digest) == ("euler", 8, "sha256:" + "ab" * 32)


def test_a_release_without_a_generation_block_gets_one() -> None:
    lines = DEMO_RELEASE.splitlines(keepends=True)
    start = lines.index("  generation:\n")
    text = "".join(lines[:start] + lines[start + 8:])
    assert "generation" not in text
    edited = set_fields(text, {"spec.generation.sampler": "euler"})
    assert edited.endswith("  cost:\n    gpu_hour_usd: 2.5\n  generation:\n    sampler: euler\n")
    assert parse_release(edited.encode(), "releases/demo.yaml").spec.generation.sampler == "euler"
