"""One analysis interval's verdict on a version's live figures, whichever provider reads them. Pure.

The canary walk (`controller.rollout.canary`) and the post-promotion watch
(`controller.rollout.post_promotion`) call `assess` once per
`analysis.interval` with the figures the observe phase read for the version
under analysis (`controller.tick.observe`). `provider: builtin` judges the
router's own figures (`judge`: error rate, p95 latency and NSFW rate of the
requests the router assigned by weight; pinned previews never count; fewer than
`min_requests` is inconclusive) and the version's quality so far (mean rating,
flag rate, CLIP score: `quality_failures`). `provider: prometheus` judges the interval's
PromQL readings (`controller.rollout.prometheus.judge_queries`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from controller.parse.release import Analysis, Rollout
from controller.rollout.outcomes import AnalysisVerdict, Figures
from controller.rollout.prometheus import judge_queries
from controller.state.records import ReleaseRecord, VersionRecord

__all__ = ["WATCH", "Subject", "assess", "judge", "judges_quality", "pinned_requests", "quality_failures", "subject"]

WATCH = "post-promotion"  # `kind` of a release's recorded analysis while a promoted version is watched


@dataclass(frozen=True)
class Subject:
    """The version whose live figures this tick's step judges, by which analysis, and whether an interval ends now."""

    version: str
    analysis: Analysis
    due: bool


def subject(record: ReleaseRecord | None, versions: Iterable[VersionRecord], rollout: Rollout, now: float) -> Subject | None:
    """A ready canary walking its steps, or a promoted version under its post-promotion watch; None: nothing is judged."""
    if record is None:
        return None
    live = list(versions)
    canary = next((v for v in live if v.role == "canary" and v.status == "ready"), None)
    watch = record.analysis or {}
    if canary is not None:
        version, analysis = canary.version, rollout.analysis
    elif watch.get("kind") == WATCH and watch.get("started_at") is not None and any(
            v.role == "stable" and v.version == watch.get("version") for v in live):
        version, analysis = str(watch["version"]), rollout.watch_analysis
    else:
        return None
    started = record.analysis_at if record.analysis_at is not None else now
    return Subject(version, analysis, now - started >= analysis.interval.total_seconds())


def pinned_requests(figures: Figures) -> int:
    """Requests pinned with X-Diffops-Version (previews): reported beside the judged ones, never judged."""
    pinned = figures.get("pinned")
    return int(pinned.get("requests", 0)) if isinstance(pinned, dict) else 0


def judges_quality(analysis: Analysis) -> bool:
    """Whether the analysis reads the version's quality so far (ratings, flags, CLIP score)."""
    return analysis.provider == "builtin" and any(
        value is not None for value in (analysis.min_mean_rating, analysis.max_flag_rate, analysis.min_clip_score))


def quality_failures(quality: Figures | None, analysis: Analysis) -> list[str]:
    """The version's quality so far against the thresholds (`controller.quality.figures`): ratings and flags once it
    has min_ratings feedback, CLIP score once it has min_ratings scores; fewer judge nothing."""
    q, reasons = dict(quality or {}), []
    enough = analysis.min_ratings
    mean, ratings = q.get("mean_rating"), int(q.get("ratings", 0))
    if analysis.min_mean_rating is not None and mean is not None and ratings >= enough and mean < analysis.min_mean_rating:
        reasons.append(f"mean rating {mean:.2f} < {analysis.min_mean_rating} ({ratings} ratings)")
    feedback, flagged = int(q.get("feedback", 0)), int(q.get("flagged", 0))
    if analysis.max_flag_rate is not None and feedback >= enough and flagged / feedback > analysis.max_flag_rate:
        reasons.append(f"flag rate {flagged / feedback:.2f} > {analysis.max_flag_rate} ({flagged} of {feedback} feedback)")
    clip, scores = q.get("mean_clip_score"), int(q.get("clip_scores", 0))
    if analysis.min_clip_score is not None and clip is not None and scores >= enough and clip < analysis.min_clip_score:
        reasons.append(f"mean CLIP score {clip:.2f} < {analysis.min_clip_score} ({scores} scored samples)")
    return reasons


def judge(stats: Figures | None, analysis: Analysis) -> AnalysisVerdict:
    """One interval's verdict on the router's judged figures (pinned previews never count) and the version's quality
    so far against the thresholds. What users say fails a version even in an interval with too few requests."""
    figures = dict(stats or {})
    requests, errors = int(figures.get("requests", 0)), int(figures.get("errors", 0))
    reasons = quality_failures(figures.get("quality"), analysis)
    if requests < analysis.min_requests:
        pinned = pinned_requests(figures)
        aside = f" ({pinned} pinned previews not counted)" if pinned else ""
        if reasons:
            return AnalysisVerdict("failed", tuple(reasons), figures)
        return AnalysisVerdict("inconclusive", (f"{requests} judged requests < min_requests {analysis.min_requests}{aside}",), figures)
    rate = errors / requests if requests else 0.0
    figures["error_rate"] = round(rate, 4)
    if rate > analysis.max_error_rate:
        reasons.insert(0, f"error rate {rate:.2f} > {analysis.max_error_rate}")
    p95 = figures.get("p95_latency_s")
    if analysis.max_p95_latency_s is not None and p95 is not None and p95 > analysis.max_p95_latency_s:
        reasons.append(f"p95 latency {p95:.2f}s > {analysis.max_p95_latency_s}s")
    nsfw = int(figures.get("nsfw", 0))
    figures["nsfw_rate"] = round(nsfw / requests, 4) if requests else 0.0
    if analysis.max_nsfw_rate is not None and requests and nsfw / requests > analysis.max_nsfw_rate:
        reasons.append(f"NSFW rate {nsfw / requests:.2f} > {analysis.max_nsfw_rate} ({nsfw} of {requests} answers flagged)")
    return AnalysisVerdict("failed" if reasons else "passed", tuple(reasons), figures)


def assess(stats: Figures | None, analysis: Analysis) -> AnalysisVerdict:
    """The interval's verdict from the release's analysis provider."""
    if analysis.provider == "prometheus" and analysis.prometheus is not None:
        return judge_queries(stats, analysis.prometheus.queries)
    return judge(stats, analysis)
