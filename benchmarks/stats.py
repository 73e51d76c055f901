"""Shared by the benchmark scripts: the percentile every table reports (nearest rank)."""

from __future__ import annotations


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]
