"""How a `diffops` command prints the state it shows: `-o/--output text|json|yaml` (kubectl's convention).

Sits at the very end of every printing command: the command builds one plain data structure, and this
module turns it into JSON or YAML with the same keys (text output stays with each command). Pure, except
for the click option factories.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import click
import yaml

__all__ = ["Output", "choose", "dump", "legacy_format_option", "output_option"]

Output = Literal["text", "json", "yaml", "markdown"]
F = TypeVar("F", bound=Callable[..., Any])
_FORMATS: dict[str, Output] = {"text": "text", "json": "json", "yaml": "yaml", "markdown": "markdown"}


def output_option(*formats: Output) -> Callable[[F], F]:
    """`-o, --output FORMAT` (default text); environment: DIFFOPS_OUTPUT."""
    return click.option(
        "-o", "--output", "output", type=click.Choice(list(formats)), default="text", show_default=True,
        help=f"Output format: {', '.join(formats)} (json and yaml carry the same keys).",
    )


def legacy_format_option(*formats: Output) -> Callable[[F], F]:
    """The older `--format FORMAT` spelling, kept hidden as an alias of `-o`."""
    return click.option("--format", "legacy_format", type=click.Choice(list(formats)), default=None, hidden=True,
                        help="Alias of -o/--output (deprecated).")


def choose(output: str, legacy_format: str | None = None, as_json: bool = False) -> Output:
    """The format asked for: an alias given on the command line (`--json`, `--format`) wins over `-o`'s value."""
    picked = "json" if as_json else legacy_format or output
    if picked not in _FORMATS:
        raise click.BadParameter(f"unknown output format {picked!r}", param_hint="-o/--output")
    return _FORMATS[picked]


def dump(data: Any, output: Output, *, compact: bool = False) -> str:
    """`data` (JSON-compatible) as JSON (indented unless `compact`) or YAML: the same keys, in the same order."""
    if output == "json":
        return json.dumps(data, indent=None if compact else 2)
    if output == "yaml":
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, default_flow_style=False).rstrip("\n")
    raise ValueError(f"dump() renders json or yaml, not {output!r}; text is the command's own")
