"""The one percentile (``quorum.stats``): linear interpolation between the closest ranks."""

from __future__ import annotations

import statistics

import pytest

from quorum.stats import percentile


def test_percentile_interpolates_between_closest_ranks() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]  # sorted; rank = q/100 * 4
    assert percentile(values, 0) == 15.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 100) == 50.0
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile(values, 90) == pytest.approx(46.0)  # rank 3.6: 40 + 0.6 * 10
    assert percentile(values, 99) == pytest.approx(49.6)  # rank 3.96: 40 + 0.96 * 10


def test_percentile_agrees_with_the_inclusive_quantiles_of_the_standard_library() -> None:
    values = [0.3, 7.0, 1.5, 2.25, 9.0, 4.0, 4.0, 11.5]
    cuts = statistics.quantiles(values, n=100, method="inclusive")  # p1 .. p99
    for q, cut in enumerate(cuts, start=1):
        assert percentile(values, q) == pytest.approx(cut)


def test_percentile_ignores_input_order_and_handles_one_value() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(iter([7.0]), 99) == 7.0


def test_percentile_of_nothing_is_an_error_unless_a_value_for_empty_is_given() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    assert percentile([], 99, empty=0.0) == 0.0
    assert percentile([2.0], 99, empty=0.0) == 2.0


def test_percentile_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], 101)
    with pytest.raises(ValueError, match="outside"):
        percentile([1.0], -1, empty=0.0)
