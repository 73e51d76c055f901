"""Shared by the benchmark scripts: the percentile every table reports (nearest rank),
writing a run's results, and stopping cleanly when terminated."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any


def exit_on_sigterm() -> None:
    """A SIGTERM (timeout(1), a CI step's end) unwinds the script as an exit does, so the
    meshes it started are stopped (``Cluster.__exit__``), not left running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


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
