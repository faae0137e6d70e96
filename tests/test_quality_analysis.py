"""Quality in canary and post-promotion analysis: the NSFW rate of the interval's answers, and what users and
reviewers said about the version so far (mean rating, flag rate) and its CLIP score, each against its threshold."""

from __future__ import annotations

import pytest

from controller.parse.release import Analysis
from controller.rollout.analysis import judge

ANALYSIS = Analysis(min_requests=5, max_nsfw_rate=0.1, min_mean_rating=3.0, max_flag_rate=0.2, min_ratings=4, min_clip_score=20)
TRAFFIC = {"requests": 20, "errors": 0, "p95_latency_s": 0.5, "nsfw": 0}
LIKED = {"feedback": 10, "ratings": 10, "mean_rating": 4.2, "flagged": 1, "clip_scores": 10, "mean_clip_score": 27.0}

CASES = [
    ("good traffic, liked", {**TRAFFIC, "quality": LIKED}, "passed", None),
    ("every answer flagged NSFW", {**TRAFFIC, "nsfw": 20, "quality": LIKED}, "failed", "NSFW rate 1.00 > 0.1 (20 of 20 answers flagged)"),
    ("NSFW at the limit", {**TRAFFIC, "nsfw": 2, "quality": LIKED}, "passed", None),
    ("rated 1", {**TRAFFIC, "quality": {**LIKED, "mean_rating": 1.0}}, "failed", "mean rating 1.00 < 3.0 (10 ratings)"),
    ("rated 1 by too few", {**TRAFFIC, "quality": {**LIKED, "ratings": 3, "mean_rating": 1.0}}, "passed", None),
    ("rated 1 with too little traffic: users fail it anyway", {"requests": 1, "errors": 0, "quality": {**LIKED, "mean_rating": 1.0}},
     "failed", "mean rating 1.00 < 3.0 (10 ratings)"),
    ("too little traffic, liked", {"requests": 1, "errors": 0, "quality": LIKED}, "inconclusive", "1 judged requests < min_requests 5"),
    ("flagged by users", {**TRAFFIC, "quality": {**LIKED, "flagged": 5}}, "failed", "flag rate 0.50 > 0.2 (5 of 10 feedback)"),
    ("flagged by too few", {**TRAFFIC, "quality": {**LIKED, "feedback": 3, "ratings": 3, "flagged": 3}}, "passed", None),
    ("CLIP score low", {**TRAFFIC, "quality": {**LIKED, "mean_clip_score": 12.5}}, "failed", "mean CLIP score 12.50 < 20.0 (10 scored samples)"),
    ("no quality figures yet", TRAFFIC, "passed", None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_quality_verdicts(case):
    _, stats, outcome, reason = case
    verdict = judge(stats, ANALYSIS)
    assert verdict.outcome == outcome, verdict
    assert (reason in verdict.reasons) if reason else not verdict.reasons


def test_errors_and_quality_are_both_named():
    verdict = judge({**TRAFFIC, "errors": 10, "nsfw": 20}, ANALYSIS)
    assert verdict.reasons[0] == "error rate 0.50 > 0.05" and any(r.startswith("NSFW rate") for r in verdict.reasons)
    assert verdict.figures["nsfw_rate"] == 1.0


def test_no_traffic_and_min_requests_zero_never_divides_by_zero():
    assert judge({"requests": 0, "errors": 0, "nsfw": 0}, Analysis(min_requests=0, max_nsfw_rate=0.1)).outcome == "passed"
