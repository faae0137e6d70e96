"""The safe YAML reader: what it refuses, and where it says the problem is."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from controller.parse.safe_yaml import MAX_BYTES, YamlError, load

REFUSED = [
    # (id, text, message fragment, line, column)
    ("duplicate key", "a: 1\nb: 2\na: 3\n", "duplicate key 'a' (first defined on line 1)", 3, 1),
    ("anchor", "a: &x 1\nb: 2\n", "anchor '&x'", 1, 4),
    ("alias", "a: [1]\nb: *x\n", "alias '*x'", 2, 4),
    ("python tag", "a: !!python/object/apply:os.system ['touch /tmp/x']\n", "tag '!!python/object/apply:os.system'", 1, 4),
    ("custom tag", "a: !secret 1\n", "tag '!secret'", 1, 4),
    ("non-string key", "1: a\n", "mapping keys must be plain strings", 1, 1),
    ("complex key", "? [a, b]\n: 1\n", "mapping keys must be plain strings", 1, 3),
    ("two documents", "a: 1\n---\nb: 2\n", "exactly one YAML document", 2, 1),
    ("syntax", "a: [1, 2\nb: 3\n", "YAML syntax", 2, 2),
    ("deep nesting", "a: " + "[" * 40 + "]" * 40 + "\n", "nesting deeper than 32", 1, 35),
    ("not utf-8", b"a: \xff\xfe\n", "not UTF-8 text (byte 3", 1, 4),
    ("not utf-8 later", "a: é\nb: ".encode() + b"\xc3(\n", "not UTF-8 text (byte 9", 2, 4),
    ("binary junk", b"\x89PNG\r\n\x1a\n\x00\x00", "not UTF-8", 1, 1),
    ("control character", "a: 1\nb: x\x07y\n", "control character U+0007", 2, 5),
    ("NUL byte", b"a: 1\n\x00", "control character U+0000", 2, 1),
    ("escape", "a: 1\nescape: \x1b[31m\n", "control character U+001B", 2, 9),
    ("escaped control character", 'a: "x\\x07"\n', "escaped control character U+0007", 1, 4),
    ("escaped lone surrogate", 'a:\n  b: "\\ud800"\n', "escaped control character U+D800", 2, 6),
    ("5000-digit integer", "a:\n  b: " + "9" * 5000 + "\n", "number is 5000 characters long", 2, 6),
    ("5000-digit key", "9" * 5000 + ": 1\n", "number is 5000 characters long", 1, 1),
    ("long hex integer", "a: 0x" + "f" * 100 + "\n", "number is 102 characters long", 1, 4),
    ("long sexagesimal integer", "a: " + "1:" * 40 + "1\n", "number is 81 characters long", 1, 4),
    ("long float", "a: 1" + "0" * 400 + ".5\n", "number is 403 characters long", 1, 4),
    ("integer over 64 bits", "a: 9223372036854775808\n", "integer 9223372036854775808 is out of range", 1, 4),
    ("integer under 64 bits", "a: -9223372036854775809\n", "is out of range", 1, 4),
    ("int tag on text", "a: !!int abc\n", "'abc' is not a valid !!int", 1, 4),
    ("bool tag on text", "a: !!bool maybe\n", "'maybe' is not a valid !!bool", 1, 4),
    ("float tag on text", "a: !!float x\n", "'x' is not a valid !!float", 1, 4),
    ("deep flow nesting", "a: " + "{a: " * 5000 + "}" * 5000 + "\n", "nesting deeper than 32", 1, 128),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_position(case):
    _, text, fragment, line, column = case
    with pytest.raises(YamlError) as info:
        load(text if isinstance(text, bytes) else text.encode())
    assert fragment in info.value.message
    assert (info.value.line, info.value.column) == (line, column)


def test_oversized_file_refused_before_parsing():
    text = b"a: [" + b"x" * (10 * 1024 * 1024)  # a syntax error too: parsed first, it would be refused for that
    started = time.monotonic()
    with pytest.raises(YamlError, match="capped at"):
        load(text)
    assert time.monotonic() - started < 1  # typically 0.02 s (measured on a loaded 2-core machine)


def test_billion_laughs_refused_fast_with_bounded_memory():
    lol = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lol.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    tracemalloc.start()
    with pytest.raises(YamlError, match="anchor"):
        load("\n".join(lol).encode())
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 5 * 1024 * 1024


def test_values_and_positions():
    doc = load(b"spec:\n  steps: 4\n  seed: null\n  ok: yes\n  list:\n    - x: 1.5\n  when: 2024-01-01\n")
    assert doc.data == {"spec": {"steps": 4, "seed": None, "ok": True, "list": [{"x": 1.5}], "when": "2024-01-01"}}
    assert doc.keys[("spec", "steps")] == (2, 3)
    assert doc.values[("spec", "steps")] == (2, 10)
    assert doc.values[("spec", "list", 0, "x")] == (6, 10)
    assert doc.locate(("spec", "missing", "deeper")) == (2, 3)  # the nearest existing value: spec's block


def test_numbers_at_the_edges_still_load():
    doc = load(b"max: 9223372036854775807\nmin: -9223372036854775808\nf: 1.0e+308\nint: !!int 7\nflt: !!float 2\ns: '" + b"9" * 5000 + b"'\n")
    assert doc.data == {"max": 2**63 - 1, "min": -(2**63), "f": 1e308, "int": 7, "flt": 2.0, "s": "9" * 5000}


def test_long_values_are_cut_in_messages():
    with pytest.raises(YamlError) as info:
        load(b"a: 1\n? " + b"x" * 100_000 + b"\n: 1\n? " + b"x" * 100_000 + b"\n: 2\n")
    assert "duplicate key" in info.value.message and len(info.value.message) < 200


def test_size_cap_is_the_documented_one():
    assert MAX_BYTES == 256 * 1024
    load(b"a: " + b"x" * (MAX_BYTES - 10))
