"""The controller's Prometheus metrics (`--metrics-port`).

Reconciles by result and duration (and when the last one ended), phase per
release, weight per version, drift healed per release and the time of the
last applied commit, refreshed after every reconcile from the recorded state;
gate check durations from each gate report; and the cost accounting's figures
(`controller.tick.costs`): GPU-seconds and USD by kind, model bytes fetched by
store, cost per image over the last hour and each release's budget per image.
Counters count from the controller's start; the totals that survive a restart
are in the state store (`diffops cost`).
User feedback and its flags per version are counted as the observe phase stores them
(`controller.quality`).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from controller.cost import GPU_KINDS, USD_KINDS, CostRecord
from controller.state.store import State

__all__ = ["ControllerMetrics"]

PHASES = ("Healthy", "Progressing", "Paused", "Degraded", "Failed", "Invalid")


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter("diffops_reconciles_total", "Reconciles by result.", ["result"], registry=self.registry)
        self.duration = Histogram("diffops_reconcile_duration_seconds", "Reconcile duration.", registry=self.registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.phase = Gauge("diffops_release_phase", "1 for the release's current phase.", ["release", "phase"],
                           registry=self.registry)
        self.weight = Gauge("diffops_version_weight", "Traffic weight set per version.", ["release", "version", "role"],
                            registry=self.registry)
        self.drift_healed = Counter("diffops_drift_healed_total", "Applications re-applied because Ray Serve no longer ran "
                                    "them as applied (missing, deleted, changed).", ["release"], registry=self.registry)
        self.registry_drift = Gauge("diffops_registry_drift", "1 while a release's models:/ URI resolves to a digest other "
                                    "than its pin (or the registry cannot be reached); serving is unchanged.", ["release"],
                                    registry=self.registry)
        self.cache_bytes = Gauge("diffops_cache_bytes", "Bytes of verified models in the controller's model cache.",
                                 registry=self.registry)
        self.feedback = Counter("diffops_feedback", "User feedback answers stored, by rating (none: flags or a comment only).",
                                ["release", "version", "rating"], registry=self.registry)
        self.flags = Counter("diffops_flags", "Flags in user feedback (nsfw, artifact, prompt_mismatch, other).",
                             ["release", "version", "flag"], registry=self.registry)
        self.applied = Gauge("diffops_last_applied_commit_timestamp_seconds", "When the last commit became fully live.",
                             registry=self.registry)
        self.last_reconcile = Gauge("diffops_last_reconcile_timestamp_seconds", "When the last reconcile ended (whatever its result).",
                                    registry=self.registry)
        self.gate_seconds = Histogram("diffops_gate_seconds", "Duration of each gate check, from the gate report.",
                                      ["release", "version", "check"], registry=self.registry,
                                      buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800))
        self.gpu_seconds = Counter("diffops_gpu_seconds_total", "GPU-seconds held: serving (replicas busy), idle (held, taking "
                                   "traffic or starting, not busy), standby (kept warm), gate (check jobs).",
                                   ["release", "version", "kind"], registry=self.registry)
        self.cost_usd = Counter("diffops_cost_usd_total", "Cost in USD from spec.cost prices: gpu, egress (object store "
                                "downloads by the controller), storage (model bytes in the cache).",
                                ["release", "version", "kind"], registry=self.registry)
        self.fetched_bytes = Counter("diffops_model_fetched_bytes_total", "Model bytes the controller downloaded, by store scheme.",
                                     ["store"], registry=self.registry)
        self.cost_per_image = Gauge("diffops_cost_per_image_usd", "USD per image over the last hour (GPU, egress, storage); "
                                    "absent while no image was made in it.", ["release", "version"], registry=self.registry)
        self.budget_per_image = Gauge("diffops_cost_budget_per_image_usd", "spec.cost.budget_per_image_usd, when the release sets it.",
                                      ["release"], registry=self.registry)

    def count_feedback(self, release: str, entries: list[dict[str, Any]]) -> None:
        """Feedback answers stored (a repeat counts again: counters never go down); flags likewise."""
        for entry in entries:
            self.feedback.labels(release, entry["version"], str(entry.get("rating") or "none")).inc()
            for flag in entry.get("flags") or []:
                self.flags.labels(release, entry["version"], flag).inc()

    def seed_feedback(self, ratings: dict[tuple[str, str, str], int], flags: dict[tuple[str, str, str], int]) -> None:
        """Start the feedback counters from what the state file holds (once, when the controller starts)."""
        for labels, count in ratings.items():
            self.feedback.labels(*labels).inc(count)
        for labels, count in flags.items():
            self.flags.labels(*labels).inc(count)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def observe_reconcile(self, result: str, seconds: float) -> None:
        self.reconciles.labels(result).inc()
        self.duration.observe(seconds)
        self.last_reconcile.set(time.time())

    def observe_gate(self, release: str, version: str, report: dict[str, Any]) -> None:
        """Each check's duration from a gate report (`checks.report.GateReport.to_dict`)."""
        for check in report.get("checks") or ():
            self.gate_seconds.labels(release, version, str(check.get("name"))).observe(float(check.get("seconds") or 0.0))

    def observe_costs(self, before: CostRecord | None, after: CostRecord) -> None:
        """Move the cost counters by what `after` added to `before` (None: counted from zero)."""
        labels = (after.release, after.version)
        for kind in GPU_KINDS:
            added = after.gpu_seconds(kind) - (before.gpu_seconds(kind) if before else 0.0)
            self.gpu_seconds.labels(*labels, kind).inc(max(0.0, added))
        for usd_kind in USD_KINDS:
            added = getattr(after, f"{usd_kind}_usd") - (getattr(before, f"{usd_kind}_usd") if before else 0.0)
            self.cost_usd.labels(*labels, usd_kind).inc(max(0.0, added))

    def set_cost_per_image(self, release: str, version: str, usd: float | None) -> None:
        if usd is None:
            try:
                self.cost_per_image.remove(release, version)
            except KeyError:
                pass
        else:
            self.cost_per_image.labels(release, version).set(usd)

    def set_budgets(self, budgets: dict[str, float | None]) -> None:
        self.budget_per_image.clear()
        for release, usd in budgets.items():
            if usd is not None:
                self.budget_per_image.labels(release).set(usd)

    def observe_drift(self, release: str) -> None:
        self.drift_healed.labels(release).inc()

    def set_registry_drift(self, release: str, drifting: bool) -> None:
        self.registry_drift.labels(release).set(1 if drifting else 0)

    def observe_state(self, state: State) -> None:
        self.phase.clear()
        for release in state.releases.values():
            for phase in PHASES:
                self.phase.labels(release.name, phase).set(1 if release.phase == phase else 0)
            self.drift_healed.labels(release.name)  # 0 until the first heal: `increase()` sees the first one too
        self.weight.clear()
        for version in state.versions:
            self.weight.labels(version.release, version.version, version.role).set(version.weight)
        if state.controller.applied_at:
            self.applied.set(state.controller.applied_at)
