"""The error taxonomy's one mapping, as tables: a tick's error -> count, delay, log; a release's error -> phase, message."""

from __future__ import annotations

import sqlite3

import pytest

from controller.apply.serve_client import ServeError
from controller.errors import ReleaseError, TemporaryError, WaitingError, backoff, release_outcome, summary, tick_outcome
from controller.source.git_source import SourceError
from controller.source.signatures import SignatureError

LOW, HIGH = (lambda: 0.0), (lambda: 1.0)


@pytest.mark.parametrize("base, attempt, rand, expected", [
    (2.0, 1, HIGH, 2.0), (2.0, 2, HIGH, 4.0), (2.0, 3, HIGH, 8.0), (2.0, 5, HIGH, 32.0),
    (2.0, 6, HIGH, 60.0), (2.0, 50, HIGH, 60.0),  # capped
    (2.0, 1, LOW, 1.0), (2.0, 3, LOW, 4.0), (2.0, 50, LOW, 30.0),  # jitter keeps at least half: never a busy loop
    (5.0, 2, lambda: 0.5, 7.5),
])
def test_backoff_table(base, attempt, rand, expected):
    assert backoff(base, attempt, rand) == pytest.approx(expected)


@pytest.mark.parametrize("err, attempt, result, retry_in, says, traceback", [
    (ServeError("Ray dashboard at http://x unreachable"), 1, "error", 2.0, "Ray dashboard at http://x unreachable", False),
    (ServeError("Ray dashboard at http://x unreachable"), 3, "error", 8.0, "retry in 8.0s (try 4)", False),
    (SourceError("fetch from origin failed"), 1, "error", 5.0, "git: fetch from origin failed", False),
    (SignatureError("gpg timed out"), 2, "error", 10.0, "signature check: gpg timed out", False),
    (sqlite3.OperationalError("database is locked"), 1, "error", 1.0, "state store: database is locked", False),
    (TemporaryError("object store slow", retry_in=0.5), 2, "error", 1.0, "object store slow", False),
    (WaitingError("job pending", retry_in=3.0), 4, "waiting", 3.0, "waiting: job pending", False),
    (KeyError("spec"), 1, "error", 2.0, "reconcile failed unexpectedly: KeyError: 'spec'", True),
    (sqlite3.OperationalError("no such table: x"), 1, "error", 2.0, "OperationalError: no such table: x", True),
])
def test_tick_outcome_table(err, attempt, result, retry_in, says, traceback):
    outcome = tick_outcome(err, attempt, HIGH)
    assert (outcome.result, outcome.retry_in, outcome.traceback) == (result, pytest.approx(retry_in), traceback)
    assert says in outcome.message


@pytest.mark.parametrize("err, serving, phase, says, traceback, end_tick", [
    (RuntimeError("boom"), True, "Degraded", "reconcile step failed: RuntimeError: boom; what serves is unchanged", True, False),
    (RuntimeError("boom"), False, "Failed", "reconcile step failed: RuntimeError: boom; nothing is serving", True, False),
    (ValueError("line one\nline two"), True, "Degraded", "ValueError: line one;", True, False),
    (ReleaseError("name taken", "Failed"), True, "Failed", "name taken", False, False),
    (ReleaseError("file broken", "Invalid"), False, "Invalid", "file broken", False, False),
    (ServeError("Ray unreachable"), True, None, "Ray unreachable", False, True),
    (WaitingError("later"), True, None, "later", False, False),
])
def test_release_outcome_table(err, serving, phase, says, traceback, end_tick):
    outcome = release_outcome(err, serving)
    assert (outcome.phase, outcome.traceback, outcome.end_tick) == (phase, traceback, end_tick)
    assert says in outcome.message


def test_summary_is_one_bounded_line():
    assert summary(RuntimeError("a\nb")) == "RuntimeError: a"
    assert summary(RuntimeError()) == "RuntimeError"
    assert len(summary(ValueError("x" * 5000))) == 300


@pytest.mark.parametrize("err, kind, retry_in, phase", [
    (TemporaryError("remote slow"), "error", 2.0, None),  # the documented default delays and phase
    (WaitingError("job pending"), "waiting", 1.0, None),
    (ReleaseError("cannot use the model"), None, None, "Failed"),
    (sqlite3.OperationalError("database is busy"), "error", 1.0, None),  # busy is the locked file's other word
])
def test_defaults_of_the_taxonomy(err, kind, retry_in, phase):
    if kind is not None:
        outcome = tick_outcome(err, 1, HIGH)
        assert (outcome.result, outcome.retry_in) == (kind, pytest.approx(retry_in))
    else:
        assert release_outcome(err, serving=True).phase == phase


@pytest.mark.parametrize("message, expected", [
    ("  padded first line  \nsecond", "ValueError: padded first line"),
    ("x" * (300 - len("ValueError: ")), "ValueError: " + "x" * (300 - len("ValueError: "))),  # exactly 300: kept whole
    ("x" * 400, "ValueError: " + "x" * (299 - len("ValueError: ")) + "…"),  # over: cut to 299 and an ellipsis
])
def test_summary_table(message, expected):
    assert summary(ValueError(message)) == expected


def test_the_taxonomy_defaults_when_raised_where_they_are_decided():
    def raised(make):
        try:
            raise make()
        except Exception as err:  # noqa: BLE001 - the point is what the mapping makes of it
            return err

    assert tick_outcome(raised(lambda: WaitingError("job pending")), 1, HIGH).retry_in == pytest.approx(1.0)
    assert tick_outcome(raised(lambda: TemporaryError("remote slow")), 1, HIGH).retry_in == pytest.approx(2.0)
    assert release_outcome(raised(lambda: ReleaseError("cannot use the model")), serving=False).phase == "Failed"
    unexpected = tick_outcome(raised(lambda: KeyError("spec")), 1, HIGH).message
    assert unexpected.endswith("(a bug: please report it with the traceback)")
    assert release_outcome(raised(lambda: KeyError("spec")), serving=True).message.endswith("(traceback in the controller log)")
