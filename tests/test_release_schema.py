"""Release validation as a table: each broken variant of the demo release and the error it gets."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from controller.cli.main import release_schema_text
from controller.parse.loader import InvalidRelease, parse_release
from serving.samplers import SAMPLERS
from tests.conftest import DEMO_RELEASE, ROOT, edit

FILE = "releases/demo.yaml"
DIGEST_LINE = '    digest: "sha256:2b30c6ef7b43b8a62eb17faac4ed5a57d221d7b7d29409f0587ecf2af91b4199"'
CANARY = "    strategy: canary\n    steps:\n      - weight: 25\n      - pause: 30s\n      - weight: 100\n"


def line_of(text: str, fragment: str) -> int:
    """Line number of the line equal to `fragment` (stripped), else of the first containing it."""
    lines = list(enumerate(text.splitlines(), 1))
    exact = [i for i, line in lines if line.strip() == fragment]
    return exact[0] if exact else next(i for i, line in lines if fragment in line)


INVALID = [
    # (id, (old, new) replacement, field, message fragment, line marker in the edited text)
    ("unknown field", ("    dtype: float32\n", "    dtype: float32\n    precision: 16\n"), "spec.model.precision", "unknown field 'precision' (allowed: uri, digest, dtype)", "precision:"),
    ("numeric digest", (DIGEST_LINE, "    digest: 12345"), "spec.model.digest", "must be a quoted string", "digest:"),
    ("short digest", (DIGEST_LINE, '    digest: "sha256:abc"'), "spec.model.digest", "64 lowercase hex", "digest:"),
    ("steps over max", ("    steps: 4\n", "    steps: 80\n"), "spec.generation.steps", "80 exceeds limits.max_steps (50)", "steps: 80"),
    ("width not multiple of 8", ("    width: 64\n", "    width: 60\n"), "spec.generation.width", "not a multiple of 8", "width: 60"),
    ("pixels over max", ("    max_pixels: 262144\n", "    max_pixels: 1024\n"), "spec.generation.width", "exceeds limits.max_pixels", "width: 64"),
    ("bad sampler", ("    sampler: ddim\n", "    sampler: dpm_turbo\n"), "spec.generation.sampler", "got 'dpm_turbo'", "sampler:"),
    ("string steps", ("    steps: 4\n", '    steps: "4"\n'), "spec.generation.steps", "valid integer", "steps:"),
    ("bool seed", ("    seed: null\n", "    seed: true\n"), "spec.generation.seed", "valid integer", "seed:"),
    ("NaN guidance", ("    guidance_scale: 7.5\n", "    guidance_scale: .nan\n"), "spec.generation.guidance_scale", "finite number", "guidance_scale:"),
    ("name is not the stem", ("  name: demo\n", "  name: other\n"), "metadata.name", "must equal the file name stem 'demo'", "name: other"),
    ("name not a DNS label", ("  name: demo\n", "  name: Demo_1\n"), "metadata.name", "DNS label", "name: Demo_1"),
    ("duration without unit", ("    scale_down_delay: 10m\n", "    scale_down_delay: 600\n"), "spec.rollout.scale_down_delay", "quoted string like '30s'", "scale_down_delay:"),
    ("bad duration", ("    scale_down_delay: 10m\n", "    scale_down_delay: ten minutes\n"), "spec.rollout.scale_down_delay", "expected a duration", "scale_down_delay:"),
    ("canary not ending at 100", ("    strategy: bluegreen\n", CANARY.replace("weight: 100", "weight: 90")), "spec.rollout.steps.2", "must end with {weight: 100}", "weight: 90"),
    ("canary weight going down", ("    strategy: bluegreen\n", CANARY.replace("weight: 25", "weight: 50").replace("pause: 30s", "weight: 10")), "spec.rollout.steps.1.weight", "only rise", "weight: 10"),
    ("weight step with no weight", ("    strategy: bluegreen\n", CANARY.replace("- pause: 30s", "- weight: null")), "spec.rollout.steps.1.weight", "needs a percent from 0 to 100", "weight: null"),
    ("step with both", ("    strategy: bluegreen\n", CANARY.replace("- pause: 30s", "- {pause: 30s, weight: 50}")), "spec.rollout.steps.1", "either {weight: N} or {pause", "pause: 30s, weight"),
    ("steps on bluegreen", ("    strategy: bluegreen\n", "    strategy: bluegreen\n    steps:\n      - weight: 100\n"), "spec.rollout.steps", "steps are for strategy: canary", "steps:"),
    ("unpinned image", ('    image: "ghcr.io/diffops/serving@sha256:' + "0" * 64 + '"', '    image: "ghcr.io/diffops/serving:latest"'), "spec.runtime.image", "pinned by digest", "image:"),
    ("bad specifier", ('      torch: ">=2.4"', '      torch: "two point four"'), "spec.runtime.requires", "PEP 440", "torch:"),
    ("unknown scheme", ("    uri: file://models/tiny-sd", "    uri: ftp://host/model"), "spec.model.uri", "unsupported model URI", "uri:"),
    ("hf without revision", ("    uri: file://models/tiny-sd", "    uri: hf://org/model"), "spec.model.uri", "pin a revision", "uri:"),
    ("batch larger than ongoing", ("    max_batch_size: 4\n", "    max_batch_size: 8\n"), "spec.replicas.max_batch_size", "a batch could never fill", "max_batch_size:"),
    ("missing model", ("  model:\n", "  modelx:\n"), "spec.modelx", "unknown field 'modelx'", "modelx:"),
    ("wrong apiVersion", ("apiVersion: diffops/v1", "apiVersion: diffops/v2"), "apiVersion", "got 'diffops/v2'", "apiVersion:"),
    ("name with --", ("  name: demo\n", "  name: demo--v1\n"), "metadata.name", "contains '--', which separates release and version", "name: demo--v1"),
    ("name over 63", ("  name: demo\n", "  name: " + "a" * 64 + "\n"), "metadata.name", "DNS label", "name: aaa"),
    ("overflowing duration", ("    scale_down_delay: 10m\n", "    scale_down_delay: 99999999999999d\n"), "spec.rollout.scale_down_delay",
     "'99999999999999d' is longer than the longest duration a release takes, 365d", "scale_down_delay:"),
    ("overflowing hours", ("    progress_deadline: 5m\n", "    progress_deadline: 99999999999999h\n"), "spec.rollout.progress_deadline",
     "longer than the longest duration a release takes, 365d", "progress_deadline:"),
    ("a day over the max", ("    scale_down_delay: 10m\n", "    scale_down_delay: 365d1ms\n"), "spec.rollout.scale_down_delay", "365d", "scale_down_delay:"),
    ("5000-digit duration", ("    scale_down_delay: 10m\n", "    scale_down_delay: " + "9" * 5000 + "s\n"), "spec.rollout.scale_down_delay",
     "(5003 characters)", "scale_down_delay:"),
    ("non-ASCII digits in a duration", ("    scale_down_delay: 10m\n", "    scale_down_delay: \u0661\u0660m\n"), "spec.rollout.scale_down_delay",
     "expected a duration", "scale_down_delay:"),
    ("infinite price", ("    gpu_hour_usd: 2.5\n", "    gpu_hour_usd: .inf\n"), "spec.cost.gpu_hour_usd", "finite number", "gpu_hour_usd:"),
    ("NaN queue", ("    max_queued_requests: 16\n", "    max_queued_requests: .nan\n"), "spec.replicas.max_queued_requests", "valid integer", "max_queued_requests:"),
]


@pytest.mark.parametrize("case", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_release_points_at_the_line(case):
    _, (old, new), field, fragment, marker = case
    text = edit(DEMO_RELEASE, old, new)
    with pytest.raises(InvalidRelease) as info:
        parse_release(text.encode(), FILE)
    matching = [e for e in info.value.errors if e.field == field]
    assert matching, [str(e) for e in info.value.errors]
    error = matching[0]
    assert fragment in error.message
    assert error.line == line_of(text, marker)
    assert str(error).startswith(f"{FILE}:{error.line}:{error.column}: {field}: ")


def test_missing_required_field_is_named():
    text = edit(DEMO_RELEASE, DIGEST_LINE + "\n", "")
    with pytest.raises(InvalidRelease) as info:
        parse_release(text.encode(), FILE)
    assert [e.message for e in info.value.errors] == ["missing required field 'digest'"]
    assert info.value.errors[0].line == line_of(text, "uri:")


def test_every_error_in_a_file_is_reported():
    text = edit(edit(DEMO_RELEASE, "    dtype: float32\n", "    dtype: float32\n    x: 1\n"), "    cpus: 0.5\n", "    cpus: 0.5\n    y: 2\n")
    with pytest.raises(InvalidRelease) as info:
        parse_release(text.encode(), FILE)
    assert {e.field for e in info.value.errors} == {"spec.model.x", "spec.replicas.y"}


VALID = [
    ("the demo release", lambda t: t),
    ("canary with indefinite pause", lambda t: edit(t, "    strategy: bluegreen\n", CANARY.replace("pause: 30s", "pause:"))),
    ("fractional GPUs", lambda t: edit(t, "    gpus: 0\n", "    gpus: 0.5\n")),
    ("fixed seed", lambda t: edit(t, "    seed: null\n", "    seed: 42\n")),
    ("s3 model", lambda t: edit(t, "file://models/tiny-sd", "s3://models/tiny-sd")),
    ("hf model", lambda t: edit(t, "file://models/tiny-sd", "hf://org/tiny@0123abc")),
    ("the longest duration", lambda t: edit(t, "    scale_down_delay: 10m\n", "    scale_down_delay: 365d\n")),
    ("defaults for optional sections", lambda t: t.split("  generation:")[0] + "  runtime:" + t.split("  runtime:")[1].split("  replicas:")[0]),
]


@pytest.mark.parametrize("case", VALID, ids=[c[0] for c in VALID])
def test_valid_release(case):
    release = parse_release(case[1](DEMO_RELEASE).encode(), FILE)
    assert release.name == "demo"


DURATIONS = [
    # (written, meaning) — what each unit means, and the documented cap
    ("250ms", timedelta(milliseconds=250)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("2d12h", timedelta(days=2, hours=12)),
    ("365d", timedelta(days=365)),
    ("8760h", timedelta(days=365)),
    ("0s", timedelta(0)),
]


@pytest.mark.parametrize("written, meaning", DURATIONS, ids=[d[0] for d in DURATIONS])
def test_duration_units(written, meaning):
    text = edit(DEMO_RELEASE, "    scale_down_delay: 10m\n", f"    scale_down_delay: {written}\n")
    assert parse_release(text.encode(), FILE).spec.rollout.scale_down_delay == meaning


def test_messages_about_huge_values_stay_short():
    text = edit(DEMO_RELEASE, "  name: demo\n", "  name: " + "X" * 100_000 + "\n")
    with pytest.raises(InvalidRelease) as info:
        parse_release(text.encode(), FILE)
    [error] = [e for e in info.value.errors if e.field == "metadata.name"]
    assert "DNS label" in error.message and len(error.message) < 300


def test_canary_pause_semantics():
    text = edit(DEMO_RELEASE, "    strategy: bluegreen\n", CANARY.replace("- weight: 100", "- pause:\n      - weight: 100"))
    steps = parse_release(text.encode(), FILE).spec.rollout.steps
    assert [(s.is_pause, s.weight, s.pause) for s in steps] == [
        (False, 25, None), (True, None, timedelta(seconds=30)), (True, None, None), (False, 100, None),
    ]


def test_required_samplers_are_offered():
    assert {"ddim", "ddpm", "pndm", "lms", "euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_karras", "unipc"} <= set(SAMPLERS)


def test_committed_json_schema_is_current():
    committed = (ROOT / "releases" / "release.schema.json").read_text()
    assert committed == release_schema_text(), "run `make schema` and commit releases/release.schema.json"
    schema = json.loads(committed)
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["ModelSpec"]["properties"]["digest"]["pattern"].startswith("^sha256:")


def test_readme_documents_every_release_field():
    from controller.plan.versions import leaves
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    text = edit(DEMO_RELEASE, "    strategy: bluegreen\n", CANARY)
    paths = {p.split(".steps.")[0] + ".steps" if ".steps." in p else p for p in leaves(parse_release(text.encode(), FILE))}
    paths = {p for p in paths if not p.startswith("spec.runtime.requires.")}
    missing = sorted(p for p in paths if f"`{p}`" not in readme)
    assert missing == []


def test_a_validation_bug_is_this_file_s_error_with_its_traceback_logged(monkeypatch, caplog):
    """A rule that raises (a bug) marks the file, logs the traceback once, and never escapes the loader."""
    import controller.parse.loader as loader

    def broken_rules(release, stem):
        raise KeyError("oops")

    monkeypatch.setattr(loader, "rules", broken_rules)
    with pytest.raises(InvalidRelease) as info:
        parse_release(DEMO_RELEASE.encode(), FILE)
    [error] = info.value.errors
    assert str(error) == f"{FILE}:1:1: could not be validated (KeyError: \"'oops'\"); this is a bug in diffops, please report it"
    [record] = [r for r in caplog.records if r.name == "diffops.loader"]
    assert record.exc_info is not None and FILE in record.getMessage()
