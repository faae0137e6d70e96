"""Field types shared by every package's part of the release schema.

The base model forbids unknown fields and coercion; the annotated types below
(digests, durations, image references, DNS labels) parse strings only and say
what a valid value looks like when one is wrong.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, PlainSerializer, WithJsonSchema

DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
DURATION_RE = re.compile(r"^(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$")
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
IMAGE_RE = re.compile(r"^[a-z0-9]+(?:[._/:-][a-z0-9]+)*@sha256:[0-9a-f]{64}$")


class SpecModel(BaseModel):
    """Base of every schema model: unknown fields and type coercion are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)


def _string(kind: str, example: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a quoted string like {example!r}; YAML read {value!r} as {type(value).__name__}")
    return value


def _digest(value: Any) -> str:
    value = _string("a digest", "sha256:<64 hex>", value)
    if not DIGEST_RE.match(value):
        raise ValueError(f"expected 'sha256:' and 64 lowercase hex digits, got {value!r}")
    return value


def parse_duration(value: Any) -> timedelta:
    """'90s', '10m', '1h30m', '250ms' -> timedelta; bare numbers are refused (unit required)."""
    if isinstance(value, timedelta):
        return value
    value = _string("a duration", "30s", value)
    match = DURATION_RE.match(value.strip())
    if not value.strip() or not match or not any(match.groups()):
        raise ValueError(f"expected a duration like '30s', '10m' or '1h30m', got {value!r}")
    hours, minutes, seconds, millis = (int(g or 0) for g in match.groups())
    return timedelta(hours=hours, minutes=minutes, seconds=seconds, milliseconds=millis)


def format_duration(value: timedelta) -> str:
    total_ms = round(value.total_seconds() * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    parts = [f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (seconds, "s"), (millis, "ms")) if n]
    return "".join(parts) or "0s"


def _image(value: Any) -> str:
    value = _string("an image reference", "registry/name@sha256:<64 hex>", value)
    if not IMAGE_RE.match(value):
        raise ValueError(f"expected an image pinned by digest, '<name>@sha256:<64 hex>', got {value!r}")
    return value


def _dns_label(value: Any) -> str:
    value = _string("a name", "demo", value)
    if not DNS_LABEL_RE.match(value):
        raise ValueError(f"expected a DNS label (lowercase letters, digits, '-', at most 63), got {value!r}")
    return value


Digest = Annotated[
    str,
    BeforeValidator(_digest),
    WithJsonSchema({"type": "string", "pattern": DIGEST_RE.pattern}),
]
Duration = Annotated[
    timedelta,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": r"^(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$", "examples": ["30s", "10m"]}),
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
