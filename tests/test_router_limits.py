"""The router's input limits over real HTTP, on the live Ray: bodies refused while they stream, hostile headers.

A raw socket client streams bodies the way a hostile or careless client
would (chunked with no length, or a declared Content-Length over the cap) at
the speed of a 1 Gbit/s link, and records how much it had sent when the answer
came: the router must answer 413 at the cap, not after reading everything, and
a declared length over the cap before any body byte. Hypothesis sends a few
arbitrary bodies and header values through the Serve proxy: nothing yields a
5xx. (X-Request-Id is kept to UTF-8: Ray Serve's proxy decodes it before the
router runs and answers 500 for other bytes; see the README's faults table.)
"""

from __future__ import annotations

import json
import select
import shutil
import socket
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.requests import MAX_BODY_BYTES
from tests.conftest import DEMO_MODEL, ROOT, ReleaseRepo
from tests.live import HTTP_PORT, SERVE_URL, Controller, clear_serve, healthy_on

pytestmark = pytest.mark.timeout(600)

MIB = 1024 * 1024
CHUNK = 64 * 1024
LINK = 125_000_000  # bytes/s: a client on a 1 Gbit/s link


@pytest.fixture(scope="module")
def live_demo(ray_head, tmp_path_factory):
    """The demo release served by a controller, once for this module (these tests only send requests)."""
    root = tmp_path_factory.mktemp("router-limits")
    repo = ReleaseRepo(root / "repo")
    shutil.copytree(DEMO_MODEL, repo.path / "models" / "tiny-sd")
    shutil.copytree(ROOT / "releases" / "golden", repo.path / "releases" / "golden")
    repo.release()
    repo.commit("demo release")
    clear_serve()
    controller = Controller(repo.path, root / "state").start()
    try:
        yield controller.wait_release(healthy_on(), timeout=400)
    finally:
        controller.stop()
        clear_serve()


def post_streaming(total: int, content_length: int | None = None, timeout: float = 60) -> tuple[int, dict, int]:
    """POST `total` bytes of body to /demo/generate, chunked (no length) or under a declared `content_length`,
    at most at `LINK` speed. Stops sending when an answer arrives; returns (status, JSON body, body bytes sent by then).
    """
    sock = socket.create_connection(("127.0.0.1", HTTP_PORT), timeout=timeout)
    framing = "Transfer-Encoding: chunked" if content_length is None else f"Content-Length: {content_length}"
    sock.sendall(f"POST /demo/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{framing}\r\n\r\n".encode())
    sock.setblocking(False)
    sent, pending, answer, deadline, ended = 0, b"", b"", time.monotonic() + timeout, total == 0
    started = time.monotonic()
    try:
        while time.monotonic() < deadline and not complete(answer):
            if not pending and not ended and sent <= LINK * (time.monotonic() - started):
                size = min(CHUNK, total - sent)
                data = b"x" * size
                pending = (b"%x\r\n" % size + data + b"\r\n") if content_length is None else data
                ended = sent + size >= total
                if ended and content_length is None:
                    pending += b"0\r\n\r\n"
                sent += size  # counted when handed over; the bound below is far from one chunk
            readable, writable, _ = select.select([sock], [sock] if pending else [], [], 0.001 if not ended else 1.0)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not data:
                    break
                answer += data
                continue
            if writable:
                try:
                    pending = pending[sock.send(pending):]
                except (BrokenPipeError, ConnectionResetError):
                    pending, ended = b"", True  # the server stopped listening; wait for what it said
    finally:
        sock.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), f"no HTTP answer after sending {sent} bytes: {answer[:200]!r}"
    return int(head.split()[1]), json.loads(body) if body.strip() else {}, sent


def complete(answer: bytes) -> bool:
    head, found, body = answer.partition(b"\r\n\r\n")
    if not found:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return body.endswith(b"0\r\n\r\n")


def test_a_chunked_body_without_length_is_refused_at_the_cap_while_the_client_is_still_sending(live_demo):
    status, body, sent = post_streaming(64 * MIB)
    assert status == 413, body
    assert body["field"] == "body" and f"capped at {MAX_BODY_BYTES} bytes (4 MiB)" in body["message"]
    assert MAX_BODY_BYTES < sent < 32 * MIB, sent  # answered having sent a fraction of the 64 MiB it meant to


def test_cap_plus_one_byte_chunked_gets_413(live_demo):
    status, body, _ = post_streaming(MAX_BODY_BYTES + 1)
    assert status == 413 and "4 MiB" in body["message"]


def test_a_declared_length_over_the_cap_gets_413_before_any_body_byte_is_sent(live_demo):
    started = time.monotonic()
    status, body, sent = post_streaming(0, content_length=64 * MIB)  # headers only: a reader that waited would never answer
    assert status == 413 and f"Content-Length {64 * MIB} bytes" in body["message"] and "4 MiB" in body["message"]
    assert sent == 0 and time.monotonic() - started < 10


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_body_exactly_at_the_cap_is_read_and_parsed(live_demo, chunked):
    body = b'{"prompt": "' + b"x" * (MAX_BODY_BYTES - len(b'{"prompt": ""}')) + b'"}'
    assert len(body) == MAX_BODY_BYTES
    content = (body[i:i + CHUNK] for i in range(0, len(body), CHUNK)) if chunked else body
    response = httpx.post(f"{SERVE_URL}/demo/generate", content=content, timeout=60)
    assert response.status_code == 422, response.text  # parsed: the prompt is over max_prompt_chars, not a 413
    assert response.json()["field"] == "prompt"


# Any bytes an HTTP/1.1 client can send in a field value (RFC 9110: no control characters but tab).
HEADER_VALUE = st.binary(min_size=0, max_size=300).map(lambda b: bytes(c for c in b if c == 9 or 32 <= c != 127).strip())
UTF8_VALUE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=100).map(lambda s: s.strip().encode())
HEADERS = st.fixed_dictionaries({}, optional={
    "X-Diffops-Version": HEADER_VALUE, "Accept": HEADER_VALUE, "Content-Type": HEADER_VALUE, "X-Other": HEADER_VALUE,
    "X-Request-Id": UTF8_VALUE,
})
BODIES = st.one_of(
    st.binary(max_size=512),
    st.dictionaries(st.sampled_from(["prompt", "steps", "width", "seed", "num_images", "other"]),
                    st.none() | st.integers(-(2**70), 2**70) | st.text(max_size=30) | st.floats(), max_size=5)
    .map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(body=BODIES, headers=HEADERS)
def test_arbitrary_bodies_and_headers_never_get_a_5xx(live_demo, body, headers):
    response = httpx.post(f"{SERVE_URL}/demo/generate", content=body, headers=headers, timeout=120)
    assert response.status_code < 500, (response.status_code, response.text[:300])


@pytest.mark.parametrize("name", ["X-Diffops-Version", "X-Request-Id", "Accept"])
def test_a_huge_header_value_never_gets_a_5xx(live_demo, name):
    for size in (1024, 8 * 1024, 60 * 1024):
        try:
            response = httpx.post(f"{SERVE_URL}/demo/generate", json={"prompt": "a red cube", "steps": 1},
                                  headers={name: "v" * size}, timeout=60)
        except httpx.RemoteProtocolError:
            continue  # the HTTP server refused the header block by closing: a client error, never a 5xx
        assert response.status_code < 500, (name, size, response.status_code, response.text[:300])
