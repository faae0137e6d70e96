"""HTTP error answers as RFC 9457 problem details. Pure.

The router decides that a request fails and of which kind (`ProblemKind`);
`problem` turns the kind, a detail, the fields at fault and the request's id
into the one document the router sends, as `application/problem+json`. Each
kind has a fixed status, `type` and `title` (`PROBLEM_TYPES`, also the README's
table); `detail` says what happened and what to do; `field` and `errors` are
ours: the request fields (body keys, headers, query parameters) at fault;
`request_id` is the `X-Request-Id` the answer carries.

`type` is an absolute-path reference, `/problems/<kind>`: the same string from
every release and every host, claiming no domain; clients compare it as a
string and the README documents each one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple, NotRequired, TypedDict

__all__ = [
    "DETAIL_CHARS", "FIELD_CHARS", "PROBLEM_MEDIA_TYPE", "PROBLEM_TYPES", "FieldError", "ProblemDocument", "ProblemKind", "ProblemType",
    "echo", "problem", "type_uri",
]

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "/problems/"
DETAIL_CHARS = 400  # a detail (one problem's text) is echoed at most this long
FIELD_CHARS = 80  # a field name (maybe a client's JSON key) is echoed at most this long

ProblemKind = Literal[
    "bad-request", "client-disconnected", "not-found", "unknown-version", "method-not-allowed", "request-too-large",
    "invalid-request", "content-blocked", "generation-failed", "internal-error", "no-version-serving", "overloaded", "version-unavailable",
]


class ProblemType(NamedTuple):
    status: int
    title: str


PROBLEM_TYPES: dict[ProblemKind, ProblemType] = {
    "bad-request": ProblemType(400, "bad request"),
    "client-disconnected": ProblemType(400, "client disconnected"),
    "not-found": ProblemType(404, "not found"),
    "unknown-version": ProblemType(404, "unknown version"),
    "method-not-allowed": ProblemType(405, "method not allowed"),
    "request-too-large": ProblemType(413, "request too large"),
    "invalid-request": ProblemType(422, "invalid request"),
    "content-blocked": ProblemType(451, "content blocked"),
    "generation-failed": ProblemType(500, "generation failed"),
    "internal-error": ProblemType(500, "internal error"),
    "no-version-serving": ProblemType(503, "no version is serving"),
    "overloaded": ProblemType(503, "overloaded"),
    "version-unavailable": ProblemType(503, "version unavailable"),
}


class FieldError(TypedDict):
    field: str
    detail: str


class ProblemDocument(TypedDict):
    """RFC 9457's members (`type`, `title`, `status`, `detail`) and ours (`field`, `errors`, `request_id`)."""

    type: str
    title: str
    status: int
    detail: str
    field: NotRequired[str]  # the first field at fault; absent when no request field is
    errors: list[FieldError]  # every field at fault, in the order found; empty when none is
    request_id: str


def type_uri(kind: ProblemKind) -> str:
    return TYPE_BASE + kind


def problem(kind: ProblemKind, detail: str, request_id: str, errors: Sequence[tuple[str, str]] = ()) -> ProblemDocument:
    """The problem details document for one refused or failed request; `errors` are (field, detail) pairs."""
    status, title = PROBLEM_TYPES[kind]
    listed = [FieldError(field=echo(field, FIELD_CHARS), detail=echo(text, DETAIL_CHARS)) for field, text in errors]
    document: ProblemDocument = {"type": type_uri(kind), "title": title, "status": status, "detail": echo(detail, DETAIL_CHARS),
                                 "errors": listed, "request_id": echo(request_id, DETAIL_CHARS)}
    if listed:
        document["field"] = listed[0]["field"]
    return document


def echo(text: str, limit: int) -> str:
    """A text (maybe a client's) safe in a UTF-8 JSON answer: surrogates escaped, then cut to `limit` characters plus '…'.

    Idempotent: an echoed text echoes to itself, so a text bounded once is never cut twice.
    """
    escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped if len(escaped) <= limit else escaped[:limit] + "…"
