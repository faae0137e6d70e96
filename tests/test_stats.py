"""One p95 for the canary analysis and the gate: nearest rank, against values worked out by hand."""

from __future__ import annotations

import pytest

from serving.stats import p95, percentile

# nearest rank: the value at 1-based rank ceil(p/100 * n) of the sorted values
P95 = [
    ("no values: no figure", [], None),
    ("one value is every percentile", [0.7], 0.7),
    ("two values: rank ceil(1.9) = 2", [0.2, 0.1], 0.2),
    ("ten values: rank ceil(9.5) = 10, the largest", [float(i) for i in range(1, 11)], 10.0),
    ("twenty values: rank ceil(19.0) = 19, not the largest", [float(i) for i in range(1, 21)], 19.0),
    ("twenty-one values: rank ceil(19.95) = 20", [float(i) for i in range(1, 22)], 20.0),
    ("order does not matter", [5.0, 1.0, 4.0, 2.0, 3.0], 5.0),  # rank ceil(4.75) = 5
    ("one slow outlier in forty is above p95", [1.0] * 39 + [9.0], 1.0),  # rank ceil(38.0) = 38
    ("three slow in forty reach p95", [1.0] * 37 + [9.0] * 3, 9.0),  # rank 38 falls in the slow three
    ("an observed value, never interpolated", [1.0, 3.0], 3.0),  # interpolation would say 2.9
]


@pytest.mark.parametrize("case, values, expected", P95, ids=[c[0] for c in P95])
def test_p95_is_the_nearest_rank(case, values, expected):
    assert p95(values) == expected


@pytest.mark.parametrize("values, p, expected", [
    ([4.0, 1.0, 3.0, 2.0], 50, 2.0),  # rank ceil(2.0) = 2: the lower middle
    ([4.0, 1.0, 3.0, 2.0, 5.0], 50, 3.0),  # rank ceil(2.5) = 3: the median
    ([4.0, 1.0, 3.0, 2.0], 100, 4.0),  # the largest
    ([4.0, 1.0, 3.0, 2.0], 1, 1.0),  # rank ceil(0.04) = 1: the smallest
])
def test_percentile(values, p, expected):
    assert percentile(values, p) == expected


@pytest.mark.parametrize("p", [0, -5, 100.5])
def test_a_percentile_outside_0_to_100_is_refused(p):
    with pytest.raises(ValueError, match="give a number in"):
        percentile([1.0], p)
