"""The experiment file's schema (`experiments/<name>.yaml`): pydantic models like the release file's, and its caps.

Read by `controller.experiments.loader` after the safe YAML reader; `schema_text` is the JSON Schema committed as
`experiments/experiment.schema.json` (`diffops experiment schema -o ...`). Every list is capped by a documented
number so an experiment file can never ask for unbounded work; the caps that span lists (cells, images) are
checked in `controller.experiments.grid` once the release is known.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator, model_validator

from checks import quality
from serving.fields import Digest, ReleaseName, SpecModel
from serving.samplers import SamplerName
from serving.schema import ModelUri

__all__ = ["MAX_AXIS_VALUES", "MAX_CELLS", "MAX_IMAGES", "MAX_MODELS", "MAX_PROMPTS", "MAX_PROMPT_CHARS", "MAX_PROMPT_FILE_BYTES",
           "SORT_METRICS", "Experiment", "ExperimentSpec", "Grid", "ModelPin", "schema_text"]

MAX_MODELS = 4
"""Models one experiment compares (each is fetched and loaded once)."""
MAX_AXIS_VALUES = 8
"""Values per grid axis (sampler, steps, guidance_scale, seed)."""
MAX_CELLS = 64
"""Cells (models x samplers x steps x guidance scales x seeds) per experiment: each is an MLflow run."""
MAX_PROMPTS = 32
"""Prompts per experiment, inline or in prompts_file."""
MAX_PROMPT_CHARS = quality.MAX_PROMPT_CHARS
"""Characters per prompt."""
MAX_PROMPT_FILE_BYTES = quality.MAX_PROMPT_FILE_BYTES
"""Size of a prompts_file (the quality check's cap)."""
MAX_IMAGES = 512
"""Images per experiment (cells x prompts)."""
SORT_METRICS = ("performance.p50_latency_s", "performance.p95_latency_s", "performance.images_per_s", "cost.usd_per_image",
                "quality.mean_clip_score", "baseline.phash_distance", "baseline.ssim")

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_PROMPT_CHARS)]
SortMetric = Annotated[str, Field(pattern="^(" + "|".join(m.replace(".", r"\.") for m in SORT_METRICS) + ")$")]


class ModelPin(SpecModel):
    uri: ModelUri
    """Where the model lives, as in a release's model.uri (file:// is read from the release repo at --rev)."""
    digest: Digest
    """sha256 over the model's file manifest (`diffops model digest PATH`); verified before anything loads it."""


class Grid(SpecModel):
    sampler: list[SamplerName] | None = Field(default=None, min_length=1, max_length=MAX_AXIS_VALUES)
    """Samplers to try; unset keeps the release's generation.sampler."""
    steps: list[Annotated[int, Field(ge=1, le=1000)]] | None = Field(default=None, min_length=1, max_length=MAX_AXIS_VALUES)
    """Denoising steps to try (each within the release's limits.max_steps); unset keeps generation.steps."""
    guidance_scale: list[Annotated[float, Field(ge=0, le=50)]] | None = Field(default=None, min_length=1, max_length=MAX_AXIS_VALUES)
    """CFG scales to try; unset keeps generation.guidance_scale."""
    seed: list[Annotated[int, Field(ge=0, le=2**32 - 1)]] | None = Field(default=None, min_length=1, max_length=MAX_AXIS_VALUES)
    """Seeds every prompt is drawn at; unset keeps generation.seed (0 when the release draws random seeds)."""

    @field_validator("sampler", "steps", "guidance_scale", "seed")
    @classmethod
    def _distinct(cls, values: list[Any] | None) -> list[Any] | None:
        if values is not None and len(set(values)) != len(values):
            twice = next(v for v in values if values.count(v) > 1)
            raise ValueError(f"{twice!r} is listed twice; each value of an axis makes its own cells, list it once")
        return values


class ExperimentSpec(SpecModel):
    release: ReleaseName
    """The release the experiment starts from (model, generation, limits, runtime, cost), read at --rev."""
    models: list[ModelPin] | None = Field(default=None, min_length=1, max_length=MAX_MODELS)
    """Models to compare; unset uses the release's model."""
    grid: Grid = Field(default_factory=Grid)
    """The axes to sweep; every combination is a cell. Duplicate values in an axis are refused."""
    prompts: list[Prompt] | None = Field(default=None, min_length=1, max_length=MAX_PROMPTS)
    """The prompts every cell draws (or prompts_file)."""
    prompts_file: str | None = Field(default=None, min_length=1, max_length=500)
    """A text file of prompts, one per line (`#` comments and blank lines skipped), relative to the experiment file."""
    width: int | None = Field(default=None, ge=8, le=4096)
    """Image width for every cell; unset keeps generation.width."""
    height: int | None = Field(default=None, ge=8, le=4096)
    """Image height for every cell; unset keeps generation.height."""
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    """Negative prompt for every cell; unset keeps generation.negative_prompt."""
    baseline: int = Field(default=0, ge=0, le=MAX_CELLS - 1)
    """Index of the config (model x sampler x steps x CFG, in grid order) every other is compared to at the same seed."""
    sort: SortMetric = "performance.p50_latency_s"
    """The comparison table's default sort metric."""
    clip: ModelPin | None = None
    """CLIP model giving each cell a mean CLIP score; unset uses the release's quality.clip (none: no score)."""

    @model_validator(mode="after")
    def _prompts_once(self) -> ExperimentSpec:
        if (self.prompts is None) == (self.prompts_file is None):
            raise ValueError("give the prompts either inline (prompts: [...]) or as prompts_file: PATH, exactly one")
        return self


class ExperimentMetadata(SpecModel):
    name: ReleaseName
    """The experiment's name (a DNS label): its MLflow experiment is `diffops-experiment/<name>`."""


class Experiment(SpecModel):
    apiVersion: Literal["diffops/v1"]
    kind: Literal["Experiment"]
    metadata: ExperimentMetadata
    spec: ExperimentSpec

    @property
    def name(self) -> str:
        return self.metadata.name


def schema_text() -> str:
    """The JSON Schema of experiment files, as committed in experiments/experiment.schema.json."""
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "diffops Experiment", **Experiment.model_json_schema()}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"
