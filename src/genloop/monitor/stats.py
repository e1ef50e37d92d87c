"""Latency percentiles over the request log: one definition for every view of it.

The web UI (``/v1/admin/monitoring``) and ``genloop monitor report`` both read the logged
requests; both compute their percentiles here, from the same samples, so the same window
shows the same p99 in either:

- samples: the latency of each request that succeeded (status < 400) and has a finite one
  (a refused or failed request's latency says little about serving speed);
- definition: linear interpolation between the closest ranks (numpy's default
  ``np.percentile``, also what the benchmarks report), in milliseconds, rounded to 0.01.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def latency_sample(status: int, latency_ms: float | None) -> float | None:
    """The latency a request adds to the percentiles, or None when it adds none."""
    if status >= 400 or latency_ms is None or not math.isfinite(latency_ms):
        return None
    return float(latency_ms)


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q`` percentile (0 ≤ q ≤ 100) of already sorted values, interpolating linearly
    between the closest ranks; None for no values."""
    if not sorted_values:
        return None
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def percentiles(values: Iterable[float], qs: Sequence[int]) -> dict[str, float | None]:
    """``{"p50": …, "p99": …}`` for each ``q`` in ``qs``, rounded to 0.01 (None: no values)."""
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        value = percentile(ordered, q)
        out[f"p{q}"] = round(value, 2) if value is not None else None
    return out
