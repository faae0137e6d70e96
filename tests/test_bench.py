"""The benchmark harness at tiny sizes, without Ray: figures have their shape and measure what they claim."""

from __future__ import annotations

import pytest

from bench import fetch, model_load, reconcile
from bench.progress import quiet
from bench.report import Figure, Goal, markdown, table


def test_reconcile_figures_and_a_change_touches_one_app(tmp_path):
    figures = reconcile.run(tmp_path, quiet, sizes=(2, 5), history=4, changes=2)
    assert [f.benchmark for f in figures] == [
        "one-release change, 2 releases", "no-op reconcile, 5 releases", "controller resident memory, 5 releases",
        "one-release change, 5 releases"]
    memory = figures.pop(2)
    assert memory.unit == "MB" and memory.value > 50 and memory.baseline_value > 50  # a Python process with the controller loaded
    for figure in figures:
        assert figure.unit == "ms" and figure.value > 0 and figure.baseline_value > 0
        assert figure.ratio == pytest.approx(figure.value / figure.baseline_value)
        assert figure.detail["noop_serve_applies"] == 0  # a no-op reconcile applies nothing to Serve
        assert figure.detail["change_ticks"] == [1, 1]  # a light change is applied in the tick that sees it
        [[app]] = {tuple(apps) for apps in figure.detail["changed_apps"]}
        assert app.startswith("r0000--")  # only the changed release's version app was touched
    assert figures[1].baseline == "no-op, 2 releases"
    assert figures[0].detail["history_commits"] == 4


def test_model_load_cache_hit_reads_nothing_from_the_store(tmp_path):
    figures = {f.benchmark: f for f in model_load.run(tmp_path, quiet, size_mb=2, repeats=1)}
    hit = figures["cache hit: bytes read from the store"]
    detail = hit.detail
    assert hit.value == 0 and hit.met is True
    assert detail["cache_hit_store"] == {"opened_stores": 0, "opened_files": 0, "bytes_read": 0}
    assert hit.baseline_value == detail["cold_fetch_store"]["bytes_read"] >= 2e6  # the cold fetch read every byte
    assert detail["weights_made_resident_bytes"] >= 2e6
    for page_cache in ("warm", "cold"):
        load = figures[f"model load from cache, {page_cache} page cache"]
        assert load.unit == "GB/s" and load.value > 0 and load.ratio == pytest.approx(load.value / load.baseline_value)
        assert load.goal is not None and load.met == (load.ratio >= 0.7)


def test_fetch_figures_compare_each_store_with_a_plain_copy_of_the_same_files(tmp_path):
    figures = {f.benchmark: f for f in fetch.run(tmp_path, quiet, size_mb=40, repeats=1)}
    assert set(figures) == {"cold fetch, local disk", "cold fetch, S3-compatible server"}
    for figure in figures.values():
        assert figure.unit == "GB/s" and figure.value > 0 and figure.baseline == "plain copy"
        assert figure.ratio == pytest.approx(figure.value / figure.baseline_value)
        assert figure.met == (figure.ratio >= 0.7) and figure.detail["model_bytes"] >= 40e6


def test_goal_verdicts_show_in_the_table():
    slow = Figure("rollout", "warm revert", 3.0, "s", "cold rollback", 9.0, 3.0 / 9.0, Goal("≤ 2 s", "value", at_most=2.0))
    fast = Figure("batching", "images/s at 8", 30.0, "images/s", "batch 1", 10.0, 3.0, Goal("≥ 1.5×", "ratio", at_least=1.5))
    plain = Figure("gate", "gate", 1.0, "s", "load", 0.5, 2.0)
    assert (slow.met, fast.met, plain.met) == (False, True, None)
    lines = table([slow, fast, plain]).splitlines()
    assert lines[0].split() == ["benchmark", "figure", "baseline", "ratio", "goal", "met"]
    assert lines[2].endswith("NO") and "cold rollback 9.00 s" in lines[2] and "0.33×" in lines[2]
    assert lines[3].endswith("yes") and "3.00×" in lines[3]
    assert lines[4].endswith("—")
    assert markdown([slow]).splitlines()[2] == "| warm revert | 3.00 s | cold rollback 9.00 s | 0.33× | ≤ 2 s | NO |"
