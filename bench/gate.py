"""Gate wall time for the demo release, against the irreducible work: load the pipeline, generate one image.

The gate (`checks.gate.run_gate`: artifact, dependency, cuda, load, golden and
performance checks) runs once in this process, as `diffops check` runs it,
and once as a Ray job on the bench's head (`controller.gate.runner.RayJobGate`),
as the controller runs it: a fresh process on the release's resources that
imports torch and diffusers first. Baseline: `serving.pipeline.load_pipeline`
plus one golden image with the release's generation config, in this process
(median of three). Imports are warmed up before either in-process figure; the
model is in the cache for all of them.

Tracking: the in-process gate's report logged as an MLflow run into a new
embedded store (what the controller does after each gate), first and again,
and with production-size images, against the gate's own time.
"""

from __future__ import annotations

import base64
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import in_process
from bench.context import Context
from bench.gitrepo import ReleaseRepo, demo_release
from bench.progress import Say
from bench.ray_head import DASHBOARD, BenchHead
from bench.report import Figure, ratio
from checks.gate import run_gate
from checks.report import GateReport
from controller.apply.ray_cluster import ensure_token
from controller.gate.runner import RayJobGate, gate_input
from controller.parse.release import Spec
from controller.plan.versions import version_id
from controller.source.git_source import ReleaseSource
from controller.tracking.gate_runs import GateRuns
from controller.tracking.mlflow_store import Tracker

BASELINE_RUNS = 3


def baseline_seconds(model: Path, spec: dict[str, Any], golden: dict[str, Any]) -> float:
    started = time.perf_counter()
    runner = in_process.load_runner(model, spec)
    in_process.generate_seconds(runner, {"prompt": golden["prompt"], "seed": golden["seed"]}, spec["generation"])
    return time.perf_counter() - started


def check_seconds(report: GateReport) -> dict[str, float]:
    """Seconds per check (the load check reports its time as a figure)."""
    return {c.name: round(c.seconds or c.figures.get("load_seconds", 0.0), 3) for c in report.checks}


def run(workdir: Path, say: Say, head: BenchHead | None) -> list[Figure]:
    repo = ReleaseRepo(workdir / "repo")
    repo.write_release(demo_release())
    commit = repo.commit("demo release")
    source = ReleaseSource.open(repo.path)
    release = source.snapshot(commit).releases["demo"]
    cache_dir = workdir / "cache"
    gate = gate_input(release, version_id(release), source, str(cache_dir), model_commit=commit, checks_commit=commit)
    spec = gate["spec"]
    model = in_process.fetch_model(spec["model"], cache_dir, repo.path, commit)
    say("warming up imports (load + one image, not timed)")
    baseline_seconds(model, spec, spec["checks"]["golden"])
    baselines = [baseline_seconds(model, spec, spec["checks"]["golden"]) for _ in range(BASELINE_RUNS)]
    baseline = statistics.median(baselines)
    say(f"baseline {baseline:.2f}s; running the gate in this process")
    started = time.perf_counter()
    report = run_gate(gate)
    local_s = time.perf_counter() - started
    if not report.ok:
        raise RuntimeError(f"the demo's gate failed in-process: {report.summary()}")
    checks = check_seconds(report)
    detail: dict[str, object] = {"baseline_s": [round(s, 3) for s in baselines], "in_process_check_s": checks}
    out = [Figure("gate", "gate wall time, in-process (diffops check)", local_s, "s", "load + 1 image", baseline,
                  ratio(local_s, baseline), detail=detail)]
    say("tracking the gate as an MLflow run (embedded SQLite store): first, again, with 1024 px images")
    out += tracking(workdir / "tracking", report, release.spec, commit, local_s)
    if head is not None:
        say("running the same gate as a Ray job (what the controller does)")
        resources = spec["replicas"]
        started = time.perf_counter()
        job_report = RayJobGate(DASHBOARD, ensure_token()).run(gate, resources["cpus"], resources["gpus"])
        job_s = time.perf_counter() - started
        if not job_report.ok:
            raise RuntimeError(f"the demo's gate failed as a Ray job: {job_report.summary()}")
        detail = {**detail, "ray_job_report_s": job_report.seconds,
                  "ray_job_check_s": check_seconds(job_report)}
        out.append(Figure("gate", "gate wall time, as a Ray job (controller)", job_s, "s", "load + 1 image", baseline,
                          ratio(job_s, baseline), detail=detail))
    return out


def tracking(state_dir: Path, report: GateReport, spec: Spec, commit: str, gate_s: float) -> list[Figure]:
    """Logging a gate run, against the gate it records: the first into a new store (MLflow's import and the store's
    schema), the next one, and one carrying production-size images (two 1024x1024 noise PNGs, ~3 MB each)."""
    runs = GateRuns(Tracker.for_state_dir(state_dir), "bench")
    timed = []
    noise = {name: base64.b64encode(png_noise(1024)).decode() for name in ("golden-produced.png", "golden-compare.png")}
    for which in (report, report, replace(report, artifacts={**report.artifacts, **noise})):
        started = time.perf_counter()
        if runs.record(which, spec, commit, strict=True) is None:
            raise RuntimeError("the gate run was not tracked")
        timed.append(time.perf_counter() - started)
    first, again, large = timed
    baseline = "gate in-process"
    return [Figure("gate", "tracking a gate run, first in a new store", first, "s", baseline, gate_s, ratio(first, gate_s)),
            Figure("gate", "tracking a gate run", again, "s", baseline, gate_s, ratio(again, gate_s)),
            Figure("gate", "tracking a gate run with 1024 px images", large, "s", baseline, gate_s, ratio(large, gate_s),
                   detail={"artifact_bytes": sum(len(base64.b64decode(v)) for v in noise.values())})]


def png_noise(side: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def bench(ctx: Context) -> list[Figure]:
    return run(ctx.workdir, ctx.say, ctx.ray())
