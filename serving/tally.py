"""The release's answer tally: one Serve deployment beside the routers, holding what every router replica answered.

Routers scale out (`spec.ingress.replicas`), but the canary analysis must judge all of a version's traffic, not
the share one router replica happened to see. Each router replica sends every answer here (fire and forget: a
request never waits on the tally), and `GET /<release>`, whichever router replica answers it, reads the figures
from here. Judged answers (assigned by weight) and pinned previews (`X-Diffops-Version`) are kept in windows of
their own, so previews can never push judged answers out.

Model replicas report their work here too (`work`: pipeline seconds and images per batch, fire and forget), kept as
running totals per version under an `epoch` that changes when the tally restarts; `GET /<release>/work` answers
them, and the controller's cost accounting (`controller.cost`) takes the differences between two reads. The same
answer carries each version's latest replica start by phase (`loaded`: fetch, verify, load, warm-up), which the
controller keeps for `diffops status`.

It also holds the release's `serving.feedback.FeedbackBook`: what each answered generation was (so feedback attaches
to the version that drew it) and the feedback sent on it, until the controller has read it (`GET /<release>/feedback`).
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Iterable
from typing import Any

from serving.feedback import RETENTION_S, Entry, FeedbackBook
from serving.stats import p95

__all__ = ["STATS_WINDOW", "Answer", "Tally", "figures", "window_stats"]

STATS_WINDOW = 20_000  # recent answers kept for canary analysis, per kind (judged, pinned)

Answer = tuple[float, str, bool, float, bool]  # (epoch seconds, version, ok, seconds, an image flagged NSFW)


def figures(answers: list[tuple[bool, float, bool]]) -> dict[str, Any]:
    """Requests, errors (5xx), p95 latency of those served, and answers with an image the safety checker flagged."""
    latencies = sorted(seconds for ok, seconds, _ in answers if ok)
    return {"requests": len(answers), "errors": sum(1 for ok, _, _ in answers if not ok), "p95_latency_s": p95(latencies),
            "nsfw": sum(1 for _, _, nsfw in answers if nsfw)}


def window_stats(judged: Iterable[Answer], pinned: Iterable[Answer], since: float) -> dict[str, dict[str, Any]]:
    """Per version since `since` (epoch seconds): the judged figures at the top level, pinned previews under `pinned`."""
    per: dict[str, tuple[list[tuple[bool, float, bool]], list[tuple[bool, float, bool]]]] = {}
    for kind, answers in enumerate((judged, pinned)):
        for at, version, ok, seconds, nsfw in answers:
            if at >= since:
                per.setdefault(version, ([], []))[kind].append((ok, seconds, nsfw))
    return {version: {**figures(mine), "pinned": figures(previews)} for version, (mine, previews) in per.items()}


class Tally:
    """The windows of one release's answers, shared by all of its router replicas (a single-replica deployment)."""

    def __init__(self, feedback_retention_s: float = RETENTION_S) -> None:
        self.book = FeedbackBook(feedback_retention_s)
        self.judged: deque[Answer] = deque(maxlen=STATS_WINDOW)
        self.pinned: deque[Answer] = deque(maxlen=STATS_WINDOW)
        self.epoch = uuid.uuid4().hex[:12]  # a new tally (restarted): the controller starts its differences afresh
        self.busy: dict[str, list[float]] = {}  # version -> [pipeline seconds, images], running totals
        self.loads: dict[str, dict[str, float]] = {}  # version -> its latest replica start, seconds by phase

    def work(self, version: str, seconds: float, images: int) -> None:
        """A replica's batch: `seconds` of pipeline time (summed over the replicas of a version) making `images`."""
        totals = self.busy.setdefault(str(version), [0.0, 0])
        totals[0] += float(seconds)
        totals[1] += int(images)

    def loaded(self, version: str, phases: dict[str, float]) -> None:
        """A replica of `version` started: seconds by phase (`serving.model_server.load_phases`); the latest start is kept."""
        self.loads[str(version)] = {str(phase): float(seconds) for phase, seconds in phases.items()}

    def work_totals(self) -> dict[str, Any]:
        """{"epoch": ..., "versions": {version: {"busy_s": seconds, "images": n}}, "loads": {version: {phase: seconds}}}
        since this tally started."""
        versions = {v: {"busy_s": busy, "images": int(images)} for v, (busy, images) in self.busy.items()}
        return {"epoch": self.epoch, "versions": versions, "loads": dict(self.loads)}

    def answered(self, answer: Answer, pinned: bool, drawn: tuple[str, Entry] | None = None) -> None:
        """A router replica's answer, and for one that served, (request id, what drew it) to attach feedback to."""
        (self.pinned if pinned else self.judged).append(tuple(answer))  # type: ignore[arg-type]  # a list after the trip
        if drawn is not None:
            self.book.remember(*drawn)

    def stats(self, since: float) -> dict[str, dict[str, Any]]:
        return window_stats(self.judged, self.pinned, since)

    def attach(self, request_id: str, client: str, feedback: Entry, now: float) -> Entry | None:
        return self.book.attach(request_id, client, feedback, now)

    def feedback_since(self, epoch: str | None, after: int, limit: int) -> Entry:
        return self.book.since(epoch, after, limit)
