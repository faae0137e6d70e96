"""Rewrite scalar fields of a release file in place, keeping its comments and layout. Pure.

Used where diffops writes a release change for a pull request (`diffops model
pin`, `diffops experiment promote`): `set_fields(text, {"spec.model.digest":
"sha256:..."})` replaces each value on its own line (a trailing comment stays;
a string keeps its plain or quoted style where it reads back as itself), adds a
missing key (and the mappings on its way) after the last line of its block
mapping, refuses block scalars and flow collections, and proves the result: the
edited text parses (`safe_yaml.load`) to the original data with exactly those
values changed, or `EditError` says which field to edit by hand.
"""

from __future__ import annotations

import json
import math
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
    if isinstance(value, float):
        if not math.isfinite(value):
            return ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return f"{mantissa}.0e{exponent}" if e and "." not in mantissa else text  # YAML 1.1 reads 1e+20 as a string
    if isinstance(value, int):
        return repr(value)
    return json.dumps(value)  # a double-quoted YAML scalar


_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./:@+-]*")


def _plain_safe(value: str) -> bool:
    """A string that reads back as itself unquoted (`euler`, `s3://b/m`), not as a number, bool or null."""
    return bool(_PLAIN.fullmatch(value)) and yaml.safe_load(value) == value


def _comment_start(line: str, start: int) -> int:
    """Index of a trailing ` #` comment after `start` (outside quotes), else the line's length."""
    quote: str | None = None
    i = start
    while i < len(line):
        ch = line[i]
        if quote:
            if ch == "\\" and quote == '"':
                i += 1  # the escaped character, a quote included
            elif ch == quote and quote == "'" and line[i + 1:i + 2] == "'":
                i += 1  # '' is a quote inside a single-quoted string
            elif ch == quote:
                quote = None
        elif ch in "\"'" and i == start:
            quote = ch
        elif ch == "#" and i > start and line[i - 1] in " \t":
            return i
        i += 1
    return len(line)


def _in_flow(lines: list[str], doc: Document, container: tuple[str, ...]) -> bool:
    """Whether the mapping at `container` is written in flow style (`{a: 1}`): its value starts with a bracket."""
    line_no, column = doc.values.get(container, (1, 1))
    return lines[line_no - 1][column - 1:column] in ("{", "[")


def _replace(lines: list[str], doc: Document, path: tuple[str, ...], value: Scalar) -> None:
    line_no, column = doc.values[path]
    key_line, _ = doc.keys[path]
    line = lines[line_no - 1]
    if line_no != key_line or isinstance(doc_value(doc, path), (dict, list)) or line[column - 1:column] in ("|", ">"):
        raise EditError(f"{'.'.join(path)}: not a one-line scalar; edit it by hand")
    if _in_flow(lines, doc, path[:-1]):
        raise EditError(f"{'.'.join(path)}: inside a flow mapping ({{...}}); edit it by hand")
    end = _comment_start(line, column - 1)
    old = line[column - 1:end].rstrip()
    plain = not old.startswith(("'", '"'))
    lines[line_no - 1] = line[:column - 1] + _written(value, plain) + line[column - 1 + len(old):]


def _written(value: Scalar, plain: bool) -> str:
    """`value` as YAML: a string plain when asked and it reads back as itself, else double-quoted."""
    return value if plain and isinstance(value, str) and _plain_safe(value) else _yaml(value)


def doc_value(doc: Document, path: tuple[str, ...]) -> Any:
    data = doc.data
    for part in path:
        data = data[part]
    return data


def _subtree_end(lines: list[str], line_no: int, indent: int) -> int:
    """The last line (1-based) of what starts on `line_no`: the lines after it indented deeper than `indent`
    (a block scalar, a list, a flow collection over several lines), blank lines inside included."""
    end = line_no
    for index in range(line_no, len(lines)):
        text = lines[index]
        if not text.strip():
            continue
        if len(text) - len(text.lstrip(" ")) <= indent:
            break
        end = index + 1
    return end


def _insert(lines: list[str], doc: Document, path: tuple[str, ...], value: Scalar) -> None:
    """Add `path` after the last key of its mapping; mappings on the way that do not exist yet are added too."""
    parent = path[:-1]
    while parent:  # the deepest mapping on the way that exists
        try:
            doc_value(doc, parent)
            break
        except (KeyError, TypeError):
            parent = parent[:-1]
    mapping = doc_value(doc, parent)
    missing = path[len(parent):]
    if not isinstance(mapping, dict) or not mapping or _in_flow(lines, doc, parent):
        raise EditError(f"{'.'.join(parent) or 'the document'}: not a block mapping with keys; add {'.'.join(path)} by hand")
    children = [doc.keys[(*parent, key)] for key in mapping]
    indent = children[0][1] - 1
    step = indent - (doc.keys[parent][1] - 1) if parent else 2
    last = max(line for p, (line, _) in [*doc.keys.items(), *doc.values.items()] if p[:len(parent)] == parent and len(p) > len(parent))
    added = [" " * (indent + step * depth) + f"{key}:" for depth, key in enumerate(missing[:-1])]
    added.append(" " * (indent + step * (len(missing) - 1)) + f"{missing[-1]}: {_written(value, plain=True)}")
    at = _subtree_end(lines, last, indent)
    lines[at:at] = added


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
