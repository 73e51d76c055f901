"""The order a node lists its tasks in, kept as tasks come and go (pure).

Theory of operation: ``GET /v1/tasks`` (the CLI's ``galaxy tasks``, and the dashboard once
a second) shows tasks newest first: by submission time, descending, then by id, ascending
(a batch's tasks share their submission time).  Sorting every task for each page cost
79 ms at 100,000 tasks (a week of retention at ten thousand a day), a stall of the node's
loop every second while a dashboard was open.  This index keeps the tasks sorted as they
are indexed, so that a page walks only as far as it shows, and a filter by a rare state
(pending, running) walks only the tasks in that state.

It holds ``(submitted_ms, id)`` in ascending order (new tasks arrive at the end, so an
insert moves little) and each state's ids.  Newest first is that order backwards, run by
run of equal ``submitted_ms``, each run ascending by id.  ``bulk()`` adds many at once and
sorts once (a node's start-up reads every stored task in no order).

Invariants: every id added and not removed is in ``_keys`` exactly once (at its
``submitted_ms``) and in exactly one state's set; a task's ``submitted_ms`` never changes.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

SMALL_STATE_SHARE = 8       # a state held by under 1/8 of the tasks is walked by its own ids


class TaskOrder:
    def __init__(self) -> None:
        self._keys: list[tuple[int, str]] = []          # (submitted_ms, id), ascending
        self._submitted: dict[str, int] = {}
        self._state_of: dict[str, str] = {}
        self._in_state: dict[str, set[str]] = {}
        self._bulk = False

    def __len__(self) -> int:
        return len(self._submitted)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._submitted

    def state(self, task_id: str) -> str | None:
        return self._state_of.get(task_id)

    def count(self, state: str) -> int:
        return len(self._in_state.get(state, ()))

    def bulk(self, on: bool) -> None:
        """Between ``bulk(True)`` and ``bulk(False)``, ``set`` appends; the end sorts once."""
        self._bulk = on
        if not on:
            self._keys.sort()

    def set(self, task_id: str, submitted_ms: int, state: str) -> None:
        """Add a task, or record its new state."""
        was = self._state_of.get(task_id)
        if was is None:
            self._submitted[task_id] = submitted_ms
            if self._bulk:
                self._keys.append((submitted_ms, task_id))
            else:
                bisect.insort(self._keys, (submitted_ms, task_id))
        elif was == state:
            return
        else:
            self._in_state[was].discard(task_id)
        self._state_of[task_id] = state
        self._in_state.setdefault(state, set()).add(task_id)

    def remove(self, task_id: str) -> None:
        submitted = self._submitted.pop(task_id, None)
        if submitted is None:
            return
        self._in_state[self._state_of.pop(task_id)].discard(task_id)
        if self._bulk:
            self._keys.remove((submitted, task_id))
            return
        i = bisect.bisect_left(self._keys, (submitted, task_id))
        del self._keys[i]

    def newest_first(self, *, state: str = "", after: str = "") -> Iterator[str]:
        """Ids newest first (``state``: only those in it; ``after``: only those listed after
        that id, nothing if it is unknown here)."""
        if after and after not in self._submitted:
            return
        if state:
            ids = self._in_state.get(state, ())
            if len(ids) * SMALL_STATE_SHARE < len(self._submitted):
                yield from self._sorted_newest_first(ids, after)
                return
        state_of = self._state_of
        for task_id in self._walk(after):
            if not state or state_of[task_id] == state:
                yield task_id

    def _sorted_newest_first(self, ids: set[str], after: str) -> Iterator[str]:
        submitted = self._submitted
        key: Callable[[str], tuple[int, str]] = lambda i: (-submitted[i], i)
        listed = sorted(ids, key=key)
        start = bisect.bisect_right(listed, key(after), key=key) if after else 0
        yield from listed[start:]

    def _walk(self, after: str) -> Iterator[str]:
        keys = self._keys
        end = len(keys)
        if after:
            s = self._submitted[after]
            # the rest of after's run (same time, larger ids), then the older runs
            for k in range(bisect.bisect_right(keys, (s, after)), end):
                if keys[k][0] != s:
                    break
                yield keys[k][1]
            end = bisect.bisect_left(keys, (s, ""))
        while end > 0:
            s = keys[end - 1][0]
            start = bisect.bisect_left(keys, (s, ""), 0, end)
            for k in range(start, end):
                yield keys[k][1]
            end = start
