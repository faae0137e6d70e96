"""A safe YAML reader for release files that remembers where every value is.

First step of parse + validate: bytes from git -> plain data plus line/column
marks. It builds data from the parser's event stream without recursion and
refuses what a release file never needs: anchors and aliases (billion laughs),
custom or Python tags, duplicate keys, non-string keys, several documents,
deep nesting, oversized input, control characters, and numbers too long or too
large for 64 bits. Every refusal is a `YamlError` with a 1-based position;
nothing else escapes `load`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import yaml

__all__ = ["Document", "MAX_BYTES", "YamlError", "load", "shown"]

MAX_BYTES = 256 * 1024
MAX_DEPTH = 32
MAX_NUMBER_CHARS = 64  # longer numerals are refused before conversion (a 5000-digit int costs, and Python caps them)
INT_RANGE = (-(2**63), 2**63 - 1)  # what SQLite and Ray Serve's configs hold
NON_PRINTABLE = yaml.reader.Reader.NON_PRINTABLE  # what the YAML reader refuses, found first to say where
CORE = "tag:yaml.org,2002:"
SCALAR_TAGS = {f"{CORE}{t}" for t in ("str", "int", "float", "bool", "null")}
Path = tuple[str | int, ...]


class YamlError(Exception):
    def __init__(self, message: str, line: int = 1, column: int = 1):
        super().__init__(message)
        self.message, self.line, self.column = message, line, column


@dataclass
class Document:
    """Parsed data plus 1-based (line, column) of each value and each mapping key."""

    data: Any
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def locate(self, path: Path, at_key: bool = False) -> tuple[int, int]:
        """Position of `path`, or of its nearest ancestor that exists."""
        path = tuple(path)
        while path:
            found = (self.keys.get(path) if at_key else None) or self.values.get(path) or self.keys.get(path)
            if found:
                return found
            path = path[:-1]
        return self.values.get((), (1, 1))


def _tag(tag: str) -> str:
    return tag.replace(CORE, "!!", 1)


def shown(value: object, limit: int = 40) -> str:
    """repr of a value for a message, cut to `limit` characters so a huge input never makes a huge message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _position(text: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of a character index."""
    return text.count("\n", 0, index) + 1, index - text.rfind("\n", 0, index)


class _Mark(Protocol):
    """Where a parser event starts or ends (0-based), as PyYAML's pure and C marks both say."""

    line: int
    column: int


def _at(mark: _Mark | None) -> tuple[int, int]:
    """1-based (line, column) of a mark; the parser marks every event, so (1, 1) is only a fallback."""
    return (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)


class _Builder:
    """Turns parser events into data; containers are filled on a stack."""

    def __init__(self) -> None:
        self.resolver = yaml.SafeLoader("")
        self.doc = Document(data=None)
        self.stack: list[tuple[Any, Path]] = []  # (container, its path)
        self.pending_key: list[str | None] = []  # per open mapping: key awaiting its value
        self.documents = 0

    def feed(self, event: yaml.Event) -> None:
        if isinstance(event, yaml.AliasEvent):
            raise YamlError(f"alias '*{event.anchor}' is not allowed in release files; write the value out", *_at(event.start_mark))
        anchor = getattr(event, "anchor", None)
        if anchor:
            raise YamlError(f"anchor '&{anchor}' is not allowed in release files; write the value out", *_at(event.start_mark))
        if isinstance(event, yaml.DocumentStartEvent):
            self.documents += 1
            if self.documents > 1:
                raise YamlError("a release file holds exactly one YAML document", *_at(event.start_mark))
        elif isinstance(event, yaml.ScalarEvent):
            self._value(self._scalar(event), event.start_mark)
        elif isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            self._container(event)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            container, _ = self.stack.pop()
            if isinstance(container, dict):
                self.pending_key.pop()

    def _scalar(self, event: yaml.ScalarEvent) -> Any:
        explicit = event.tag not in (None, "!")
        # the resolver's stub leaves `resolve` unannotated; it returns the implicit tag of a plain scalar
        tag: str = event.tag if explicit and event.tag is not None else self.resolver.resolve(  # type: ignore[no-untyped-call]
            yaml.ScalarNode, event.value, event.implicit)
        if event.tag not in (None, "!") and tag not in SCALAR_TAGS:
            raise YamlError(f"tag {_tag(event.tag)!r} is not allowed in release files", *_at(event.start_mark))
        if tag == f"{CORE}null":
            return None
        if tag not in (f"{CORE}bool", f"{CORE}int", f"{CORE}float"):
            bad = NON_PRINTABLE.search(event.value)  # written as an escape: "\x07", "\ud800"
            if bad:
                raise YamlError(f"escaped control character U+{ord(bad.group()):04X} is not allowed in release files",
                                *_at(event.start_mark))
            return event.value  # strings, and implicit timestamps kept as written
        if tag != f"{CORE}bool" and len(event.value) > MAX_NUMBER_CHARS:
            raise YamlError(f"number is {len(event.value)} characters long; release files take numbers of at most "
                            f"{MAX_NUMBER_CHARS} (quote it if it is text)", *_at(event.start_mark))
        # the pure-Python SafeLoader's events carry `yaml.error.Mark`s (never the C parser's)
        start, end = cast("yaml.error.Mark | None", event.start_mark), cast("yaml.error.Mark | None", event.end_mark)
        node = yaml.ScalarNode(tag, event.value, start, end, event.style)
        try:
            value = getattr(self.resolver, f"construct_yaml_{tag.removeprefix(CORE)}")(node)
        except (ValueError, KeyError, ArithmeticError):  # an explicit tag on a value that is not one: `!!int abc`
            raise YamlError(f"{shown(event.value)} is not a valid {_tag(tag)}", *_at(event.start_mark)) from None
        if isinstance(value, int) and not isinstance(value, bool) and not INT_RANGE[0] <= value <= INT_RANGE[1]:
            raise YamlError(f"integer {shown(value)} is out of range; release files take 64-bit integers "
                            f"({INT_RANGE[0]} to {INT_RANGE[1]})", *_at(event.start_mark))
        return value

    def _container(self, event: yaml.CollectionStartEvent) -> None:
        if event.tag not in (None, "!", f"{CORE}map", f"{CORE}seq"):
            raise YamlError(f"tag {_tag(event.tag)!r} is not allowed in release files", *_at(event.start_mark))
        if len(self.stack) >= MAX_DEPTH:
            raise YamlError(f"nesting deeper than {MAX_DEPTH} levels", *_at(event.start_mark))
        container: Any = {} if isinstance(event, yaml.MappingStartEvent) else []
        path = self._value(container, event.start_mark)
        self.stack.append((container, path))
        if isinstance(container, dict):
            self.pending_key.append(None)

    def _value(self, value: Any, mark: _Mark | None) -> Path:
        """Place a value in the open container (or as the root); return its path."""
        if not self.stack:
            self.doc.data = value
            self.doc.values[()] = _at(mark)
            return ()
        parent, parent_path = self.stack[-1]
        if isinstance(parent, list):
            path = (*parent_path, len(parent))
            parent.append(value)
        elif self.pending_key[-1] is None:  # this value is a key
            if not isinstance(value, str):
                raise YamlError(f"mapping keys must be plain strings, got {shown(value)}", *_at(mark))
            path = (*parent_path, value)
            if value in parent:
                line = self.doc.keys[path][0]
                raise YamlError(f"duplicate key {shown(value)} (first defined on line {line})", *_at(mark))
            self.doc.keys[path] = _at(mark)
            self.pending_key[-1] = value
            parent[value] = None
            return path
        else:
            key = self.pending_key[-1]
            path = (*parent_path, key)
            parent[key] = value
            self.pending_key[-1] = None
        self.doc.values[path] = _at(mark)
        return path


def load(raw: bytes) -> Document:
    """Parse one release file's bytes; raise YamlError with a 1-based position."""
    if len(raw) > MAX_BYTES:
        raise YamlError(f"file is {len(raw)} bytes; release files are capped at {MAX_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        before = raw[: err.start].decode("utf-8")
        line, column = _position(before, len(before))
        raise YamlError(f"not UTF-8 text (byte {err.start}, {shown(raw[err.start:err.start + 4])}); "
                        "release files are UTF-8 YAML", line, column) from None
    bad = NON_PRINTABLE.search(text)
    if bad:
        raise YamlError(f"control character U+{ord(bad.group()):04X} is not allowed in release files; "
                        "only printable text, tabs and newlines", *_position(text, bad.start()))
    builder = _Builder()
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            builder.feed(event)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        message = " ".join(filter(None, [err.context, err.problem]))
        raise YamlError(f"YAML syntax: {message}", *(_at(mark) if mark else (1, 1))) from None
    except yaml.YAMLError as err:  # the reader's own refusals carry no mark
        raise YamlError(f"YAML: {shown(str(err), 200)}") from None
    return builder.doc
