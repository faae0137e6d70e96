"""The `diffops` command line: the group (its `--no-color`, every option's DIFFOPS_ variable, `completion`,
`version`) and the authoring side: lint, diff, schema; `model` (artifacts and the registry) is `controller.cli.model`.

Each command parses its options, calls the pure or I/O module that does the
work, prints, and maps failures to an exit code and a message saying what to do.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from controller.cli import cost as cli_cost
from controller.cli import experiment as cli_experiment
from controller.cli import gate as cli_gate
from controller.cli import model as cli_model
from controller.cli import monitoring as cli_monitoring
from controller.cli import operate as cli_operate
from controller.cli import quality as cli_quality
from controller.cli import review as cli_review
from controller.cli.common import fail, open_source, repo_option, state_dir_option
from controller.cli.output import Output, choose, dump, legacy_format_option, output_option
from controller.cli.plan_inputs import planned_changes
from controller.cli.shell import apply_envvars, completion
from controller.cli.terminal import color_wanted
from controller.cli.version import version
from controller.parse.loader import ReleaseError
from controller.parse.release import Release
from controller.plan import report as diff_report
from controller.plan.changes import ReleaseChange
from controller.source.git_source import ReleaseSource, SourceError

__all__ = ["diff", "diff_exit_code", "diff_output", "lint", "main", "release_schema_text", "resolve_range", "schema"]


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="diffops")
@click.option("--no-color", is_flag=True, help="No colour in any output (also: NO_COLOR set and not empty).")
@click.pass_context
def main(ctx: click.Context, no_color: bool) -> None:
    """diffops: GitOps releases of diffusion models to Ray Serve.

    Release files live in releases/<name>.yaml of a git repository; every
    command reads them from git objects at a revision, never the work tree.

    Every option can also be set as DIFFOPS_<OPTION> (--state-dir:
    DIFFOPS_STATE_DIR, -o: DIFFOPS_OUTPUT); the command line wins. Exit
    codes: 0 ok, 1 failed (or, with diff --exit-code, differences), 2 usage
    error or an input diffops could not read (revision, repository, state).
    """
    if not color_wanted(no_color, os.environ):
        ctx.color = False


@main.command()
@repo_option
@state_dir_option
@click.option("--rev", default=None, help="Revision to validate (default: HEAD).")
@output_option("text", "json", "yaml")
def lint(repo: str, state_dir: Path, rev: str | None, output: str) -> None:
    """Validate every release file at a revision; print file:line:col errors, exit 1 on any."""
    source = open_source(repo, state_dir)
    try:
        snapshot = source.snapshot(rev)
    except SourceError as err:
        fail(str(err), 2)
    except Exception as err:  # whatever is committed, lint answers with a message, never a traceback
        fail(f"could not read releases at {rev or 'HEAD'}: {type(err).__name__}: {err}; this is a bug in diffops, please report it", 2)
    bad = sum(1 for f in snapshot.files.values() if f.errors)
    good = len(snapshot.files) - bad
    fmt = choose(output)
    if fmt == "text":
        for error in snapshot.errors:
            click.echo(str(error))
    else:
        click.echo(dump({"revision": snapshot.revision, "valid": good, "invalid": bad, "errors": _error_rows(snapshot.errors)}, fmt))
    click.echo(f"{good} valid, {bad} invalid release file(s) at {snapshot.revision[:12]}", err=True)
    sys.exit(1 if bad else 0)


def _error_rows(errors: list[ReleaseError]) -> list[dict[str, object]]:
    return [{"file": e.file, "line": e.line, "column": e.column, "field": e.field, "message": e.message, "text": str(e)} for e in errors]


def resolve_range(source: ReleaseSource, spec: str | None) -> tuple[str, str]:
    """'A..B', 'A...B' (from the merge base), 'A' (A..HEAD), or nothing (HEAD's parent..HEAD)."""
    if not spec:
        return source.parent_of("HEAD"), source.resolve("HEAD").hexsha
    if "..." in spec:
        a, b = (part or "HEAD" for part in spec.split("...", 1))
        bases = source.repo.merge_base(source.resolve(a).hexsha, source.resolve(b).hexsha)
        if not bases:
            raise SourceError(f"{a} and {b} have no common ancestor")
        return bases[0].hexsha, source.resolve(b).hexsha
    a, _, b = spec.partition("..")
    return source.resolve(a or "HEAD").hexsha, source.resolve(b or "HEAD").hexsha


@main.command()
@repo_option
@state_dir_option
@click.argument("revisions", required=False, metavar="[A..B]")
@output_option("text", "json", "yaml", "markdown")
@legacy_format_option("text", "json", "yaml", "markdown")
@click.option("--exit-code", is_flag=True, help="Exit 1 if anything differs (invalid files at B included), 0 if nothing does.")
@click.option("--model-sizes", is_flag=True,
              help="Also list new models in object stores (s3://, gs://, az://) for their download size; without it "
                   "only models in the repo are sized (offline).")
def diff(repo: str, state_dir: Path, revisions: str | None, output: str, legacy_format: str | None, exit_code: bool,
         model_sizes: bool) -> None:
    """Per release: added/changed/removed fields, change class, version ids, GPU impact and download.

    A..B compares two revisions, A...B compares B with its merge base with A
    (what a pull request changes), A alone means A..HEAD; the default is the
    last commit (HEAD~1..HEAD). A change that starts replicas shows the model
    bytes each of their nodes may fetch (and the nodes whose caches hold it,
    from the state dir).
    Exits 1 if B has invalid release files; with --exit-code (as git diff): 0
    nothing differs, 1 differences, 2 an error (unknown revision, unreadable
    repository). markdown is made for a pull request comment.
    """
    source = open_source(repo, state_dir)
    try:
        base_rev, target_rev = resolve_range(source, revisions)
        before = source.snapshot(base_rev)
        after = source.snapshot(target_rev, base=before)
    except SourceError as err:
        fail(str(err), 2)
    changes = planned_changes(source, before.releases, after.releases, target_rev, state_dir, model_sizes)
    errors = after.errors
    click.echo(diff_output(choose(output, legacy_format), changes, errors, base_rev, target_rev))
    sys.exit(diff_exit_code(bool(changes), bool(errors), exit_code))


def diff_output(fmt: Output, changes: list[ReleaseChange], errors: list[ReleaseError], base: str, target: str) -> str:
    if fmt == "text":
        return diff_report.as_text(changes, errors)
    if fmt == "markdown":
        return diff_report.as_markdown(changes, errors, base, target)
    return dump(json.loads(diff_report.as_json(changes, errors, base, target)), fmt)


def diff_exit_code(changed: bool, invalid: bool, exit_code: bool) -> int:
    """1 when B has invalid files; with --exit-code also 1 when any release changed. (Errors exit 2 earlier.)"""
    return 1 if invalid or (exit_code and changed) else 0


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the schema to FILE instead of stdout (a file here, not an output format: the schema is JSON).")
def schema(output: Path | None) -> None:
    """Print the release file JSON Schema (committed as releases/release.schema.json)."""
    text = release_schema_text()
    if output:
        output.write_text(text)
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text, nl=False)


def release_schema_text() -> str:
    document = {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "diffops Release", **Release.model_json_schema()}
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


for command in [*cli_gate.COMMANDS, *cli_operate.COMMANDS, cli_cost.cost, completion, version]:
    main.add_command(command)
main.add_command(cli_model.model)
main.add_command(cli_experiment.experiment)
main.add_command(cli_monitoring.monitoring)
main.add_command(cli_quality.quality)
main.add_command(cli_review.review)
apply_envvars(main)

if __name__ == "__main__":
    main()
