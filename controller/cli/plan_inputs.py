"""What `diffops diff` reads beyond the two commits: each new model's size and the nodes holding it.

The I/O shell around `controller.plan.changes.with_downloads`, shared by `diffops diff` and the pull-request plan of
`diffops experiment promote`, so both print the same plan. Sizes come from a model store's listing (no file is
read): models in the repo at the target commit always (offline), object stores only when asked; the holders from
the controller's state in the state dir, when there is one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from controller.parse.release import Release
from controller.plan.changes import ReleaseChange, diff_releases, with_downloads
from controller.plan.downloads import ModelSize, held_nodes
from controller.source.git_source import ReleaseSource
from controller.state.store import StateFileError, Store
from serving.stores import open_store

__all__ = ["held_models", "model_size", "planned_changes", "sized_models"]


def planned_changes(source: ReleaseSource, before: Mapping[str, Release], after: Mapping[str, Release], target: str,
                    state_dir: Path, remote_sizes: bool = False) -> list[ReleaseChange]:
    """The per-release changes from `before` to `after` (the releases at commit `target`), each with its download."""
    changes = diff_releases(before, after)
    starting = [after[c.name] for c in changes if c.impact.replicas_to_start and c.name in after]
    return with_downloads(changes, after, sized_models(source.path, target, starting, remote_sizes), held_models(state_dir))


def sized_models(repo: Path, revision: str, releases: Iterable[Release], remote: bool) -> dict[str, ModelSize | str]:
    """Each release's model size by digest, or the reason it is unknown; a digest shared by releases is listed once."""
    uris = {release.spec.model.digest: release.spec.model.uri for release in releases}
    return {digest: model_size(uri, repo, revision, remote) for digest, uri in uris.items()}


def model_size(uri: str, repo: Path, revision: str, remote: bool) -> ModelSize | str:
    if uri.startswith("file:///"):
        return "a path on the controller's machine"
    if uri.startswith(("models:/", "hf://")):
        return "resolved when the controller fetches it"
    if not uri.startswith("file://") and not remote:
        return "in an object store; --model-sizes lists it"
    try:
        listing = open_store(uri, repo=repo, commit=revision).list()
    except Exception as err:  # whatever the store answers, the plan names it and goes on
        return f"could not list {uri}: {type(err).__name__}: {err}"
    return ModelSize(sum(size for _, size in listing), len(listing))


def held_models(state_dir: Path) -> dict[str, tuple[str, ...]]:
    """Model digest -> the nodes whose caches hold it, from the controller's state (none without one)."""
    path = state_dir / "state.db"
    if not path.exists():
        return {}
    try:
        store = Store(path, readonly=True)
    except StateFileError:  # a newer diffops's state: the plan goes on without it (`status` says what to do)
        return {}
    try:
        state = store.load()
    finally:
        store.close()
    return held_nodes(state.versions, state.apps)
