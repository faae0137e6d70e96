"""Request reading and validation: every refusal names its field, in microseconds, before any pipeline work.

Tables for the refusals and for the bounded body reader (413 before reading a
declared oversized body, at the crossing chunk for a streamed one); Hypothesis
for the whole surface: no body the router can receive yields anything but
parameters or a 4xx whose answer renders as the router renders it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.requests import MAX_BODY_BYTES, RequestError, parse_request, read_body

LIMITS = {"max_steps": 50, "max_pixels": 262144, "max_images": 4, "max_prompt_chars": 2000}
DEFAULTS = {"width": 64, "height": 64}

REFUSED = [
    ("not json", b"not json", "body", 422),
    ("json array", b"[1]", "body", 422),
    ("NaN guidance", b'{"prompt": "x", "guidance_scale": NaN}', "body", 422),
    ("Infinity", b'{"prompt": "x", "guidance_scale": Infinity}', "body", 422),
    ("huge guidance", b'{"prompt": "x", "guidance_scale": 1e308}', "guidance_scale", 422),
    ("width 100000", b'{"prompt": "x", "width": 100000}', "width", 422),
    ("height alone over pixels", b'{"prompt": "x", "height": 8192}', "height", 422),
    ("steps 10^6", b'{"prompt": "x", "steps": 1000000}', "steps", 422),
    ("zero steps", b'{"prompt": "x", "steps": 0}', "steps", 422),
    ("num_images 1000", b'{"prompt": "x", "num_images": 1000}', "num_images", 422),
    ("empty prompt", b'{"prompt": ""}', "prompt", 422),
    ("prompt not a string", b'{"prompt": 5}', "prompt", 422),
    ("seed negative", b'{"prompt": "x", "seed": -1}', "seed", 422),
    ("seed as string", b'{"prompt": "x", "seed": "1"}', "seed", 422),
    ("bool steps", b'{"prompt": "x", "steps": true}', "steps", 422),
    ("unknown field", b'{"prompt": "x", "model": "other"}', "model", 422),
    ("long negative prompt", json.dumps({"prompt": "x", "negative_prompt": "n" * 2001}).encode(), "negative_prompt", 422),
    ("1 MB prompt", json.dumps({"prompt": "x" * 1_000_000}).encode(), "prompt", 422),
    ("body over the cap", b'{"prompt": "' + b"x" * MAX_BODY_BYTES + b'"}', "body", 413),
    ("JSON nested 100000 deep", b"[" * 100_000, "body", 422),
    ("unpaired surrogate prompt", b'{"prompt": "\\ud800 cube"}', "prompt", 422),
    ("surrogate as an unknown key", b'{"prompt": "x", "\\udfff": 1}', "body", 422),
    ("10^5-digit seed", b'{"prompt": "x", "seed": ' + b"9" * 100_000 + b"}", "body", 422),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(case: tuple[str, bytes, str, int]) -> None:
    _, body, field, status = case
    started = time.perf_counter()
    with pytest.raises(RequestError) as info:
        parse_request(body, LIMITS, DEFAULTS)
    assert info.value.status == status
    assert info.value.document("req-1")["field"] == field
    assert time.perf_counter() - started < 0.5  # refused before any pipeline work; the slowest row takes 4 ms (measured)


def test_accepted_with_unset_fields_left_to_the_version() -> None:
    params = parse_request(b'{"prompt": "a red cube", "steps": 8, "width": 128}', LIMITS, DEFAULTS)
    assert params == {"prompt": "a red cube", "negative_prompt": None, "seed": None, "steps": 8, "guidance_scale": None,
                      "width": 128, "height": None, "num_images": 1}


def test_all_problems_are_listed() -> None:
    with pytest.raises(RequestError) as info:
        parse_request(b'{"prompt": "x", "steps": 99, "num_images": 9}', LIMITS, DEFAULTS)
    assert [e["field"] for e in info.value.document("req-1")["errors"]] == ["steps", "num_images"]


MIB = 1024 * 1024


class Sender:
    """An async body source that counts what the reader pulled from it."""

    def __init__(self, total: int, chunk: int = 64 * 1024):
        self.total, self.chunk, self.pulled = total, chunk, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while self.pulled < self.total:
            size = min(self.chunk, self.total - self.pulled)
            self.pulled += size
            yield b"x" * size


def read(sender: Sender, content_length: str | None) -> bytearray:
    return asyncio.run(read_body(sender, content_length))


# (case, bytes offered, chunk size, Content-Length header, status or None for read, most bytes the reader may pull)
READS = [
    ("declared over the cap: refused before a byte", 64 * MIB, 64 * 1024, str(64 * MIB), 413, 0),
    ("declared 1 byte over: refused before a byte", MAX_BODY_BYTES + 1, 64 * 1024, str(MAX_BODY_BYTES + 1), 413, 0),
    ("chunked 64 MiB: stops at the crossing chunk", 64 * MIB, 64 * 1024, None, 413, MAX_BODY_BYTES + 64 * 1024),
    ("chunked cap + 1 byte", MAX_BODY_BYTES + 1, 64 * 1024, None, 413, MAX_BODY_BYTES + 1),
    ("one huge chunk", 16 * MIB, 16 * MIB, None, 413, 16 * MIB),
    ("exactly the cap, chunked", MAX_BODY_BYTES, 64 * 1024, None, None, MAX_BODY_BYTES),
    ("exactly the cap, declared", MAX_BODY_BYTES, 1 * MIB, str(MAX_BODY_BYTES), None, MAX_BODY_BYTES),
    ("empty", 0, 1, "0", None, 0),
    ("Content-Length not a number", 10, 10, "ten", 400, 0),
    ("Content-Length negative", 10, 10, "-1", 400, 0),
    ("Content-Length 10^40", 10, 10, "1" + "0" * 40, 400, 0),
]


@pytest.mark.parametrize("case", READS, ids=[c[0] for c in READS])
def test_read_body_is_bounded_while_streaming(case: tuple[str, int, int, str | None, int | None, int]) -> None:
    _, total, chunk, declared, status, most = case
    sender = Sender(total, chunk)
    if status is None:
        assert len(read(sender, declared)) == total
    else:
        with pytest.raises(RequestError) as info:
            read(sender, declared)
        assert info.value.status == status
        if status == 413:
            assert f"capped at {MAX_BODY_BYTES} bytes (4 MiB)" in info.value.document("req-1")["detail"]
    assert sender.pulled <= most


LIMITS_FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "width", "height", "num_images"]
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80) | st.floats() | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
REQUESTS = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=20), JSON_VALUES, max_size=9)


def outcome(body: bytes) -> int:
    """200 for parameters, else the refusal's status; the refusal must render as the router's JSONResponse does."""
    try:
        params = parse_request(body, LIMITS, DEFAULTS)
    except RequestError as err:
        rendered = json.dumps(err.document("req-1"), ensure_ascii=False, allow_nan=False).encode("utf-8")
        assert err.document("req-1")["field"] and len(rendered) < 64 * 1024
        return err.status
    assert set(params) == set(FIELDS) and params["prompt"].strip()
    return 200


@LIMITS_FUZZ
@given(st.binary(max_size=2048))
def test_any_bytes_give_parameters_or_a_4xx(body: bytes) -> None:
    assert outcome(body) in (200, 413, 422)


@LIMITS_FUZZ
@given(REQUESTS, st.booleans())
def test_any_json_object_gives_parameters_or_a_named_422(request: dict[str, object], ascii_only: bool) -> None:
    body = json.dumps(request, ensure_ascii=ascii_only, allow_nan=True).encode("utf-8", "surrogatepass")
    assert outcome(body) in (200, 422)


# (case, body fields beyond the prompt, None when accepted, else (field, message fragment)): each limit at its edge.
# LIMITS: 50 steps, 4 images, 262144 pixels (512x512), 2000 prompt characters; seeds are 32-bit, guidance at most 50.
EDGES = [
    ("steps at the limit", {"steps": 50}, None),
    ("steps one over", {"steps": 51}, ("steps", "51 exceeds the limit of 50")),
    ("num_images at the limit", {"num_images": 4}, None),
    ("num_images one over", {"num_images": 5}, ("num_images", "5 exceeds the limit of 4")),
    ("num_images zero", {"num_images": 0}, ("num_images", "greater than or equal to 1")),
    ("512x512 is exactly max_pixels", {"width": 512, "height": 512}, None),
    ("520x512 is over", {"width": 520, "height": 512}, ("width", "520x512 is 266240 pixels; the limit is 262144")),
    ("height over with the default width", {"height": 4104}, ("height", "64x4104 is 262656 pixels")),
    ("width 8 is the smallest", {"width": 8}, None),
    ("width 4 is too small", {"width": 4}, ("width", "greater than or equal to 8")),
    ("width not a multiple of 8", {"width": 100}, ("width", "100 is not a multiple of 8")),
    ("height not a multiple of 8", {"height": 12}, ("height", "12 is not a multiple of 8")),
    ("largest 32-bit seed", {"seed": 2**32 - 1}, None),
    ("seed 2^32", {"seed": 2**32}, ("seed", "less than or equal to 4294967295")),
    ("seed zero", {"seed": 0}, None),
    ("guidance 0 and 50 are the ends", {"guidance_scale": 50.0}, None),
    ("guidance over 50", {"guidance_scale": 50.5}, ("guidance_scale", "less than or equal to 50")),
    ("negative guidance", {"guidance_scale": -0.5}, ("guidance_scale", "greater than or equal to 0")),
    ("prompt of spaces", {"prompt": "   "}, ("prompt", "must not be empty")),
    ("prompt at 2000 characters", {"prompt": "p" * 2000}, None),
    ("prompt at 2001 characters", {"prompt": "p" * 2001}, ("prompt", "2001 characters; the limit is 2000")),
    ("negative prompt at 2000", {"negative_prompt": "n" * 2000}, None),
    ("unknown field says so", {"strength": 0.5}, ("strength", "unknown field")),
]


@pytest.mark.parametrize("case", EDGES, ids=[c[0] for c in EDGES])
def test_each_limit_at_its_edge(case: tuple[str, dict[str, object], tuple[str, str] | None]) -> None:
    _, fields, refused = case
    body = json.dumps({"prompt": "a red cube", **fields}).encode()
    if refused is None:
        params = parse_request(body, LIMITS, DEFAULTS)
        assert all(params[k] == v for k, v in fields.items())
        return
    with pytest.raises(RequestError) as info:
        parse_request(body, LIMITS, DEFAULTS)
    field, fragment = refused
    answer = info.value.document("req-1")
    assert (info.value.status, answer["title"], answer["field"]) == (422, "invalid request", field)
    assert fragment in answer["detail"] and answer["errors"][0] == {"field": field, "detail": answer["detail"]}
    assert str(info.value) == "; ".join(f"{e['field']}: {e['detail']}" for e in answer["errors"])


def test_a_client_key_is_echoed_bounded_and_as_valid_utf8() -> None:
    key = "k" * 81
    with pytest.raises(RequestError) as info:
        parse_request(json.dumps({"prompt": "x", key: 1}).encode(), LIMITS, DEFAULTS)
    assert info.value.document("req-1")["field"] == "k" * 80 + "…"
    exact = "k" * 80
    with pytest.raises(RequestError) as info:
        parse_request(json.dumps({"prompt": "x", exact: 1}).encode(), LIMITS, DEFAULTS)
    assert info.value.document("req-1")["field"] == exact


@pytest.mark.parametrize("header, status, says", [
    ("20", None, None), (" 20 ", None, None),  # a count, padded or not
    ("9" * 20, 413, "capped at"), ("9" * 21, 400, "is not a byte count"),  # 20 digits is a count (over the cap), 21 is not
    ("²", 400, "is not a byte count"),  # a digit to str.isdigit, not to HTTP
])
def test_content_length_header(header: str, status: int | None, says: str | None) -> None:
    from serving.requests import declared_length

    if status is None or says is None:
        assert (status, says) == (None, None) and declared_length(header) == 20
        return
    with pytest.raises(RequestError) as info:
        declared_length(header)
    assert info.value.status == status and says in info.value.document("req-1")["detail"]
    assert info.value.document("req-1")["title"] == {400: "bad request", 413: "request too large"}[status]


def test_a_body_of_exactly_the_cap_is_read_and_judged_not_refused_for_size() -> None:
    body = b'{"prompt": "' + b"x" * (MAX_BODY_BYTES - len(b'{"prompt": ""}')) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    with pytest.raises(RequestError) as info:
        parse_request(body, LIMITS, DEFAULTS)
    assert (info.value.status, info.value.document("req-1")["field"]) == (422, "prompt")  # too long a prompt, not too large a body
    with pytest.raises(RequestError) as info:
        parse_request(body + b" ", LIMITS, DEFAULTS)
    assert info.value.status == 413 and info.value.document("req-1")["detail"].startswith(f"{MAX_BODY_BYTES + 1} bytes; ")


def test_an_unnamed_kind_is_an_invalid_request_and_messages_are_bounded() -> None:
    err = RequestError([("prompt", "m" * 500)])
    assert (err.status, err.document("req-1")["title"]) == (422, "invalid request") and err.document("req-1")["detail"] == "m" * 400 + "…"
    assert RequestError([("\ud800", "x")]).document("req-1")["field"] == "\\ud800"  # a lone surrogate echoed escaped, as valid UTF-8


def test_nan_and_infinity_name_the_constant() -> None:
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(RequestError) as info:
            parse_request(f'{{"prompt": "x", "guidance_scale": {constant}}}'.encode(), LIMITS, DEFAULTS)
        assert f"{constant} is not a number JSON allows" in info.value.document("req-1")["detail"]


def test_a_streamed_body_over_the_cap_says_where_reading_stopped() -> None:
    with pytest.raises(RequestError) as info:
        read(Sender(MAX_BODY_BYTES + 10, chunk=MIB), None)
    assert f"more than {MAX_BODY_BYTES} bytes sent (stopped reading at {MAX_BODY_BYTES + 10})" in info.value.document("req-1")["detail"]
    with pytest.raises(RequestError) as info:
        read(Sender(10), str(MAX_BODY_BYTES + 1))
    assert info.value.document("req-1")["detail"].startswith(f"Content-Length {MAX_BODY_BYTES + 1} bytes; ")
