"""User feedback without Ray: the body's contract (every refusal names its field), the tally's bounded memory, the
router's answers to any body (202, 404 or 422, never a 5xx), the controller's read into a real SQLite state file
(a read cut short stores nothing twice, a restarted tally is read afresh, a repeat replaces), `diffops quality`
and the feedback counters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from controller.cli.main import main
from controller.metrics import ControllerMetrics
from controller.quality import drain, summarize
from controller.state.feedback import feedback_counts, feedback_rows
from controller.state.store import Store
from serving.feedback import FLAGS, MAX_COMMENT_CHARS, MAX_FEEDBACK_BYTES, FeedbackBook, client_key, generation, parse_feedback
from serving.requests import RequestError
from serving.router import Router
from tests.test_problem_details import CONFIG, call, router

RID = "0b5c2e1e-5f0e-4d3c-9d55-2a0f6f1c7a10"

# (case, body, the field the 422 names, a fragment of its detail)
REFUSED: list[tuple[str, bytes, str, str]] = [
    ("not JSON", b"{", "body", "not valid JSON"),
    ("not an object", b"[1]", "body", "expected a JSON object"),
    ("NaN", b'{"request_id": "a", "rating": NaN}', "body", "NaN is not a number"),
    ("no request id", b'{"rating": 3}', "request_id", "required"),
    ("request id not a string", b'{"request_id": 7, "rating": 3}', "request_id", "X-Request-Id"),
    ("request id with a space", b'{"request_id": "a b", "rating": 3}', "request_id", "1-128"),
    ("request id too long", json.dumps({"request_id": "a" * 129, "rating": 3}).encode(), "request_id", "1-128"),
    ("rating zero", b'{"request_id": "a", "rating": 0}', "rating", "1 to 5"),
    ("rating six", b'{"request_id": "a", "rating": 6}', "rating", "1 to 5"),
    ("rating a float", b'{"request_id": "a", "rating": 4.5}', "rating", "whole number"),
    ("rating a bool", b'{"request_id": "a", "rating": true}', "rating", "whole number"),
    ("rating a string", b'{"request_id": "a", "rating": "5"}', "rating", "whole number"),
    ("flags not a list", b'{"request_id": "a", "flags": "nsfw"}', "flags", "expected a list"),
    ("unknown flag", b'{"request_id": "a", "flags": ["nsfw", "ugly"]}', "flags.1", "expected one of nsfw"),
    ("flag not a string", b'{"request_id": "a", "flags": [{}]}', "flags.0", "expected one of"),
    ("flag twice", b'{"request_id": "a", "flags": ["other", "other"]}', "flags.1", "listed twice"),
    ("comment not a string", b'{"request_id": "a", "comment": 5}', "comment", "expected a string"),
    ("comment too long", json.dumps({"request_id": "a", "comment": "x" * (MAX_COMMENT_CHARS + 1)}).encode(), "comment",
     f"2001 characters; the limit is {MAX_COMMENT_CHARS}"),
    ("comment with a lone surrogate", b'{"request_id": "a", "comment": "\\ud800"}', "comment", "surrogate"),
    ("unknown field", b'{"request_id": "a", "rating": 3, "stars": 5}', "stars", "unknown field"),
    ("nothing to say", b'{"request_id": "a"}', "body", "at least one of rating, flags, comment"),
    ("only blanks", b'{"request_id": "a", "flags": [], "comment": "  "}', "body", "at least one of"),
]


@pytest.mark.parametrize("case, body, field, fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_every_refused_feedback_names_its_field(case: str, body: bytes, field: str, fragment: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_feedback(body)
    assert caught.value.status == 422 and caught.value.problems[0][0] == field and fragment in caught.value.problems[0][1], case


def test_accepted_feedback_is_normalized() -> None:
    assert parse_feedback(json.dumps({"request_id": RID, "rating": 5, "flags": ["other", "nsfw"], "comment": "ok"}).encode()) == {
        "request_id": RID, "rating": 5, "flags": ["nsfw", "other"], "comment": "ok"}
    assert parse_feedback(b'{"request_id": "r.1:x_y-z", "flags": ["artifact"], "rating": null}') == {
        "request_id": "r.1:x_y-z", "rating": None, "flags": ["artifact"], "comment": None}


def test_client_key_hashes_the_explicit_client_else_the_first_forwarded_hop_else_the_peer() -> None:
    assert client_key("alice", "1.2.3.4", "5.6.7.8") == client_key("alice", None, None) != client_key("bob", None, None)
    assert client_key(None, "1.2.3.4, 10.0.0.1", "5.6.7.8") == client_key(None, None, "1.2.3.4") != client_key(None, None, "5.6.7.8")
    assert "1.2.3.4" not in client_key(None, "1.2.3.4", None) and len(client_key(None, None, None)) == 16


def answer(at: float, version: str = "v1", prompt: str = "a red cube") -> dict[str, Any]:
    return generation(at, version, {"prompt": prompt, "negative_prompt": "blur", "steps": 2, "seed": None}, {"seed": 42, "steps": 2})


def test_a_remembered_answer_keeps_the_prompt_hash_seed_and_parameters_never_the_prompt() -> None:
    remembered = answer(10.0)
    assert remembered["seed"] == 42 and remembered["params"] == {"steps": 2} and len(remembered["prompt_sha256"]) == 64
    assert "a red cube" not in json.dumps(remembered) and "blur" not in json.dumps(remembered)


def test_feedback_attaches_within_the_window_and_the_cap_and_a_repeat_replaces() -> None:
    book = FeedbackBook(retention_s=100, remembered=3, kept=10, epoch="e1")
    for index in range(4):
        book.remember(f"r{index}", answer(1000.0 + index, version=f"v{index % 2}"))
    assert book.attach("r0", "c", {"rating": 5}, 1004.0) is None  # past the cap of 3: the oldest went
    first = book.attach("r1", "c", {"rating": 2, "flags": []}, 1004.0)
    assert first is not None and first["version"] == "v1" and first["seed"] == 42 and first["seq"] == 1
    book.attach("r1", "c", {"rating": 4, "flags": ["artifact"]}, 1005.0)
    book.attach("r1", "other", {"rating": 1, "flags": []}, 1006.0)
    read = book.since(None, 0)
    assert [(e["client"], e["rating"], e["seq"]) for e in read["entries"]] == [("c", 4, 2), ("other", 1, 3)]
    assert read["epoch"] == "e1" and read["first"] == 2 and book.since("e1", 2)["entries"][0]["seq"] == 3
    assert book.since("another", 3)["entries"] == read["entries"]  # a reader of another tally reads this one from its start
    assert book.attach("r2", "c", {"rating": 3}, 1102.1) is None  # answered at 1002: past the 100 s window


def test_entries_past_the_cap_are_dropped_oldest_first_and_the_reader_can_tell() -> None:
    book = FeedbackBook(kept=2, epoch="e")
    book.remember("r", answer(1.0))
    for client in "abc":
        book.attach("r", client, {"rating": 3}, 2.0)
    read = book.since("e", 0)
    assert read["first"] == 2 and [e["client"] for e in read["entries"]] == ["b", "c"]


def send(served: Router, body: bytes, headers: dict[str, bytes] | None = None) -> tuple[int, dict[str, Any]]:
    response, document = call(served, path="/demo/feedback", body=body, headers={"X-Request-Id": b"fb-1", **(headers or {})})
    return response.status_code, document


def test_the_router_answers_202_naming_the_version_404_for_an_unknown_id_and_422_naming_the_field(monkeypatch) -> None:
    served = router(monkeypatch, config=CONFIG)
    monkeypatch.setattr(served, "attach_waits", (0.0,))
    generated, _ = call(served, headers={"X-Request-Id": RID.encode()})
    version = generated.headers["X-Diffops-Version"]
    status, accepted = send(served, json.dumps({"request_id": RID, "rating": 4}).encode())
    assert status == 202 and accepted == {"release": "demo", "request_id": RID, "version": version, "status": "accepted"}
    status, missing = send(served, b'{"request_id": "never-answered", "rating": 4}')
    assert status == 404 and missing["field"] == "request_id" and "never answered request 'never-answered'" in missing["detail"]
    status, refused = send(served, b'{"request_id": "x", "rating": 9}')
    assert status == 422 and refused["field"] == "rating" and refused["request_id"] == "fb-1"
    read, page = call(served, method="GET", path="/demo/feedback", query=b"after=0")
    assert read.status_code == 200 and [(e["request_id"], e["rating"], e["version"]) for e in page["entries"]] == [(RID, 4, version)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
                 lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
                 max_leaves=12).map(lambda data: json.dumps(data).encode()),
    st.fixed_dictionaries({"request_id": st.sampled_from([RID, "gone", ""]) | st.text(max_size=20)},
                          optional={"rating": st.integers(-2, 8) | st.text(max_size=3), "comment": st.text(max_size=50),
                                    "flags": st.lists(st.sampled_from([*FLAGS, "x"]) | st.integers(), max_size=5)}
                          ).map(lambda data: json.dumps(data).encode()),
))
def test_any_feedback_body_is_answered_202_404_or_422_never_a_5xx(monkeypatch, body: bytes) -> None:
    served = router(monkeypatch, config=CONFIG)
    monkeypatch.setattr(served, "attach_waits", (0.0,))
    call(served, headers={"X-Request-Id": RID.encode()})
    status, document = send(served, body)
    assert status in (202, 404, 422), (status, document)
    if status == 422:
        assert document.get("field"), document  # every refusal names what to fix


class TallyAtOurBoundary:
    """The router's `GET /<release>/feedback`, answered from a real `FeedbackBook`; `fail_after` pages, it stops answering."""

    def __init__(self, book: FeedbackBook, fail_after: int | None = None):
        self.book, self.fail_after, self.reads = book, fail_after, 0

    def router_feedback(self, release: str, epoch: str | None, after: int, limit: int) -> dict[str, Any] | None:
        self.reads += 1
        if self.fail_after is not None and self.reads > self.fail_after:
            raise ConnectionError("the proxy went away")
        return json.loads(json.dumps(self.book.since(epoch, after, limit)))  # what crosses HTTP


def filled_book(count: int, epoch: str = "e1") -> FeedbackBook:
    book = FeedbackBook(epoch=epoch)
    for index in range(count):
        book.remember(f"r{index}", answer(float(index), version="v1" if index % 3 else "v2"))
        book.attach(f"r{index}", "c", {"rating": index % 5 + 1, "flags": ["nsfw"] if index % 4 == 0 else [], "comment": None},
                    float(index))
    return book


def test_a_read_cut_short_resumes_from_the_stored_cursor_and_stores_every_entry_once(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("controller.quality.PAGE", 10)
    store, book = Store(tmp_path / "state.db"), filled_book(25)
    with pytest.raises(ConnectionError):
        drain(TallyAtOurBoundary(book, fail_after=2), "demo", store.db)  # two pages stored, the third read failed
    assert len(feedback_rows(store.db, "demo")) == 20
    assert len(drain(TallyAtOurBoundary(book), "demo", store.db)) == 5
    assert drain(TallyAtOurBoundary(book), "demo", store.db) == []
    rows = feedback_rows(store.db, "demo")
    assert len(rows) == 25 == len({r["request_id"] for r in rows})


def test_a_repeat_replaces_the_stored_answer_and_a_restarted_tally_is_read_from_its_start(tmp_path: Path) -> None:
    store, book = Store(tmp_path / "state.db"), filled_book(3)
    drain(TallyAtOurBoundary(book), "demo", store.db)
    book.attach("r1", "c", {"rating": 1, "flags": ["artifact"], "comment": "smudged"}, 50.0)
    drain(TallyAtOurBoundary(book), "demo", store.db)
    restarted = filled_book(0, epoch="e2")
    restarted.remember("fresh", answer(60.0, version="v2"))
    restarted.attach("fresh", "c", {"rating": 5, "flags": [], "comment": None}, 61.0)
    drain(TallyAtOurBoundary(restarted), "demo", store.db)
    rows = {r["request_id"]: r for r in feedback_rows(store.db, "demo")}
    assert set(rows) == {"r0", "r1", "r2", "fresh"}
    assert (rows["r1"]["rating"], rows["r1"]["flags"], rows["r1"]["comment"]) == (1, ["artifact"], "smudged")


def test_summary_and_quality_command_show_ratings_and_flags_per_version(tmp_path: Path) -> None:
    store = Store(tmp_path / "state" / "state.db")
    drain(TallyAtOurBoundary(filled_book(12)), "demo", store.db)
    summary = {v["version"]: v for v in summarize(feedback_rows(store.db, "demo"))}
    v2 = summary["v2"]  # requests 0, 3, 6, 9: ratings 1, 4, 2, 5; nsfw on 0 and 8 -> only 0 is v2's
    assert v2["feedback"] == 4 and v2["ratings"]["mean"] == 3.0 and v2["ratings"]["histogram"] == {"1": 1, "2": 1, "3": 0, "4": 1, "5": 1}
    assert v2["flags"]["nsfw"] == {"count": 1, "rate": 0.25} and summary["v1"]["flags"]["nsfw"]["count"] == 2
    store.close()
    result = CliRunner().invoke(main, ["quality", "demo", "--state-dir", str(tmp_path / "state"), "-o", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["release"] == "demo" and {v["version"]: v["feedback"] for v in data["versions"]} == {"v1": 8, "v2": 4}
    text = CliRunner().invoke(main, ["quality", "demo", "--state-dir", str(tmp_path / "state")]).output
    assert "v2: 4 feedback (0 from reviewers), 4 rated, mean 3.00" in text and "nsfw 1 (25%)" in text
    empty = CliRunner().invoke(main, ["quality", "other", "--state-dir", str(tmp_path / "state")])
    assert empty.exit_code == 0 and "other: no feedback or samples stored yet" in empty.output
    missing = CliRunner().invoke(main, ["quality", "demo", "--state-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no state file" in missing.output


def test_feedback_counters_start_from_the_state_file_and_count_what_is_stored(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    drain(TallyAtOurBoundary(filled_book(4)), "demo", store.db)
    metrics = ControllerMetrics(CollectorRegistry())
    metrics.seed_feedback(*feedback_counts(store.db))
    metrics.count_feedback("demo", [{"version": "v1", "rating": None, "flags": ["artifact", "nsfw"]}])
    value = metrics.registry.get_sample_value
    assert value("diffops_feedback_total", {"release": "demo", "version": "v2", "rating": "1"}) == 1  # request 0
    assert value("diffops_feedback_total", {"release": "demo", "version": "v1", "rating": "none"}) == 1
    assert value("diffops_flags_total", {"release": "demo", "version": "v1", "flag": "nsfw"}) == 1
    assert value("diffops_flags_total", {"release": "demo", "version": "v2", "flag": "nsfw"}) == 1


def test_a_body_at_the_cap_is_read_and_one_byte_more_is_refused_unread(monkeypatch) -> None:
    served = router(monkeypatch, config=CONFIG)
    monkeypatch.setattr(served, "attach_waits", (0.0,))
    call(served, headers={"X-Request-Id": RID.encode()})
    body = json.dumps({"request_id": RID, "rating": 3}).encode()
    at_cap = body[:-1] + b" " * (MAX_FEEDBACK_BYTES - len(body)) + b"}"  # valid JSON, padded to exactly the cap
    assert len(at_cap) == MAX_FEEDBACK_BYTES
    assert send(served, at_cap)[0] == 202
    status, refused = send(served, at_cap + b" ")
    assert status == 413, refused
