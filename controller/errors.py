"""The controller's error taxonomy, and its one mapping to phase, log and retry. Pure.

Three kinds, decided where an error is raised:

- `TemporaryError`: trouble outside us that passes (git remote, Ray dashboard,
  a locked state file). The tick ends early and is retried after a capped
  exponential backoff with jitter; the base delay is the error's own.
- `WaitingError`: work that is not finished yet; the tick ends early, quietly.
- `ReleaseError`: a failure that belongs to one release (a name held by
  another controller, a file or model it cannot use): that release's phase and
  message; never raised past the release.

Anything else is unexpected (a bug): caught around each release's step, its
traceback logged once, the release marked with a one-line summary, the loop
and the other releases go on. `controller.reconciler` calls `tick_outcome`,
`controller.tick.decide` calls `release_outcome`, and nothing else decides.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from controller.state.records import Phase

__all__ = ["ReleaseError", "ReleaseOutcome", "TemporaryError", "TickOutcome", "WaitingError", "backoff", "classify", "release_outcome",
           "summary", "tick_outcome"]

RETRY_CAP_S = 60.0  # the longest a temporary failure waits between tries
UNEXPECTED_RETRY_S = 2.0  # base delay after an unclassified exception outside any release's step
SUMMARY_CHARS = 300


class TemporaryError(Exception):
    """Trouble that passes: the tick ends early and is retried after `retry_in` seconds (doubled while it lasts)."""

    def __init__(self, message: str, retry_in: float = 2.0):
        super().__init__(message)
        self.retry_in = retry_in


class WaitingError(Exception):
    """Work not finished: the tick ends early, without an error, and looks again after `retry_in` seconds."""

    def __init__(self, message: str, retry_in: float = 1.0):
        super().__init__(message)
        self.retry_in = retry_in


class ReleaseError(Exception):
    """One release cannot go on: it takes this phase and message until its file changes or `diffops retry`."""

    def __init__(self, message: str, phase: Phase = "Failed"):
        super().__init__(message)
        self.phase: Phase = phase


def summary(err: BaseException) -> str:
    """`Type: first line of the message`, at most SUMMARY_CHARS, for a phase message or a log line."""
    lines = str(err).strip().splitlines()
    text = f"{type(err).__name__}: {lines[0].strip()}" if lines else type(err).__name__
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


def classify(err: BaseException) -> TemporaryError | WaitingError | ReleaseError | None:
    """The taxonomy's reading of an error; errors of modules that predate it are mapped here. None: unexpected."""
    from controller.source.git_source import SourceError
    from controller.source.signatures import SignatureError

    if isinstance(err, (TemporaryError, WaitingError, ReleaseError)):
        return err
    if isinstance(err, SourceError):  # git: a fetch that failed, a ref not there (yet)
        return TemporaryError(f"git: {err}", retry_in=5.0)
    if isinstance(err, SignatureError):  # git verify-commit could not run
        return TemporaryError(f"signature check: {err}", retry_in=5.0)
    if isinstance(err, sqlite3.OperationalError) and ("locked" in str(err) or "busy" in str(err)):
        return TemporaryError(f"state store: {err}", retry_in=1.0)
    return None


def backoff(base: float, attempt: int, rand: Callable[[], float], cap: float = RETRY_CAP_S) -> float:
    """Delay before try `attempt + 1`: base·2^(attempt-1), capped, with jitter in [½, 1] of that (never 0)."""
    delay = min(cap, base * 2.0 ** max(0, attempt - 1))
    return delay / 2 + delay / 2 * rand()


@dataclass(frozen=True)
class TickOutcome:
    result: str  # diffops_reconciles_total{result}: error | waiting
    retry_in: float
    message: str
    traceback: bool  # unexpected: log the traceback (once per distinct summary)


def tick_outcome(err: BaseException, attempt: int, rand: Callable[[], float]) -> TickOutcome:
    """A tick that raised: what to count, how long to wait, what to say. `attempt`: consecutive failed ticks, from 1."""
    kind = classify(err)
    if isinstance(kind, WaitingError):
        return TickOutcome("waiting", kind.retry_in, f"waiting: {kind}", False)
    if isinstance(kind, TemporaryError):
        delay = backoff(kind.retry_in, attempt, rand)
        return TickOutcome("error", delay, f"reconcile stopped: {kind}; next: retry in {delay:.1f}s (try {attempt + 1})", False)
    delay = backoff(UNEXPECTED_RETRY_S, attempt, rand)
    return TickOutcome("error", delay, f"reconcile failed unexpectedly: {summary(err)}; next: retry in {delay:.1f}s "
                                       "(a bug: please report it with the traceback)", True)


@dataclass(frozen=True)
class ReleaseOutcome:
    phase: Phase | None  # None: leave the release as it was
    message: str
    traceback: bool
    end_tick: bool  # temporary: the whole tick ends early and is retried


def release_outcome(err: BaseException, serving: bool) -> ReleaseOutcome:
    """One release's step raised. `serving`: a version of it is taking traffic (kept unchanged either way)."""
    kind = classify(err)
    if isinstance(kind, TemporaryError):
        return ReleaseOutcome(None, str(kind), False, end_tick=True)
    if isinstance(kind, WaitingError):
        return ReleaseOutcome(None, str(kind), False, end_tick=False)
    if isinstance(kind, ReleaseError):
        return ReleaseOutcome(kind.phase, str(kind), False, end_tick=False)
    phase: Phase = "Degraded" if serving else "Failed"
    keeps = "what serves is unchanged" if serving else "nothing is serving"
    return ReleaseOutcome(phase, f"reconcile step failed: {summary(err)}; {keeps}; next: retried every tick "
                                 "(traceback in the controller log)", True, end_tick=False)
