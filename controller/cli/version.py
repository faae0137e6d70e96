"""`diffops version`: this diffops, the schemas it reads and writes, and the runtime it serves with.

Versions of installed distributions are read from their metadata (importlib.metadata), never by importing
them: `diffops version` answers in well under a second even where torch takes many to import.
"""

from __future__ import annotations

import platform
import typing
from collections.abc import Callable
from importlib import metadata
from typing import TypedDict

import click

from controller.cli.output import choose, dump, output_option
from controller.parse.release import Release
from controller.state.migrations import SCHEMA_VERSION

__all__ = ["RUNTIME", "VersionInfo", "installed", "release_api_version", "version", "version_info", "version_text"]

RUNTIME = ("torch", "diffusers", "ray")


class VersionInfo(TypedDict):
    diffops: str | None
    release_api_version: str
    state_schema_version: int
    python: str
    torch: str | None
    diffusers: str | None
    ray: str | None


def installed(distribution: str) -> str | None:
    """The installed version of `distribution`, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def release_api_version() -> str:
    """The `apiVersion` release files must carry, read from the release model (one source of truth)."""
    [api_version] = typing.get_args(Release.model_fields["apiVersion"].annotation)
    return str(api_version)


def version_info(lookup: Callable[[str], str | None] = installed, python: str | None = None) -> VersionInfo:
    found = {name: lookup(name) for name in RUNTIME}
    return VersionInfo(diffops=lookup("diffops"), release_api_version=release_api_version(), state_schema_version=SCHEMA_VERSION,
                       python=python or platform.python_version(), torch=found["torch"], diffusers=found["diffusers"],
                       ray=found["ray"])


def version_text(info: VersionInfo) -> str:
    rows = [("diffops", info["diffops"]), ("release apiVersion", info["release_api_version"]),
            ("state schema", str(info["state_schema_version"])), ("python", info["python"]),
            ("torch", info["torch"]), ("diffusers", info["diffusers"]), ("ray", info["ray"])]
    return "\n".join(f"{name:<19} {value or 'not installed'}" for name, value in rows)


@click.command()
@output_option("text", "json", "yaml")
def version(output: str) -> None:
    """diffops, the release apiVersion, the state schema, and the installed python, torch, diffusers and Ray."""
    info = version_info()
    fmt = choose(output)
    click.echo(version_text(info) if fmt == "text" else dump(info, fmt))
