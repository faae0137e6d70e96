"""The plan as tables: which edits make a new version, which apply in place, and their GPU cost."""

from __future__ import annotations

import pytest

from controller.plan.changes import GpuImpact, diff_releases
from controller.plan.versions import FIELD_CLASSES, field_class, leaves, version_id
from tests.conftest import make_release as release

GPU1 = ("    gpus: 0\n", "    gpus: 1\n")

CHANGES = [
    # (id, edits, expected class, version id changes?, changed paths)
    ("steps", [("    steps: 4\n", "    steps: 8\n")], "version", True, ["spec.generation.steps"]),
    ("sampler", [("    sampler: ddim\n", "    sampler: euler_a\n")], "version", True, ["spec.generation.sampler"]),
    ("negative prompt", [('    negative_prompt: ""\n', '    negative_prompt: "blurry"\n')], "version", True, ["spec.generation.negative_prompt"]),
    ("model digest", [("2b30c6ef", "3b30c6ef")], "version", True, ["spec.model.digest"]),
    ("dtype", [("    dtype: float32\n", "    dtype: float16\n")], "version", True, ["spec.model.dtype"]),
    ("image", [("serving@sha256:0000", "serving@sha256:1111")], "version", True, ["spec.runtime.image"]),
    ("requirement", [('      torch: ">=2.4"\n', '      torch: ">=2.5"\n')], "version", True, ["spec.runtime.requires.torch"]),
    ("gpus per replica", [GPU1], "version", True, ["spec.replicas.gpus"]),
    ("cpus per replica", [("    cpus: 0.5\n", "    cpus: 1\n")], "version", True, ["spec.replicas.cpus"]),
    ("replica count", [("    count: 1\n", "    count: 3\n")], "light", False, ["spec.replicas.count"]),
    ("batch size", [("    max_batch_size: 4\n", "    max_batch_size: 2\n")], "light", False, ["spec.replicas.max_batch_size"]),
    ("queue", [("    max_queued_requests: 16\n", "    max_queued_requests: 64\n")], "light", False, ["spec.replicas.max_queued_requests"]),
    ("limits", [("    max_images: 4\n", "    max_images: 2\n")], "light", False, ["spec.limits.max_images"]),
    ("uri only", [("file://models/tiny-sd", "s3://bucket/tiny-sd")], "policy", False, ["spec.model.uri"]),
    ("rollout only", [("    scale_down_delay: 10m\n", "    scale_down_delay: 30m\n")], "policy", False, ["spec.rollout.scale_down_delay"]),
    ("cost only", [("    gpu_hour_usd: 2.5\n", "    gpu_hour_usd: 3\n")], "policy", False, ["spec.cost.gpu_hour_usd"]),
    ("light and version together", [("    count: 1\n", "    count: 2\n"), ("    steps: 4\n", "    steps: 6\n")], "version", True, ["spec.generation.steps", "spec.replicas.count"]),
]


@pytest.mark.parametrize("case", CHANGES, ids=[c[0] for c in CHANGES])
def test_change_class_and_version_id(case):
    _, edits, expected_class, new_version, paths = case
    old, new = release(), release(*edits)
    [change] = diff_releases({"demo": old}, {"demo": new})
    assert change.action == "change"
    assert change.change_class == expected_class
    assert [f.path for f in change.fields] == paths
    assert (change.old_version != change.new_version) is new_version
    assert change.old_version == version_id(old) and change.new_version == version_id(new)


def test_version_id_is_stable_and_short():
    assert version_id(release()) == version_id(release())
    assert len(version_id(release())) == 10
    assert version_id(release()) != version_id(release(name="other"))


def test_no_change_no_entry():
    assert diff_releases({"demo": release()}, {"demo": release()}) == []


def test_added_and_removed():
    changes = diff_releases({"old": release(name="old")}, {"new": release(GPU1, name="new")})
    assert [(c.name, c.action, c.change_class) for c in changes] == [("new", "add", "version"), ("old", "remove", "remove")]
    assert changes[0].impact == GpuImpact(replicas_to_start=1, gpus_before=0, gpus_peak=1, gpus_after=1)
    assert changes[1].impact == GpuImpact(replicas_to_start=0, gpus_before=0, gpus_peak=0, gpus_after=0)


IMPACTS = [
    # (id, old edits, new edits, expected impact)
    ("bluegreen version change doubles GPUs at peak", [GPU1, ("    count: 1\n", "    count: 2\n")],
     [GPU1, ("    count: 1\n", "    count: 2\n"), ("    steps: 4\n", "    steps: 8\n")],
     GpuImpact(replicas_to_start=2, gpus_before=2, gpus_peak=4, gpus_after=2, standby_gpus=2)),
    ("scale up is light", [GPU1], [GPU1, ("    count: 1\n", "    count: 3\n")],
     GpuImpact(replicas_to_start=2, gpus_before=1, gpus_peak=3, gpus_after=3)),
    ("scale down starts nothing", [GPU1, ("    count: 1\n", "    count: 3\n")], [GPU1],
     GpuImpact(replicas_to_start=0, gpus_before=3, gpus_peak=3, gpus_after=1)),
    ("policy change costs nothing", [GPU1], [GPU1, ("    gpu_hour_usd: 2.5\n", "    gpu_hour_usd: 1\n")],
     GpuImpact(replicas_to_start=0, gpus_before=1, gpus_peak=1, gpus_after=1)),
    ("more GPUs per replica", [GPU1], [("    gpus: 0\n", "    gpus: 2\n")],
     GpuImpact(replicas_to_start=1, gpus_before=1, gpus_peak=3, gpus_after=2, standby_gpus=1)),
]


@pytest.mark.parametrize("case", IMPACTS, ids=[c[0] for c in IMPACTS])
def test_gpu_impact(case):
    _, old_edits, new_edits, expected = case
    [change] = diff_releases({"demo": release(*old_edits)}, {"demo": release(*new_edits)})
    assert change.impact == expected


def test_every_schema_field_has_an_explicit_class():
    """A new schema field must be classified on purpose, not fall into the default."""
    prefixes = [prefix for prefix, _ in FIELD_CLASSES]
    unclassified = [
        path for path in leaves(release())
        if path.startswith("spec.") and not any(path == p or path.startswith(p + ".") for p in prefixes)
    ]
    assert unclassified == []
    assert field_class("spec.some_future_field") == "version"


TWO_GPUS = [GPU1, ("    count: 1\n", "    count: 2\n")]
# (case, old releases, new releases, expected (name, action, class, old version?, new version?, strategy, impact))
WHOLE = [
    ("removing a 2-GPU release frees both", {"demo": release(*TWO_GPUS)}, {},
     ("demo", "remove", "remove", True, False, None, GpuImpact(replicas_to_start=0, gpus_before=2, gpus_peak=2, gpus_after=0))),
    ("adding a 2-GPU release starts both", {}, {"demo": release(*TWO_GPUS)},
     ("demo", "add", "version", False, True, "bluegreen", GpuImpact(replicas_to_start=2, gpus_before=0, gpus_peak=2, gpus_after=2))),
    ("a light change says its strategy", {"demo": release()}, {"demo": release(("    strategy: bluegreen\n", "    strategy: auto\n"),
                                                                                  ("    count: 1\n", "    count: 2\n"))},
     ("demo", "change", "light", True, True, "auto", GpuImpact(replicas_to_start=1, gpus_before=0, gpus_peak=0, gpus_after=0))),
]


@pytest.mark.parametrize("case", WHOLE, ids=[c[0] for c in WHOLE])
def test_a_whole_release_change(case):
    _, old, new, (name, action, change_class, has_old, has_new, strategy, impact) = case
    [change] = diff_releases(old, new)
    assert (change.name, change.action, change.change_class, change.strategy, change.impact) == (name, action, change_class, strategy, impact)
    assert (change.old_version is not None, change.new_version is not None) == (has_old, has_new)
    assert change.old_version in (None, *(version_id(r) for r in old.values()))
    assert change.new_version in (None, *(version_id(r) for r in new.values()))


def test_changes_come_sorted_by_release_name():
    old = {"b": release(name="b"), "c": release(name="c")}
    new = {"a": release(name="a"), "b": release(("    steps: 4\n", "    steps: 6\n"), name="b"), "c": release(name="c")}
    assert [(c.name, c.action) for c in diff_releases(old, new)] == [("a", "add"), ("b", "change")]


@pytest.mark.parametrize("path, expected", [
    ("spec.model.digest", "version"), ("spec.model.uri", "policy"), ("spec.model", "version"),  # unknown or partial: the safe kind
    ("spec.runtime.image_policy", "version"), ("spec.runtime.requires.torch", "version"),
    ("spec.replicas.count", "light"), ("spec.replicas.countdown", "version"),  # a prefix matches whole path segments only
    ("spec.replicas.gpus", "version"), ("spec.limits.max_images", "light"), ("spec.rollout.analysis.interval", "policy"),
    ("spec.checks.golden.reference", "policy"), ("spec.faults.error_rate", "version"), ("metadata.name", "version"),
])
def test_field_class_table(path, expected):
    assert field_class(path) == expected


def test_flatten_names_every_leaf_and_keeps_empty_containers():
    from controller.plan.versions import flatten

    assert flatten({"a": {"b": 1, "c": [2, {"d": None}]}, "e": {}, "f": []}) == {"a.b": 1, "a.c.0": 2, "a.c.1.d": None, "e": {}, "f": []}
    assert flatten(5) == {"": 5}


def test_version_id_counts_a_late_field_only_when_it_differs_from_its_default():
    base = release()
    verify = release(("    image_policy: unverified  #", "    image_policy: verify  #"))
    assert version_id(verify) != version_id(base)  # unverified -> verify: a different version
    late = ("spec.runtime.image_policy", "spec.quality.safety")  # fields added after ids existed, here at their defaults
    without = {k: v for k, v in leaves(verify).items() if k not in late}
    import hashlib
    import json

    identity = {path: value for path, value in without.items() if field_class(path) == "version"}
    expected = hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:10]
    assert version_id(verify) == expected  # the default is hashed as if the field were absent (ids made before it existed)


def test_each_changed_field_carries_both_values():
    drill = release(("  cost:\n", "  faults:\n    error_rate: 0.5\n  cost:\n"), ("    steps: 4\n", "    steps: 8\n"))
    [change] = diff_releases({"demo": release()}, {"demo": drill})
    fields = {f.path: (f.old, f.new, f.change_class) for f in change.fields}
    assert fields["spec.generation.steps"] == (4, 8, "version")
    assert fields["spec.faults.error_rate"] == (None, 0.5, "version")  # a field only the new file has
    [back] = diff_releases({"demo": drill}, {"demo": release()})
    assert {f.path: (f.old, f.new) for f in back.fields}["spec.faults.error_rate"] == (0.5, None)  # and only the old one
