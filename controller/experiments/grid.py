"""The experiment's cells: models x samplers x steps x CFG x seeds, each a release config with its version id. Pure.

Second step of `diffops experiment run`, after the file is validated and the release read at --rev. Axes left
unset keep the release's value. Every cell's config is the release with that cell's model and generation fields,
validated by the release's own schema and rules (steps within limits.max_steps, sizes multiples of 8), so a cell
is exactly what a release pull request would roll out; `version` is the version id it would get. The caps that
span lists (cells, images) are checked here.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from controller.experiments.loader import ExperimentFile, InvalidExperiment
from controller.experiments.schema import MAX_CELLS, MAX_IMAGES, ModelPin
from controller.parse.loader import ReleaseError
from controller.parse.release import Release, rules
from controller.plan.versions import version_id

__all__ = ["Cell", "Config", "cell_release", "configs_of", "expand"]

DEFAULT_SEED = 0  # a release without a fixed seed draws random ones; an experiment must be reproducible


@dataclass(frozen=True)
class Config:
    """One model x sampler x steps x CFG combination: what a column group of the contact sheet shows."""

    index: int
    model_index: int
    model: ModelPin
    sampler: str
    steps: int
    guidance_scale: float

    def label(self, several_models: bool = False) -> str:
        model = f"{self.model.uri.rstrip('/').rsplit('/', 1)[-1]} " if several_models else ""
        return f"{model}{self.sampler} {self.steps} steps cfg {self.guidance_scale:g}"


@dataclass(frozen=True)
class Cell:
    """One config at one seed: an MLflow run."""

    index: int
    config: Config
    seed: int
    release: Release
    version: str

    @property
    def id(self) -> str:
        c = self.config
        return f"m{c.model_index}-{c.sampler}-{c.steps}-cfg{c.guidance_scale:g}-seed{self.seed}"

    def label(self, several_models: bool = False) -> str:
        return f"{self.config.label(several_models)} seed {self.seed}"


def configs_of(found: ExperimentFile, release: Release) -> tuple[list[Config], list[int]]:
    """The configs in grid order (models, then samplers, steps, CFG) and the seeds."""
    spec, generation = found.experiment.spec, release.spec.generation
    models = spec.models or [ModelPin(uri=release.spec.model.uri, digest=release.spec.model.digest)]
    grid = spec.grid
    axes = (grid.sampler or [generation.sampler], grid.steps or [generation.steps], grid.guidance_scale or [generation.guidance_scale])
    seeds = grid.seed or [generation.seed if generation.seed is not None else DEFAULT_SEED]
    combos = itertools.product(enumerate(models), *axes)
    configs = [Config(i, m, model, str(sampler), int(steps), float(cfg)) for i, ((m, model), sampler, steps, cfg) in enumerate(combos)]
    return configs, [int(seed) for seed in seeds]


def cell_release(release: Release, model: ModelPin, generation: dict[str, Any]) -> Release:
    """The release with another model and generation fields, validated by its own schema (raises ValidationError)."""
    data = release.model_dump(mode="json")
    data["spec"]["model"].update(uri=model.uri, digest=model.digest)
    data["spec"]["generation"].update(generation)
    return Release.model_validate(data)


def _field(found: ExperimentFile, path: str, config: Config) -> str:
    """The experiment field behind a release field of a cell: the grid value, the override, or the release."""
    spec, grid = found.experiment.spec, found.experiment.spec.grid
    leaf = path.removeprefix("spec.generation.")
    axis = {"sampler": config.sampler, "steps": config.steps, "guidance_scale": config.guidance_scale}
    values = getattr(grid, leaf, None) if leaf in axis else None
    if values is not None:
        return f"spec.grid.{leaf}.{values.index(axis[leaf])}"
    if leaf in ("width", "height", "negative_prompt") and getattr(spec, leaf) is not None:
        return f"spec.{leaf}"
    return "spec.release"


def _cell(found: ExperimentFile, release: Release, config: Config, seed: int, index: int, several: bool) -> Cell | list[ReleaseError]:
    spec = found.experiment.spec
    generation: dict[str, Any] = {"sampler": config.sampler, "steps": config.steps, "guidance_scale": config.guidance_scale, "seed": seed}
    generation.update({k: getattr(spec, k) for k in ("width", "height", "negative_prompt") if getattr(spec, k) is not None})

    def placed(path: str, message: str) -> ReleaseError:
        field = _field(found, path, config)
        where = f"release {release.name} with {config.label(several)}" if field.startswith("spec.grid.") else f"release {release.name}"
        return found.error(field, f"{where}: {message.removeprefix('Value error, ')}")

    try:
        changed = cell_release(release, config.model, generation)
    except ValidationError as err:
        return [placed(".".join(map(str, e["loc"])), e["msg"]) for e in err.errors()]
    problems = rules(changed, release.name)
    if problems:
        return [placed(f"spec.{path}" if not path.startswith("spec.") else path, message) for path, message in problems]
    return Cell(index, config, seed, changed, version_id(changed))


def expand(found: ExperimentFile, release: Release) -> list[Cell]:
    """Every cell in order (config-major, seeds inner); InvalidExperiment naming the field when a cap or a release
    rule refuses it."""
    spec = found.experiment.spec
    configs, seeds = configs_of(found, release)
    count = len(configs) * len(seeds)
    if count > MAX_CELLS:
        sizes = " x ".join(str(n) for n in (len(spec.models or [1]), *(len(getattr(spec.grid, a) or [1])
                                                                      for a in ("sampler", "steps", "guidance_scale", "seed"))))
        raise InvalidExperiment([found.error("spec.grid", f"{sizes} (models x sampler x steps x guidance_scale x seed) = "
                                                          f"{count} cells; the cap is {MAX_CELLS}: sweep fewer values")])
    images = count * len(found.prompts)
    if images > MAX_IMAGES:
        field = "spec.prompts" if spec.prompts is not None else "spec.prompts_file"
        raise InvalidExperiment([found.error(field, f"{count} cells x {len(found.prompts)} prompts = {images} images; the cap is "
                                                    f"{MAX_IMAGES}: use fewer prompts or cells")])
    if spec.baseline >= len(configs):
        raise InvalidExperiment([found.error("spec.baseline", f"{spec.baseline} is not a config index: the grid has {len(configs)} "
                                                              f"config(s), 0 to {len(configs) - 1}")])
    cells: list[Cell] = []
    errors: list[ReleaseError] = []
    several = len({c.model_index for c in configs}) > 1
    for config in configs:
        for seed in seeds:
            made = _cell(found, release, config, seed, len(cells), several)
            if isinstance(made, Cell):
                cells.append(made)
            else:
                errors += [e for e in made if e not in errors]
    if errors:
        raise InvalidExperiment(errors)
    return cells
