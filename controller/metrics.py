"""The controller's Prometheus metrics (`--metrics-port`).

Reconciles by result and duration, phase per release, weight per version,
drift healed per release and the time of the last applied commit, refreshed
after every reconcile from the recorded state; user feedback and its flags per
version, counted as the observe phase stores them (`controller.quality`).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

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
        self.cache_bytes = Gauge("diffops_cache_bytes", "Bytes of verified models in the controller's model cache.",
                                 registry=self.registry)
        self.feedback = Counter("diffops_feedback", "User feedback answers stored, by rating (none: flags or a comment only).",
                                ["release", "version", "rating"], registry=self.registry)
        self.flags = Counter("diffops_flags", "Flags in user feedback (nsfw, artifact, prompt_mismatch, other).",
                             ["release", "version", "flag"], registry=self.registry)
        self.applied = Gauge("diffops_last_applied_commit_timestamp_seconds", "When the last commit became fully live.",
                             registry=self.registry)

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

    def observe_drift(self, release: str) -> None:
        self.drift_healed.labels(release).inc()

    def observe_state(self, state: State) -> None:
        self.phase.clear()
        for release in state.releases.values():
            for phase in PHASES:
                self.phase.labels(release.name, phase).set(1 if release.phase == phase else 0)
        self.weight.clear()
        for version in state.versions:
            self.weight.labels(version.release, version.version, version.role).set(version.weight)
        if state.controller.applied_at:
            self.applied.set(state.controller.applied_at)
