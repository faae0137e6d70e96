"""The gate's input travels by reference: a content-addressed package, a small job request, a start deadline.

Unpacking uses Ray's own `unzip_package` (what a node does with a `working_dir`
package), and the job side is `checks.job.run_dir`, what `python -m checks.job`
runs in that directory.
"""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import git
import numpy as np
import pytest
from PIL import Image

from checks.job import INPUT_NAME, REFERENCE_MAX_BYTES, REFERENCE_NAME, pack, read_dir, reference_refusal, run_dir
from controller.gate.runner import gate_input, job_request, package_uri, settings_from_env
from controller.gate.start import Fail, KeepWaiting, start_deadline_s, start_verdict
from controller.plan.versions import version_id
from controller.source.git_source import ReleaseSource
from tests.conftest import ReleaseRepo, make_release

ENV_LIMIT = 128 * 1024  # Linux MAX_ARG_STRLEN: the most one environment string may hold


def noise_png(side: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def sample_gate(reference: bytes | None) -> dict:
    return {"release": "demo", "version": "v1234", "spec": {"checks": {"golden": {"reference": "releases/golden/demo.png"}}},
            "model": {"uri": "file://models/tiny-sd", "digest": "sha256:" + "0" * 64, "dtype": "float32"},
            "repo": "/srv/repo", "commit": "c" * 40, "cache_dir": "/var/cache/diffops", "reference": reference,
            "reference_bytes": None if reference is None else len(reference), "timeout_s": 120.0}


def unpack_like_ray(package: bytes, tmp_path: Path) -> Path:
    from ray._private.runtime_env.packaging import unzip_package

    zipped, target = tmp_path / "pkg.zip", tmp_path / "working_dir"
    zipped.write_bytes(package)
    unzip_package(str(zipped), str(target), remove_top_level_directory=False, unlink_zip=True)
    return target


def test_a_512px_reference_round_trips_through_rays_unzip_as_its_own_file(tmp_path):
    reference = noise_png(512)
    assert len(reference) > ENV_LIMIT  # what used to kill the job's worker at start
    gate = sample_gate(reference)
    folder = unpack_like_ray(pack(gate), tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [INPUT_NAME, REFERENCE_NAME]
    assert (folder / REFERENCE_NAME).read_bytes() == reference
    assert "reference" not in json.loads((folder / INPUT_NAME).read_text())  # the JSON never carries the image
    assert read_dir(folder) == gate


def test_no_reference_means_no_file_and_none_back(tmp_path):
    gate = sample_gate(None)
    folder = unpack_like_ray(pack(gate), tmp_path)
    assert [p.name for p in folder.iterdir()] == [INPUT_NAME]
    assert read_dir(folder)["reference"] is None


def test_package_name_is_content_addressed_and_rays_pattern():
    from ray._private.runtime_env.packaging import is_zip_uri

    first, again = pack(sample_gate(noise_png(64))), pack(sample_gate(noise_png(64)))
    other = pack(sample_gate(noise_png(64, seed=1)))
    assert first == again and package_uri(first) == package_uri(again)  # a restarted controller finds its job again
    assert package_uri(first) != package_uri(other)
    assert re.fullmatch(r"gcs://_ray_pkg_[0-9a-f]{40}\.zip", package_uri(first))
    assert is_zip_uri(package_uri(first))


@pytest.mark.parametrize("side", [0, 512, 2048])
def test_the_job_request_is_a_pointer_whatever_the_reference_size(side):
    gate = sample_gate(noise_png(side) if side else None)
    uri = package_uri(pack(gate))
    pin = "diffops 0.1.0 serving 0123456789ab"
    body = job_request(gate, "diffops-gate-demo-v1234-abcd", uri, "/opt/venv/bin/python", 0.5, 1, {"gpu-pool": 1.0}, pin)
    assert len(json.dumps(body)) < 1024
    assert body["runtime_env"] == {"working_dir": uri, "env_vars": {"DIFFOPS_SERVING_CODE": pin}}  # the code pin only, no data
    assert body["entrypoint"] == "/opt/venv/bin/python -m checks.job"
    assert (body["entrypoint_num_cpus"], body["entrypoint_num_gpus"], body["entrypoint_resources"]) == (0.5, 1, {"gpu-pool": 1.0})


def test_start_deadline_is_scaled_for_gpus():
    assert [start_deadline_s(gpus, 120) for gpus in (0, 0.5, 1, 4)] == [120, 360, 360, 360]
    assert start_deadline_s(0) == 120  # the documented default base


RAY_PENDING = ("Job has not started yet. It may be waiting for resources (CPUs, GPUs, memory, custom resources) "
               "to become available. It may be waiting for the runtime environment to be set up.")

START_CASES = [
    # status, pending seconds, cpus, gpus -> fails?
    ("PENDING", 0, 0.5, 0, False),
    ("PENDING", 119.9, 0.5, 0, False),
    ("PENDING", 120, 0.5, 0, True),
    ("PENDING", 300, 0.5, 1, False),  # a GPU gate gets 3x the base
    ("PENDING", 360, 0.5, 1, True),
    ("UNKNOWN", 120, 0.5, 0, True),  # Ray lost or never recorded the job
    ("RUNNING", 10_000, 0.5, 1, False),  # started: the whole-job limit applies, not this one
    ("SUCCEEDED", 10_000, 0.5, 0, False),
    ("FAILED", 10_000, 0.5, 0, False),
    ("PENDING", float("nan"), 0.5, 0, False),
]


@pytest.mark.parametrize("status,pending_s,cpus,gpus,fails", START_CASES)
def test_start_verdict(status, pending_s, cpus, gpus, fails):
    verdict = start_verdict(status, RAY_PENDING, pending_s, cpus, gpus, {"gpu-pool": 1}, base_s=120)
    assert isinstance(verdict, Fail if fails else KeepWaiting)


def test_start_failure_says_what_ray_said_and_what_was_asked():
    verdict = start_verdict("PENDING", RAY_PENDING, 400, 0.5, 4, {"gpu-pool": 1}, base_s=120)
    assert isinstance(verdict, Fail)
    assert "did not start within 360s (120s x3 for a GPU gate)" in verdict.reason
    assert "asked for 0.5 CPU, 4 GPU, 1 gpu-pool" in verdict.reason
    assert "Ray says (PENDING): Job has not started yet. It may be waiting for resources" in verdict.reason
    assert start_verdict("PENDING", "", 120, 1, 0, base_s=120).reason.count("no status message") == 1


SETTINGS_CASES = [
    ({}, (120.0, {})),
    ({"DIFFOPS_GATE_START_DEADLINE_S": "5"}, (5.0, {})),
    ({"DIFFOPS_GATE_RESOURCES": '{"gpu-pool": 1}'}, (120.0, {"gpu-pool": 1.0})),
]
SETTINGS_REFUSALS = [
    ({"DIFFOPS_GATE_START_DEADLINE_S": "soon"}, "give seconds"),
    ({"DIFFOPS_GATE_START_DEADLINE_S": "-1"}, "positive"),
    ({"DIFFOPS_GATE_START_DEADLINE_S": "inf"}, "positive"),
    ({"DIFFOPS_GATE_RESOURCES": "[1]"}, "JSON object"),
    ({"DIFFOPS_GATE_RESOURCES": '{"pool": 0}'}, "positive amounts"),
    ({"DIFFOPS_GATE_RESOURCES": "{"}, "JSON object"),
]


@pytest.mark.parametrize("environ,expected", SETTINGS_CASES)
def test_settings_from_env(environ, expected):
    assert settings_from_env(environ) == expected


@pytest.mark.parametrize("environ,says", SETTINGS_REFUSALS)
def test_settings_from_env_refuses_with_an_example(environ, says):
    with pytest.raises(ValueError, match=says):
        settings_from_env(environ)


def test_reference_cap_is_at_least_8_mb_and_the_refusal_names_size_and_cap():
    assert REFERENCE_MAX_BYTES >= 8_000_000
    assert reference_refusal("releases/golden/demo.png", REFERENCE_MAX_BYTES) is None
    message = reference_refusal("releases/golden/demo.png", 20 * 2**20)
    assert message is not None
    assert "releases/golden/demo.png is 20.0 MiB (20971520 bytes)" in message and f"({REFERENCE_MAX_BYTES} bytes)" in message


def test_an_oversize_reference_is_never_read_and_fails_the_golden_check(model_repo: ReleaseRepo, tmp_path):
    huge = REFERENCE_MAX_BYTES + 1
    model_repo.write("releases/golden/demo.png", b"\x89PNG" + b"\0" * (huge - 4))
    commit = model_repo.commit("an oversize reference")
    release = make_release()
    source = ReleaseSource(git.Repo(model_repo.path))
    gate = gate_input(release, version_id(release), source, str(tmp_path / "models"), model_commit=commit, checks_commit=commit)
    assert gate["reference"] is None and gate["reference_bytes"] == huge
    package = pack(gate)
    assert len(package) < 16 * 1024
    report = run_dir(unpack_like_ray(package, tmp_path))
    golden = next(c for c in report.checks if c.name == "golden")
    assert golden.outcome == "failed" and f"({huge} bytes), over the 16 MiB cap" in golden.message
    assert {c.name: c.outcome for c in report.checks}["load"] == "passed"  # the other checks still ran


class DrawsOneImage:
    """A pipeline runner (our boundary) whose model always draws `image`: a 1024 px render takes tens of minutes
    on CPU with the demo model, and what is under test here is the input's path and the comparison at that size."""

    device = "cpu"

    def __init__(self, image: bytes):
        self.image, self.requests = image, []

    def run(self, requests):
        self.requests += requests
        return [{"images": [self.image], "params": {}, "seconds": 0.0, "batch_size": 1} for _ in requests]


def test_a_1024px_golden_reference_passes_through_the_gate_job_path(model_repo: ReleaseRepo, tmp_path):
    drawn = noise_png(1024)
    assert len(drawn) > 2 * 2**20  # a 1024 px PNG of fine detail: far over one environment string
    model_repo.release(**{"width: 64": "width: 1024", "height: 64": "height: 1024", "max_pixels: 262144": "max_pixels: 1048576"})
    model_repo.write("releases/golden/demo.png", drawn)
    commit = model_repo.commit("a 1024 px release and its golden reference")
    release = make_release(("width: 64", "width: 1024"), ("height: 64", "height: 1024"), ("max_pixels: 262144", "max_pixels: 1048576"))
    gate = gate_input(release, version_id(release), ReleaseSource(git.Repo(model_repo.path)), str(tmp_path / "models"),
                      model_commit=commit, checks_commit=commit)
    folder = unpack_like_ray(pack(gate), tmp_path)
    with Image.open(folder / REFERENCE_NAME) as image:
        assert image.size == (1024, 1024)
    runner = DrawsOneImage(drawn)
    report = run_dir(folder, loader=lambda path, model, sampler: runner)
    outcomes = {c.name: c.outcome for c in report.checks}
    assert outcomes == {"artifact": "passed", "dependency": "passed", "cuda": "skipped", "load": "passed", "golden": "passed",
                        "performance": "passed"}, report.summary()
    assert next(c for c in report.checks if c.name == "golden").figures["phash_distance"] == 0
    assert (runner.requests[0]["width"], runner.requests[0]["height"]) == (1024, 1024)

    runner.image = noise_png(1024, seed=1)  # the model now draws something else: the 1024 px comparison must see it
    failed = run_dir(folder, loader=lambda path, model, sampler: runner)
    assert "golden check failed: phash distance" in failed.summary() and "SSIM" in failed.summary()
    assert set(failed.artifacts) == {"golden-produced.png", "golden-compare.png"}
