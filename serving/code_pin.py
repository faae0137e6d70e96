"""The serving code's identity, pinned by the controller and checked by every replica and router at start.

The controller renders `runtime_env.env_vars[DIFFOPS_SERVING_CODE]` = its own `fingerprint()` into each
application (`controller.apply.serve_config`); a replica or router whose node runs other serving code
(another diffops, a hand-patched file) refuses to start, naming both, instead of serving with code the
release was never checked against. The fingerprint is the installed diffops version and a hash of the
`serving` package's source files, so it moves with any change to what runs on the nodes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata
from pathlib import Path

__all__ = ["PIN_ENV", "CodeMismatch", "check", "fingerprint"]

PIN_ENV = "DIFFOPS_SERVING_CODE"


class CodeMismatch(RuntimeError):
    """This node's serving code is not what the controller pinned."""


@lru_cache(maxsize=1)
def fingerprint() -> str:
    """`diffops <version> serving <sha256 of serving/*.py, 12 hex>`, the same on every node with the same code."""
    try:
        version = metadata.version("diffops")
    except metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"diffops {version} serving {digest.hexdigest()[:12]}"


def check(subject: str, environ: Mapping[str, str] = os.environ) -> None:
    """Raise CodeMismatch when the pinned serving code (if any) is not this node's."""
    pinned = environ.get(PIN_ENV)
    if pinned and pinned != fingerprint():
        raise CodeMismatch(f"{subject}: this node runs {fingerprint()}, the controller pinned {pinned}; install the "
                           "controller's diffops on every node (or roll the nodes' image) so replicas run the code "
                           "the release was checked with")
