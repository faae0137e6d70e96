"""The model registry on MLflow: registered versions with provenance, aliases, and resolving `models:/` URIs.

Used by `diffops model register|promote|pin` (the CLI) and by the controller:
`controller.tick.prepare` resolves a release's `models:/NAME@ALIAS` or
`models:/NAME/N` to the registered version's `source` (where the bytes are)
and its `diffops.digest` tag before it fetches, and `controller.tick.registry`
re-resolves the aliases of serving releases to report drift. The decisions
(`registry_ref`, `refusal`, `drift`) are pure; `ModelRegistry` is the thin
shell over MLflow's own client (`Tracker.client`). Replicas never talk to it.
"""

from __future__ import annotations

import getpass
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from controller.tracking.mlflow_store import Tracker, TrackingError
from serving.schema import REGISTRY_SCHEME, REGISTRY_URI

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

__all__ = ["DIGEST_TAG", "ModelRegistry", "RegisteredVersion", "RegistryError", "RegistryRef", "Registration", "drift",
           "provenance_tags", "refusal", "registry_ref"]

DIGEST_TAG = "diffops.digest"


class RegistryError(Exception):
    """The registry has no such model, version or alias, or cannot be reached; the message says what to do."""


@dataclass(frozen=True)
class RegistryRef:
    """A parsed `models:/` URI: a name and either an alias or a version number."""

    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"{REGISTRY_SCHEME}{self.name}@{self.alias}" if self.alias else f"{REGISTRY_SCHEME}{self.name}/{self.version}"


def registry_ref(uri: str) -> RegistryRef | None:
    """The registered model a URI names; None for any other scheme. A malformed `models:/` URI raises ValueError
    (the release schema refuses it before this is asked)."""
    if not uri.startswith(REGISTRY_SCHEME):
        return None
    match = REGISTRY_URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"{uri!r}: use models:/NAME@ALIAS or models:/NAME/VERSION")
    return RegistryRef(match["name"], match["alias"], match["version"])


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version as the registry answers it."""

    name: str
    version: str
    source: str  # where the model's bytes are (a local path's file:// URI, or an object store)
    digest: str | None  # its `diffops.digest` tag; None: not registered by diffops
    tags: dict[str, str]
    aliases: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        return f"{REGISTRY_SCHEME}{self.name}/{self.version}"


def refusal(ref: RegistryRef, pinned: str, found: RegisteredVersion, release: str) -> str | None:
    """Why a release pinning `pinned` must not use what `ref` resolves to; None when the digests agree."""
    if found.digest is None:
        return (f"{ref.uri} is {found.uri}, which has no {DIGEST_TAG} tag (not registered by diffops); register the model "
                f"with `diffops model register PATH --name {ref.name}` and pin that version")
    if found.digest == pinned:
        return None
    return (f"{ref.uri} is {found.uri} with digest {found.digest}, but the release pins {pinned}; refused (the registry is "
            f"never followed silently): run `diffops model pin {release}` and commit the change to follow it"
            + (f", or move the alias back with `diffops model promote {ref.name} VERSION --alias {ref.alias}`" if ref.alias else ""))


def drift(ref: RegistryRef, pinned: str, found: RegisteredVersion | None, error: str | None, release: str) -> str | None:
    """What a serving release's registry drift is, for status and the log; None when the registry agrees with the pin."""
    if error is not None:
        return f"cannot check {ref.uri}: {error}; serving is unchanged"
    assert found is not None
    if found.digest == pinned:
        return None
    what = found.digest or f"no {DIGEST_TAG} tag"
    return (f"{ref.uri} now resolves to {found.uri} ({what}), the release pins {pinned}; serving is unchanged; "
            f"`diffops model pin {release}` and commit to follow it"
            + (f", or `diffops model promote {ref.name} VERSION --alias {ref.alias}` to move the alias back" if ref.alias else ""))


@dataclass(frozen=True)
class Registration:
    """The outcome of `register`: the version and whether this call created it (False: the digest was there)."""

    version: RegisteredVersion
    created: bool


def provenance_tags(digest: str, source_uri: str, base_model: str | None, training_run: str | None,
                    who: str | None = None, at: float | None = None) -> dict[str, str]:
    """The tags every version diffops registers carries: digest, where it came from, who registered it and when."""
    when = datetime.fromtimestamp(at if at is not None else time.time(), UTC).isoformat(timespec="seconds")
    tags = {DIGEST_TAG: digest, "diffops.source_uri": source_uri,
            "diffops.registered_by": who or getpass.getuser(),
            "diffops.registered_at": when}
    if base_model:
        tags["diffops.base_model"] = base_model
    if training_run:
        tags["diffops.training_run"] = training_run
    return tags


def _version(found: ModelVersion) -> RegisteredVersion:
    tags = {str(k): str(v) for k, v in (found.tags or {}).items()}
    return RegisteredVersion(str(found.name), str(found.version), str(found.source), tags.get(DIGEST_TAG), tags,
                             tuple(str(a) for a in (getattr(found, "aliases", None) or ())))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _missing(err: BaseException) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(err, "error_code", "")) or "not found" in str(err).lower()


class ModelRegistry:
    """MLflow's model registry at a tracking store (the registry URI is the tracking URI)."""

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    @property
    def uri(self) -> str:
        return self.tracker.uri

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """One registry call; a failure is a RegistryError naming the store and what to do."""
        try:
            return fn(*args, **kwargs)
        except TrackingError as err:
            raise RegistryError(str(err)) from err
        except Exception as err:
            if _missing(err):
                raise RegistryError(f"{what}: not in the registry at {self.uri} ({_first_line(err)}); check the name, "
                                    "version or alias, or register it with `diffops model register PATH --name NAME`") from err
            raise RegistryError(f"registry at {self.uri}: {what} failed: {type(err).__name__}: {_first_line(err)}; "
                                "check --tracking-uri (DIFFOPS_TRACKING_URI) and that the server is up") from err

    def lookup(self, ref: RegistryRef) -> RegisteredVersion:
        """What the registry holds for `ref` now."""
        client = self._call("opening the registry", lambda: self.tracker.client)
        if ref.alias is not None:
            found = self._call(f"{ref.uri}", client.get_model_version_by_alias, ref.name, ref.alias)
        else:
            found = self._call(f"{ref.uri}", client.get_model_version, ref.name, ref.version)
        return _version(found)

    def get(self, name: str, version: str) -> RegisteredVersion:
        return self.lookup(RegistryRef(name, version=version))

    def versions(self, name: str) -> list[RegisteredVersion]:
        """Every version of a registered model, oldest first ([] when the name is not registered)."""
        client = self._call("opening the registry", lambda: self.tracker.client)
        found = self._call(f"listing versions of {name}", client.search_model_versions, f"name = '{name}'")
        return sorted((_version(v) for v in found), key=lambda v: int(v.version))

    def register(self, name: str, source: str, tags: dict[str, str], description: str | None = None) -> Registration:
        """A new version of `name` at `source` with `tags`, or the existing version with the same digest (idempotent)."""
        client = self._call("opening the registry", lambda: self.tracker.client)
        digest = tags[DIGEST_TAG]
        try:
            same = [v for v in self.versions(name) if v.digest == digest]
        except RegistryError:
            same = []
        if same:
            return Registration(same[0], False)
        try:
            client.create_registered_model(name, tags={"diffops.kind": "model"}, description=description)
        except Exception as err:  # exists already (a concurrent or an earlier registration)
            if "RESOURCE_ALREADY_EXISTS" not in str(getattr(err, "error_code", "")) and "already exists" not in str(err).lower():
                raise RegistryError(f"registry at {self.uri}: creating model {name!r} failed: {_first_line(err)}") from err
        created = self._call(f"registering {name}", client.create_model_version, name, source, tags=tags, description=description)
        return Registration(_version(created), True)

    def promote(self, name: str, version: str, alias: str) -> RegisteredVersion | None:
        """Point `alias` at `version`; the version it pointed at before (None: the alias is new)."""
        client = self._call("opening the registry", lambda: self.tracker.client)
        self.get(name, version)  # a version that does not exist is an error naming it
        try:
            before: RegisteredVersion | None = _version(client.get_model_version_by_alias(name, alias))
        except Exception:
            before = None
        self._call(f"setting alias {alias} of {name}", client.set_registered_model_alias, name, alias, version)
        return before
