"""One served demo, only read: what a client sees of it over real HTTP, the router's input limits, the gate job
that let it in, loopback ports and a token that never reaches a log, batches formed under concurrency.

The demo is rolled out once for the module (a controller process on the session's Ray). A raw socket client
streams bodies the way a hostile or careless client would (chunked with no length, or a declared Content-Length
over the cap) at the speed of a 1 Gbit/s link, and records how much it had sent when the answer came: the router
must answer 413 at the cap, not after reading everything, and a declared length over the cap before any body
byte. Hypothesis sends a few arbitrary bodies and header values through the Serve proxy: nothing yields a 5xx.
(X-Request-Id is kept to UTF-8: Ray Serve's proxy decodes it before the router runs and answers 500 for other
bytes; see the README's faults table.)
"""

from __future__ import annotations

import base64
import json
import os
import select
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.requests import MAX_BODY_BYTES
from tests.conftest import demo_repo
from tests.live import DASHBOARD, HTTP_PORT, SERVE_URL, Controller, clear_serve, generate, healthy_on, serve_client, stable_version

pytestmark = pytest.mark.timeout(600)

MIB = 1024 * 1024
CHUNK = 64 * 1024
LINK = 125_000_000  # bytes/s: a client on a 1 Gbit/s link


@pytest.fixture(scope="module")
def served_demo(ray_head, tmp_path_factory):
    """The demo release served by a controller, once for this module: (repo, controller, its status entry).
    These tests only read; a test that commits or changes Serve belongs with `live_demo` elsewhere."""
    root = tmp_path_factory.mktemp("router-limits")
    repo = demo_repo(root / "repo")
    clear_serve()
    controller = Controller(repo.path, root / "state").start()
    try:
        yield repo, controller, controller.wait_release(healthy_on(), timeout=400)
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


def test_a_chunked_body_without_length_is_refused_at_the_cap_while_the_client_is_still_sending(served_demo):
    status, body, sent = post_streaming(64 * MIB)
    assert status == 413, body
    assert body["field"] == "body" and f"capped at {MAX_BODY_BYTES} bytes (4 MiB)" in body["detail"]
    assert MAX_BODY_BYTES < sent < 32 * MIB, sent  # answered having sent a fraction of the 64 MiB it meant to


def test_cap_plus_one_byte_chunked_gets_413(served_demo):
    status, body, _ = post_streaming(MAX_BODY_BYTES + 1)
    assert status == 413 and "4 MiB" in body["detail"]


def test_a_declared_length_over_the_cap_gets_413_before_any_body_byte_is_sent(served_demo):
    started = time.monotonic()
    status, body, sent = post_streaming(0, content_length=64 * MIB)  # headers only: a reader that waited would never answer
    assert status == 413 and f"Content-Length {64 * MIB} bytes" in body["detail"] and "4 MiB" in body["detail"]
    assert sent == 0 and time.monotonic() - started < 10


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_a_body_exactly_at_the_cap_is_read_and_parsed(served_demo, chunked):
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
def test_arbitrary_bodies_and_headers_never_get_a_5xx(served_demo, body, headers):
    response = httpx.post(f"{SERVE_URL}/demo/generate", content=body, headers=headers, timeout=120)
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code != 200:  # every refusal is an RFC 9457 problem document
        assert response.headers["content-type"] == "application/problem+json" and response.json()["status"] == response.status_code


@pytest.mark.parametrize("name", ["X-Diffops-Version", "X-Request-Id", "Accept"])
def test_a_huge_header_value_never_gets_a_5xx(served_demo, name):
    for size in (1024, 8 * 1024, 60 * 1024):
        try:
            response = httpx.post(f"{SERVE_URL}/demo/generate", json={"prompt": "a red cube", "steps": 1},
                                  headers={name: "v" * size}, timeout=60)
        except httpx.RemoteProtocolError:
            continue  # the HTTP server refused the header block by closing: a client error, never a 5xx
        assert response.status_code < 500, (name, size, response.status_code, response.text[:300])


BAD_REQUESTS = [
    ("width 100000", {"prompt": "x", "width": 100000}, "width"),
    ("steps over the limit", {"prompt": "x", "steps": 1_000_000}, "steps"),
    ("empty prompt", {"prompt": "   "}, "prompt"),
    ("prompt over the limit", {"prompt": "x" * 2001}, "prompt"),
    ("1 MB prompt", {"prompt": "x" * 1_000_000}, "prompt"),
    ("too many images", {"prompt": "x", "num_images": 1000}, "num_images"),
    ("wrong type", {"prompt": "x", "steps": "four"}, "steps"),
    ("float steps", {"prompt": "x", "steps": 4.5}, "steps"),
    ("missing prompt", {"steps": 4}, "prompt"),
    ("unknown field", {"prompt": "x", "strength": 0.5}, "strength"),
    ("width not multiple of 8", {"prompt": "x", "width": 60}, "width"),
]


def model_replicas(release: str, version: str) -> tuple[str, ...]:
    return serve_client().observe()[f"{release}--{version}"].replica_ids


def gate_jobs() -> list[dict]:
    from controller.apply.serve_client import ray_token

    jobs = httpx.get(f"{DASHBOARD}/api/jobs/", headers={"Authorization": f"Bearer {ray_token()}"}, timeout=10).json()
    return [j for j in jobs if (j.get("submission_id") or "").startswith("diffops-gate-")]


def test_committed_release_serves_png_and_json(served_demo):
    _, controller, release = served_demo
    version = stable_version(release)
    response = generate()
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(b"\x89PNG")
    assert response.headers["X-Diffops-Version"] == version
    assert response.headers["X-Request-Id"]

    as_json = generate(body={"prompt": "a red cube", "seed": 7, "num_images": 2}, headers={"Accept": "application/json"})
    data = as_json.json()
    assert len(data["images"]) == 2 and base64.b64decode(data["images"][0]).startswith(b"\x89PNG")
    assert data["metadata"]["seed"] == 7 and data["metadata"]["version"] == version and data["metadata"]["steps"] == 4

    same_seed = [generate(body={"prompt": "a red cube", "seed": 3}).content for _ in range(2)]
    assert same_seed[0] == same_seed[1]

    pinned = generate(headers={"X-Diffops-Version": version})
    assert pinned.status_code == 200 and pinned.headers["X-Diffops-Version"] == version
    unknown = generate(headers={"X-Diffops-Version": "0000000000"})
    assert unknown.status_code == 404 and version in unknown.json()["detail"]

    log = controller.logs
    assert "demo: rolling out" in log and "next: verify the model and run the checks" in log
    assert "traffic switched to it (100%)" in log


def test_bad_requests_get_422_naming_the_field(served_demo):
    _, _, release = served_demo
    replicas = model_replicas("demo", stable_version(release))
    answers = []
    for case, body, field in BAD_REQUESTS:
        response = generate(body=body)
        answers.append((case, response))
        assert response.status_code == 422, case
        assert response.json()["field"] == field, case
    raw = [b"not json", b"[1, 2]", b'{"prompt": "x", "guidance_scale": NaN}', b'{"prompt": "x", "guidance_scale": 1e999}']
    for body in raw:
        response = httpx.post(f"{SERVE_URL}/demo/generate", content=body, timeout=30)
        answers.append((body, response))
        assert response.status_code == 422, body
    for case, response in answers:  # refused by the router: no version was picked, no pipeline ran (1e6 steps would take hours)
        assert "X-Diffops-Version" not in response.headers, case
        assert response.elapsed.total_seconds() < 10.0, (case, response.elapsed)  # typically ~0.05s; a pipeline run is minutes
    assert generate().status_code == 200  # nothing above hurt the replica
    assert model_replicas("demo", stable_version(release)) == replicas


def test_first_rollout_passed_the_gate_as_a_ray_job(served_demo):
    _, controller, release = served_demo
    version = stable_version(release)
    gate = release["versions"][0]["gate"]
    assert gate["job"] and gate["job"].startswith(f"diffops-gate-demo-{version}-")  # the job that ran this version's checks
    [job] = [j for j in gate_jobs() if j["submission_id"] == gate["job"]]
    assert job["status"] == "SUCCEEDED" and job["metadata"]["version"] == version
    assert (job["metadata"]["num_cpus"], job["metadata"]["num_gpus"]) == ("0.5", "0")  # the release's replica resources
    assert gate["ok"] and {name: c["outcome"] for name, c in gate["checks"].items()} == {
        "artifact": "passed", "dependency": "passed", "cuda": "skipped", "load": "passed", "golden": "passed", "performance": "passed"}
    assert gate["checks"]["golden"]["figures"]["phash_distance"] == 0
    assert gate["checks"]["performance"]["figures"]["p95_latency_s"] > 0


def test_ray_listens_on_loopback_only_and_the_token_never_reaches_a_log(served_demo, ray_head):
    _, controller, _ = served_demo
    listening = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if not any(ray_head.temp_dir in part or "ray::" in part for part in process.info["cmdline"] or []):
                continue
            listening += [(c.laddr.ip, c.laddr.port, process.pid) for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    # The dashboard (Ray's REST API: Serve deploys, jobs, cluster state) and Serve's HTTP proxy: loopback only.
    # (Ray puts its internal gRPC ports, metrics exporter and client server on the machine's address whatever the
    # node IP says; the README says so.)
    served = {ray_head.dashboard_port: "dashboard", HTTP_PORT: "Serve HTTP"}
    exposed = [(ip, port, served[port]) for ip, port, _ in listening if port in served]
    assert {port for _, port, _ in exposed} == set(served), listening
    assert [entry for entry in exposed if entry[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")] == []
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert len(token) >= 16
    logs = [controller.log_path, *Path(ray_head.temp_dir).rglob("*.log"), *Path(ray_head.temp_dir).rglob("*.out"),
            *Path(ray_head.temp_dir).rglob("*.err")]
    leaked = [str(path) for path in logs if path.is_file() and token in path.read_text(errors="replace")]
    assert leaked == []


# README "Serving": requests are batched (`@serve.batch`, grouped by steps/size/CFG); the JSON metadata has batch_size.
def test_concurrent_requests_are_batched(served_demo):
    _, _, release = served_demo
    body = {"prompt": "a red cube", "seed": 1}
    with ThreadPoolExecutor(8) as pool:  # twice what one replica takes at once (max_ongoing_requests: 4)
        answers = list(pool.map(lambda _: generate(body=body, headers={"Accept": "application/json"}), range(16)))
    assert {a.status_code for a in answers} == {200}, [a.text for a in answers if a.status_code != 200][:3]
    sizes = [a.json()["metadata"]["batch_size"] for a in answers]
    assert max(sizes) > 1 and max(sizes) <= 4, sizes  # batches formed, never above max_batch_size
    assert {a.json()["metadata"]["version"] for a in answers} == {stable_version(release)}
