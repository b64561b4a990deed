"""The one percentile Quorum reports: ``quorum bench``, the scenarios, the benchmarks and the
README's figures all use ``percentile`` from here, so that two "p99" rows mean the same thing.

The definition is linear interpolation between the closest ranks (Hyndman & Fan's type 7:
numpy's and ``statistics.quantiles(method="inclusive")``'s default, which ``vllm bench``
reports): with the values sorted as ``v[0] <= ... <= v[n-1]``, the ``q``-th percentile sits
at rank ``r = q/100 * (n - 1)`` and is ``v[floor(r)] + (v[floor(r) + 1] - v[floor(r)]) *
(r - floor(r))``. p0 is the minimum, p100 the maximum, p50 the median; on a small sample a
high percentile lies between its two largest values rather than on the largest.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["percentile"]


def percentile(values: Iterable[float], q: float, *, empty: float | None = None) -> float:
    """The ``q``-th percentile (``q`` in [0, 100]) of ``values``, interpolated linearly
    between the closest ranks (see the module docstring); the order of ``values`` does not
    matter and they keep their unit.

    ``empty``: returned when there are no values (for a report row that must show something);
    without it, no values is an error. Raises ``ValueError`` for ``q`` outside [0, 100], or
    for no values when ``empty`` is None.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    ordered = sorted(values)
    if not ordered:
        if empty is None:
            raise ValueError("percentile of no values")
        return empty
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
