"""Shared by the benchmark scripts: the percentile every table reports (nearest rank), and
writing a run's results."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str, result: Any) -> None:
    """Write a run's results (making the directory) and say where."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {path}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))
    return xs[k]
