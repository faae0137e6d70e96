"""Read and validate a generation request against the release's limits. Pure.

The router reads the body through `read_body` (refused with 413 as soon as it
is known to pass `MAX_BODY_BYTES`: a declared Content-Length before a byte is
read, a streamed body at the chunk that crosses the cap) and calls
`parse_request` on it before any pipeline work: a bad request becomes a
`RequestError` (422, naming the field) in microseconds, never a 500 and never
a GPU second. The router answers it with `RequestError.document`, an RFC 9457
problem details document (`serving.problems`).
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serving.problems import DETAIL_CHARS, FIELD_CHARS, PROBLEM_TYPES, ProblemDocument, echo, problem

__all__ = ["MAX_BODY_BYTES", "GenerateRequest", "RequestError", "RequestKind", "declared_length", "limit_problems", "parse_request",
           "read_body", "too_large"]

MAX_BODY_BYTES = 4 * 1024 * 1024

RequestKind = Literal["bad-request", "request-too-large", "invalid-request"]  # the problem kinds a request itself can be


class RequestError(Exception):
    """A request the release's contract refuses: (field, detail) problems, bounded; `status` is the HTTP code of its kind."""

    def __init__(self, problems: list[tuple[str, str]], kind: RequestKind = "invalid-request"):
        problems = [(echo(field, FIELD_CHARS), echo(detail, DETAIL_CHARS)) for field, detail in problems]
        super().__init__("; ".join(f"{field}: {detail}" for field, detail in problems))
        self.problems, self.kind, self.status = problems, kind, PROBLEM_TYPES[kind].status

    def document(self, request_id: str) -> ProblemDocument:
        """The problem details answer: the first problem as `detail` and `field`, all of them under `errors`."""
        return problem(self.kind, self.problems[0][1], request_id, self.problems)


class GenerateRequest(BaseModel):
    """The JSON body of `POST /<release>/generate`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, le=2**32 - 1)
    steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=50, allow_inf_nan=False)
    width: int | None = Field(None, ge=8)
    height: int | None = Field(None, ge=8)
    num_images: int = Field(1, ge=1)


def _reject_constant(token: str) -> float:
    raise ValueError(f"{token} is not a number JSON allows")


def too_large(what: str, cap: int) -> RequestError:
    return RequestError([("body", f"{what}; request bodies are capped at {cap} bytes ({cap // 1024 // 1024} MiB)")], "request-too-large")


def declared_length(value: str | None, cap: int = MAX_BODY_BYTES) -> int | None:
    """The Content-Length header as a byte count (None when absent); raise RequestError when it is over `cap` or not a count."""
    if value is None:
        return None
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 20:
        raise RequestError([("Content-Length", f"{value[:40]!r} is not a byte count")], "bad-request")
    length = int(text)
    if length > cap:
        raise too_large(f"Content-Length {length} bytes", cap)
    return length


async def read_body(chunks: AsyncIterable[bytes], content_length: str | None, cap: int = MAX_BODY_BYTES) -> bytearray:
    """The whole body, read chunk by chunk and refused (RequestError 413) as soon as it passes `cap`.

    A declared Content-Length over the cap is refused before a byte is read; a
    chunked or undeclared body stops being read at the chunk that crosses the
    cap, so at most `cap` bytes plus that one chunk are ever held.
    """
    declared_length(content_length, cap)
    body = bytearray()
    async for chunk in chunks:
        if len(body) + len(chunk) > cap:
            raise too_large(f"more than {cap} bytes sent (stopped reading at {len(body) + len(chunk)})", cap)
        body += chunk
    return body


def parse_request(body: bytes | bytearray, limits: dict[str, int], defaults: dict[str, int]) -> dict[str, Any]:
    """Body bytes -> generation parameters (unset fields are None); raise RequestError."""
    if len(body) > MAX_BODY_BYTES:
        raise too_large(f"{len(body)} bytes", MAX_BODY_BYTES)
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError([("body", f"not valid JSON: {err}")]) from None
    except RecursionError:
        raise RequestError([("body", "JSON nested too deeply")]) from None
    if not isinstance(data, dict):
        raise RequestError([("body", "expected a JSON object like {\"prompt\": \"a red cube\"}")])
    try:
        request = GenerateRequest.model_validate(data)
    except ValidationError as err:
        problems = []
        for item in err.errors():
            field = ".".join(str(p) for p in item["loc"]) or "body"
            message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append((field, message))
        raise RequestError(problems) from None
    problems = limit_problems(request, limits, defaults)
    if problems:
        raise RequestError(problems)
    return request.model_dump()


def limit_problems(request: GenerateRequest, limits: dict[str, int], defaults: dict[str, int]) -> list[tuple[str, str]]:
    problems = []
    max_chars = limits["max_prompt_chars"]
    if not request.prompt.strip():
        problems.append(("prompt", "must not be empty"))
    for field in ("prompt", "negative_prompt"):
        text = getattr(request, field)
        if text is not None and len(text) > max_chars:
            problems.append((field, f"{len(text)} characters; the limit is {max_chars}"))
        elif text is not None and not _encodable(text):
            problems.append((field, "contains an unpaired UTF-16 surrogate (\\ud800-\\udfff); send valid Unicode text"))
    if request.steps is not None and request.steps > limits["max_steps"]:
        problems.append(("steps", f"{request.steps} exceeds the limit of {limits['max_steps']}"))
    if request.num_images > limits["max_images"]:
        problems.append(("num_images", f"{request.num_images} exceeds the limit of {limits['max_images']}"))
    for side in ("width", "height"):
        value = getattr(request, side)
        if value is not None and value % 8:
            problems.append((side, f"{value} is not a multiple of 8"))
    width = request.width if request.width is not None else defaults["width"]
    height = request.height if request.height is not None else defaults["height"]
    if width * height > limits["max_pixels"]:
        field = "width" if request.width is not None else "height"
        problems.append((field, f"{width}x{height} is {width * height} pixels; the limit is {limits['max_pixels']}"))
    if request.guidance_scale is not None and not math.isfinite(request.guidance_scale):
        problems.append(("guidance_scale", "must be a finite number"))
    return problems


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False

