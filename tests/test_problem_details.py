"""HTTP errors as RFC 9457 problem details: the document, and every error path of the router.

A table for the pure builder (each kind: its status, `type` and `title`, as the
README documents them); the router driven in process through real Starlette
requests, with the version's deployment handle faked at our boundary, for
every 4xx and 5xx it answers; Hypothesis for the whole surface: any body and
headers get an image or a 4xx problem document, never a 5xx.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from serving.problems import PROBLEM_TYPES, ProblemKind, problem
from serving.requests import MAX_BODY_BYTES
from serving.router import Router

CONFIG = {
    "weights": {"v1": 100, "v0": 0},
    "limits": {"max_steps": 50, "max_pixels": 262144, "max_images": 4, "max_prompt_chars": 2000},
    "defaults": {"width": 64, "height": 64},
    "retry_after_s": 2,
}
GOOD = b'{"prompt": "a red cube", "steps": 2}'
PROBLEM_JSON = "application/problem+json"

# (kind, status, type, title): the README's table, written out here rather than read from the code under test.
TYPES = [
    ("bad-request", 400, "/problems/bad-request", "bad request"),
    ("client-disconnected", 400, "/problems/client-disconnected", "client disconnected"),
    ("not-found", 404, "/problems/not-found", "not found"),
    ("unknown-version", 404, "/problems/unknown-version", "unknown version"),
    ("method-not-allowed", 405, "/problems/method-not-allowed", "method not allowed"),
    ("request-too-large", 413, "/problems/request-too-large", "request too large"),
    ("invalid-request", 422, "/problems/invalid-request", "invalid request"),
    ("content-blocked", 451, "/problems/content-blocked", "content blocked"),
    ("generation-failed", 500, "/problems/generation-failed", "generation failed"),
    ("internal-error", 500, "/problems/internal-error", "internal error"),
    ("no-version-serving", 503, "/problems/no-version-serving", "no version is serving"),
    ("overloaded", 503, "/problems/overloaded", "overloaded"),
    ("version-unavailable", 503, "/problems/version-unavailable", "version unavailable"),
]
TITLES = {type_: title for _, _, type_, title in TYPES}


@pytest.mark.parametrize("case", TYPES, ids=[c[0] for c in TYPES])
def test_each_kind_has_a_fixed_status_type_and_title(case: tuple[ProblemKind, int, str, str]) -> None:
    kind, status, type_, title = case
    document = problem(kind, "what happened; what to do", "req-1")
    assert document == {"type": type_, "title": title, "status": status, "detail": "what happened; what to do", "errors": [],
                        "request_id": "req-1"}


def test_every_kind_is_in_the_documented_table() -> None:
    assert sorted(PROBLEM_TYPES) == sorted(c[0] for c in TYPES)


def test_fields_at_fault_are_named_first_and_all_listed_bounded() -> None:
    document = problem("invalid-request", "9 exceeds the limit of 4", "req-1", [("num_images", "9 exceeds the limit of 4"),
                                                                               ("k" * 81, "unknown field"), ("steps", "s" * 401)])
    assert document["field"] == "num_images"
    assert document["errors"] == [{"field": "num_images", "detail": "9 exceeds the limit of 4"}, {"field": "k" * 80 + "…", "detail": "unknown field"},
                                  {"field": "steps", "detail": "s" * 400 + "…"}]
    assert "field" not in problem("overloaded", "retry", "req-1")  # no request field is at fault
    long = problem("unknown-version", "\ud800" + "d" * 1000, "r" * 500)
    assert long["detail"] == "\\ud800" + "d" * 394 + "…" and long["request_id"] == "r" * 400 + "…"
    json.dumps(long, ensure_ascii=False, allow_nan=False).encode("utf-8")  # renders as valid UTF-8 JSON


class FakeVersion:
    """The version deployment's handle, at our boundary: `generate.remote(params)` answers or raises `fails`."""

    def __init__(self, fails: BaseException | None = None):
        self.fails = fails
        self.generate = self
        self.calls = 0

    async def remote(self, params: dict[str, Any]) -> dict[str, Any]:
        self.calls += 1
        if self.fails is not None:
            raise self.fails
        return {"images": [b"\x89PNG fake"], "params": {"seed": 1, "steps": params["steps"] or 4}, "seconds": 0.01, "batch_size": 1}


def router(monkeypatch: pytest.MonkeyPatch, version: FakeVersion | None = None, config: dict[str, Any] | None = None) -> Router:
    served = Router("demo")
    if config is not None:
        served.reconfigure(config)
    fake = version or FakeVersion()
    monkeypatch.setattr(served, "_handle", lambda name: fake)
    return served


def call(served: Router, method: str = "POST", path: str = "/demo/generate", body: bytes | list[bytes] = GOOD,
         headers: dict[str, bytes] | None = None, disconnect: bool = False, query: bytes = b"") -> tuple[Response, dict[str, Any]]:
    """The router's answer to one HTTP request (a list body arrives in those chunks), and its JSON body."""
    chunks = body if isinstance(body, list) else [body]
    messages: list[Message] = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1 or disconnect}
                               for i, chunk in enumerate(chunks)]
    if disconnect:
        messages.append({"type": "http.disconnect"})

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    raw_headers = [(name.lower().encode("latin-1"), value) for name, value in (headers or {}).items()]
    scope = {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": query, "headers": raw_headers,
             "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 8000), "root_path": ""}
    response = asyncio.run(served(Request(scope, receive)))
    return response, json.loads(bytes(response.body)) if response.headers["content-type"] != "image/png" else {}


def assert_problem(response: Response, body: dict[str, Any], status: int, type_: str, request_id: str = "req-7") -> None:
    assert response.status_code == status and response.headers["content-type"] == PROBLEM_JSON, (response.status_code, body)
    assert body["status"] == status and body["type"] == type_ and body["request_id"] == request_id
    assert set(body) <= {"type", "title", "status", "detail", "field", "errors", "request_id"} and body["title"] and body["detail"]


MIB = 1024 * 1024
RID = {"X-Request-Id": b"req-7"}

# (case, router config or None for none yet, version failure, request, status, type, fragment of detail, field or None)
PATHS: list[tuple[str, dict[str, Any] | None, BaseException | None, dict[str, Any], int, str, str, str | None]] = [
    ("Content-Length not a count", CONFIG, None, {"headers": {**RID, "Content-Length": b"ten"}}, 400, "/problems/bad-request",
     "'ten' is not a byte count", "Content-Length"),
    ("client left mid-body", CONFIG, None, {"body": [b'{"prompt": '], "disconnect": True}, 400, "/problems/client-disconnected",
     "the body ended early", None),
    ("unknown path", CONFIG, None, {"path": "/demo/other"}, 404, "/problems/not-found", "use POST /demo/generate", None),
    ("unknown pinned version", CONFIG, None, {"headers": {**RID, "X-Diffops-Version": b"0000000000"}}, 404,
     "/problems/unknown-version", "'0000000000' is not live; live versions: ['v0', 'v1']", "X-Diffops-Version"),
    ("GET on generate", CONFIG, None, {"method": "GET"}, 405, "/problems/method-not-allowed", "use POST", None),
    ("declared over the cap", CONFIG, None, {"headers": {**RID, "Content-Length": str(64 * MIB).encode()}}, 413,
     "/problems/request-too-large", f"capped at {MAX_BODY_BYTES} bytes (4 MiB)", "body"),
    ("streamed over the cap", CONFIG, None, {"body": [b"x" * MIB] * 5}, 413, "/problems/request-too-large",
     f"more than {MAX_BODY_BYTES} bytes sent (stopped reading at {5 * MIB})", "body"),
    ("a field over its limit", CONFIG, None, {"body": b'{"prompt": "x", "steps": 99}'}, 422, "/problems/invalid-request",
     "99 exceeds the limit of 50", "steps"),
    ("no version has weight", {**CONFIG, "weights": {"v0": 0}}, None, {}, 503, "/problems/no-version-serving", "retry shortly", None),
    ("queue full", CONFIG, BackPressureError(num_queued_requests=8, max_queued_requests=8), {}, 503, "/problems/overloaded",
     "version v1 queue is full; retry after 2s", None),
    ("version gone", CONFIG, DeploymentUnavailableError(DeploymentID(name="Model", app_name="demo--v1")), {}, 503,
     "/problems/version-unavailable", "v1 is not running", None),
    ("version raised", CONFIG, RuntimeError("CUDA out of memory"), {}, 500, "/problems/generation-failed",
     "version v1 failed: RuntimeError", None),
    ("router not configured yet", None, None, {}, 500, "/problems/internal-error", "the router of demo failed (KeyError)", None),
]


@pytest.mark.parametrize("case", PATHS, ids=[c[0] for c in PATHS])
def test_every_error_the_router_answers_is_a_problem_document(monkeypatch: pytest.MonkeyPatch,
                                                              case: tuple[str, dict[str, Any] | None, BaseException | None,
                                                                          dict[str, Any], int, str, str, str | None]) -> None:
    _, config, fails, request, status, type_, fragment, field = case
    served = router(monkeypatch, FakeVersion(fails), config)
    response, body = call(served, **{"headers": RID, **request})
    assert_problem(response, body, status, type_)
    assert fragment in body["detail"], body["detail"]
    assert body.get("field") == field and [e["field"] for e in body["errors"]] == ([field] if field else [])
    if status == 503:
        assert response.headers["Retry-After"] == "2"  # the release's retry_after_s, kept beside the document
    if status == 405:
        assert response.headers["Allow"] == "POST"
    picked = fails is not None  # the version was picked (and failed): the answer says which
    assert response.headers.get("X-Diffops-Version") == ("v1" if picked else None)


def test_a_client_asking_for_json_only_still_gets_problem_json(monkeypatch: pytest.MonkeyPatch) -> None:
    served = router(monkeypatch, config=CONFIG)
    response, body = call(served, body=b'{"prompt": ""}', headers={**RID, "Accept": b"application/json"})
    assert_problem(response, body, 422, "/problems/invalid-request")
    assert (body["field"], body["detail"], body["title"]) == ("prompt", "must not be empty", "invalid request")
    served_image, _ = call(served, headers={"Accept": b"application/json"})
    assert served_image.status_code == 200 and served_image.headers["content-type"] == "application/json"  # success keeps JSON


def test_the_stats_query_names_its_parameter(monkeypatch: pytest.MonkeyPatch) -> None:
    served = router(monkeypatch, config=CONFIG)
    response, body = call(served, method="GET", path="/demo", headers=RID, body=b"", query=b"since=0")
    assert response.status_code == 200 and body["weights"] == CONFIG["weights"]
    refused, body = call(served, method="GET", path="/demo", headers=RID, body=b"", query=b"since=yesterday")
    assert_problem(refused, body, 422, "/problems/invalid-request")
    assert (body["field"], body["detail"]) == ("since", "epoch seconds expected")


def test_without_a_request_id_the_router_makes_one_and_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    served = router(monkeypatch, config=CONFIG)
    response, body = call(served, body=b"[1]", headers={})
    assert response.status_code == 422 and len(body["request_id"]) == 32 and int(body["request_id"], 16) >= 0


# Any bytes an HTTP/1.1 client can send in a field value (RFC 9110: no control characters but tab).
HEADER_VALUE = st.binary(max_size=120).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127).strip())
HEADERS = st.fixed_dictionaries({}, optional={
    "X-Diffops-Version": HEADER_VALUE | st.sampled_from([b"v1", b"v0"]), "Accept": HEADER_VALUE | st.just(b"application/json"),
    "Content-Type": HEADER_VALUE, "Content-Length": HEADER_VALUE | st.sampled_from([b"12", str(64 * MIB).encode()]),
    "X-Request-Id": HEADER_VALUE,
})
BODIES = st.one_of(
    st.binary(max_size=512),
    st.dictionaries(st.sampled_from(["prompt", "steps", "width", "seed", "num_images", "other"]),
                    st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=30) | st.floats(), max_size=5)
    .map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=BODIES, headers=HEADERS, method=st.sampled_from(["POST", "POST", "GET", "PUT"]))
def test_any_body_and_headers_get_an_answer_or_a_4xx_problem_document(monkeypatch: pytest.MonkeyPatch, body: bytes,
                                                                      headers: dict[str, bytes], method: str) -> None:
    served = router(monkeypatch, config=CONFIG)
    response, document = call(served, method=method, body=body, headers=headers)
    if response.status_code == 200:
        return
    assert 400 <= response.status_code < 500, (response.status_code, document)
    assert response.headers["content-type"] == PROBLEM_JSON and document["status"] == response.status_code
    assert document["title"] == TITLES[document["type"]]
    assert len(response.body) < 64 * 1024
