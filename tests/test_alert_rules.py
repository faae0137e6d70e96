"""The alerts (deploy/prometheus/rules.yaml) as Prometheus judges them: `promtool check rules` and `promtool test
rules` with the unit tests in deploy/prometheus/tests/, where every alert fires in one case and stays quiet in
another. Every alert says how bad (severity) and what to do (summary, description), reads only metrics of the
contract (DESIGN.md "Metrics and monitoring"), and the Kubernetes PrometheusRule carries the very same rules.
Broken copies (a bad expression, an unknown field, a wrong expectation) are refused by the same tools.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from controller.monitoring import binaries

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yaml"
UNIT_TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yaml"))

# DESIGN.md "Metrics and monitoring": name -> kind. Ray adds `ray_` to what routers and replicas export.
CONTRACT = {
    "diffops_reconciles_total": "counter", "diffops_reconcile_duration_seconds": "histogram",
    "diffops_release_phase": "gauge", "diffops_version_weight": "gauge", "diffops_drift_healed_total": "counter",
    "diffops_gate_seconds": "histogram", "diffops_gpu_seconds_total": "counter", "diffops_cost_usd_total": "counter",
    "diffops_model_fetched_bytes_total": "counter", "diffops_cache_bytes": "gauge", "diffops_cost_per_image_usd": "gauge",
    "diffops_cost_budget_per_image_usd": "gauge", "diffops_last_applied_commit_timestamp_seconds": "gauge",
    "diffops_last_reconcile_timestamp_seconds": "gauge",
    "ray_diffops_requests_total": "counter", "ray_diffops_request_latency_seconds": "histogram",
    "ray_diffops_image_seconds": "histogram", "ray_diffops_images_generated_total": "counter",
    "ray_diffops_queue_length": "gauge", "ray_diffops_requests_in_flight": "gauge", "ray_diffops_model_load_seconds": "gauge",
    "ray_diffops_gpu_utilization_ratio": "gauge", "ray_diffops_gpu_memory_used_bytes": "gauge",
    "ray_diffops_gpu_memory_total_bytes": "gauge",
    "up": "gauge",  # Prometheus's own, per target
    "diffops_registry_drift": "gauge",  # beyond DESIGN.md's list: the registry's drift (README, "Metrics and monitoring")
}
SERIES = {f"{name}{suffix}" for name, kind in CONTRACT.items()
          for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binaries()[1]), *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def metrics_in(expr: str) -> set[str]:
    """Every series name a PromQL expression selects."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(node.name or "")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def rules(path: Path = RULES) -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]


def copy_of_prometheus_dir(tmp_path: Path, edits: dict[str, tuple[str, str]]) -> Path:
    """deploy/prometheus/ copied, with `file: (old, new)` text edits (each old text must be there)."""
    target = tmp_path / "prometheus"
    shutil.copytree(PROMETHEUS_DIR, target)
    for name, (old, new) in edits.items():
        text = (target / name).read_text()
        assert old in text, f"{old!r} not in {name}"
        (target / name).write_text(text.replace(old, new, 1))
    return target


# --- the files as they are -----------------------------------------------------------------------------------------

def test_promtool_accepts_the_rules_and_every_unit_test_passes():
    checked = promtool("check", "rules", str(RULES))
    assert checked.returncode == 0 and f"SUCCESS: {len(rules())} rules found" in checked.stdout, checked.stdout + checked.stderr
    tested = promtool("test", "rules", *map(str, UNIT_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(UNIT_TESTS) == 3


def test_the_alerts_the_issue_asks_for_are_there():
    assert {r["alert"] for r in rules()} == {
        "DiffopsControllerDown", "DiffopsNoReconcile", "DiffopsReconcileErrors", "DiffopsReleaseFailed", "DiffopsReleaseDegraded",
        "DiffopsReleaseInvalid", "DiffopsDriftHealedRepeatedly", "DiffopsServingErrors", "DiffopsServingSlow",
        "DiffopsGpuMemoryHigh", "DiffopsQueueGrowing", "DiffopsCostPerImageOverBudget", "DiffopsRegistryDrift",
    }


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_every_alert_says_how_bad_and_what_to_do(rule):
    assert rule["labels"]["severity"] in ("critical", "warning")
    assert set(rule["annotations"]) == {"summary", "description"}
    description = rule["annotations"]["description"]
    assert re.search(r"`diffops [a-z]|spec\.|[Ss]tart it|[Rr]estart|[Rr]ead|Find it", description), description


@pytest.mark.parametrize("rule", rules(), ids=lambda r: r["alert"])
def test_every_alert_reads_only_metrics_of_the_contract(rule):
    assert metrics_in(rule["expr"]) <= SERIES, metrics_in(rule["expr"]) - SERIES


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    cases: dict[str, set[bool]] = {}
    for path in UNIT_TESTS:
        doc = yaml.safe_load(path.read_text())
        assert doc["rule_files"] == ["../rules.yaml"]
        for test in doc["tests"]:
            for check in test["alert_rule_test"]:
                cases.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    assert cases == {r["alert"]: {True, False} for r in rules()}


def test_the_kubernetes_prometheusrule_carries_the_same_groups_and_rules():
    manifest = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "prometheusrule.yaml").read_text())
    assert manifest["kind"] == "PrometheusRule"
    assert manifest["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


# --- broken copies: the same tools refuse them ---------------------------------------------------------------------

@pytest.mark.parametrize(("old", "new", "message"), [
    ("> 300", "> > 300", "parse error"),  # a bad expression
    ("severity: critical", "severity: [critical]", "cannot unmarshal"),  # a label that is not a string
    ("for: 5m", "for: 5m\n        keep_firing: 1m", "field keep_firing not found"),  # an unknown field
])
def test_promtool_refuses_broken_rules(tmp_path, old, new, message):
    broken = copy_of_prometheus_dir(tmp_path, {"rules.yaml": (old, new)})
    checked = promtool("check", "rules", str(broken / "rules.yaml"))
    assert checked.returncode != 0 and message in checked.stdout + checked.stderr, checked.stdout + checked.stderr


def test_a_unit_test_fails_when_the_alert_would_not_fire(tmp_path):
    broken = copy_of_prometheus_dir(tmp_path, {"rules.yaml": ("> 0.05", "> 0.5")})  # 10% errors no longer alert
    tested = promtool("test", "rules", str(broken / "tests" / "serving.yaml"))
    assert tested.returncode != 0 and "DiffopsServingErrors: 10% of demo's requests get 503" in tested.stdout + tested.stderr


def test_a_unit_test_fails_when_the_alert_fires_too_soon(tmp_path):
    broken = copy_of_prometheus_dir(tmp_path, {"rules.yaml": ("for: 15m\n        labels:\n          severity: warning\n"
                                                              "        annotations:\n          summary: \"Release {{ $labels.release }} is Invalid",
                                                              "for: 5m\n        labels:\n          severity: warning\n"
                                                              "        annotations:\n          summary: \"Release {{ $labels.release }} is Invalid")})
    tested = promtool("test", "rules", str(broken / "tests" / "controller.yaml"))
    assert tested.returncode != 0 and "Invalid for 10 minutes is still pending" in tested.stdout + tested.stderr


def test_the_contract_check_catches_a_misspelt_metric():
    assert metrics_in("sum(rate(ray_diffops_request_total[5m])) > 0") - SERIES == {"ray_diffops_request_total"}
    assert metrics_in("histogram_quantile(0.9, rate(diffops_gate_seconds_bucket[5m]))") - SERIES == set()
