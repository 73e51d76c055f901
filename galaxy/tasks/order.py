"""The order a node lists its tasks in, kept as tasks come and go (pure).

Theory of operation: ``GET /v1/tasks`` (the CLI's ``galaxy tasks``, and the dashboard once
a second) shows tasks newest first: by submission time, descending, then by id, ascending
(a batch's tasks share their submission time).  Sorting every task for each page cost
79 ms at 100,000 tasks (a week of retention at ten thousand a day), a stall of the node's
loop every second while a dashboard was open.  This index keeps the tasks sorted as they
are indexed, so that a page walks only as far as it shows, and a filter that few tasks
match (a state such as pending or running, an owner, a node) sorts just those.

It holds ``(submitted_ms, id)`` in ascending order (new tasks arrive at the end, so an
insert moves little) and the ids of each state, owner and node (every node an attempt of
the task was placed on).  Newest first is that order backwards, run by run of equal
``submitted_ms``, each run ascending by id.  ``bulk()`` adds many at once and sorts once
(a node's start-up reads every stored task in no order).

Invariants: every id added and not removed is in ``_keys`` exactly once (at its
``submitted_ms``), in exactly one state's ids and one owner's, and in the ids of each node
its attempts were on; a task's ``submitted_ms`` and owner never change, its attempts only
grow.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator, Sequence
from typing import Any


class TaskOrder:
    def __init__(self) -> None:
        self._keys: list[tuple[int, str]] = []          # (submitted_ms, id), ascending
        self._submitted: dict[str, int] = {}
        self._state_of: dict[str, str] = {}
        self._owner_of: dict[str, str] = {}
        self._nodes_of: dict[str, tuple[str, ...]] = {}    # every node an attempt of it was placed on
        # value -> ids, per kind (indexed on every node for every task's every step: no tuple keys)
        self._by_state: dict[str, set[str]] = {}
        self._by_owner: dict[str, set[str]] = {}
        self._by_node: dict[str, set[str]] = {}
        self._bulk = False

    def __len__(self) -> int:
        return len(self._submitted)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._submitted

    def state(self, task_id: str) -> str | None:
        return self._state_of.get(task_id)

    def count(self, state: str) -> int:
        return len(self._by_state.get(state, ()))

    def bulk(self, on: bool) -> None:
        """Between ``bulk(True)`` and ``bulk(False)``, ``set`` appends; the end sorts once."""
        self._bulk = on
        if not on:
            self._keys.sort()

    def set(self, task_id: str, submitted_ms: int, state: str, owner: str, attempts: Sequence[Any]) -> None:
        """Add a task, or record its new state and attempts (each with a ``node``; a task's
        attempts only ever grow, its owner and submission time never change)."""
        was = self._state_of.get(task_id)
        if was is None:
            self._submitted[task_id] = submitted_ms
            self._owner_of[task_id] = owner
            _add(self._by_owner, owner, task_id)
            self._nodes_of[task_id] = ()
            if self._bulk:
                self._keys.append((submitted_ms, task_id))
            else:
                bisect.insort(self._keys, (submitted_ms, task_id))
        elif was != state:
            self._by_state[was].discard(task_id)
        if was != state:
            self._state_of[task_id] = state
            _add(self._by_state, state, task_id)
        nodes = self._nodes_of[task_id]
        if len(attempts) != len(nodes):
            for a in attempts[len(nodes):]:
                _add(self._by_node, a.node, task_id)
                nodes += (a.node,)
            self._nodes_of[task_id] = nodes

    def remove(self, task_id: str) -> None:
        submitted = self._submitted.pop(task_id, None)
        if submitted is None:
            return
        _discard(self._by_state, self._state_of.pop(task_id), task_id)
        _discard(self._by_owner, self._owner_of.pop(task_id), task_id)
        for node in set(self._nodes_of.pop(task_id)):     # a retry may run on a node again
            _discard(self._by_node, node, task_id)
        if self._bulk:
            self._keys.remove((submitted, task_id))
            return
        i = bisect.bisect_left(self._keys, (submitted, task_id))
        del self._keys[i]

    def newest_first(self, *, state: str = "", owner: str = "", node: str = "", after: str = "",
                     wanted: int = 100) -> Iterator[str]:
        """Ids newest first: those in ``state``, of ``owner``, with an attempt on ``node``
        (each if given), listed after ``after`` (nothing if that id is unknown here).
        ``wanted``: how many the caller will likely take (which way is cheaper)."""
        if after and after not in self._submitted:
            return
        filters = [by.get(value, _NONE) for by, value in
                   ((self._by_state, state), (self._by_owner, owner), (self._by_node, node)) if value]
        if not filters:
            yield from self._walk(after)
            return
        # Sorting the k ids of the rarest filter costs ~k; walking everything until ``wanted``
        # match, ~wanted * n / k.
        smallest = min(filters, key=len)
        if len(smallest) ** 2 < wanted * len(self._submitted):
            yield from self._sorted_newest_first([i for i in smallest if all(i in f for f in filters)], after)
            return
        for task_id in self._walk(after):
            if all(task_id in f for f in filters):
                yield task_id

    def _sorted_newest_first(self, ids: list[str], after: str) -> Iterator[str]:
        submitted = self._submitted
        key: Callable[[str], tuple[int, str]] = lambda i: (-submitted[i], i)
        ids.sort(key=key)
        start = bisect.bisect_right(ids, key(after), key=key) if after else 0
        yield from ids[start:]

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


_NONE: frozenset[str] = frozenset()


def _add(by: dict[str, set[str]], value: str, task_id: str) -> None:
    ids = by.get(value)
    if ids is None:
        by[value] = {task_id}
    else:
        ids.add(task_id)


def _discard(by: dict[str, set[str]], value: str, task_id: str) -> None:
    ids = by[value]
    ids.discard(task_id)
    if not ids:
        del by[value]
