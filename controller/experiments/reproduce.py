"""`diffops experiment reproduce RUN_ID`: draw one recorded cell again and compare it with its recorded images.

The cell is rebuilt from the run's own params only (model, generation config by release field path, prompts; the
whole prompt list from `prompts.json` when the param was cut), drawn through the same path as `experiment run`
(`controller.experiments.draw`), and compared per prompt with the images MLflow's client downloads from the run:
pHash distance and the largest and mean absolute difference of 8-bit RGB values. `PromptDiff.ok` judges one prompt
against the allowed pHash distance (default 0: the same hardware and packages draw the same image).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checks import imagecompare
from checks.golden import ImageRefused, decode_png
from controller.experiments import draw as drawing
from controller.experiments.measure import pixel_difference
from controller.experiments.record import PROMPTS_ARTIFACT
from controller.tracking.mlflow_store import Tracker
from serving.artifacts import ModelCache, fetch
from serving.schema import GenerationSpec, ModelSpec

__all__ = ["PromptDiff", "ReproduceError", "recipe", "reproduce"]

GENERATION_FIELDS = ("sampler", "steps", "guidance_scale", "width", "height", "negative_prompt", "seed")


class ReproduceError(Exception):
    """The run cannot be reproduced (not an experiment cell, params missing, model not fetchable); says what to do."""


@dataclass(frozen=True)
class PromptDiff:
    index: int
    prompt: str
    phash_distance: int
    max_abs: int
    mean_abs: float

    def ok(self, max_phash_distance: int) -> bool:
        return self.phash_distance <= max_phash_distance


def _value(params: dict[str, str], key: str, kind: str) -> Any:
    if key not in params:
        raise ReproduceError(f"the run has no param {key!r}; only runs logged by `diffops experiment run` can be reproduced")
    text = params[key]
    if kind == "str":
        return text
    try:
        return json.loads(text)
    except ValueError:
        raise ReproduceError(f"param {key}={text[:80]!r} is not a {kind}; the run's params were changed") from None


def recipe(params: dict[str, str]) -> tuple[ModelSpec, GenerationSpec, list[str] | None]:
    """The model, generation config and prompts (None when the param was cut: read prompts.json) from a run's params."""
    kinds = {"sampler": "str", "negative_prompt": "str", "guidance_scale": "number", "seed": "number"}
    raw = {name: _value(params, f"generation.{name}", kinds.get(name, "number")) for name in GENERATION_FIELDS}
    if isinstance(raw["guidance_scale"], int):
        raw["guidance_scale"] = float(raw["guidance_scale"])
    try:
        generation = GenerationSpec.model_validate(raw)
        model = ModelSpec.model_validate({k: _value(params, f"model.{k}", "str") for k in ("uri", "digest", "dtype")})
    except ValueError as err:
        raise ReproduceError(f"the run's params do not describe a drawable cell: {err}") from None
    if generation.seed is None:
        raise ReproduceError("the run has no fixed seed (generation.seed); it cannot be drawn again")
    prompts_text = _value(params, "prompts", "str")
    prompts = None if prompts_text.endswith(f"whole in {PROMPTS_ARTIFACT})") else _value(params, "prompts", "JSON list")
    if prompts is not None and (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or not prompts):
        raise ReproduceError("param prompts is not a JSON list of prompts")
    return model, generation, prompts


def reproduce(run_id: str, tracker: Tracker, state_dir: Path, open_repo: Callable[[str], tuple[Path, str]],
              say: Callable[[str], None] = lambda line: None) -> list[PromptDiff]:
    """Draw the cell of run `run_id` again and compare it with the run's images, prompt by prompt. `open_repo(commit)`
    gives the release repo and commit to fetch a `file://` model that is not in the cache yet."""
    client = tracker.client
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise ReproduceError(f"run {run_id} not found in {tracker.uri} ({type(err).__name__}); check the id and --tracking-uri") from err
    if run.data.tags.get("diffops.kind") != "experiment" or "diffops.cell" not in run.data.tags:
        raise ReproduceError(f"run {run_id} is not an experiment cell (tag diffops.kind={run.data.tags.get('diffops.kind')!r}); "
                             "give the id of a cell run, a child of an `experiment run`")
    model, generation, prompts = recipe(dict(run.data.params))
    with tempfile.TemporaryDirectory(prefix="diffops-reproduce-") as folder:
        if prompts is None:
            prompts = json.loads(Path(client.download_artifacts(run_id, PROMPTS_ARTIFACT, folder)).read_text())
        recorded = Path(client.download_artifacts(run_id, "images", folder))
        expected = []
        for index in range(len(prompts)):
            target = recorded / f"{index}.png"
            if not target.is_file():
                raise ReproduceError(f"run {run_id} has no artifact images/{index}.png for prompt {index}; it cannot be compared")
            expected.append(target.read_bytes())
    cache = ModelCache(state_dir / "models")
    if cache.check(model.digest, rehash=False).intact:
        model_dir = fetch(model.uri, model.digest, cache).path
    else:
        repo, commit = open_repo(run.data.tags.get("diffops.commit", ""))
        model_dir = fetch(model.uri, model.digest, cache, repo=repo, commit=commit).path
    loaded = drawing.load(model_dir, model.dtype, generation.sampler)
    say(f"run {run_id}: loaded {model.uri} on {loaded.runner.device}; next: drawing {len(prompts)} prompt(s) ({loaded.load_seconds:.1f}s)")
    drawn = drawing.draw(loaded, generation.model_dump(mode="json"), prompts)
    diffs = []
    for index, (prompt, produced, was) in enumerate(zip(prompts, drawn.images, expected, strict=True)):
        try:
            distance = imagecompare.phash_distance(decode_png(produced), decode_png(was))
            largest, mean = pixel_difference(produced, was)
        except ImageRefused as err:
            raise ReproduceError(f"recorded images/{index}.png {err}") from None
        diffs.append(PromptDiff(index, prompt, distance, largest, mean))
    return diffs
