"""Request validation as a table: every refusal names its field, in microseconds, before any pipeline work."""

from __future__ import annotations

import json
import time

import pytest

from serving.requests import MAX_BODY_BYTES, RequestError, parse_request

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
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused(case):
    _, body, field, status = case
    started = time.perf_counter()
    with pytest.raises(RequestError) as info:
        parse_request(body, LIMITS, DEFAULTS)
    assert info.value.status == status
    assert info.value.body()["field"] == field
    assert time.perf_counter() - started < 0.5


def test_accepted_with_unset_fields_left_to_the_version():
    params = parse_request(b'{"prompt": "a red cube", "steps": 8, "width": 128}', LIMITS, DEFAULTS)
    assert params == {"prompt": "a red cube", "negative_prompt": None, "seed": None, "steps": 8, "guidance_scale": None,
                      "width": 128, "height": None, "num_images": 1}


def test_all_problems_are_listed():
    with pytest.raises(RequestError) as info:
        parse_request(b'{"prompt": "x", "steps": 99, "num_images": 9}', LIMITS, DEFAULTS)
    assert [e["field"] for e in info.value.body()["errors"]] == ["steps", "num_images"]
