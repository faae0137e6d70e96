"""The gate: every check for one version, in order, each under the release's time limit.

`run_gate` is what the gate job runs on the release's own resources, and what
`diffops check` runs locally. Order: artifact (nothing else runs if the files
are wrong), dependency, cuda, load, golden, performance, quality. An exception inside a
check (a crash, an out-of-memory) becomes an `error` result with the reason;
a check past its limit becomes an `error` too, and the gate reports anyway.

A golden reference over `REFERENCE_MAX_BYTES` is never read: the golden check
fails naming its size and the cap (the controller does not even read the blob).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from checks import artifact, dependency, golden, performance, quality
from checks.job import REFERENCE_MAX_BYTES, reference_refusal
from checks.report import CheckResult, GateReport
from serving.artifacts import ModelCache, fetch
from serving.generator import PipelineRunner
from serving.manifest import ArtifactError
from serving.model_cache import node_cache_dir
from serving.pipeline import load_pipeline, pick_device

__all__ = ["load_runner", "run_gate"]

log = logging.getLogger("diffops.checks")


class _TimedOut(Exception):
    pass


_T = TypeVar("_T")


def _within(name: str, limit_s: float, work: Callable[[], _T]) -> _T:
    """Run `work` in a thread; a check past its limit or raising becomes an `error` result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as err:  # noqa: BLE001 - any crash in a check is that check's failure
            box["error"] = err

    thread = threading.Thread(target=target, name=f"check-{name}", daemon=True)
    thread.start()
    thread.join(limit_s)
    if thread.is_alive():
        raise _TimedOut(f"{name} did not finish within {limit_s:.0f}s (checks.timeout)")
    if "error" in box:
        err = box["error"]
        raise RuntimeError(f"{type(err).__name__}: {err}".strip()) from err
    value: _T = box["value"]  # the thread finished without raising, so it set a value
    return value


def load_runner(model_dir: Path, model: dict[str, Any], sampler: str) -> PipelineRunner:
    device = pick_device()
    pipeline = load_pipeline(model_dir, dtype=model.get("dtype", "float32"), sampler=sampler, device=device)
    return PipelineRunner(pipeline, device)


def run_gate(gate_input: dict[str, Any], progress: Callable[[str], None] = lambda line: None,
             loader: Callable[[Path, dict[str, Any], str], PipelineRunner] = load_runner) -> GateReport:
    started = time.monotonic()
    spec, name, version = gate_input["spec"], gate_input["release"], gate_input["version"]
    checks_spec, limit = spec.get("checks") or {}, float(gate_input.get("timeout_s", 600))
    results: list[CheckResult] = []
    artifacts: dict[str, str] = {}

    def report() -> GateReport:
        return GateReport(name, version, tuple(results), round(time.monotonic() - started, 3), artifacts)

    def attempt(check: str, work: Callable[[], _T]) -> _T | None:
        progress(f"{name}--{version}: running the {check} check")
        try:
            return _within(check, limit, work)
        except (_TimedOut, RuntimeError) as err:
            results.append(CheckResult(check, "error", str(err)))
            return None

    model = gate_input["model"]
    try:
        fetched = fetch(model["uri"], model["digest"], ModelCache(node_cache_dir(gate_input.get("cache_dir"))),
                        repo=Path(gate_input["repo"]) if gate_input.get("repo") else None, commit=gate_input.get("commit"))
    except ArtifactError as err:
        results.append(CheckResult("artifact", "failed", str(err)))
        return report()
    found = attempt("artifact", lambda: artifact.run(fetched.path, model["digest"]))
    if found is not None:
        results.append(found)
    if not results or results[-1].blocking:
        return report()
    requires, image = spec["runtime"].get("requires") or {}, spec["runtime"]["image"]
    results.append(dependency.run(requires, image, spec["runtime"].get("image_policy", "verify")))
    results.append(dependency.run_cuda(requires))

    def load() -> PipelineRunner:
        return loader(fetched.path, model, spec["generation"]["sampler"])

    load_started = time.monotonic()
    runner = attempt("load", load)
    if runner is None:
        for check in ("golden", "performance", "quality"):
            results.append(CheckResult(check, "skipped", "not run: the pipeline did not load"))
        return report()
    load_seconds = time.monotonic() - load_started
    results.append(CheckResult("load", "passed", f"pipeline loaded on {runner.device} in {load_seconds:.2f}s",
                               {"load_seconds": round(load_seconds, 3), "device": runner.device}))
    reference = gate_input.get("reference")
    size = gate_input.get("reference_bytes") or (len(reference) if reference is not None else None)
    refusal = reference_refusal((checks_spec.get("golden") or {}).get("reference", "?"), size)
    outcome: tuple[CheckResult, dict[str, str]] | None
    if refusal is not None and checks_spec.get("golden") is not None:
        outcome = (CheckResult("golden", "failed", refusal, {"reference_bytes": size}, {"max_reference_bytes": REFERENCE_MAX_BYTES}), {})
    else:
        outcome = attempt("golden", lambda: golden.run(runner, checks_spec.get("golden"), spec["generation"], reference))
    if outcome is not None:
        results.append(outcome[0])
        artifacts.update(outcome[1])
    measured = attempt("performance", lambda: performance.run(runner, checks_spec.get("performance"), spec["generation"]))
    if measured is not None:
        results.append(measured)
    if checks_spec.get("quality") is not None:
        judged = attempt("quality", lambda: _quality(runner, checks_spec["quality"], gate_input))
        if judged is not None:
            results.append(judged[0])
            artifacts.update(judged[1])
    return report()


def _quality(runner: PipelineRunner, check: dict[str, Any], gate_input: dict[str, Any]) -> tuple[CheckResult, dict[str, str]]:
    """The quality check with the release's pinned CLIP model and safety checker, fetched and verified like the model."""
    from serving.quality_models import frechet_distance, load_clip, load_safety

    size = gate_input.get("prompt_set_bytes")
    if size is not None and size > quality.MAX_PROMPT_FILE_BYTES:
        return CheckResult("quality", "failed", f"prompt set {check['prompts']} is {size:,} bytes; the cap is "
                           f"{quality.MAX_PROMPT_FILE_BYTES:,} bytes (64 KiB); split it or keep fewer prompts"), {}
    pins = gate_input.get("quality_models") or {}
    repo = Path(gate_input["repo"]) if gate_input.get("repo") else None
    cache = ModelCache(node_cache_dir(gate_input.get("cache_dir")))

    def load(name: str, loader: Callable[[Path, str], Any]) -> Any:
        pin = pins.get(name)
        if pin is None:
            return None
        fetched = fetch(pin["uri"], pin["digest"], cache, repo=repo, commit=gate_input.get("commit"))
        return loader(fetched.path, runner.device)

    spec = gate_input["spec"]
    return quality.run(runner, check, spec["generation"], gate_input.get("prompt_set"), load("clip", load_clip),
                       load("safety", load_safety), gate_input.get("quality_baseline"), frechet_distance)
