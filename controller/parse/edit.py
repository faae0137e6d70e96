"""Rewrite scalar fields of a release file in place, keeping its comments and layout. Pure.

Used where diffops writes a release change for a pull request (`diffops model
pin`, `diffops experiment promote`): `set_fields(text, {"spec.model.digest":
"sha256:..."})` replaces each value on its own line (a trailing comment stays),
adds a missing key at the end of its block mapping, and proves the result: the
edited text parses (`safe_yaml.load`) to the original data with exactly those
values changed, or `EditError` says which field to edit by hand.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import yaml

from controller.parse.safe_yaml import Document, YamlError, load

__all__ = ["EditError", "Scalar", "set_fields"]

Scalar = str | int | float | bool | None


class EditError(Exception):
    """The file cannot be edited safely here; the message names the field."""


def _yaml(value: Scalar) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(value)  # a double-quoted YAML scalar


_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:@+-]*")


def _plain_safe(value: str) -> bool:
    """A string that reads back as itself unquoted (`euler`, `s3://b/m`), not as a number, bool or null."""
    return bool(_PLAIN.fullmatch(value)) and yaml.safe_load(value) == value


def _comment_start(line: str, start: int) -> int:
    """Index of a trailing ` #` comment after `start` (outside quotes), else the line's length."""
    quote: str | None = None
    for i in range(start, len(line)):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"':
                continue
            if ch == quote:
                quote = None
        elif ch in "\"'" and i == start:
            quote = ch
        elif ch == "#" and i > start and line[i - 1] in " \t":
            return i
    return len(line)


def _replace(lines: list[str], doc: Document, path: tuple[str, ...], value: Scalar) -> None:
    line_no, column = doc.values[path]
    key_line, _ = doc.keys[path]
    line = lines[line_no - 1]
    if line_no != key_line or isinstance(doc_value(doc, path), (dict, list)):
        raise EditError(f"{'.'.join(path)}: not a one-line scalar; edit it by hand")
    end = _comment_start(line, column - 1)
    old = line[column - 1:end].rstrip()
    plain = not old.startswith(("'", '"'))
    text = value if plain and isinstance(value, str) and _plain_safe(value) else _yaml(value)
    lines[line_no - 1] = line[:column - 1] + text + line[column - 1 + len(old):]


def doc_value(doc: Document, path: tuple[str, ...]) -> Any:
    data = doc.data
    for part in path:
        data = data[part]
    return data


def _insert(lines: list[str], doc: Document, path: tuple[str, ...], value: Scalar) -> None:
    parent = path[:-1]
    try:
        mapping = doc_value(doc, parent)
    except (KeyError, TypeError):
        raise EditError(f"{'.'.join(parent)}: no such mapping to add {path[-1]} to; add it by hand") from None
    if not isinstance(mapping, dict) or not mapping:
        raise EditError(f"{'.'.join(parent)}: not a block mapping with keys; add {path[-1]} by hand")
    children = [doc.keys[(*parent, key)] for key in mapping]
    indent = children[0][1] - 1
    last = max(line for p, (line, _) in [*doc.keys.items(), *doc.values.items()] if p[:len(parent)] == parent and len(p) > len(parent))
    lines.insert(last, " " * indent + f"{path[-1]}: {_yaml(value)}")


def set_fields(text: str, changes: Mapping[str, Scalar]) -> str:
    """`text` with each dotted field set to its value; raises EditError when it cannot be done safely."""
    try:
        before = load(text.encode())
    except YamlError as err:
        raise EditError(f"the file does not parse (line {err.line}): {err.message}") from None
    lines = text.splitlines()
    expected = json.loads(json.dumps(before.data))
    for dotted, value in changes.items():
        path = tuple(dotted.split("."))
        doc = load(("\n".join(lines) + "\n").encode())
        if path in doc.values:
            _replace(lines, doc, path, value)
        else:
            _insert(lines, doc, path, value)
        target = expected
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    result = "\n".join(lines) + "\n"
    try:
        after = load(result.encode()).data
    except YamlError as err:
        raise EditError(f"the edit broke the file at line {err.line} ({err.message}); edit {', '.join(changes)} by hand") from None
    if after != expected:
        raise EditError(f"the edit did not give the values asked for; edit {', '.join(changes)} by hand")
    return result
