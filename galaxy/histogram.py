"""A fixed-bucket latency histogram: counts only, so it is cheap to feed and bounded forever.

Theory of operation
-------------------
``Histogram(bounds_s)`` keeps one counter per bucket (``len(bounds_s) + 1``: the last
holds what is above every bound) and the sum of the observations.  Observing is one
bisection and two additions; memory never grows with the number of observations, so a
service can observe every event it handles and an exporter reads ``snapshot()`` at
scrape time (the shape ``api/metrics.py`` turns into a Prometheus histogram).

Invariants: ``bounds_s`` is strictly ascending and non-empty; ``sum(counts)`` is the number
of observations; a bucket ``i`` counts observations ``x`` with ``bounds_s[i-1] < x <=
bounds_s[i]`` (Prometheus' ``le``, upper bound inclusive).  Negative observations (two
machines' clocks disagree about when an event happened) count as zero.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

# Task latencies span a quick LAN placement (ms) to a queue behind busy nodes (minutes).
TASK_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class Histogram:
    __slots__ = ("bounds_s", "counts", "sum_s")

    def __init__(self, bounds_s: Sequence[float]) -> None:
        bounds = tuple(float(b) for b in bounds_s)
        if not bounds or any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ValueError("bounds_s must be non-empty and strictly ascending")
        self.bounds_s = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum_s = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, seconds)
        self.counts[bisect.bisect_left(self.bounds_s, seconds)] += 1
        self.sum_s += seconds

    def observe_ms(self, ms: int) -> None:
        self.observe(ms / 1000)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict:
        """``{"bounds_s", "counts", "sum_s"}``: a copy the reader may keep."""
        return {"bounds_s": list(self.bounds_s), "counts": list(self.counts), "sum_s": self.sum_s}
