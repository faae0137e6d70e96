"""Parse + validate an experiment file: bytes -> `ExperimentFile`, or `InvalidExperiment` with file:line errors.

First step of `diffops experiment run`: the same safe YAML reader as release files (no anchors, no duplicate
keys, capped size), then `controller.experiments.schema`. Errors found later (in `controller.experiments.grid`,
once the release is known) are placed on lines through `ExperimentFile.error`. Whatever the bytes, the outcome is an
`ExperimentFile` or `InvalidExperiment`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from checks.quality import PromptSetError
from checks.quality import parse_prompts as quality_prompts
from controller.experiments.schema import MAX_PROMPT_FILE_BYTES, MAX_PROMPTS, Experiment
from controller.parse import safe_yaml
from controller.parse.loader import ReleaseError, schema_message
from controller.parse.safe_yaml import shown

__all__ = ["ExperimentFile", "InvalidExperiment", "parse_experiment", "parse_prompts", "read_experiment"]


class InvalidExperiment(Exception):
    """Every problem found in an experiment file, each at file:line:column with its field."""

    def __init__(self, errors: list[ReleaseError]):
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


@dataclass(frozen=True)
class ExperimentFile:
    """A validated experiment, where it came from, and its prompts (inline or read from prompts_file)."""

    experiment: Experiment
    file: str
    document: safe_yaml.Document
    prompts: tuple[str, ...]

    def error(self, field: str, message: str) -> ReleaseError:
        """A problem with `field` (a dotted path like `spec.grid.steps.1`), placed on its line."""
        loc = tuple(int(p) if p.isdigit() else p for p in field.split("."))
        return ReleaseError(self.file, *self.document.locate(loc, at_key=True), message, field)


def _message(error: ErrorDetails) -> str:
    loc, kind = error["loc"], error["type"]
    if kind == "too_short" and loc and loc[-1] in ("sampler", "steps", "guidance_scale", "seed"):
        message = error["msg"].removeprefix("Value error, ")
        return f"{message}: an empty axis sweeps nothing; list values or remove the axis to keep the release's value"
    if kind == "string_pattern_mismatch":
        return f"{error['msg']}, got {shown(error['input'])}"
    return schema_message(error, Experiment)


def parse_prompts(text: bytes, where: str) -> tuple[str, ...]:
    """Prompts from a prompts file (the quality check's format, at most MAX_PROMPTS); a ValueError says what is wrong."""
    try:
        return tuple(quality_prompts(text, max_prompts=MAX_PROMPTS))
    except PromptSetError as err:
        raise ValueError(f"{where} {err}") from None



def parse_experiment(raw: bytes, file: str, read: Any = None) -> ExperimentFile:
    """Validate one experiment file; raise InvalidExperiment listing every problem. `read(relative path) -> bytes`
    reads a prompts_file (None: prompts_file is refused)."""
    try:
        doc = safe_yaml.load(raw)
    except safe_yaml.YamlError as err:
        raise InvalidExperiment([ReleaseError(file, err.line, err.column, err.message)]) from None
    if not isinstance(doc.data, dict):
        message = "an experiment file is a mapping with apiVersion, kind, metadata, spec"
        raise InvalidExperiment([ReleaseError(file, *doc.locate(()), message)])
    try:
        experiment = Experiment.model_validate(doc.data)
    except ValidationError as err:
        errors = []
        for item in err.errors():
            loc = tuple(item["loc"])
            line, column = doc.locate(loc, at_key=item["type"] == "extra_forbidden")
            errors.append(ReleaseError(file, line, column, _message(item), ".".join(map(str, loc))))
        raise InvalidExperiment(errors) from None
    spec = experiment.spec
    if spec.prompts is not None:
        return ExperimentFile(experiment, file, doc, tuple(spec.prompts))
    placed = ExperimentFile(experiment, file, doc, ())
    try:
        if read is None:
            raise ValueError("prompts_file is read only from an experiment file on disk; list the prompts inline")
        prompts = parse_prompts(read(spec.prompts_file), str(spec.prompts_file))
    except (OSError, ValueError) as err:
        message = f"{spec.prompts_file}: {err.strerror}" if isinstance(err, OSError) else str(err)
        raise InvalidExperiment([placed.error("spec.prompts_file", message)]) from None
    return ExperimentFile(experiment, file, doc, prompts)


def read_experiment(path: Path) -> ExperimentFile:
    """Read and validate the experiment file at `path`; its prompts_file is relative to the file's directory."""
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= safe_yaml.MAX_BYTES else b" " * size  # the reader refuses it by size
    except OSError as err:
        raise InvalidExperiment([ReleaseError(str(path), 1, 1, f"cannot read the experiment file: {err.strerror}")]) from None

    def read(relative: str) -> bytes:
        target = path.parent / relative
        with target.open("rb") as handle:
            return handle.read(MAX_PROMPT_FILE_BYTES + 1)

    return parse_experiment(raw, str(path), read)
