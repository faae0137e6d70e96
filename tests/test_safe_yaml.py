"""The safe YAML reader: what it refuses, and where it says the problem is."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from controller.safe_yaml import MAX_BYTES, YamlError, load

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
    ("not utf-8", b"a: \xff\xfe\n", "not UTF-8", 1, 1),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_with_position(case):
    _, text, fragment, line, column = case
    with pytest.raises(YamlError) as info:
        load(text if isinstance(text, bytes) else text.encode())
    assert fragment in info.value.message
    assert (info.value.line, info.value.column) == (line, column)


def test_oversized_file_refused_before_parsing():
    started = time.monotonic()
    with pytest.raises(YamlError, match="capped at"):
        load(b"a: " + b"x" * (10 * 1024 * 1024))
    assert time.monotonic() - started < 1


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


def test_size_cap_is_the_documented_one():
    assert MAX_BYTES == 256 * 1024
    load(b"a: " + b"x" * (MAX_BYTES - 10))
