"""Experiment files: the grid a file expands to, every refusal naming its field and line, the caps, the committed
JSON Schema, and a fuzz of the reader (nothing but a valid experiment or a clean error)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from controller.experiments.grid import expand
from controller.experiments.loader import ExperimentFile, InvalidExperiment, parse_experiment, read_experiment
from controller.experiments.run import release_of
from controller.experiments.schema import MAX_CELLS, MAX_IMAGES, MAX_PROMPTS, schema_text
from controller.experiments.table import sort_rows
from controller.source.git_source import ReleaseSource
from tests.conftest import ROOT, ReleaseRepo, make_release
from tests.test_fuzz_inputs import FUZZ, emit, leaf, mutate, paths

FILE = "experiments/try.yaml"
DIGEST = "sha256:" + "ab" * 32
EXPERIMENT = """\
apiVersion: diffops/v1
kind: Experiment
metadata:
  name: try
spec:
  release: demo
  grid:
    sampler: [ddim, euler]
    steps: [2, 4]
    seed: [1, 2]
  prompts: [a red cube, a blue sphere]
"""
BASE: dict[str, Any] = yaml.safe_load(EXPERIMENT)


def parsed(text: str = EXPERIMENT, **files: bytes) -> ExperimentFile:
    return parse_experiment(text.encode(), FILE, lambda path: files[path])


def refusal(text: str) -> list[str]:
    with pytest.raises(InvalidExperiment) as caught:
        found = parsed(text)
        expand(found, make_release())
    return [str(e) for e in caught.value.errors]


def test_grid_expands_to_every_combination_in_order_with_the_release_for_unset_axes():
    cells = expand(parsed(EXPERIMENT.replace("    seed: [1, 2]\n", "")), make_release())
    assert [(c.config.index, c.config.sampler, c.config.steps, c.config.guidance_scale, c.seed) for c in cells] == [
        (0, "ddim", 2, 7.5, 0), (1, "ddim", 4, 7.5, 0), (2, "euler", 2, 7.5, 0), (3, "euler", 4, 7.5, 0)]
    full = expand(parsed(), make_release())
    assert [c.id for c in full] == ["m0-ddim-2-cfg7.5-seed1", "m0-ddim-2-cfg7.5-seed2", "m0-ddim-4-cfg7.5-seed1", "m0-ddim-4-cfg7.5-seed2",
                                    "m0-euler-2-cfg7.5-seed1", "m0-euler-2-cfg7.5-seed2", "m0-euler-4-cfg7.5-seed1", "m0-euler-4-cfg7.5-seed2"]
    first = full[0].release.spec
    assert (first.generation.sampler, first.generation.steps, first.generation.seed, first.model.uri) == ("ddim", 2, 1, "file://models/tiny-sd")
    assert len({c.version for c in full}) == 8, "each cell is its own release version"
    assert full[4].release.spec.runtime == make_release().spec.runtime, "everything outside the grid is the release's"


def test_models_and_overrides_change_every_cell():
    text = EXPERIMENT.replace("  prompts:", f'  models:\n    - {{uri: file://models/a, digest: "{DIGEST}"}}\n'
                                           f'    - {{uri: "s3://bucket/b", digest: "{DIGEST}"}}\n  width: 32\n  prompts:')
    cells = expand(parsed(text), make_release())
    assert len(cells) == 16 and {c.config.model.uri for c in cells} == {"file://models/a", "s3://bucket/b"}
    assert {c.release.spec.generation.width for c in cells} == {32} and {c.release.spec.generation.height for c in cells} == {64}
    assert cells[8].id.startswith("m1-") and cells[8].config.label(True) == "b ddim 2 steps cfg 7.5"


def test_prompts_file_is_read_beside_the_experiment_file(tmp_path: Path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.txt").write_text("# comment\na red cube\n\n  a blue sphere  \n")
    (tmp_path / "e.yaml").write_text(EXPERIMENT.replace("  prompts: [a red cube, a blue sphere]", "  prompts_file: prompts/p.txt"))
    assert read_experiment(tmp_path / "e.yaml").prompts == ("a red cube", "a blue sphere")
    assert read_experiment(ROOT / "experiments" / "demo-grid.yaml").prompts == ("a red cube", "a blue sphere")


many_prompts = "[" + ", ".join(f"p{i}" for i in range(MAX_PROMPTS + 1)) + "]"
REFUSALS = [
    ("unknown sampler", ("sampler: [ddim, euler]", "sampler: [ddim, fast]"),
     "experiments/try.yaml:8:21: spec.grid.sampler.1: Input should be 'ddim', "),
    ("empty grid axis", ("steps: [2, 4]", "steps: []"),
     "experiments/try.yaml:9:12: spec.grid.steps: List should have at least 1 item after validation, not 0: an empty axis sweeps nothing"),
    ("axis over its cap", ("seed: [1, 2]", "seed: [1, 2, 3, 4, 5, 6, 7, 8, 9]"),
     "experiments/try.yaml:10:11: spec.grid.seed: List should have at most 8 items after validation, not 9"),
    ("grid over the cell cap", ("steps: [2, 4]", "steps: [1, 2, 3, 4, 5, 6, 7, 8]\n    guidance_scale: [1, 2, 3]"),
     f"experiments/try.yaml:7:3: spec.grid: 1 x 2 x 8 x 3 x 2 (models x sampler x steps x guidance_scale x seed) = 96 cells; "
     f"the cap is {MAX_CELLS}"),
    ("prompts over their cap", ("prompts: [a red cube, a blue sphere]", f"prompts: {many_prompts}"),
     "experiments/try.yaml:11:12: spec.prompts: List should have at most 32 items after validation, not 33"),
    ("images over their cap", ("steps: [2, 4]\n    seed: [1, 2]\n  prompts: [a red cube, a blue sphere]",
                               "steps: [1, 2, 3, 4, 5, 6, 7, 8]\n    seed: [1, 2]\n  prompts: [" + ", ".join(f"p{i}" for i in range(32)) + "]"),
     f"experiments/try.yaml:11:3: spec.prompts: 32 cells x 32 prompts = 1024 images; the cap is {MAX_IMAGES}"),
    ("missing digest", ("  prompts:", "  models: [{uri: file://models/x}]\n  prompts:"),
     "experiments/try.yaml:11:12: spec.models.0.digest: missing required field 'digest'"),
    ("unquoted digest", ("  prompts:", "  clip: {uri: file://models/c, digest: 1234}\n  prompts:"),
     "spec.clip.digest: a digest must be a quoted string like 'sha256:<64 hex>'; YAML read 1234 as int"),
    ("steps past the release's limit", ("steps: [2, 4]", "steps: [2, 51]"),
     "experiments/try.yaml:9:16: spec.grid.steps.1: release demo with ddim 51 steps cfg 7.5: 51 exceeds limits.max_steps (50)"),
    ("size not a multiple of 8", ("  prompts:", "  width: 60\n  prompts:"),
     "experiments/try.yaml:11:3: spec.width: release demo: 60 is not a multiple of 8 (try 56)"),
    ("baseline outside the grid", ("  prompts:", "  baseline: 4\n  prompts:"),
     "spec.baseline: 4 is not a config index: the grid has 4 config(s), 0 to 3"),
    ("duplicate value", ("steps: [2, 4]", "steps: [4, 4]"), "spec.grid.steps: 4 is listed twice"),
    ("unknown field", ("  prompts:", "  sampler: ddim\n  prompts:"), "spec.sampler: unknown field 'sampler' (allowed: release, models, grid,"),
    ("both prompt forms", ("  prompts:", "  prompts_file: p.txt\n  prompts:"), "spec: give the prompts either inline"),
    ("unknown sort metric", ("  prompts:", "  sort: speed\n  prompts:"), "spec.sort: String should match pattern"),
    ("anchor", ("  grid:", "  grid: &g"), "experiments/try.yaml:7:9: anchor '&g' is not allowed"),
    ("wrong kind", ("kind: Experiment", "kind: Release"), "experiments/try.yaml:2:7: kind: Input should be 'Experiment', got 'Release'"),
]


@pytest.mark.parametrize(("case", "edit", "expected"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_field_and_line(case: str, edit: tuple[str, str], expected: str):
    assert edit[0] in EXPERIMENT
    errors = refusal(EXPERIMENT.replace(*edit))
    assert any(expected in error for error in errors), errors
    assert len(errors) == len(set(errors)) <= 2, "one error per cause, not one per cell"


def test_prompts_file_refusals(tmp_path: Path):
    text = EXPERIMENT.replace("  prompts: [a red cube, a blue sphere]", "  prompts_file: p.txt")
    for content, expected in [(b"# only a comment\n", "p.txt holds no prompt"), (b"\xff\xfe", "p.txt is not UTF-8"),
                              (b"x\n" * (MAX_PROMPTS + 1), f"holds {MAX_PROMPTS + 1} prompts; the cap is {MAX_PROMPTS}")]:
        with pytest.raises(InvalidExperiment) as caught:
            parsed(text, **{"p.txt": content})
        assert str(caught.value).startswith("experiments/try.yaml:11:3: spec.prompts_file: ") and expected in str(caught.value)
    (tmp_path / "e.yaml").write_text(text)
    with pytest.raises(InvalidExperiment, match=r"spec.prompts_file: p.txt: No such file"):
        read_experiment(tmp_path / "e.yaml")


def test_unknown_release_names_the_releases_there(release_repo: ReleaseRepo, tmp_path: Path):
    release_repo.release()
    release_repo.commit()
    source = ReleaseSource.open(release_repo.path, state_dir=tmp_path / "state")
    found = parsed(EXPERIMENT.replace("release: demo", "release: nope"))
    with pytest.raises(InvalidExperiment) as caught:
        release_of(found, source, None)
    assert str(caught.value).startswith("experiments/try.yaml:6:3: spec.release: no release 'nope' at ")
    assert str(caught.value).endswith("(releases: demo)")
    release_repo.release("broken", **{"steps: 4": "steps: 51"})
    release_repo.commit()
    with pytest.raises(InvalidExperiment, match=r"spec.release: release 'broken' does not validate at \w+: .*51 exceeds limits.max_steps"):
        release_of(parsed(EXPERIMENT.replace("release: demo", "release: broken")), source, None)


def test_committed_json_schema_is_current():
    committed = (ROOT / "experiments" / "experiment.schema.json").read_text()
    assert committed == schema_text(), "run `diffops experiment schema -o experiments/experiment.schema.json` and commit it"
    schema = json.loads(committed)
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["Grid"]["properties"]["seed"]["anyOf"][0]["maxItems"] == 8


def test_table_sorts_best_first_for_each_metric_with_missing_values_last():
    rows = [{"index": 0, "metrics": {"performance.p50_latency_s": 0.3, "baseline.ssim": 1.0}},
            {"index": 1, "metrics": {"performance.p50_latency_s": 0.1, "baseline.ssim": 0.5}},
            {"index": 2, "metrics": {"baseline.ssim": 0.9}}]
    assert [r["index"] for r in sort_rows(rows, "performance.p50_latency_s")] == [1, 0, 2]
    assert [r["index"] for r in sort_rows(rows, "baseline.ssim")] == [0, 2, 1]
    assert [r["index"] for r in sort_rows(rows, "quality.mean_clip_score")] == [0, 1, 2]


BASE_PATHS = paths(BASE)


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(BASE_PATHS), st.sampled_from(["replace", "delete", "add", "wrap"]), leaf),
                      min_size=1, max_size=3), raw=st.binary(max_size=200))
def test_fuzzed_experiment_files_give_an_experiment_or_clean_errors(edits: list[tuple[Any, str, Any]], raw: bytes):
    doc: Any = BASE
    for path, how, value in edits:
        try:
            doc = mutate(doc, path, how, value)
        except (KeyError, IndexError, TypeError):
            continue
    for data in (emit(doc), raw, emit(BASE)[:len(raw)] + raw):
        try:
            found = parse_experiment(data, FILE, lambda path: raw)
            expand(found, make_release())
        except InvalidExperiment as err:
            assert err.errors and all(str(e).startswith(f"{FILE}:") and e.line >= 1 and "bug" not in e.message for e in err.errors)
