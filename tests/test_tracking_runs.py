"""What a gate's tracking run records (controller.tracking.runs): names are the contract in DESIGN.md."""

from __future__ import annotations

import base64
import json

import pytest

from checks.report import CheckResult, GateReport
from controller.parse.loader import parse_release
from controller.tracking.runs import MAX_PARAM_CHARS, gate_record, metric_name, numeric_figures, spec_params, usd_per_image
from tests.conftest import DEMO_RELEASE, edit


def release(text: str = DEMO_RELEASE):
    return parse_release(text.encode(), "releases/demo.yaml")


REPORT = GateReport("demo", "abc1234567", (
    CheckResult("artifact", "passed", "ok", {"files": 10, "total_bytes": 507752, "component_bytes": {"unet": 283454},
                                             "pipeline_class": "StableDiffusionPipeline"}),
    CheckResult("dependency", "passed", "ok", {"packages": {"torch": "2.13.0", "diffusers": "0.42.1"}, "image_verified": False,
                                               "image_pinned": "sha256:" + "0" * 64, "image_reported": None}),
    CheckResult("cuda", "skipped", "no CUDA", {"cuda_available": False, "cuda": None, "cpu": "AMD EPYC 7B13"}),
    CheckResult("golden", "passed", "ok", {"phash_distance": 0, "ssim": 1.0, "psnr_db": None}, seconds=0.4),
    CheckResult("performance", "passed", "ok", {"p50_latency_s": 0.2, "p95_latency_s": 0.3, "images_per_s": 8.0,
                                                 "peak_memory_gb": 0.56, "device": "cpu"}, seconds=2.0),
    CheckResult("quality", "passed", "ok", {"mean_clip_score": 21.5, "nsfw_rate": 0.0, "images": 4}),
), 9.5, {"golden-produced.png": base64.b64encode(b"\x89PNG produced").decode()}, job="diffops-gate-demo-abc")


def test_params_are_release_field_paths_with_the_prompts():
    params = spec_params(release().spec)
    assert params["model.uri"] == "file://models/tiny-sd" and params["model.digest"].startswith("sha256:2b30c6")
    assert params["generation.sampler"] == "ddim" and params["generation.steps"] == "4"
    assert params["generation.guidance_scale"] == "7.5" and params["generation.width"] == "64"
    assert params["generation.seed"] == "null" and params["generation.negative_prompt"] == ""
    assert params["checks.golden.prompt"] == "a red cube" and json.loads(params["prompts"]) == ["a red cube"]


def test_a_param_past_mlflows_limit_is_cut_and_the_spec_travels_whole_as_an_artifact():
    long = "x" * 9000
    spec = release(edit(DEMO_RELEASE, 'negative_prompt: ""', f'negative_prompt: "{long}"')).spec
    record = gate_record("demo", "abc", "c0ffee", spec, REPORT, controller_version="diffops 0.1.0")
    assert len(record.params["generation.negative_prompt"]) == MAX_PARAM_CHARS
    assert record.params["generation.negative_prompt"].endswith("(9000 chars; whole in params.json)")
    assert json.loads(record.artifacts["params.json"])["generation"]["negative_prompt"] == long


def test_gate_record_tags_metrics_and_artifacts():
    record = gate_record("demo", "abc1234567", "c0ffee", release().spec, REPORT, controller_version="diffops 0.1.0 serving x",
                         gate_key="k1")
    assert record.name == "gate demo abc1234567"
    assert {k: record.tags[k] for k in ("diffops.release", "diffops.version", "diffops.commit", "diffops.kind")} == {
        "diffops.release": "demo", "diffops.version": "abc1234567", "diffops.commit": "c0ffee", "diffops.kind": "gate"}
    assert record.tags["diffops.device"] == "AMD EPYC 7B13" and record.tags["diffops.torch"] == "2.13.0"
    assert record.tags["diffops.image"] == "sha256:" + "0" * 64 and "diffops.image_reported" not in record.tags
    assert record.tags["diffops.job"] == "diffops-gate-demo-abc" and record.tags["diffops.ok"] == "true"
    assert record.metrics["performance.p95_latency_s"] == 0.3 and record.metrics["golden.ssim"] == 1.0
    assert record.metrics["quality.mean_clip_score"] == 21.5 and record.metrics["artifact.component_bytes.unet"] == 283454
    assert "golden.psnr_db" not in record.metrics and "dependency.image_verified" not in record.metrics  # None, bool
    assert record.metrics["gate.ok"] == 1.0 and record.metrics["gate.seconds"] == 9.5 and record.metrics["golden.seconds"] == 0.4
    assert record.metrics["cost.usd_per_image"] == 0.0  # the demo holds no GPU: its images cost no GPU time
    assert record.artifacts["gate/golden-produced.png"] == b"\x89PNG produced"
    assert json.loads(record.artifacts["gate/report.json"])["job"] == "diffops-gate-demo-abc"


@pytest.mark.parametrize(("gpus", "price", "images_per_s", "expected"), [
    (1, 2.5, 8.0, 2.5 / 3600 / 8),
    (2, 3.6, 1.0, 0.002),
    (1, None, 8.0, None),  # no price: no cost figure, rather than a zero
    (1, 2.5, None, None),  # no throughput measured
    (1, 2.5, 0.0, None),
])
def test_usd_per_image(gpus, price, images_per_s, expected):
    text = edit(edit(DEMO_RELEASE, "gpus: 0", f"gpus: {gpus}"), "gpu_hour_usd: 2.5", f"gpu_hour_usd: {price if price is not None else 'null'}")
    cost = usd_per_image(release(text).spec, images_per_s)
    assert (cost is None) if expected is None else cost == pytest.approx(expected)


@pytest.mark.parametrize(("figures", "expected"), [
    ({"a": 1, "b": 2.5}, {"x.a": 1.0, "x.b": 2.5}),
    ({"a": True, "b": None, "c": "text", "d": [1, 2]}, {}),
    ({"a": float("nan"), "b": float("inf")}, {}),
    ({"nested": {"deep": {"v": 3}}}, {"x.nested.deep.v": 3.0}),
    ({"with space/and:colon": 1}, {"x.with space/and_colon": 1.0}),
])
def test_numeric_figures(figures, expected):
    assert dict(numeric_figures("x", figures)) == expected


def test_metric_names_keep_what_mlflow_accepts():
    assert metric_name("quality", "mean_clip_score") == "quality.mean_clip_score"
    assert metric_name("a", "b{c}") == "a.b_c_" and len(metric_name("a", "b" * 400)) == 250
