"""The `diffops` command line, authoring side: lint, diff, schema, model artifacts.

Each command parses its options, calls the pure or I/O module that does the
work, prints, and maps failures to an exit code and a message saying what to do.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from controller.cli import gate as cli_gate
from controller.cli import operate as cli_operate
from controller.cli.common import fail, open_source, release_at, repo_option, state_dir_option
from controller.parse.release import Release
from controller.plan import report as diff_report
from controller.plan.changes import diff_releases
from controller.source.git_source import ReleaseSource, SourceError
from serving.manifest import MANIFEST_NAME, ArtifactError, manifest_of


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="diffops")
def main() -> None:
    """diffops: GitOps releases of diffusion models to Ray Serve.

    Release files live in releases/<name>.yaml of a git repository; every
    command reads them from git objects at a revision, never the work tree.
    """


@main.command()
@repo_option
@state_dir_option
@click.option("--rev", default=None, help="Revision to validate (default: HEAD).")
def lint(repo: str, state_dir: Path, rev: str | None) -> None:
    """Validate every release file at a revision; print file:line:col errors, exit 1 on any."""
    source = open_source(repo, state_dir)
    try:
        snapshot = source.snapshot(rev)
    except SourceError as err:
        fail(str(err), 2)
    except Exception as err:  # whatever is committed, lint answers with a message, never a traceback
        fail(f"could not read releases at {rev or 'HEAD'}: {type(err).__name__}: {err}; this is a bug in diffops, please report it", 2)
    for error in snapshot.errors:
        click.echo(str(error))
    bad = sum(1 for f in snapshot.files.values() if f.errors)
    good = len(snapshot.files) - bad
    click.echo(f"{good} valid, {bad} invalid release file(s) at {snapshot.revision[:12]}", err=True)
    sys.exit(1 if bad else 0)


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
@click.option("--format", "fmt", type=click.Choice(["text", "json", "markdown"]), default="text", show_default=True)
def diff(repo: str, state_dir: Path, revisions: str | None, fmt: str) -> None:
    """Per release: added/changed/removed fields, change class, version ids and GPU impact.

    A..B compares two revisions, A...B compares B with its merge base with A
    (what a pull request changes), A alone means A..HEAD; the default is the
    last commit (HEAD~1..HEAD). Exits 1 if B has invalid release files.
    """
    source = open_source(repo, state_dir)
    try:
        base_rev, target_rev = resolve_range(source, revisions)
        before = source.snapshot(base_rev)
        after = source.snapshot(target_rev, base=before)
    except SourceError as err:
        fail(str(err), 2)
    changes = diff_releases(before.releases, after.releases)
    errors = after.errors
    if fmt == "json":
        click.echo(diff_report.as_json(changes, errors, base_rev, target_rev))
    elif fmt == "markdown":
        click.echo(diff_report.as_markdown(changes, errors, base_rev, target_rev))
    else:
        click.echo(diff_report.as_text(changes, errors))
    sys.exit(1 if errors else 0)


@main.command()
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file instead of stdout.")
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


@main.group()
def model() -> None:
    """Model artifacts: digests to pin, and fetching into the verified cache."""


@model.command("digest")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--write", is_flag=True, help=f"Also write {MANIFEST_NAME} into PATH so a mismatch can name the file.")
def model_digest(path: Path, write: bool) -> None:
    """Print the digest of a model directory, to pin as spec.model.digest."""
    try:
        manifest = manifest_of(path)
    except ArtifactError as err:
        fail(f"{path}: {err}")
    if write:
        (path / MANIFEST_NAME).write_text(manifest.text())
        click.echo(f"wrote {path / MANIFEST_NAME} ({len(manifest.files)} files)", err=True)
    click.echo(manifest.digest)


@model.command("fetch")
@click.argument("release_name", metavar="RELEASE")
@repo_option
@state_dir_option
@click.option("--rev", default=None, help="Revision to read the release at (default: HEAD).")
@click.option("--reverify", is_flag=True, help="Re-hash a cached copy instead of trusting the cache.")
def model_fetch(release_name: str, repo: str, state_dir: Path, rev: str | None, reverify: bool) -> None:
    """Fetch and verify a release's model into the cache (what a replica does before loading)."""
    from serving.artifacts import ModelCache, fetch

    source = open_source(repo, state_dir)
    release, commit = release_at(source, release_name, rev)
    started = time.monotonic()
    click.echo(f"{release_name}: fetching {release.spec.model.uri} ({release.spec.model.digest[:19]}…)", err=True)
    try:
        result = fetch(
            release.spec.model.uri, release.spec.model.digest, ModelCache(state_dir / "models"),
            repo=source.path, commit=commit, reverify=reverify,
        )
    except ArtifactError as err:
        fail(f"{release_name}: model refused: {err}; the model is not cached and nothing will load it")
    how = "cache hit, nothing transferred" if result.cached else f"transferred {result.bytes_transferred} bytes"
    click.echo(f"{release_name}: verified {result.files} files, {how}, in {time.monotonic() - started:.2f}s", err=True)
    click.echo(str(result.path))


for command in [*cli_gate.COMMANDS, *cli_operate.COMMANDS]:
    main.add_command(command)

if __name__ == "__main__":
    main()
