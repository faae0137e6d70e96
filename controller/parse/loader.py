"""Parse + validate one release file: bytes -> `Release`, or errors at file:line:column.

Second step of a reconcile, after `controller.source.git_source` reads the blob. Runs the
safe YAML reader, the pydantic schema, then every package's cross-field rules,
and turns each problem into a `ReleaseError` placed on its line. Whatever the
bytes, the outcome is a `Release` or `InvalidRelease`: an exception nobody
classified is logged with its traceback and becomes the file's error too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from controller.parse import safe_yaml
from controller.parse.release import Release, rules
from controller.parse.safe_yaml import shown

__all__ = ["InvalidRelease", "ReleaseError", "parse_release", "schema_message"]

log = logging.getLogger("diffops.loader")
log.addHandler(logging.NullHandler())  # the controller's handler gets the traceback; `diffops lint` prints none


@dataclass(frozen=True)
class ReleaseError:
    file: str
    line: int
    column: int
    message: str
    field: str = ""

    def __str__(self) -> str:
        where = f"{self.field}: " if self.field else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class InvalidRelease(Exception):
    def __init__(self, errors: list[ReleaseError]):
        super().__init__("\n".join(map(str, errors)))
        self.errors = errors


def _dotted(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


def _model_at(path: tuple[Any, ...], root: type[BaseModel]) -> type[BaseModel] | None:
    """The schema model class found by walking field names from `root`."""
    model: type[BaseModel] = root
    for part in path:
        if isinstance(part, int):
            continue
        info = model.model_fields.get(part)
        if info is None:
            return None
        annotation = info.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model


def schema_message(error: ErrorDetails, root: type[BaseModel] = Release) -> str:
    """A pydantic error as a release (or experiment) file's reader wants it: the field's allowed names, the value read."""
    loc, kind = error["loc"], error["type"]
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1], root)
        allowed = ", ".join(model.model_fields) if model else ""
        return f"unknown field {loc[-1]!r}" + (f" (allowed: {allowed})" if allowed else "")
    if kind == "missing":
        return f"missing required field {loc[-1]!r}"
    message = error["msg"].removeprefix("Value error, ")
    if kind in ("literal_error", "enum"):
        return f"{message}, got {shown(error['input'])}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{message}, got {type(error['input']).__name__} {shown(error['input'])}"
    return message


def parse_release(raw: bytes, file: str) -> Release:
    """Validate one release file; raise InvalidRelease listing every problem found."""
    try:
        return _parse(raw, file)
    except InvalidRelease:
        raise
    except Exception as err:  # a bug, not the file's fault; still only this file's problem
        log.exception("%s: validation raised %s; next: the file is Invalid until it changes", file, type(err).__name__)
        summary = f"{type(err).__name__}: {shown(str(err), 200)}"
        message = f"could not be validated ({summary}); this is a bug in diffops, please report it"
        raise InvalidRelease([ReleaseError(file, 1, 1, message)]) from None


def _parse(raw: bytes, file: str) -> Release:
    try:
        doc = safe_yaml.load(raw)
    except safe_yaml.YamlError as err:
        raise InvalidRelease([ReleaseError(file, err.line, err.column, err.message)]) from None
    if not isinstance(doc.data, dict):
        raise InvalidRelease([ReleaseError(file, *doc.locate(()), "a release file is a mapping with apiVersion, kind, metadata, spec")])
    try:
        release = Release.model_validate(doc.data)
    except ValidationError as err:
        errors = []
        for item in err.errors():
            loc = tuple(item["loc"])
            line, column = doc.locate(loc, at_key=item["type"] == "extra_forbidden")
            errors.append(ReleaseError(file, line, column, schema_message(item), _dotted(loc)))
        raise InvalidRelease(errors) from None
    stem = PurePosixPath(file).stem
    problems = rules(release, stem)
    if problems:
        errors = []
        for path, message in problems:
            loc = tuple(int(p) if p.isdigit() else p for p in path.split("."))
            errors.append(ReleaseError(file, *doc.locate(loc, at_key=True), message, path))
        raise InvalidRelease(errors)
    return release
