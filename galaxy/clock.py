"""Clocks: the only place that reads real time.

Theory of operation: protocol cores never read a clock; runners read one of these once
per event and pass ``now_ms`` down.  ``SystemClock`` uses the monotonic clock for
deadlines and the wall clock for timestamps that cross the wire (replay windows,
``last_heard`` shown to users).  ``SimClock`` is advanced explicitly by tests and the
simulator, so a run is a pure function of its seed.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...          # monotonic milliseconds, for deadlines
    def wall_ms(self) -> int: ...         # Unix epoch milliseconds, for the wire and users


class SystemClock:
    def now_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000


class SimClock:
    """A clock that moves only when told to; monotonic and wall time move together."""

    def __init__(self, start_ms: int = 0, wall_offset_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms
        self._wall_offset_ms = wall_offset_ms

    def now_ms(self) -> int:
        return self._now_ms

    def wall_ms(self) -> int:
        return self._now_ms + self._wall_offset_ms

    def advance(self, delta_ms: int) -> None:
        if delta_ms < 0:
            raise ValueError("a clock never goes back")
        self._now_ms += delta_ms

    def set(self, now_ms: int) -> None:
        self.advance(now_ms - self._now_ms)
