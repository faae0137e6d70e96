"""Field types shared by every package's part of the release schema.

The base model forbids unknown fields, coercion and non-finite floats; the
annotated types below (digests, durations, image references, DNS labels,
release names) parse strings only, are bounded, and say what a valid value
looks like when one is wrong.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

__all__ = ["DIGEST_RE", "DNS_LABEL_RE", "IMAGE_RE", "MAX_DURATION", "RELEASE_NAME_RE", "Digest", "DnsLabel", "Duration", "ImageRef",
           "ReleaseName", "SpecModel", "format_duration", "parse_duration"]

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DURATION_RE = re.compile(r"^(?:([0-9]+)d)?(?:([0-9]+)h)?(?:([0-9]+)m(?!s))?(?:([0-9]+)s)?(?:([0-9]+)ms)?$")
DURATION_UNITS_MS = (86_400_000, 3_600_000, 60_000, 1000, 1)  # d, h, m, s, ms
MAX_DURATION = timedelta(days=365)
MAX_DURATION_TEXT = "365d"
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
RELEASE_NAME_RE = re.compile(r"^(?!.*--)[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
IMAGE_RE = re.compile(r"^[a-z0-9]+(?:[._/:-][a-z0-9]+)*@sha256:[0-9a-f]{64}$")


class SpecModel(BaseModel):
    """Base of every schema model: unknown fields and type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


def _shown(value: Any, limit: int = 40) -> str:
    """repr of a value for a message, cut so a huge input never makes a huge message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _string(kind: str, example: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    raise ValueError(f"{kind} must be a quoted string like {example!r}; YAML read {_shown(value)} as {type(value).__name__}")


def _digest(value: Any) -> str:
    text = _string("a digest", "sha256:<64 hex>", value)
    if not DIGEST_RE.match(text):
        raise ValueError(f"expected 'sha256:' and 64 lowercase hex digits, got {_shown(text, 80)}")
    return text


def parse_duration(value: Any) -> timedelta:
    """'90s', '10m', '1h30m', '2d', '250ms' -> timedelta, at most 365d; bare numbers are refused (unit required)."""
    if isinstance(value, timedelta):
        if not timedelta(0) <= value <= MAX_DURATION:
            raise ValueError(f"{format_duration(value)} is outside 0s to {MAX_DURATION_TEXT}")
        return value
    text = _string("a duration", "30s", value)
    match = DURATION_RE.match(text.strip()) if len(text) <= 64 else None
    if not text.strip() or not match or not any(match.groups()):
        raise ValueError(f"expected a duration like '30s', '10m', '1h30m' or '2d', got {_shown(text)}")
    groups = match.groups("")  # digits per unit; over 16 digits is past the cap in any unit
    counted = all(len(g) <= 16 for g in groups)
    millis = sum(int(g or 0) * unit for g, unit in zip(groups, DURATION_UNITS_MS, strict=True)) if counted else None
    if millis is None or millis > MAX_DURATION // timedelta(milliseconds=1):
        raise ValueError(f"{_shown(text)} is longer than the longest duration a release takes, {MAX_DURATION_TEXT}")
    return timedelta(milliseconds=millis)


def format_duration(value: timedelta) -> str:
    total_ms = round(value.total_seconds() * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    parts = [f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s"), (millis, "ms")) if n]
    return "".join(parts) or "0s"


def _image(value: Any) -> str:
    text = _string("an image reference", "registry/name@sha256:<64 hex>", value)
    if not IMAGE_RE.match(text):
        raise ValueError(f"expected an image pinned by digest, '<name>@sha256:<64 hex>', got {_shown(text, 120)}")
    return text


def _dns_label(value: Any) -> str:
    text = _string("a name", "demo", value)
    if not DNS_LABEL_RE.match(text):
        raise ValueError(f"expected a DNS label (lowercase letters, digits, '-', at most 63), got {_shown(text, 80)}")
    return text


def _release_name(value: Any) -> str:
    name = _dns_label(value)
    if "--" in name:
        raise ValueError(f"{name!r} contains '--', which separates release and version in Ray Serve application "
                         "names (<release>--<version>), so it could collide with another release's version; use single '-'")
    return name


Digest = Annotated[
    str,
    BeforeValidator(_digest),
    WithJsonSchema({"type": "string", "pattern": DIGEST_RE.pattern}),
]
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?$",
                    "examples": ["30s", "10m", "2d"]}),
]
ImageRef = Annotated[
    str,
    BeforeValidator(_image),
    WithJsonSchema({"type": "string", "pattern": IMAGE_RE.pattern}),
]
DnsLabel = Annotated[
    str,
    BeforeValidator(_dns_label),
    WithJsonSchema({"type": "string", "pattern": DNS_LABEL_RE.pattern, "maxLength": 63}),
]
ReleaseName = Annotated[
    str,
    BeforeValidator(_release_name),
    WithJsonSchema({"type": "string", "pattern": RELEASE_NAME_RE.pattern, "maxLength": 63}),
]
