"""Where replicas and gate jobs read a version's model from, and publishing `file://` models there.

Between `controller.tick.prepare` (which publishes once the model is verified here) and
`controller.apply.serve_config` (which renders what replicas fetch). On a cluster no replica
may read a path of the controller's machine: a `file://` model of the release repo is copied,
already verified, to the `--model-store` (`s3://bucket/prefix`, `gs://`, `az://`) under its
digest, and replicas fetch it from there into their node-local cache, verifying every byte
again. Object-store and Hub models are fetched from where the release says. Without a store,
`file://` models are served only when the cluster runs on this machine (`Placement.local`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from serving.manifest import MANIFEST_NAME, ArtifactError, list_model_files
from serving.schema import ModelSpec
from serving.stores import filesystem

__all__ = ["PUBLISHABLE", "STORE_SCHEMES", "Placement", "publish", "published_uri"]

log = logging.getLogger("diffops.controller")

PUBLISHABLE = "file://"  # models only the controller's machine can read
STORE_SCHEMES = ("s3://", "gs://", "az://")


def published_uri(store: str, digest: str) -> str:
    """Where a model lives in the store: content-addressed by its digest (`<store>/sha256-<hex>`)."""
    return f"{store.rstrip('/')}/{digest.replace(':', '-')}"


@dataclass(frozen=True)
class Placement:
    """How this controller's cluster reaches models: a `--model-store` for `file://` models, and whether the
    cluster's nodes share this machine (its own head or a loopback `--ray-address`). Pure."""

    store: str | None = None
    local: bool = True

    def __post_init__(self) -> None:
        if self.store is not None and not self.store.startswith(STORE_SCHEMES):
            raise ValueError(f"--model-store {self.store!r}: give an object store URI, e.g. s3://bucket/models "
                             f"(one of {', '.join(STORE_SCHEMES)})")

    def publishes(self, model: ModelSpec) -> bool:
        """True when the model is copied to the store before its version starts."""
        return self.store is not None and model.uri.startswith(PUBLISHABLE)

    def for_replicas(self, model: ModelSpec) -> ModelSpec:
        """The model as replicas and gate jobs fetch it: from the store when it is published there."""
        if self.store is not None and self.publishes(model):
            return model.model_copy(update={"uri": published_uri(self.store, model.digest)})
        return model

    def reads_repo(self, model: ModelSpec) -> bool:
        """Whether replicas read the model from the release repo on this machine (a local cluster, no store)."""
        return model.uri.startswith(PUBLISHABLE) and not self.publishes(model)

    def refusal(self, model: ModelSpec) -> str | None:
        """Why no replica could reach this model, with what to do; None when it can."""
        if self.reads_repo(model) and not self.local:
            return (f"{model.uri} is a file in the release repo on the controller's machine, which the cluster's nodes "
                    "cannot read; run the controller with --model-store s3://bucket/prefix (it publishes the model "
                    "there by digest) or point spec.model.uri at an object store")
        return None


def publish(local_copy: Path, uri: str) -> tuple[int, bool]:
    """Copy a verified model directory to `uri` (files first, the manifest last); (bytes sent, True if it was
    already there). Already there means the manifest is present with every file at its size: the name is the digest,
    so what is there is that model or is refused by the replica's own verification."""
    started = time.monotonic()
    keys = [*list_model_files(local_copy), MANIFEST_NAME]
    sizes = {key: (local_copy / key).stat().st_size for key in keys}
    fs, root = filesystem(uri)
    root = root.rstrip("/")
    try:
        found = {path[len(root) + 1:]: int(info.get("size") or 0) for path, info in fs.find(root, detail=True).items()
                 if path.startswith(root + "/")}
    except FileNotFoundError:
        found = {}
    if all(found.get(key) == size for key, size in sizes.items()):
        return 0, True
    sent = 0
    for key in sorted(keys, key=lambda k: k == MANIFEST_NAME):  # the manifest last: a partial copy never looks complete
        try:
            fs.put_file(str(local_copy / key), f"{root}/{key}")
        except Exception as err:  # each fsspec backend raises its own errors: the version fails naming it
            raise ArtifactError(f"publishing {key} to {uri} failed: {err}; check the store's credentials and that it exists") from err
        sent += sizes[key]
    log.info("model store: published %s (%d files, %.1f MB) in %.1fs; next: replicas fetch it from there",
             uri, len(keys), sent / 1e6, time.monotonic() - started)
    return sent, False
