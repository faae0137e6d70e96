"""What a tracked run records, built from what diffops knows. Pure.

Used by the controller after a gate (`controller.tick.prepare`), by `diffops
check --track`, and by experiments: a `RunRecord` holds the run's tags, params,
metrics and artifacts; `controller.tracking.mlflow_store` writes it. Names are a
contract (DESIGN.md, "Tracking and registry"): tags `diffops.release`,
`diffops.version`, `diffops.commit`, `diffops.kind`; params are release field
paths (`generation.steps`, `model.digest`); metrics are `<check>.<figure>`
(`performance.p95_latency_s`, `golden.ssim`, `quality.mean_clip_score`) plus
`cost.usd_per_image`.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from checks.report import GateReport
from controller.parse.release import Spec

__all__ = ["MAX_PARAM_CHARS", "Kind", "RunRecord", "environment_tags", "gate_record", "metric_name", "numeric_figures",
           "spec_params", "usd_per_image"]

Kind = Literal["gate", "experiment"]
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value; longer values are cut and logged whole as an artifact
_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")


@dataclass(frozen=True)
class RunRecord:
    """One run, ready to log: `artifacts` maps a relative path (`golden/golden-produced.png`) to its bytes."""

    name: str
    tags: dict[str, str]
    params: dict[str, str]
    metrics: dict[str, float]
    artifacts: dict[str, bytes] = field(default_factory=dict)


def _param(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    if len(text) <= MAX_PARAM_CHARS:
        return text
    note = f"... ({len(text)} chars; whole in params.json)"
    return text[:MAX_PARAM_CHARS - len(note)] + note


def spec_params(spec: Spec) -> dict[str, str]:
    """The generation recipe as params named by release field path: model, generation, and the prompts the checks draw."""
    params: dict[str, Any] = {f"model.{k}": v for k, v in spec.model.model_dump(mode="json").items()}
    params.update({f"generation.{k}": v for k, v in spec.generation.model_dump(mode="json").items()})
    golden, quality = spec.checks.golden, spec.checks.quality
    prompts = []
    if golden is not None:
        params.update({"checks.golden.prompt": golden.prompt, "checks.golden.seed": golden.seed})
        prompts.append(golden.prompt)
    if quality is not None:
        params.update({"checks.quality.prompts": quality.prompts, "checks.quality.seeds": quality.seeds})
    if prompts:
        params["prompts"] = prompts
    return {key: _param(value) for key, value in params.items()}


def metric_name(*parts: str) -> str:
    """A metric key MLflow accepts: the parts joined by dots, other characters as `_`."""
    return _METRIC_KEY.sub("_", ".".join(parts))[:250]


def numeric_figures(prefix: str, figures: Mapping[str, Any]) -> Iterator[tuple[str, float]]:
    """Every finite number in a check's figures, nested dicts flattened (`artifact.component_bytes.unet`); booleans are
    left out (they are facts, logged as tags where they matter), as are strings and lists."""
    for key, value in figures.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            yield metric_name(prefix, key), float(value)
        elif isinstance(value, Mapping):
            yield from numeric_figures(metric_name(prefix, key), value)


def usd_per_image(spec: Spec, images_per_s: float | None) -> float | None:
    """What one image costs at the measured throughput of one replica: its GPUs x `cost.gpu_hour_usd` / images per
    hour; None without a price or a throughput."""
    price = spec.cost.gpu_hour_usd
    if price is None or not images_per_s:
        return None
    return spec.replicas.gpus * price / 3600 / images_per_s


def environment_tags(report: GateReport) -> dict[str, str]:
    """Where the checks ran, from the report's own figures: device (GPU model or CPU), driver, CUDA, packages, image."""
    figures = {check.name: check.figures for check in report.checks}
    cuda, dependency = figures.get("cuda", {}), figures.get("dependency", {})
    tags = {
        "diffops.device": cuda.get("gpu") or cuda.get("cpu") or figures.get("load", {}).get("device"),
        "diffops.gpu_driver": cuda.get("driver"),
        "diffops.cuda": cuda.get("cuda"),
        "diffops.image": dependency.get("image_pinned"),
        "diffops.image_reported": dependency.get("image_reported"),
        "diffops.serving_code": dependency.get("serving_code"),
        **{f"diffops.{name}": version for name, version in (dependency.get("packages") or {}).items()},
    }
    return {key: str(value) for key, value in tags.items() if value not in (None, "")}


def gate_record(release: str, version: str, commit: str, spec: Spec, report: GateReport, *,
                controller_version: str, gate_key: str | None = None) -> RunRecord:
    """A gate run: the spec's recipe as params, the commit and environment as tags, every check figure as a metric,
    the report's images (golden output, comparison, quality samples) and the report itself as artifacts."""
    tags = {
        "diffops.release": release, "diffops.version": version, "diffops.commit": commit, "diffops.kind": "gate",
        "diffops.controller_version": controller_version, "diffops.ok": str(report.ok).lower(),
        "mlflow.source.git.commit": commit,
        **({"diffops.gate_key": gate_key} if gate_key else {}),
        **({"diffops.job": report.job} if report.job else {}),
        **environment_tags(report),
    }
    metrics = {"gate.ok": 1.0 if report.ok else 0.0, "gate.seconds": float(report.seconds)}
    for check in report.checks:
        metrics.update(numeric_figures(check.name, check.figures))
        metrics[metric_name(check.name, "seconds")] = float(check.seconds)
    performance = next((c.figures for c in report.checks if c.name == "performance"), {})
    cost = usd_per_image(spec, performance.get("images_per_s"))
    if cost is not None:
        metrics["cost.usd_per_image"] = cost
    params = spec_params(spec)
    artifacts = {f"gate/{name}": base64.b64decode(data) for name, data in sorted(report.artifacts.items())}
    artifacts["gate/report.json"] = json.dumps(report.to_dict(with_artifacts=False), indent=1, sort_keys=True).encode()
    if any(value.endswith("whole in params.json)") for value in params.values()):
        artifacts["params.json"] = json.dumps(spec.model_dump(mode="json"), indent=1, sort_keys=True).encode()
    return RunRecord(f"gate {release} {version}", tags, params, metrics, artifacts)
