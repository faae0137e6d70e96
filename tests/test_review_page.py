"""The review page (`controller.review`): a real state file filled by `store_samples` with real PNGs, the real server,
and the real page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright). A reviewer rates three
images blind; the page's counts move, the images leave the queue, and `diffops quality` shows the reviews on the
right versions. The API's edges (blind queue, unknown ids, named fields, the body cap, ids that try to leave the
samples dir, a repeat review) are checked over plain HTTP, and fuzzed with Hypothesis."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from controller.review import ReviewServer
from controller.review.queue import REVIEW_FIELDS
from controller.state.samples import store_samples
from controller.state.store import Store
from serving.feedback import MAX_FEEDBACK_BYTES

ROOT = Path(__file__).resolve().parents[1]
DIFFOPS = str(Path(sys.executable).with_name("diffops"))
CHROMIUM = "/usr/bin/chromium"
VERSIONS = {"0a1b2c3d4e5f": (200, 40, 40), "9f8e7d6c5b4a": (40, 90, 200)}
PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "a bowl of ramen"]
FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def request_id(prompt: int, version: str) -> str:
    return f"req-{prompt}-{version[:4]}"


def png(color: tuple[int, int, int], prompt: int) -> bytes:
    """A 32x32 PNG in the version's colour with a stripe per prompt: every kept image differs."""
    image = Image.new("RGB", (32, 32), color)
    for x in range(32):
        image.putpixel((x, 4 * prompt + 2), (255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def make_state(state_dir: Path) -> dict[str, str]:
    """Six kept samples of `demo` (3 prompts x 2 versions), one sampled but not kept, and a `tampered` release whose
    row names a file outside the samples dir; returns request id -> version."""
    samples_dir = state_dir / "samples"
    store = Store(state_dir / "state.db")
    versions, rows = {}, []
    for index, prompt in enumerate(PROMPTS):
        for version, color in VERSIONS.items():
            rid = request_id(index, version)
            (samples_dir / version).mkdir(parents=True, exist_ok=True)
            (samples_dir / version / f"{rid}.png").write_bytes(png(color, index))
            rows.append({"request_id": rid, "version": version, "prompt": prompt, "seed": 1000 + index, "params": {"steps": 4},
                         "clip_score": 0.3, "nsfw": False, "image": f"{version}/{rid}.png", "at": 1_700_000_000.0 + index})
            versions[rid] = version
    rows.append({"request_id": "not-kept", "version": "0a1b2c3d4e5f", "prompt": "x", "image": None, "at": 1_700_000_100.0})
    store_samples(store.db, "demo", rows, ("epoch", len(rows)))
    store_samples(store.db, "tampered", [{"request_id": "evil", "version": "v", "prompt": "p", "image": "../state.db",
                                          "at": 1_700_000_000.0}], ("epoch", 1))
    store.close()
    return versions


@contextmanager
def serving(state_dir: Path) -> Iterator[tuple[ReviewServer, dict[str, str]]]:
    versions = make_state(state_dir)
    server = ReviewServer(state_dir).start()
    try:
        yield server, versions
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReviewServer, dict[str, str]]]:
    """A server nobody stores reviews through (read-only and refused requests only)."""
    with serving(tmp_path_factory.mktemp("shared")) as served:
        yield served


def call(server: ReviewServer, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
         raw: bytes | None = None) -> tuple[int, str, Any]:
    """One request on a fresh connection: (status, Content-Type, JSON body or bytes)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    sent = {"Content-Type": "application/json"} if data is not None else {}
    connection.request(method, path, body=data, headers={**sent, **(headers or {})})
    response = connection.getresponse()
    content, kind = response.read(), response.getheader("Content-Type") or ""
    connection.close()
    return response.status, kind, json.loads(content) if "json" in kind else content


def query(path: str, **params: str) -> str:
    return f"{path}?{urllib.parse.urlencode(params)}"


def review(server: ReviewServer, reviewer: str, rid: str, **fields: Any) -> tuple[int, str, Any]:
    return call(server, "POST", "/api/review", {"release": "demo", "reviewer": reviewer, "request_id": rid, **fields})


def quality(state_dir: Path) -> dict[str, dict[str, Any]]:
    result = subprocess.run([DIFFOPS, "quality", "demo", "-o", "json", "--state-dir", str(state_dir)], capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    return {v["version"]: v for v in json.loads(result.stdout)["versions"]}


# The page in a browser.


def card_ids(page: Page) -> list[str]:
    return [str(card.get_attribute("data-id")) for card in page.get_by_role("article").all()]


def rate(page: Page, label: str, rating: int, flag: str | None = None) -> str:
    card = page.get_by_role("article", name=f"Image {label}", exact=True)
    rid = str(card.get_attribute("data-id"))
    card.get_by_role("button", name=str(rating), exact=True).click()
    expect(card.get_by_role("button", name=str(rating), exact=True)).to_have_attribute("aria-pressed", "true")
    if flag:
        card.get_by_label(flag).check()
    card.get_by_role("button", name=f"Submit image {label}").click()
    return rid


def test_a_reviewer_rates_three_images_blind_and_quality_counts_them_per_version(tmp_path: Path):
    with serving(tmp_path) as (server, versions), sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(server.url)
        page.wait_for_selector("body[data-ready]", state="attached", timeout=10_000)

        expect(page.get_by_label("Release")).to_have_value("demo")
        expect(page.get_by_label("Reviewer")).to_have_value("reviewer")
        progress = page.get_by_role("status")
        expect(progress).to_have_text("Reviewed 0 · 6 remaining")
        expect(page.locator("#prompt")).to_have_text(PROMPTS[0])
        assert sorted(card_ids(page)) == sorted(request_id(0, v) for v in VERSIONS)
        assert page.locator(".version").count() == 0, "blind by default: no version on the page"
        sizes = page.eval_on_selector_all("article img", "imgs => imgs.map(i => [i.naturalWidth, i.width, getComputedStyle(i).imageRendering])")
        assert sizes == [[32, 256, "pixelated"]] * 2, "a 32 px sample is drawn 8x, pixelated"

        first = rate(page, "A", 5)
        expect(progress).to_have_text("Reviewed 1 · 5 remaining")
        second = rate(page, "B", 4, flag="artifact")
        expect(page.locator("#prompt")).to_have_text(PROMPTS[1])
        third = rate(page, "A", 1, flag="nsfw")
        expect(progress).to_have_text("Reviewed 3 · 3 remaining")
        assert {first, second, third}.isdisjoint(card_ids(page))
        expect(page.locator("#counts tbody td:nth-child(3)")).to_have_count(2)
        # the counts table is fetched again after each review: wait until it shows all three
        page.wait_for_function("() => [...document.querySelectorAll('#counts tbody td:nth-child(3)')]"
                               ".reduce((sum, cell) => sum + Number(cell.textContent), 0) === 3", timeout=10_000)

        page.reload()
        page.wait_for_selector("body[data-ready]", state="attached", timeout=10_000)
        expect(progress).to_have_text("Reviewed 3 · 3 remaining")
        expect(page.locator("#prompt")).to_have_text(PROMPTS[1])
        assert card_ids(page) == [request_id(1, v) for v in VERSIONS if request_id(1, v) != third]
        page.get_by_label("Show versions").check()
        expect(page.locator(".version")).to_have_text([versions[card_ids(page)[0]]])
        assert errors == []
        browser.close()

    stored = quality(tmp_path)
    expected: dict[str, dict[str, Any]] = {}
    for rid, rating, flag in ((first, 5, None), (second, 4, "artifact"), (third, 1, "nsfw")):
        mine = expected.setdefault(versions[rid], {"ratings": [], "flags": []})
        mine["ratings"].append(rating)
        mine["flags"] += [flag] if flag else []
    assert set(stored) == set(expected)
    for version, mine in expected.items():
        assert stored[version]["feedback"] == len(mine["ratings"])
        assert stored[version]["ratings"]["histogram"] == {str(n): mine["ratings"].count(n) for n in range(1, 6)}
        assert {f: c["count"] for f, c in stored[version]["flags"].items() if c["count"]} == {f: 1 for f in mine["flags"]}


def test_diffops_review_serves_the_page_until_interrupted(tmp_path: Path):
    make_state(tmp_path)
    process = subprocess.Popen([DIFFOPS, "review", "--state-dir", str(tmp_path), "--port", "0"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = process.stderr.readline() if process.stderr else ""
        found = re.search(r"review: serving the review page at (http://127\.0\.0\.1:\d+/); next: open it in a browser", line)
        assert found, line
        with urllib.request.urlopen(found.group(1), timeout=10) as response:
            assert response.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            assert b"<title>diffops review</title>" in response.read()
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        assert "review: stopped" in (process.stderr.read() if process.stderr else "")
    finally:
        process.kill()
        process.wait()


# The API over plain HTTP.


def test_the_queue_is_blind_by_default_and_groups_each_prompt_across_versions(shared):
    server, versions = shared
    status, kind, blind = call(server, "GET", query("/api/queue", release="demo", reviewer="ana"))
    assert (status, kind) == (200, "application/json")
    assert [g["prompt"] for g in blind["groups"]] == PROMPTS
    assert all(sorted(s["label"] for s in g["samples"]) == ["A", "B"] for g in blind["groups"])
    assert not any("version" in s for g in blind["groups"] for s in g["samples"])
    assert blind["remaining"] == 6 and blind["reviewed"] == 0
    _, _, shown = call(server, "GET", query("/api/queue", release="demo", reviewer="ana", blind="0"))
    assert [[s["id"] for s in g["samples"]] for g in shown["groups"]] == [[s["id"] for s in g["samples"]] for g in blind["groups"]]
    assert all(s["version"] == versions[s["id"]] for g in shown["groups"] for s in g["samples"])
    firsts = set()
    for name in [f"reviewer {n}" for n in range(8)]:
        _, _, queue = call(server, "GET", query("/api/queue", release="demo", reviewer=name))
        firsts |= {versions[g["samples"][0]["id"]] for g in queue["groups"]}
    assert firsts == set(VERSIONS), "which version comes first (is A) depends on reviewer and prompt"
    status, kind, image = call(server, "GET", blind["groups"][0]["samples"][0]["image"])
    assert (status, kind) == (200, "image/png") and Image.open(io.BytesIO(image)).size == (32, 32)
    assert call(server, "GET", "/api/releases")[2] == {"releases": ["demo", "tampered"]}


@pytest.mark.parametrize(("path", "status", "field"), [
    (query("/api/image", release="demo", id="no-such-sample"), 404, None),
    (query("/api/image", release="demo", id="not-kept"), 404, None),
    (query("/api/image", release="tampered", id="evil"), 404, None),  # its row names ../state.db
    (query("/api/image", release="demo", id="../state.db"), 422, "id"),
    (query("/api/image", release="demo", id="/etc/passwd"), 422, "id"),
    ("/api/image?release=demo&id=..%2F..%2Fstate.db", 422, "id"),
    (query("/api/image", id="req-0-0a1b"), 422, "release"),
    (query("/api/queue", release="demo"), 422, "reviewer"),
    (query("/api/queue", release="demo", reviewer="x" * 65), 422, "reviewer"),
    (query("/api/queue", release="demo", reviewer="tab\there"), 422, "reviewer"),
    (query("/api/queue", release="demo", reviewer="ana", blind="maybe"), 422, "blind"),
    (query("/api/queue", release="nope", reviewer="ana"), 404, None),
    (query("/api/counts", release="nope"), 404, None),
    ("/state.db", 404, None),
])
def test_refused_gets_are_problem_documents(shared, path, status, field):
    server, _ = shared
    got, kind, document = call(server, "GET", path)
    assert (got, kind) == (status, "application/problem+json")
    assert document["status"] == status and document["detail"]
    assert document.get("field") == field


@pytest.mark.parametrize(("body", "field"), [
    ({"reviewer": "ana", "request_id": "req-0-0a1b", "rating": 7}, "rating"),
    ({"release": "demo", "request_id": "req-0-0a1b", "rating": 3}, "reviewer"),
    ({"release": "demo", "reviewer": "", "request_id": "req-0-0a1b", "rating": 3}, "reviewer"),
    ({"release": "demo", "reviewer": "a\u0000b", "request_id": "req-0-0a1b"}, "reviewer"),
    ({"release": "demo", "reviewer": "ana", "request_id": "../state.db", "rating": 3}, "request_id"),
    ({"release": "demo", "reviewer": "ana", "request_id": "req-0-0a1b", "flags": ["blurry"]}, "flags.0"),
    ({"release": "demo", "reviewer": "ana", "request_id": "req-0-0a1b", "stars": 5}, "stars"),
])
def test_a_bad_review_is_422_naming_the_field(shared, body, field):
    server, _ = shared
    status, kind, document = call(server, "POST", "/api/review", body)
    assert (status, kind) == (422, "application/problem+json")
    assert field in [e["field"] for e in document["errors"]]


def test_reviews_of_samples_not_kept_are_404_and_other_refusals_keep_their_status(shared):
    server, _ = shared
    assert review(server, "ana", "no-such-sample", rating=3)[:2] == (404, "application/problem+json")
    assert review(server, "ana", "not-kept", rating=3)[0] == 404
    assert call(server, "POST", "/api/review", raw=b'{"release": "demo"', headers={})[2]["field"] == "body"
    status, _, document = call(server, "POST", "/api/review", raw=b"{}", headers={"Content-Type": "text/plain"})
    assert (status, document["field"]) == (400, "Content-Type")
    assert call(server, "GET", "/api/review")[0] == 405
    assert call(server, "DELETE", "/api/queue")[0] == 405
    status, _, document = call(server, "GET", "/api/releases", headers={"Host": "rebound.example:80"})
    assert (status, document["field"]) == (400, "Host")


def test_the_body_cap_is_64_kib(tmp_path: Path):
    with serving(tmp_path) as (server, _):
        head = json.dumps({"release": "demo", "reviewer": "ana", "request_id": "req-0-0a1b", "rating": 2}).encode()
        at_cap = head[:-1] + b" " * (MAX_FEEDBACK_BYTES - len(head)) + b"}"
        assert len(at_cap) == MAX_FEEDBACK_BYTES
        assert call(server, "POST", "/api/review", raw=at_cap)[0] == 202
        status, kind, document = call(server, "POST", "/api/review", raw=at_cap + b" ")
        assert (status, kind, document["title"]) == (413, "application/problem+json", "request too large")


def test_a_second_review_by_the_same_reviewer_replaces_the_first(tmp_path: Path):
    with serving(tmp_path) as (server, versions):
        status, _, stored = review(server, "ana", "req-2-0a1b", rating=2, flags=["other"], comment="muddy")
        assert status == 202 and stored["version"] == versions["req-2-0a1b"] and stored["source"] == "review"
        assert review(server, "ana", "req-2-0a1b", rating=5)[0] == 202
        assert review(server, "bo", "req-2-0a1b", rating=3)[0] == 202
        counts = {v["version"]: v for v in call(server, "GET", query("/api/counts", release="demo"))[2]["versions"]}
        mine = counts[versions["req-2-0a1b"]]
        assert (mine["kept"], mine["reviews"], mine["mean_rating"], mine["flags"]["other"]) == (3, 2, 4.0, 0)
        _, _, queue = call(server, "GET", query("/api/queue", release="demo", reviewer="ana"))
        assert (queue["reviewed"], queue["remaining"]) == (1, 5)
        assert "req-2-0a1b" not in {s["id"] for g in queue["groups"] for s in g["samples"]}
        assert quality(tmp_path)[versions["req-2-0a1b"]]["ratings"]["histogram"] == {"1": 0, "2": 0, "3": 1, "4": 0, "5": 1}


hostile = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), st.floats(), st.text(max_size=80),
                    st.sampled_from(["demo", "req-0-0a1b", "not-kept", "../state.db", "nsfw", "", "\ud800", "x" * 70]),
                    st.lists(st.sampled_from(["nsfw", "artifact", "other", "bad", 3]), max_size=4))
bodies = st.one_of(
    st.binary(max_size=200),
    st.dictionaries(st.sampled_from([*REVIEW_FIELDS, "extra", ""]), hostile, max_size=7).map(lambda d: json.dumps(d).encode()),
    st.recursive(hostile, lambda inner: st.lists(inner, max_size=3), max_leaves=5).map(lambda d: json.dumps(d).encode()),
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ReviewServer, dict[str, str]]]:
    with serving(tmp_path_factory.mktemp("fuzzed")) as served:
        yield served


@FUZZ
@given(body=bodies)
def test_fuzzed_review_bodies_are_answered_never_500(fuzzed, body):
    server, _ = fuzzed
    status, kind, _ = call(server, "POST", "/api/review", raw=body)
    assert status in (202, 404, 422), (status, body)
    assert kind == ("application/json" if status == 202 else "application/problem+json")


@FUZZ
@given(path=st.sampled_from(["/api/queue", "/api/image", "/api/counts", "/api/releases", "/"]),
       params=st.dictionaries(st.sampled_from(["release", "reviewer", "blind", "id", "x"]), st.text(max_size=70), max_size=4),
       junk=st.text(alphabet="%&=?/.+#;\\x0", max_size=12))
def test_fuzzed_query_strings_are_answered_never_500(shared, path, params, junk):
    server, _ = shared
    status, kind, _ = call(server, "GET", f"{path}?{urllib.parse.urlencode(params)}{junk}".replace("#", "%23"))
    assert status in (200, 404, 422), (status, path, params, junk)
    assert kind.startswith(("application/json", "image/png", "text/html")) if status == 200 else kind == "application/problem+json"
