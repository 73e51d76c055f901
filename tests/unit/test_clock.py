"""Logical clocks: HLC table tests, vector-clock laws (hypothesis), pruning and departures."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy.clock import Departures, Hlc, HlcClock, Order, SimClock, VectorClock

T0 = 1_700_000_000_000

# ---- HLC -------------------------------------------------------------------------------


def test_hlc_orders_by_wall_then_logical_then_node():
    assert Hlc(1, 5, "z") < Hlc(2, 0, "a") < Hlc(2, 1, "a") < Hlc(2, 1, "b")
    assert sorted([Hlc(2, 1, "b"), Hlc(1, 9, "c"), Hlc(2, 1, "a")]) == [
        Hlc(1, 9, "c"), Hlc(2, 1, "a"), Hlc(2, 1, "b")]


def test_hlc_send_follows_wall_and_counts_when_wall_stalls_or_steps_back():
    c = HlcClock("a")
    assert c.send(T0) == Hlc(T0, 0, "a")
    assert c.send(T0) == Hlc(T0, 1, "a")
    assert c.send(T0 - 5_000) == Hlc(T0, 2, "a")        # wall stepped back: still increasing
    assert c.send(T0 + 1) == Hlc(T0 + 1, 0, "a")


def test_hlc_recv_is_after_remote_and_local():
    c = HlcClock("a")
    c.send(T0)
    # A remote slightly ahead (within drift): the receive event is after it.
    got = c.recv(T0, Hlc(T0 + 100, 7, "b"))
    assert got == Hlc(T0 + 100, 8, "a") and got > Hlc(T0 + 100, 7, "b")
    # A remote behind: local time wins, logical bumps.
    assert c.recv(T0 + 100, Hlc(T0, 50, "b")) == Hlc(T0 + 100, 9, "a")
    # Wall moved past both: logical resets.
    assert c.recv(T0 + 500, Hlc(T0 + 200, 3, "b")) == Hlc(T0 + 500, 0, "a")
    # Same wall on all three: max logical + 1.
    assert c.recv(T0 + 500, Hlc(T0 + 500, 10, "b")) == Hlc(T0 + 500, 11, "a")
    assert c.stats["clamped"] == 0


def test_hlc_recv_clamps_a_remote_beyond_max_drift_and_counts_it():
    c = HlcClock("a", max_drift_ms=1_000)
    far = Hlc(T0 + 3_600_000, 4, "broken")
    got = c.recv(T0, far)
    assert c.stats["clamped"] == 1
    assert got == Hlc(T0 + 1_000, 1, "a")        # advanced to now + max_drift, not to the remote
    assert got < far                             # the documented price of clamping
    # Still strictly increasing afterwards.
    assert c.send(T0) > got


def test_hlc_restore_never_reissues_after_restart():
    first = HlcClock("a")
    issued = [first.send(T0 + 10) for _ in range(3)]
    again = HlcClock("a", last=issued[-1])
    assert again.send(T0) > issued[-1]           # wall clock behind after the restart
    again.restore(Hlc(T0 - 1, 0, "a"))           # an older one changes nothing
    assert again.send(T0) > issued[-1]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(-10_000, 10_000), st.integers(-2_000, 2_000),
                          st.integers(0, 5)), max_size=60))
def test_hlc_timestamps_strictly_increase_and_follow_causality(events):
    c = HlcClock("a", max_drift_ms=1_000)
    prev = c.last
    for is_recv, wall_delta, remote_delta, logical in events:
        now = T0 + wall_delta
        if is_recv:
            remote = Hlc(now + remote_delta, logical, "b")
            got = c.recv(now, remote)
            if remote.wall_ms <= now + 1_000:
                assert got > remote
        else:
            got = c.send(now)
        assert got > prev and got.wall_ms >= now
        prev = got


def test_hlc_rejects_bad_arguments():
    with pytest.raises(ValueError):
        HlcClock("")
    with pytest.raises(ValueError):
        HlcClock("a", max_drift_ms=-1)


# ---- vector clocks: table tests --------------------------------------------------------

def vc(**kw: int) -> VectorClock:
    return VectorClock(kw)


@pytest.mark.parametrize("a,b,order", [
    (vc(), vc(), Order.EQUAL),
    (vc(a=1), vc(a=1), Order.EQUAL),
    (vc(), vc(a=1), Order.BEFORE),
    (vc(a=1), vc(a=2), Order.BEFORE),
    (vc(a=1), vc(a=1, b=1), Order.BEFORE),
    (vc(a=2, b=1), vc(a=1, b=1), Order.AFTER),
    (vc(a=1), vc(), Order.AFTER),
    (vc(a=1), vc(b=1), Order.CONCURRENT),
    (vc(a=2, b=1), vc(a=1, b=2), Order.CONCURRENT),
    (vc(a=1, c=1), vc(a=1, b=1), Order.CONCURRENT),
])
def test_compare_table(a, b, order):
    assert a.compare(b) is order
    mirror = {Order.BEFORE: Order.AFTER, Order.AFTER: Order.BEFORE}.get(order, order)
    assert b.compare(a) is mirror


def test_vector_clock_is_an_immutable_normalised_value():
    a = VectorClock({"x": 2, "y": 0})
    assert len(a) == 1 and "y" not in a and a.get("y") == 0      # zero entries vanish
    assert a == VectorClock([("x", 2)]) and hash(a) == hash(VectorClock({"x": 2}))
    b = a.increment("y")
    assert a == VectorClock({"x": 2}) and b == VectorClock({"x": 2, "y": 1})
    assert b.items() == [("x", 2), ("y", 1)] and b.to_dict() == {"x": 2, "y": 1}
    assert repr(b) == "VectorClock({'x': 2, 'y': 1})"
    for bad in ({"": 1}, {"x": -1}, {"x": 1.5}, {1: 1}):
        with pytest.raises(ValueError):
            VectorClock(bad)
    with pytest.raises(ValueError):
        a.increment("")


def test_without_and_prune_drop_entries():
    a = vc(a=3, b=1, c=2)
    assert a.without({"b"}) == vc(a=3, c=2)
    assert a.without(set()) is a and a.without({"zz"}) is a
    assert a.prune({"a", "c", "d"}) == vc(a=3, c=2)
    assert a.prune({"a", "b", "c"}) is a


def test_pruning_can_lose_an_order_but_the_horizon_case_never_invents_one():
    # Lose an order: b's only lead over a was at n; pruned, they look concurrent/equal.
    a, b = vc(m=1), vc(m=1, n=1)
    assert a.compare(b) is Order.BEFORE
    assert a.compare(b.without({"n"})) is Order.EQUAL
    # Invent an order (the unsafe case the horizon rules out): a carries a write of n that
    # b lacks; dropping n makes a look older than b.
    a, b = vc(m=1, n=2), vc(m=2, n=1)
    assert a.compare(b) is Order.CONCURRENT
    assert a.without({"n"}).compare(b.without({"n"})) is Order.BEFORE
    # Once n's last write is everywhere (equal n entries), pruning changes no comparison.
    a, b = vc(m=1, n=2), vc(m=2, n=2)
    assert a.compare(b) is a.without({"n"}).compare(b.without({"n"})) is Order.BEFORE


# ---- vector clocks: laws ---------------------------------------------------------------

NODES = st.sampled_from(["a", "b", "c", "d"])
CLOCKS = st.dictionaries(NODES, st.integers(0, 4), max_size=4).map(VectorClock)


@settings(max_examples=400, deadline=None)
@given(CLOCKS, CLOCKS, CLOCKS)
def test_merge_is_commutative_associative_idempotent(a, b, c):
    assert a.merge(b) == b.merge(a)
    assert a.merge(b).merge(c) == a.merge(b.merge(c))
    assert a.merge(a) == a
    m = a.merge(b)
    assert a.compare(m) in (Order.BEFORE, Order.EQUAL) and b.compare(m) in (Order.BEFORE, Order.EQUAL)


@settings(max_examples=400, deadline=None)
@given(CLOCKS, CLOCKS, CLOCKS)
def test_compare_is_antisymmetric_transitive_and_agrees_with_merge(a, b, c):
    ab, ba = a.compare(b), b.compare(a)
    mirror = {Order.BEFORE: Order.AFTER, Order.AFTER: Order.BEFORE}
    assert ba is mirror.get(ab, ab)
    assert (ab is Order.EQUAL) == (a == b)
    # a <= b iff merging b into a gives b.
    assert (ab in (Order.BEFORE, Order.EQUAL)) == (a.merge(b) == b)
    if ab is Order.BEFORE and b.compare(c) is Order.BEFORE:
        assert a.compare(c) is Order.BEFORE
    # Increment makes a strictly later clock.
    assert a.compare(a.increment("a")) is Order.BEFORE


@settings(max_examples=300, deadline=None)
@given(CLOCKS, CLOCKS, st.sets(NODES))
def test_pruning_both_sides_never_turns_an_order_around(a, b, gone):
    before, after = a.compare(b), a.without(gone).compare(b.without(gone))
    if before is Order.BEFORE:
        assert after in (Order.BEFORE, Order.EQUAL)
    if before is Order.AFTER:
        assert after in (Order.AFTER, Order.EQUAL)
    if before is Order.EQUAL:
        assert after is Order.EQUAL


# ---- departures ------------------------------------------------------------------------

def test_departures_prunes_only_after_the_horizon_and_forgets_returning_nodes():
    clock = SimClock()
    d = Departures(horizon_ms=1_000)
    present = {"a", "b", "c"}
    assert d.update(clock.now_ms(), {"a", "b"}, present) == frozenset()
    assert d.gone_since_ms("c") == 0 and d.gone_since_ms("a") is None
    clock.advance(999)
    assert d.update(clock.now_ms(), {"a", "b"}, present) == frozenset()
    clock.advance(1)
    assert d.update(clock.now_ms(), {"a", "b"}, present) == {"c"}
    # c comes back: not prunable, and a later absence starts a fresh horizon.
    assert d.update(clock.now_ms(), {"a", "b", "c"}, present) == frozenset()
    clock.advance(10)
    assert d.update(clock.now_ms(), {"a"}, present) == frozenset()
    assert d.gone_since_ms("b") == d.gone_since_ms("c") == clock.now_ms()
    clock.advance(1_000)
    assert d.update(clock.now_ms(), {"a"}, present) == {"b", "c"}
    # No local clock mentions c any more: it stays prunable (peers may still send it).
    clock.advance(10_000)
    assert d.update(clock.now_ms(), {"a"}, {"a"}) == {"b", "c"}


def test_departures_is_bounded():
    d = Departures(horizon_ms=10, ids_max=3)
    for i in range(10):
        d.update(i, set(), {f"n{i}"})
    assert sum(d.gone_since_ms(f"n{i}") is not None for i in range(10)) == 3
    assert d.gone_since_ms("n9") == 9
