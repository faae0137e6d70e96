"""The `diffops experiment` commands: `run` (a grid of configs over prompts, each cell an MLflow run), `reproduce`
(one cell drawn again, compared with its recorded images) and `schema` (the experiment file's JSON Schema).

Thin shells over `controller.experiments`; the group is importable as `controller.cli.experiment.experiment`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from controller.cli.common import fail, open_source, repo_option, state_dir_option, tracker_at, tracker_option, tracking_option
from controller.cli.promote import promote
from controller.cli.terminal import is_terminal, print_rich, render_text
from controller.experiments.schema import SORT_METRICS, schema_text

__all__ = ["experiment", "promote", "reproduce", "run", "schema"]


@click.group()
def experiment() -> None:
    """Experiments: sweep models, samplers, steps, CFG and seeds over a prompt set, tracked in MLflow."""


def _say(line: str) -> None:
    click.echo(line, err=True)


@experiment.command("run")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@repo_option
@click.option("--rev", default=None, help="Revision whose release the experiment starts from (default: HEAD).")
@state_dir_option
@tracking_option
@tracker_option
@click.option("-o", "--output-dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Also write contact-sheet.png and table.json here.")
@click.option("--sort", type=click.Choice(SORT_METRICS), default=None,
              help="Sort the table by this metric (default: the file's spec.sort).")
@click.option("--ray-address", default=None, metavar="URL",
              help="Draw on this Ray cluster (its dashboard URL, or GCS host:port): one job per model, all models at once.")
def run(file: Path, repo: str, rev: str | None, state_dir: Path, tracking_uri: str | None, tracker: str, output_dir: Path | None,
        sort: str | None, ray_address: str | None) -> None:
    """Run every cell of the experiment FILE, log each as a run (MLflow, or --tracker), print the comparison table."""
    from controller.cli.version import installed
    from controller.experiments.loader import InvalidExperiment, read_experiment
    from controller.experiments.on_ray import RayDrawer, RayDrawError
    from controller.experiments.run import ExperimentRunError, run_experiment
    from controller.experiments.table import comparison_table
    from controller.source.git_source import SourceError
    from controller.tracking.mlflow_store import TrackingError

    try:
        found = read_experiment(file)
    except InvalidExperiment as err:
        fail(f"{file} is not a valid experiment file:\n" + "\n".join(map(str, err.errors)))
    source = open_source(repo, state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    metric = sort or found.experiment.spec.sort
    ray = None
    if ray_address is not None:
        from controller.apply.dashboard import ray_token
        from controller.apply.ray_cluster import dashboard_url_for

        ray = RayDrawer(dashboard_url_for(ray_address), ray_token())
    bar = tqdm(unit="image", desc=f"experiment {found.experiment.name}", file=sys.stderr, disable=not is_terminal(sys.stderr))
    try:
        with bar:
            runs = tracker_at(state_dir, tracking_uri, tracker)
            outcome = run_experiment(found, file.read_bytes(), source, rev, state_dir, runs, sort=metric,
                                     say=bar.write if not bar.disable else _say, on_drawn=lambda cell: bar.update(len(found.prompts)),
                                     controller_version=installed("diffops"), ray=ray)
    except InvalidExperiment as err:
        fail(f"{file}:\n" + "\n".join(map(str, err.errors)))
    except (ExperimentRunError, RayDrawError) as err:
        fail(str(err))
    except (TrackingError, SourceError) as err:
        fail(str(err), 2)
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "contact-sheet.png").write_bytes(outcome.sheet)
        (output_dir / "table.json").write_bytes(outcome.table_json())
        _say(f"experiment {found.experiment.name}: wrote {output_dir / 'contact-sheet.png'} and {output_dir / 'table.json'}")
    table = comparison_table(f"{found.experiment.name}: {len(outcome.rows)} cells at {outcome.commit[:12]}, sorted by {metric} "
                             f"(parent run {outcome.parent_run_id})", outcome.rows, metric)
    if is_terminal(sys.stdout):
        print_rich(table)
    else:
        click.echo(render_text(table, 220), nl=False)


@experiment.command("reproduce")
@click.argument("run_id")
@repo_option
@state_dir_option
@tracking_option
@click.option("--max-phash-distance", type=click.IntRange(0, 64), default=0, show_default=True,
              help="Largest pHash distance a prompt's image may have from the recorded one.")
def reproduce(run_id: str, repo: str, state_dir: Path, tracking_uri: str | None, max_phash_distance: int) -> None:
    """Draw the cell of RUN_ID again from the run's own params; per prompt, the pHash and pixel distance to the recorded
    image. Exit 1 when a prompt's distance exceeds --max-phash-distance."""
    from controller.experiments.reproduce import ReproduceError
    from controller.experiments.reproduce import reproduce as redraw
    from controller.tracking.mlflow_store import TrackingError
    from serving.artifacts import ArtifactError

    def open_repo(commit: str) -> tuple[Path, str]:
        return open_source(repo, state_dir).path, commit

    try:
        diffs = redraw(run_id, tracker_at(state_dir, tracking_uri), state_dir, open_repo, say=_say)
    except (ReproduceError, ArtifactError) as err:
        fail(str(err))
    except TrackingError as err:
        fail(str(err), 2)
    for diff in diffs:
        mark = "ok" if diff.ok(max_phash_distance) else "DIFFERS"
        click.echo(f"prompt {diff.index} {diff.prompt[:60]!r}: phash distance {diff.phash_distance}, pixels max {diff.max_abs} "
                   f"mean {diff.mean_abs:.4f} {mark}")
    bad = [d for d in diffs if not d.ok(max_phash_distance)]
    if bad:
        fail(f"run {run_id}: {len(bad)} of {len(diffs)} prompt(s) differ past pHash distance {max_phash_distance}, first prompt "
             f"{bad[0].index} {bad[0].prompt[:60]!r} at {bad[0].phash_distance}; the hardware or packages draw differently")
    click.echo(f"run {run_id}: reproduced, {len(diffs)} prompt(s) within pHash distance {max_phash_distance}")


@experiment.command("schema")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the schema to FILE instead of stdout.")
def schema(output: Path | None) -> None:
    """Print the experiment file JSON Schema (committed as experiments/experiment.schema.json)."""
    text = schema_text()
    if output:
        output.write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


experiment.add_command(promote)
