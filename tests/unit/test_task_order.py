"""The listing's order (galaxy/tasks/order.py) against sorting every task, as it used to."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy.tasks.order import TaskOrder

STATES = ("pending", "running", "succeeded")
_op = st.tuples(st.sampled_from(["set", "set", "set", "remove"]), st.integers(0, 30), st.integers(0, 6),
                st.sampled_from(STATES))


def _reference(tasks: dict[str, tuple[int, str]], state: str, after: str) -> list[str]:
    rows = sorted((-s, i) for i, (s, st_) in tasks.items() if not state or st_ == state)
    keys = [i for _, i in rows]
    if after:
        if after not in tasks:
            return []
        ak = (-tasks[after][0], after)
        return [i for k, i in zip(rows, keys) if k > ak]
    return keys


@settings(max_examples=400, deadline=None)
@given(st.lists(_op, max_size=60), st.booleans(), st.sampled_from(("",) + STATES), st.integers(-1, 30))
def test_newest_first_is_the_sorted_listing_whatever_came_and_went(ops, bulk_start, state, after_n):
    order, tasks = TaskOrder(), {}
    if bulk_start:
        order.bulk(True)
    for i, (op, n, submitted_ms, st_) in enumerate(ops):
        task_id = f"t-{n:02d}"
        if op == "remove":
            order.remove(task_id)
            tasks.pop(task_id, None)
        else:                       # a task's submission time never changes
            submitted_ms = tasks[task_id][0] if task_id in tasks else submitted_ms
            order.set(task_id, submitted_ms, st_)
            tasks[task_id] = (submitted_ms, st_)
        if bulk_start and i == len(ops) // 2:
            order.bulk(False)
    order.bulk(False)
    after = f"t-{after_n:02d}" if after_n >= 0 else ""
    assert list(order.newest_first(state=state, after=after)) == _reference(tasks, state, after)
    assert len(order) == len(tasks) and all(order.state(i) == s for i, (_, s) in tasks.items())
    assert [order.count(s) for s in STATES] == [sum(v[1] == s for v in tasks.values()) for s in STATES]


def test_a_rare_state_is_walked_by_its_own_ids_and_a_page_stops_where_it_is_full():
    order = TaskOrder()
    for n in range(1000):
        order.set(f"t-{n:04d}", n // 10, "succeeded" if n % 100 else "running")
    running = list(order.newest_first(state="running"))
    assert running == [f"t-{n:04d}" for n in range(900, -1, -100)]
    assert list(order.newest_first(state="running", after="t-0500")) == running[5:]
    walk = order.newest_first()
    assert [next(walk) for _ in range(3)] == ["t-0990", "t-0991", "t-0992"]    # a run ascending by id
    assert list(order.newest_first(after="t-0995"))[:5] == ["t-0996", "t-0997", "t-0998", "t-0999", "t-0980"]
    assert list(order.newest_first(after="t-9999")) == []                        # unknown: nothing
