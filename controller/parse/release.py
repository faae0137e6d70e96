"""The `Release` resource: the controller's rollout part, composed with the others.

Serving owns model/generation/limits/runtime/replicas, checks owns checks, the
controller owns metadata, rollout and cost and composes them here. `rules`
collects every package's cross-field rules as (field path, message) pairs for
`controller.parse.loader` to place on lines.
"""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise
from typing import Any, Literal

from pydantic import Field, SerializerFunctionWrapHandler, model_serializer, model_validator

from checks.schema import ChecksSpec
from serving import schema as serving
from serving.fields import Duration, ReleaseName, SpecModel, format_duration

__all__ = ["Analysis", "Cost", "Metadata", "PostPromotion", "PrometheusAnalysis", "PrometheusQuery", "Release", "Rollout", "Spec", "Step",
           "pinned_models", "rules"]


class Metadata(SpecModel):
    name: ReleaseName
    """Release name: a DNS label without '--' (it separates release and version in app names), equal to the file stem; also the route `/<name>`."""  # noqa: E501 (one line of the JSON schema)


class Step(SpecModel):
    weight: int | None = Field(default=None, ge=0, le=100)
    """Percent of traffic to the new version."""
    pause: Duration | None = None
    """Hold before the next step; empty (`pause:`) waits for `diffops promote`."""

    @model_validator(mode="after")
    def _one_of(self) -> Step:
        if len(self.model_fields_set & {"weight", "pause"}) != 1:
            raise ValueError("a step is either {weight: N} or {pause: DURATION} (empty pause waits for promote)")
        return self

    @property
    def is_pause(self) -> bool:
        return "pause" in self.model_fields_set

    @model_serializer(mode="wrap")
    def _as_written(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Only the step's own key ({weight: N} or {pause: ...}), so a dumped spec validates again (records, gate input)."""
        data: dict[str, Any] = handler(self)
        return {key: value for key, value in data.items() if key in self.model_fields_set}


class PrometheusQuery(SpecModel):
    name: str = Field(min_length=1, max_length=63, pattern=r"^[A-Za-z0-9_.-]+$")
    """Names the query in verdicts, events and `diffops status`."""
    query: str = Field(min_length=1, max_length=4000)
    """PromQL returning one sample (a scalar, or an instant vector of one series); `{{release}}`, `{{version}}` (the
    version under analysis) and `{{interval}}` (analysis.interval as a Prometheus duration) are substituted."""
    min: float | None = None
    """The interval fails when the value is below this."""
    max: float | None = None
    """The interval fails when the value is above this."""
    inconclusive_below: float | None = None
    """A value below this judges nothing (inconclusive), e.g. a request rate too low to trust an error ratio."""
    inconclusive_above: float | None = None
    """A value above this judges nothing (inconclusive)."""


class PrometheusAnalysis(SpecModel):
    address: str = Field(pattern=r"^https?://[^\s/?#]+(/[^\s?#]*)?$", max_length=500)
    """The Prometheus server's base URL, e.g. http://127.0.0.1:9090 (its /api/v1/query is asked)."""
    queries: list[PrometheusQuery] = Field(min_length=1, max_length=16)
    """Every query is asked once per interval: any value outside min/max fails the interval; no data, a query error
    or a value in an inconclusive range makes it inconclusive (never a failure)."""
    timeout: Duration = timedelta(seconds=2)
    """Longest wait for all of one interval's queries together (the controller's tick waits on them)."""


class Analysis(SpecModel):
    provider: Literal["builtin", "prometheus"] = "builtin"
    """builtin: the router's own figures (error rate, p95 latency, min_requests); prometheus: the `prometheus` queries."""
    prometheus: PrometheusAnalysis | None = None
    """Queries for provider: prometheus (Argo Rollouts AnalysisTemplate / Flagger MetricTemplate style)."""
    interval: Duration = timedelta(seconds=10)
    """How often live canary figures are judged."""
    min_requests: int = Field(default=5, ge=0)
    """Judged requests (the router's weighted draws; pinned previews never count) an interval needs for a verdict;
    fewer make it inconclusive, and a canary step completes only after an interval of its own passed."""
    max_error_rate: float = Field(default=0.05, ge=0, le=1)
    """Largest fraction of non-2xx (excluding 4xx) answers."""
    max_p95_latency_s: float | None = Field(default=None, gt=0)
    """Largest p95 latency of the canary, seconds."""
    failure_limit: int = Field(default=2, ge=1)
    """Consecutive failed intervals that abort the rollout."""
    on_no_traffic: Literal["wait", "promote"] = "wait"
    """A step whose intervals never reach min_requests judged requests: `wait` holds it and aborts the rollout at
    rollout.progress_deadline with a not-enough-traffic reason; `promote` lets it complete unjudged (logged as such)."""
    max_nsfw_rate: float | None = Field(default=None, ge=0, le=1)
    """Largest share of the interval's judged answers whose image the safety checker flagged (needs quality.safety)."""
    min_mean_rating: float | None = Field(default=None, ge=1, le=5)
    """Smallest mean user rating (1-5) of the version's feedback so far; judged once it has min_ratings ratings."""
    max_flag_rate: float | None = Field(default=None, ge=0, le=1)
    """Largest share of the version's feedback so far that carries a flag; judged once it has min_ratings feedback."""
    min_ratings: int = Field(default=5, ge=1, le=100_000)
    """Feedback a version needs before min_mean_rating / max_flag_rate judge it; below it they judge nothing."""
    min_clip_score: float | None = Field(default=None, ge=0, le=100)
    """Smallest mean CLIP score of the version's scored samples so far (needs quality.clip); judged once it has
    min_ratings scores."""


class PostPromotion(SpecModel):
    duration: Duration = timedelta(minutes=5)
    """How long the new version is watched after it reached 100%; at most rollout.scale_down_delay (the standby must
    stay warm for the whole watch)."""
    analysis: Analysis | None = None
    """The watch's analysis; rollout.analysis when unset. failure_limit failed intervals in a row switch traffic back
    to the warm standby at once."""


class Rollout(SpecModel):
    strategy: Literal["bluegreen", "canary", "auto"] = "bluegreen"
    """bluegreen: start the new version beside the old, switch at once; canary: shift by steps;
    auto: blue/green when the cluster has room for both, else a surge-limited rollout that shrinks the old version as the new one grows."""
    steps: list[Step] = Field(default_factory=list, max_length=64)
    """Canary steps, ending at weight 100."""
    analysis: Analysis = Field(default_factory=Analysis)
    """Canary analysis of live traffic."""
    scale_down_delay: Duration = timedelta(minutes=10)
    """How long the previous version stays warm as standby (instant revert)."""
    progress_deadline: Duration = timedelta(minutes=10)
    """Longest a rollout may take to get ready before it is failed (extended by measured load time)."""
    post_promotion: PostPromotion | None = None
    """Watch the new version after a blue/green switch or the last canary step, and switch back to the warm standby
    if its analysis fails; off when unset."""

    @property
    def watch_analysis(self) -> Analysis:
        """The analysis a post-promotion watch runs."""
        watch = self.post_promotion
        return watch.analysis if watch is not None and watch.analysis is not None else self.analysis


class Cost(SpecModel):
    gpu_hour_usd: float | None = Field(default=None, ge=0)
    """Price of one GPU hour: GPU cost (serving, idle, standby, gate), cost per image, and diff estimates."""
    egress_usd_per_gb: float | None = Field(default=None, ge=0)
    """Price of one GB (10^9 bytes) the controller downloads from an object store (s3, gs, az, hf) for this release."""
    storage_usd_per_gb_month: float | None = Field(default=None, ge=0)
    """Price of keeping one GB of this release's models in the model cache for a month (30 days)."""
    budget_per_image_usd: float | None = Field(default=None, gt=0)
    """Cost per image this release should stay under; exported as diffops_cost_budget_per_image_usd for alerting."""


class Spec(SpecModel):
    model: serving.ModelSpec
    generation: serving.GenerationSpec = Field(default_factory=serving.GenerationSpec)
    limits: serving.LimitsSpec = Field(default_factory=serving.LimitsSpec)
    runtime: serving.RuntimeSpec
    replicas: serving.ReplicasSpec = Field(default_factory=serving.ReplicasSpec)
    ingress: serving.IngressSpec = Field(default_factory=serving.IngressSpec)
    rollout: Rollout = Field(default_factory=Rollout)
    checks: ChecksSpec = Field(default_factory=ChecksSpec)
    cost: Cost = Field(default_factory=Cost)
    quality: serving.QualitySpec = Field(default_factory=serving.QualitySpec)
    """Review sampling, CLIP scoring and the NSFW safety checker."""
    faults: serving.FaultsSpec | None = None
    """Fault injection for rollback drills; refused unless the controller runs with --allow-fault-injection."""


def pinned_models(spec: Spec) -> list[tuple[str, serving.ModelSpec]]:
    """Every model a version needs, named for messages: the diffusion model, then the safety checker and the CLIP model
    when set (each fetched, verified and, on a cluster, published like the model)."""
    quality = spec.quality
    extra = [(what, pin) for what, pin in (("safety checker", quality.safety), ("CLIP model", quality.clip)) if pin is not None]
    return [("model", spec.model)] + [(what, serving.ModelSpec(uri=pin.uri, digest=pin.digest)) for what, pin in extra]


class Release(SpecModel):
    apiVersion: Literal["diffops/v1"]
    kind: Literal["Release"]
    metadata: Metadata
    spec: Spec

    @property
    def name(self) -> str:
        return self.metadata.name


def _analysis_rules(analysis: Analysis, path: str) -> list[tuple[str, str]]:
    if analysis.provider == "builtin":
        if analysis.prometheus is not None:
            return [(f"{path}.prometheus", "prometheus queries are read only with provider: prometheus; set it or remove them")]
        return []
    if analysis.prometheus is None:
        return [(f"{path}.prometheus", "provider: prometheus needs prometheus: {address: http://..., queries: [...]}")]
    problems, seen = [], set()
    for i, query in enumerate(analysis.prometheus.queries):
        if query.min is None and query.max is None:
            problems.append((f"{path}.prometheus.queries.{i}", f"query {query.name!r} judges nothing: give it min, max or both"))
        if query.name in seen:
            problems.append((f"{path}.prometheus.queries.{i}.name", f"{query.name!r} is used twice; names tell verdicts apart"))
        seen.add(query.name)
    return problems


def _post_promotion_rules(rollout: Rollout) -> list[tuple[str, str]]:
    watch = rollout.post_promotion
    if watch is None:
        return []
    problems = []
    if watch.duration > rollout.scale_down_delay:
        problems.append(("rollout.post_promotion.duration",
                         f"{format_duration(watch.duration)} exceeds rollout.scale_down_delay "
                         f"({format_duration(rollout.scale_down_delay)}): the standby must stay warm for the whole watch; "
                         "lengthen scale_down_delay or shorten the watch"))
    if watch.duration < rollout.watch_analysis.interval:
        problems.append(("rollout.post_promotion.duration",
                         f"{format_duration(watch.duration)} is shorter than one analysis interval "
                         f"({format_duration(rollout.watch_analysis.interval)}): nothing would be judged"))
    if watch.analysis is not None:
        problems += _analysis_rules(watch.analysis, "rollout.post_promotion.analysis")
    return problems


def _rollout_rules(rollout: Rollout) -> list[tuple[str, str]]:
    problems = _analysis_rules(rollout.analysis, "rollout.analysis") + _post_promotion_rules(rollout)
    return problems + _step_rules(rollout)


def _step_rules(rollout: Rollout) -> list[tuple[str, str]]:
    if rollout.strategy != "canary":
        if rollout.steps:
            return [("rollout.steps", "steps are for strategy: canary; remove them or switch the strategy")]
        return []
    unset = [i for i, s in enumerate(rollout.steps) if not s.is_pause and s.weight is None]
    if unset:  # `{weight: null}` names no weight at all
        return [(f"rollout.steps.{i}.weight", "a weight step needs a percent from 0 to 100") for i in unset]
    weights = [(i, s.weight) for i, s in enumerate(rollout.steps) if not s.is_pause and s.weight is not None]
    if not weights:
        return [("rollout.steps", "a canary needs steps ending with {weight: 100}")]
    problems = []
    for (_, before), (i, after) in pairwise(weights):
        if after < before:
            problems.append((f"rollout.steps.{i}.weight", f"weight goes down from {before} to {after}; canary weights only rise"))
    last_index, last_weight = weights[-1]
    if last_weight != 100 or last_index != len(rollout.steps) - 1:
        problems.append((f"rollout.steps.{len(rollout.steps) - 1}", "canary steps must end with {weight: 100}"))
    return problems


def _quality_rules(spec: Spec) -> list[tuple[str, str]]:
    """Every quality threshold names a model that measures it."""
    quality, needs = spec.quality, []
    analyses = [("rollout.analysis", spec.rollout.analysis)]
    if spec.rollout.post_promotion is not None and spec.rollout.post_promotion.analysis is not None:
        analyses.append(("rollout.post_promotion.analysis", spec.rollout.post_promotion.analysis))
    for path, analysis in analyses:
        needs += [(f"{path}.max_nsfw_rate", analysis.max_nsfw_rate, "safety"), (f"{path}.min_clip_score", analysis.min_clip_score, "clip")]
    check = spec.checks.quality
    if check is not None:
        needs += [("checks.quality.min_clip_score", check.min_clip_score, "clip"),
                  ("checks.quality.max_distance", check.max_distance, "clip"),
                  ("checks.quality.max_nsfw_rate", check.max_nsfw_rate, "safety")]
    return [(path, f"needs quality.{model}: {{uri, digest}} (the model that measures it)")
            for path, value, model in needs if value is not None and getattr(quality, model) is None]


def rules(release: Release, stem: str) -> list[tuple[str, str]]:
    """Every cross-field rule; (field path, message) per violation."""
    spec = release.spec
    problems = []
    if release.metadata.name != stem:
        problems.append(("metadata.name", f"{release.metadata.name!r} must equal the file name stem {stem!r}"))
    in_spec = serving.rules(spec.generation, spec.limits, spec.replicas) + _rollout_rules(spec.rollout) + _quality_rules(spec)
    problems += [(f"spec.{path}", message) for path, message in in_spec]
    return problems
