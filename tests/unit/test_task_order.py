"""The listing's order (galaxy/tasks/order.py) against sorting every task, as it used to."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy.tasks.order import TaskOrder

STATES = ("pending", "running", "succeeded")
NODES = ("n-a", "n-b", "n-c")
_op = st.tuples(st.sampled_from(["set", "set", "set", "remove"]), st.integers(0, 30), st.integers(0, 6),
                st.sampled_from(STATES), st.sampled_from(("alice", "bob")), st.lists(st.sampled_from(NODES), max_size=2))


class _Attempt:
    def __init__(self, node: str) -> None:
        self.node = node


def _reference(tasks: dict[str, tuple], state: str, owner: str, node: str, after: str) -> list[str]:
    rows = sorted((-s, i) for i, (s, st_, o, nodes) in tasks.items()
                  if (not state or st_ == state) and (not owner or o == owner) and (not node or node in nodes))
    if after:
        if after not in tasks:
            return []
        ak = (-tasks[after][0], after)
        return [i for k, i in rows if (k, i) > ak]
    return [i for _, i in rows]


@settings(max_examples=500, deadline=None)
@given(st.lists(_op, max_size=60), st.booleans(), st.sampled_from(("",) + STATES),
       st.sampled_from(("", "alice", "bob", "carol")), st.sampled_from(("",) + NODES + ("n-x",)), st.integers(-1, 30),
       st.sampled_from((0, 100)))
def test_newest_first_is_the_sorted_listing_whatever_came_and_went(ops, bulk_start, state, owner, node, after_n,
                                                                  wanted):
    """(``wanted`` 0 walks the whole order with the filters; 100 sorts the rarest filter's ids.)"""
    order, tasks = TaskOrder(), {}
    if bulk_start:
        order.bulk(True)
    for i, (op, n, submitted_ms, st_, who, more_nodes) in enumerate(ops):
        task_id = f"t-{n:02d}"
        if op == "remove":
            order.remove(task_id)
            tasks.pop(task_id, None)
        else:        # a task's submission time and owner never change; its attempts only grow
            submitted_ms, who, nodes = tasks[task_id][0::2] + (tasks[task_id][3],) if task_id in tasks else (
                submitted_ms, who, ())
            nodes += tuple(more_nodes)
            order.set(task_id, submitted_ms, st_, who, [_Attempt(x) for x in nodes])
            tasks[task_id] = (submitted_ms, st_, who, nodes)
        if bulk_start and i == len(ops) // 2:
            order.bulk(False)
    order.bulk(False)
    after = f"t-{after_n:02d}" if after_n >= 0 else ""
    assert list(order.newest_first(state=state, owner=owner, node=node, after=after, wanted=wanted)) == _reference(
        tasks, state, owner, node, after)
    assert len(order) == len(tasks) and all(order.state(i) == v[1] for i, v in tasks.items())
    assert [order.count(s) for s in STATES] == [sum(v[1] == s for v in tasks.values()) for s in STATES]


def test_a_rare_state_is_walked_by_its_own_ids_and_a_page_stops_where_it_is_full():
    order = TaskOrder()
    for n in range(1000):
        order.set(f"t-{n:04d}", n // 10, "succeeded" if n % 100 else "running", "alice", ())
    running = list(order.newest_first(state="running"))
    assert running == [f"t-{n:04d}" for n in range(900, -1, -100)]
    assert list(order.newest_first(state="running", after="t-0500")) == running[5:]
    walk = order.newest_first()
    assert [next(walk) for _ in range(3)] == ["t-0990", "t-0991", "t-0992"]    # a run ascending by id
    assert list(order.newest_first(after="t-0995"))[:5] == ["t-0996", "t-0997", "t-0998", "t-0999", "t-0980"]
    assert list(order.newest_first(after="t-9999")) == []                        # unknown: nothing
