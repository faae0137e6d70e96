"""`diffops model`: digests to pin, fetching into the verified cache, and the model registry on MLflow.

`register` hashes a model (a directory, or an object-store URI verified through
the cache), publishes a local directory to `--model-store` by digest when given,
and records a registered version with provenance tags
(`controller.tracking.registry`); `promote` moves an alias; `pin` rewrites a
release file's digest to what its `models:/` URI resolves to now, for a pull
request (`controller.parse.edit.set_fields`, comments kept).
"""

from __future__ import annotations

import difflib
import shlex
import time
from pathlib import Path

import click

from controller.cli.common import fail, open_source, release_at, repo_option, state_dir_option, tracker_at, tracking_option
from controller.cli.output import choose, dump, output_option
from controller.cli.terminal import progress
from controller.tracking.registry import ModelRegistry, RegisteredVersion, RegistryError, provenance_tags, refusal, registry_ref
from serving.manifest import MANIFEST_NAME, ArtifactError, Manifest, manifest_of
from serving.schema import ModelSpec

__all__ = ["model", "resolved_model"]


@click.group()
def model() -> None:
    """Model artifacts: digests to pin, the verified cache, and the model registry (MLflow)."""


def _registry(state_dir: Path, tracking_uri: str | None) -> ModelRegistry:
    return ModelRegistry(tracker_at(state_dir, tracking_uri))


@model.command("digest")
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--write", is_flag=True, help=f"Also write {MANIFEST_NAME} into PATH so a mismatch can name the file.")
def model_digest(path: Path, write: bool) -> None:
    """Print the digest of a model directory, to pin as spec.model.digest."""
    try:
        with progress(f"hashing {path}"):
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
@tracking_option
@click.option("--rev", default=None, help="Revision to read the release at (default: HEAD).")
@click.option("--reverify", is_flag=True, help="Re-hash a cached copy instead of trusting the cache.")
def model_fetch(release_name: str, repo: str, state_dir: Path, tracking_uri: str | None, rev: str | None, reverify: bool) -> None:
    """Fetch and verify a release's model into the cache (what a replica does before loading); a models:/ URI is
    resolved through the registry first, and refused when its digest is not the pinned one."""
    from serving.artifacts import ModelCache, fetch

    source = open_source(repo, state_dir)
    release, commit = release_at(source, release_name, rev)
    digest = release.spec.model.digest
    uri, roots = resolved_model(release_name, release.spec.model, state_dir, tracking_uri)
    started = time.monotonic()
    click.echo(f"{release_name}: fetching {uri} ({digest[:19]}…)", err=True)
    try:
        with progress(f"{release_name}: fetching and verifying {uri}"):
            result = fetch(uri, digest, ModelCache(state_dir / "models"), repo=source.path, commit=commit, reverify=reverify,
                           allowed_roots=roots)
    except ArtifactError as err:
        fail(f"{release_name}: model refused: {err}; the model is not cached and nothing will load it")
    except Exception as err:  # the store's own errors (an endpoint that does not answer, a part that never came)
        fail(f"{release_name}: fetch from {uri} failed: {type(err).__name__}: {err}; what landed is kept: run it again to "
             "resume", 2)
    how = "cache hit, nothing transferred" if result.cached else f"transferred {result.bytes_transferred} bytes"
    if result.resumed_bytes:
        how += f" (and {result.resumed_bytes} bytes resumed from an earlier attempt)"
    click.echo(f"{release_name}: verified {result.files} files, {how}, in {time.monotonic() - started:.2f}s", err=True)
    click.echo(str(result.path))


def resolved_model(release_name: str, model: ModelSpec, state_dir: Path, tracking_uri: str | None) -> tuple[str, tuple[Path, ...]]:
    """Where a release's model is fetched from, and the local root that fetch may read: a `models:/` URI resolved
    through the registry (exit 1 when its digest is not the pinned one), any other URI as it is."""
    ref = registry_ref(model.uri)
    if ref is None:
        return model.uri, ()
    found = _lookup(_registry(state_dir, tracking_uri), ref.uri)
    problem = refusal(ref, model.digest, found, release_name)
    if problem is not None:
        fail(f"{release_name}: model refused: {problem}")
    click.echo(f"{release_name}: {ref.uri} is {found.uri} at {found.source}", err=True)
    roots = (Path(found.source.removeprefix("file://")),) if found.source.startswith("file:///") else ()
    return found.source, roots


def _lookup(registry: ModelRegistry, uri: str) -> RegisteredVersion:
    ref = registry_ref(uri)
    assert ref is not None
    try:
        return registry.lookup(ref)
    except RegistryError as err:
        fail(str(err))


def _remote_digest(uri: str, state_dir: Path) -> str:
    """The digest of a model in an object store or on the Hub: its manifest's, verified by fetching every file into
    the cache (nothing is registered that does not verify)."""
    from serving.artifacts import ModelCache, fetch
    from serving.stores import open_store

    cache = ModelCache(state_dir / "models")
    try:
        scratch = state_dir / "models" / ".register"
        scratch.mkdir(parents=True, exist_ok=True)
        with open_store(uri, repo=None, commit=None, scratch=scratch).open(MANIFEST_NAME) as stream:
            digest = Manifest.parse(stream.read().decode()).digest
        with progress(f"fetching and verifying {uri}"):
            fetch(uri, digest, cache)
    except (ArtifactError, OSError, ValueError) as err:
        fail(f"{uri}: {err}; a model registered from a store needs its {MANIFEST_NAME} (`diffops model digest PATH --write` "
             "before uploading)")
    return digest


@model.command("register")
@click.argument("what", metavar="PATH|URI")
@click.option("--name", required=True, help="Registered model name (models:/NAME/...).")
@click.option("--base-model", default=None, metavar="X", help="What it was fine-tuned from (a provenance tag).")
@click.option("--training-run", default=None, metavar="RUN_ID", help="The MLflow run that trained it (a provenance tag).")
@click.option("--model-store", default=None, metavar="URI",
              help="Object store (s3://bucket/prefix, gs://, az://) a local directory is uploaded to, by digest; without it "
                   "the version's source is the directory itself (readable only on this machine).")
@click.option("--description", default=None, help="Version description shown by MLflow.")
@state_dir_option
@tracking_option
@output_option("text", "json", "yaml")
def register(what: str, name: str, base_model: str | None, training_run: str | None, model_store: str | None,
             description: str | None, state_dir: Path, tracking_uri: str | None, output: str) -> None:
    """Register a model version: its digest, where its bytes are, and its provenance (idempotent per digest)."""
    from controller.apply.model_store import STORE_SCHEMES, publish, published_uri
    from serving.artifacts import ModelCache, fetch

    started = time.monotonic()
    local = Path(what.removeprefix("file://")) if what.startswith("file://") or "://" not in what else None
    if local is not None:
        local = local.expanduser().resolve()
        if not local.is_dir():
            fail(f"{what}: not a model directory; give a directory or an object-store URI (s3://, gs://, az://, hf://)")
        try:
            with progress(f"hashing {local}"):
                digest = manifest_of(local).digest
        except ArtifactError as err:
            fail(f"{local}: {err}")
        source = local.as_uri()
        if model_store:
            if not model_store.startswith(STORE_SCHEMES):
                fail(f"--model-store {model_store!r}: give an object store URI, e.g. s3://bucket/models")
            source = published_uri(model_store, digest)
            try:  # published from the verified cache copy, whose manifest goes last
                with progress(f"uploading to {source}"):
                    copy = fetch(local.as_uri(), digest, ModelCache(state_dir / "models"), allowed_roots=(local,))
                    publish(copy.path, source)
            except ArtifactError as err:
                fail(str(err))
    else:
        digest, source = _remote_digest(what, state_dir), what
    registry = _registry(state_dir, tracking_uri)
    tags = provenance_tags(digest, what if local is None else local.as_uri(), base_model, training_run)
    try:
        done = registry.register(name, source, tags, description)
    except RegistryError as err:
        fail(str(err))
    version = done.version
    how = "registered" if done.created else "already registered (same digest), kept"
    click.echo(f"{name}: {how} version {version.version} ({version.uri}) from {version.source} in "
               f"{time.monotonic() - started:.1f}s; next: pin it in a release as spec.model: "
               f"{{uri: {version.uri}, digest: \"{version.digest}\"}} or promote it with "
               f"`diffops model promote {name} {version.version} --alias production`", err=True)
    fmt = choose(output)
    if fmt == "text":
        click.echo(f"{version.uri} {version.digest}")
    else:
        click.echo(dump({"name": name, "version": version.version, "uri": version.uri, "digest": version.digest,
                         "source": version.source, "created": done.created, "tags": version.tags}, fmt))


@model.command("promote")
@click.argument("name")
@click.argument("version")
@click.option("--alias", default="production", show_default=True, help="Alias to point at VERSION (models:/NAME@ALIAS).")
@state_dir_option
@tracking_option
def promote(name: str, version: str, alias: str, state_dir: Path, tracking_uri: str | None) -> None:
    """Point an alias at a registered version; releases pinned to the old digest report drift until pinned again."""
    registry = _registry(state_dir, tracking_uri)
    try:
        target = registry.get(name, version)
        before = registry.promote(name, version, alias)
    except RegistryError as err:
        fail(str(err))
    moved = (f"moved from version {before.version} ({before.digest}) to {version} ({target.digest})" if before is not None
             else f"set to version {version} ({target.digest}), new")
    if before is not None and before.version == version:
        moved = f"already at version {version} ({target.digest}); unchanged"
    click.echo(f"{name}: alias {alias} {moved}; next: releases using models:/{name}@{alias} that pin another digest "
               f"report drift until `diffops model pin RELEASE` is committed")


@model.command("pin")
@click.argument("release_name", metavar="RELEASE")
@repo_option
@state_dir_option
@tracking_option
def pin(release_name: str, repo: str, state_dir: Path, tracking_uri: str | None) -> None:
    """Rewrite releases/RELEASE.yaml in the work tree to the digest its models:/ URI resolves to now (the URI is
    kept: an alias stays an alias); print the diff and the commit to make."""
    from controller.parse.edit import EditError, set_fields
    from controller.parse.loader import InvalidRelease, parse_release

    path = Path(repo) / "releases" / f"{release_name}.yaml"
    if not path.is_file():
        fail(f"{path}: no such release file; give the repository's work tree with --repo")
    text = path.read_text()
    try:
        release = parse_release(text.encode(), f"releases/{release_name}.yaml")
    except InvalidRelease as err:
        fail(f"{err}\n{path} does not validate; fix it first (`diffops lint`)")
    ref = registry_ref(release.spec.model.uri)
    if ref is None:
        fail(f"{release_name}: spec.model.uri is {release.spec.model.uri}, not a registered model (models:/NAME@ALIAS or "
             "models:/NAME/VERSION); pin other models with `diffops model digest PATH`")
    found = _lookup(_registry(state_dir, tracking_uri), ref.uri)
    if found.digest is None:
        fail(f"{release_name}: {refusal(ref, release.spec.model.digest, found, release_name)}")
    if found.digest == release.spec.model.digest:
        click.echo(f"{release_name}: already pinned to {found.uri} ({found.digest}); nothing to change", err=True)
        return
    try:
        edited = set_fields(text, {"spec.model.digest": found.digest})
    except EditError as err:
        fail(f"{path}: {err}")
    path.write_text(edited)
    click.echo("".join(difflib.unified_diff(text.splitlines(keepends=True), edited.splitlines(keepends=True),
                                            f"a/releases/{release_name}.yaml", f"b/releases/{release_name}.yaml")), nl=False)
    message = f"{release_name}: pin {ref.uri} to {found.uri} ({found.digest[:19]})"
    click.echo(f"{release_name}: {path} now pins {found.uri} ({found.digest}, was {release.spec.model.digest}); next: "
               f"review the diff, then commit it: git -C {shlex.quote(repo)} commit -m {shlex.quote(message)} "
               f"releases/{release_name}.yaml", err=True)
