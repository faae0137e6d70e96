"""Fakes at our own boundaries, for benchmarks that measure the controller's own work.

`InstantServe` implements `controller.apply.serve_client.ServeApi`: a config applies
at once, every app is RUNNING with its replicas and every router confirms its
weights. `PassingGate` implements `controller.gate.runner.Gate` and passes at
once. With both, a reconcile's time is git, parsing, planning, rendering and
SQLite, nothing else.
"""

from __future__ import annotations

from typing import Any

from checks.report import CheckResult, GateReport
from controller.state.records import ObservedApp


class InstantServe:
    def __init__(self) -> None:
        self.config: dict[str, Any] = {"applications": []}
        self.applies = 0
        self.changed_apps: set[str] = set()  # apps whose config differed in the last apply

    def apply(self, config: dict[str, Any]) -> None:
        before = {app["name"]: app for app in self.config["applications"]}
        after = {app["name"]: app for app in config["applications"]}
        self.changed_apps = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
        self.config, self.applies = config, self.applies + 1

    def observe(self) -> dict[str, ObservedApp]:
        observed = {}
        for app in self.config["applications"]:
            deployment = app["deployments"][0]
            count = deployment["num_replicas"]
            observed[app["name"]] = ObservedApp(app["name"], "RUNNING", "", count, count,
                                                user_config=deployment.get("user_config"), args=app["args"], config=app)
        return observed

    def router_weights(self, release: str) -> dict[str, int] | None:
        for app in self.config["applications"]:
            if app["name"] == release:
                weights: dict[str, int] = app["deployments"][0]["user_config"]["weights"]
                return weights
        return None

    def router_stats(self, release: str, since: float) -> dict[str, dict[str, Any]] | None:
        return {}

    def cluster_resources(self) -> dict[str, tuple[float, float]] | None:
        return None


class PassingGate:
    def __init__(self) -> None:
        self.runs = 0

    def run(self, gate: dict[str, Any], cpus: float, gpus: float) -> GateReport:
        self.runs += 1
        passed = CheckResult("bench", "passed", "gate faked for the reconcile benchmark")
        return GateReport(gate["release"], gate["version"], (passed,), 0.0)
