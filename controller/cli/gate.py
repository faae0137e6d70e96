"""The `diffops` command line, gate side: `check` (the gate, locally) and `golden` (write the reference)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from checks.report import GateReport
from controller.cli.common import fail, open_source, release_at, repo_option, state_dir_option, tracker_at, tracker_option, tracking_option
from controller.cli.model import resolved_model
from controller.cli.output import choose, dump, legacy_format_option, output_option
from controller.cli.terminal import progress
from controller.plan.versions import version_id

__all__ = ["COMMANDS", "MARKS", "check", "golden", "report_text"]

MARKS = {"passed": "✓", "failed": "✗", "error": "✗", "skipped": "-"}
COLORS = {"passed": "green", "failed": "red", "error": "red", "skipped": "yellow"}


def report_text(report: GateReport, saved: list[Path]) -> str:
    """The gate's report for a terminal; the marks carry ANSI colour, which click drops where colour is off or piped."""
    verdict = "passed" if report.ok else "FAILED"
    lines = [f"{report.release} {report.version}: gate {click.style(verdict, fg='green' if report.ok else 'red', bold=True)} "
             f"in {report.seconds:.1f}s"]
    for check in report.checks:
        mark = click.style(MARKS[check.outcome], fg=COLORS[check.outcome])
        lines.append(f"  {mark} {check.name:<12} {check.outcome:<8} {check.message}")
    lines += [f"  saved {path}" for path in saved]
    return "\n".join(lines)


@click.command()
@click.argument("release_name", metavar="RELEASE")
@repo_option
@state_dir_option
@click.option("--rev", default=None, help="Revision to check (default: HEAD).")
@click.option("--track", is_flag=True, help="Log the gate as a tracking run (kind gate, tag diffops.where=local).")
@tracking_option
@tracker_option
@output_option("text", "json", "yaml")
@legacy_format_option("text", "json", "yaml")
def check(release_name: str, repo: str, state_dir: Path, rev: str | None, track: bool, tracking_uri: str | None, tracker: str,
          output: str, legacy_format: str | None) -> None:
    """Run the gate locally (artifact, dependency, cuda, load, golden, performance, quality); exit 1 on failure."""
    from controller.gate.runner import LocalGate, gate_input
    from controller.tick.prepare import latest_features

    source = open_source(repo, state_dir)
    release, commit = release_at(source, release_name, rev)
    version = version_id(release)
    fmt = choose(output, legacy_format)
    click.echo(f"{release_name}: checking version {version} at {commit[:12]}; next: artifact, dependency, load, golden, "
               "performance, quality", err=True)
    quality = release.spec.checks.quality
    baseline = latest_features(state_dir / "gate" / release_name, version) if quality and quality.max_distance is not None else None
    model = release.spec.model
    uri, roots = resolved_model(release_name, model, state_dir, tracking_uri)
    if uri != model.uri:  # a registered model: fetched (and verified) here first, so the gate finds it in the cache
        from serving.artifacts import ModelCache, fetch
        from serving.manifest import ArtifactError

        try:
            fetch(uri, model.digest, ModelCache(state_dir / "models"), allowed_roots=roots)
        except ArtifactError as err:
            fail(f"{release_name}: model refused: {err}")
        model = model.model_copy(update={"uri": uri})
    with progress(f"{release_name} {version}: gate running (artifact, dependency, load, golden, performance, quality)"):
        report = LocalGate().run(gate_input(release, version, source, str(state_dir / "models"), model_commit=commit,
                                            checks_commit=commit, model=model, quality_baseline=baseline))
    saved = report.save_artifacts(state_dir / "gate" / release_name / version)
    run, untracked = None, None
    if track:
        from controller.tracking.gate_runs import GateRuns
        from controller.tracking.tracker import NAMES, TrackingError
        from serving.code_pin import fingerprint

        try:
            with progress(f"{release_name} {version}: logging the gate to {NAMES[tracker]}"):
                run = GateRuns(tracker_at(state_dir, tracking_uri, tracker), fingerprint()).record(
                    report, release.spec, commit, tags={"diffops.where": "local"}, strict=True)
        except TrackingError as err:
            untracked = err
    if fmt != "text":
        click.echo(dump({**report.to_dict(with_artifacts=False), "saved": [str(p) for p in saved], "run": run}, fmt))
    else:
        click.echo(report_text(report, saved) + (f"\n  tracked: {run['link']}" if run else ""))
    if untracked is not None:
        fail(f"{release_name}: the gate ran (report above) but was not tracked: {untracked}")
    sys.exit(0 if report.ok else 1)


@click.command()
@click.argument("release_name", metavar="RELEASE")
@repo_option
@state_dir_option
@click.option("--rev", default=None, help="Revision whose release to render (default: HEAD).")
@click.option("--write", is_flag=True, required=True, help="Write the reference PNG into the work tree (commit it in your pull request).")
def golden(release_name: str, repo: str, state_dir: Path, rev: str | None, write: bool) -> None:
    """Render the release's golden prompt/seed and write it as the reference image."""
    from checks.golden import render
    from serving.artifacts import ModelCache, fetch
    from serving.generator import PipelineRunner
    from serving.pipeline import load_pipeline, pick_device

    source = open_source(repo, state_dir)
    release, commit = release_at(source, release_name, rev)
    if release.spec.checks.golden is None:
        fail(f"{release_name}: no spec.checks.golden configured")
    if source.repo.working_tree_dir is None:
        fail(f"{source.path} has no work tree to write the reference into; run this in a clone")
    started = time.monotonic()
    spec = release.model_dump(mode="json")["spec"]
    model = release.spec.model
    with progress(f"{release_name}: fetching {model.uri}, loading and rendering the golden prompt"):
        fetched = fetch(model.uri, model.digest, ModelCache(state_dir / "models"), repo=source.path, commit=commit)
        device = pick_device()
        pipeline = load_pipeline(fetched.path, dtype=model.dtype, sampler=spec["generation"]["sampler"], device=device)
        image = render(PipelineRunner(pipeline, device), spec["checks"]["golden"], spec["generation"])
    target = Path(source.repo.working_tree_dir) / release.spec.checks.golden.reference
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(image)
    click.echo(f"{release_name}: wrote {target} ({len(image)} bytes, rendered on {device} in {time.monotonic() - started:.1f}s); "
               f"next: commit it with the release change")


COMMANDS = [check, golden]
