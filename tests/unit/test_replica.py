"""Replicated documents: merge rules, resolvers, tombstones, pruning, digests and sync.

Pure tests: replicas exchange versions in memory (and through the real wire codec where
frame bounds matter).  Every replica's full ``_check()`` runs after each step.  Property
tests (hypothesis) check that any delivery order, with duplicates, gives the same state.
"""

from __future__ import annotations

import itertools
import random

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from galaxy import wire
from galaxy.clock import Hlc, VectorClock
from galaxy.gossip import replica as rp
from galaxy.gossip.replica import (
    Collected, Doc, InvalidDoc, Lattice, LastWriterWins, Replica, SyncError, from_wire, make_doc,
    pack_updates, to_wire,
)
from galaxy.messages import DigestNode, DocSync, DocUpdate, DocWire

T0 = 1_700_000_000_000
KEY = bytes(range(32))


def state(r: Replica) -> dict[tuple[str, str], tuple[bytes, ...]]:
    return {(d.doc_type, d.key): tuple(v.vid for v in r.versions(d.doc_type, d.key))
            for d in r.all_versions()}


def checked(*rs: Replica) -> None:
    for r in rs:
        r._check()


def exchange(a: Replica, b: Replica, now: int = T0, *, frame_max_bytes: int = rp.SYNC_FRAME_BYTES_MAX,
             codec: bool = False, rounds_max: int = 200) -> dict:
    """Run one anti-entropy session a -> b to the end; returns byte and round counts."""
    sa = a.sync(b.node_id, frame_max_bytes=frame_max_bytes)
    sb = b.sync(a.node_id, frame_max_bytes=frame_max_bytes)
    ca = wire.Codec("galaxy", [KEY], a.node_id, frame_max_bytes=frame_max_bytes) if codec else None
    cb = wire.Codec("galaxy", [KEY], b.node_id, frame_max_bytes=frame_max_bytes) if codec else None
    stats = {"rounds": 0, "frame_bytes": 0, "frame_bytes_max": 0}

    def carry(msg: DocSync, src: wire.Codec | None, dst: wire.Codec | None) -> DocSync:
        if src is None:
            return msg
        frame = src.encode(msg, now)       # raises EncodeError if over frame_max_bytes
        stats["frame_bytes"] += len(frame)
        stats["frame_bytes_max"] = max(stats["frame_bytes_max"], len(frame))
        got = dst.decode(frame, now).msg
        assert got == msg
        return got

    msg = sa.start()
    while msg is not None:
        stats["rounds"] += 1
        assert stats["rounds"] <= rounds_max, "sync does not terminate"
        step_b = sb.step(now, carry(msg, ca, cb))
        checked(b)
        step_a = sa.step(now, carry(step_b.reply or DocSync(), cb, ca))
        checked(a)
        msg = step_a.reply
    assert not sa.pending and not sb.pending
    stats["digest_bytes"] = sa.stats["digest_bytes_out"] + sb.stats["digest_bytes_out"]
    stats["docs"] = sa.stats["docs_out"] + sb.stats["docs_out"]
    return stats


# ---- values and versions ---------------------------------------------------------------

def test_put_get_items_and_plain_values():
    r = Replica("a")
    d = r.put(T0, "task", "t1", {"state": "pending", "args": ("x", 1), "blob": b"\x00", "f": 1.5})
    assert d.value == {"state": "pending", "args": ["x", 1], "blob": b"\x00", "f": 1.5}   # tuples -> lists
    assert d.origin == "a" and d.hlc == Hlc(T0, 0, "a") and d.vc == VectorClock({"a": 1})
    assert msgpack.unpackb(d.raw, raw=False) == d.value
    assert r.get("task", "t1") == d and r.get("task", "nope") is None and r.get("x", "t1") is None
    d2 = r.put(T0, "task", "t1", "v2")
    assert d2.vc == VectorClock({"a": 2}) and d2.hlc == Hlc(T0, 1, "a")
    assert r.versions("task", "t1") == (d2,)
    r.put(T0, "task", "t2", None)
    r.put(T0, "member", "a", 1)
    assert sorted(d.key for d in r.items("task")) == ["t1", "t2"]
    assert sorted(r.doc_types()) == ["member", "task"] and len(r) == 3
    checked(r)


@pytest.mark.parametrize("value", [
    {1: "int key"}, {"s": {1, 2}}, float("nan"), float("inf"), 2**64, object(),
    "x" * (rp.VALUE_BYTES_MAX + 1),
])
def test_values_that_are_not_plain_or_too_large_are_refused(value):
    r = Replica("a")
    with pytest.raises(InvalidDoc):
        r.put(T0, "t", "k", value)
    assert len(r) == 0


def test_values_nested_too_deep_are_refused():
    deep: list = []
    for _ in range(rp.VALUE_DEPTH_MAX + 1):
        deep = [deep]
    with pytest.raises(InvalidDoc):
        Replica("a").put(T0, "t", "k", deep)


@pytest.mark.parametrize("doc_type,key", [("", "k"), ("t", ""), ("t" * 65, "k"), ("t", "k" * 257),
                                          ("t", "a\nb"), (1, "k")])
def test_names_are_checked(doc_type, key):
    with pytest.raises(InvalidDoc):
        Replica("a").put(T0, doc_type, key, 1)


def test_wire_round_trip_and_validation():
    r = Replica("a")
    d = r.put(T0, "task", "t1", {"x": [1, 2]})
    w = to_wire(d)
    assert from_wire(w) == d and from_wire(w).value == d.value
    bad = [
        DocWire("task", "t1", b"\xc1", False, {"a": 1}, T0, 0, "a"),           # not msgpack
        DocWire("task", "t1", msgpack.packb(1) + b"x", False, {"a": 1}, T0, 0, "a"),   # trailing bytes
        DocWire("task", "t1", msgpack.packb({1: 2}), False, {"a": 1}, T0, 0, "a"),
        DocWire("task", "t1", msgpack.packb(1), True, {"a": 1}, T0, 0, "a"),    # tombstone with a value
        DocWire("task", "t1", msgpack.packb(1), False, {"a": -1}, T0, 0, "a"),
        DocWire("task", "t1", msgpack.packb(1), False, {"": 1}, T0, 0, "a"),
        DocWire("task", "t1", msgpack.packb(1), False, {"a": 1}, -1, 0, "a"),
        DocWire("task", "t1", msgpack.packb(1), False, {"a": 1}, T0, 0, ""),
        DocWire("task", "t1", msgpack.packb(1), False, {f"n{i}": 1 for i in range(rp.VC_ENTRIES_MAX + 1)},
                T0, 0, "a"),
    ]
    for x in bad:
        with pytest.raises(InvalidDoc):
            from_wire(x)
    b = Replica("b")
    assert b.merge(T0, bad + [w]) == [d]
    assert b.stats["invalid"] == len(bad)
    checked(b)


# ---- merge rules ---------------------------------------------------------------------------

def test_a_causally_newer_version_wins_without_a_conflict():
    a, b = Replica("a"), Replica("b")
    d1 = a.put(T0, "t", "k", 1)
    assert b.merge(T0, [d1], src="a") == [d1]
    d2 = b.put(T0 + 1, "t", "k", 2)
    assert d2.vc == VectorClock({"a": 1, "b": 1})
    assert a.merge(T0 + 1, [d2]) == [d2]
    assert a.versions("t", "k") == (d2,) and a.get("t", "k").value == 2
    assert a.merge(T0 + 2, [d1]) == []               # an old version changes nothing
    assert a.conflicts_resolved == b.conflicts_resolved == 0
    checked(a, b)


def test_concurrent_versions_are_kept_as_siblings_and_resolved_alike_everywhere():
    a, b = Replica("a"), Replica("b")
    da = a.put(T0 + 5, "t", "k", "from a")           # later HLC
    db = b.put(T0, "t", "k", "from b")
    changed_a = a.merge(T0 + 5, [db])
    changed_b = b.merge(T0 + 5, [da])
    assert set(changed_a) == set(changed_b) == {da, db}
    assert a.get("t", "k") == b.get("t", "k") == da  # last writer by HLC
    assert a.conflicts_resolved == b.conflicts_resolved == 1
    # Duplicates are not new conflicts.
    assert a.merge(T0 + 6, [db, da, db]) == [] and a.conflicts_resolved == 1
    # A write over the siblings settles the conflict for good.
    d3 = b.put(T0 + 7, "t", "k", "settled")
    assert d3.vc == VectorClock({"a": 1, "b": 2})
    assert a.merge(T0 + 7, [d3]) == [d3] and a.versions("t", "k") == (d3,)
    checked(a, b)


def test_lww_ties_on_wall_time_break_by_node_id():
    a, z = Replica("a"), Replica("z")
    da, dz = a.put(T0, "t", "k", "a"), z.put(T0, "t", "k", "z")
    a.merge(T0, [dz])
    z.merge(T0, [da])
    assert a.get("t", "k") == z.get("t", "k") == dz


def state_rank(doc: Doc) -> int:
    order = {"pending": 0, "running": 1, "succeeded": 2, "failed": 2}
    return 3 if doc.deleted else order[doc.value["state"]]


def test_lattice_resolver_ranks_before_hlc():
    res = {"task": Lattice(state_rank)}
    a, b = Replica("a", res), Replica("b", res)
    done = a.put(T0, "task", "t", {"state": "succeeded"})
    late = b.put(T0 + 1_000, "task", "t", {"state": "running"})   # later, but lower in the lattice
    a.merge(T0 + 1_000, [late])
    b.merge(T0 + 1_000, [done])
    assert a.get("task", "t") == b.get("task", "t") == done
    # Other types still use last writer wins.
    a.put(T0, "other", "k", 1)
    assert isinstance(a.resolver("other"), LastWriterWins) and repr(a.resolver("task")).startswith("Lattice")


def test_a_raising_rank_function_ranks_lowest_and_is_counted():
    def rank(doc: Doc) -> int:
        return doc.value["rank"]                        # KeyError for some values

    res = {"t": Lattice(rank)}
    a, b = Replica("a", res), Replica("b", res)
    good = a.put(T0, "t", "k", {"rank": 1})
    broken = b.put(T0 + 9, "t", "k", {"no rank": 1})
    a.merge(T0 + 9, [broken])
    b.merge(T0 + 9, [good])
    assert a.get("t", "k") == b.get("t", "k") == good
    assert a.stats["rank_errors"] > 0


def test_a_lattice_never_picks_an_overwritten_version_whatever_the_order():
    """A -> B causally, C concurrent with both; rank(A) > rank(C) > rank(B).  Keeping only a
    winner would let A (overwritten by B) win in some orders; siblings make it C always."""
    ranks = {"A": 3, "B": 1, "C": 2}
    res = {"t": Lattice(lambda d: ranks[d.value])}
    x, y, z = Replica("x", res), Replica("y", res), Replica("z", res)
    A = x.put(T0, "t", "k", "A")
    y.merge(T0, [A])
    B = y.put(T0 + 1, "t", "k", "B")
    C = z.put(T0 + 2, "t", "k", "C")
    results = set()
    for order in itertools.permutations([A, B, C]):
        r = Replica("r", res)
        for d in order:
            r.merge(T0 + 3, [d])
        checked(r)
        results.add((r.get("t", "k").value, tuple(v.vid for v in r.versions("t", "k"))))
    assert results == {("C", tuple(sorted([B.vid, C.vid])))}


def test_distinct_versions_with_equal_clocks_keep_the_resolver_greatest():
    vc = VectorClock({"a": 1})
    raw1, raw2 = msgpack.packb("one"), msgpack.packb("two")
    v1 = make_doc("t", "k", raw1, False, vc, Hlc(T0, 0, "a"))
    v2 = make_doc("t", "k", raw2, False, vc, Hlc(T0, 1, "a"))      # a writer that lost its disk
    r1, r2 = Replica("r1"), Replica("r2")
    r1.merge(T0, [v1, v2])
    r2.merge(T0, [v2, v1])
    assert r1.versions("t", "k") == r2.versions("t", "k") == (v2,)
    assert r1.conflicts_resolved == 1 and r2.conflicts_resolved == 0   # r2 never held v1
    checked(r1, r2)


def test_hlc_follows_merged_versions():
    a, b = Replica("a"), Replica("b")
    ahead = b.put(T0 + 10_000, "t", "k", 1)          # b's clock runs 10 s ahead
    a.merge(T0, [ahead])
    mine = a.put(T0, "t", "k2", 2)
    assert mine.hlc > ahead.hlc
    assert a.hlc.stats["clamped"] == 0


def test_bounds_docs_max_and_siblings_max():
    r = Replica("r", docs_max=2)
    r.put(T0, "t", "a", 1)
    r.put(T0, "t", "b", 1)
    with pytest.raises(InvalidDoc):
        r.put(T0, "t", "c", 1)
    other = Replica("o").put(T0, "t", "c", 1)
    assert r.merge(T0, [other]) == [] and r.stats["dropped_full"] == 1
    r.put(T0, "t", "a", 2)                             # existing keys still take writes
    checked(r)
    s = Replica("s")
    vs = [Replica(f"w{i}").put(T0 + i, "t", "k", i) for i in range(rp.SIBLINGS_MAX + 5)]
    s.merge(T0, vs)
    assert len(s.versions("t", "k")) == rp.SIBLINGS_MAX and s.stats["siblings_dropped"] == 5
    assert s.get("t", "k").value == rp.SIBLINGS_MAX + 4       # the newest survive
    checked(s)


# ---- tombstones ----------------------------------------------------------------------------

def test_delete_writes_a_tombstone_that_hides_and_beats_older_versions():
    a, b = Replica("a"), Replica("b")
    d1 = a.put(T0, "t", "k", 1)
    b.merge(T0, [d1])
    tomb = a.delete(T0 + 1, "t", "k")
    assert tomb.deleted and tomb.value is None and tomb.vc == VectorClock({"a": 2})
    assert a.get("t", "k") is None and a.items("t") == [] and a.winner("t", "k") == tomb
    assert a.delete(T0 + 2, "t", "k") is None and a.delete(T0, "t", "nope") is None
    assert a.merge(T0 + 2, [d1]) == []              # no resurrection by an old version
    b.merge(T0 + 2, [tomb])
    assert b.get("t", "k") is None and len(b) == 1
    again = b.put(T0 + 3, "t", "k", "new life")       # a new write after the delete is live
    a.merge(T0 + 3, [again])
    assert a.get("t", "k").value == "new life"
    checked(a, b)


def test_tombstones_are_collected_once_every_live_member_acknowledged_them():
    grace = 1_000
    a, b, c = (Replica(n, tombstone_grace_ms=grace) for n in "abc")
    d = a.put(T0, "t", "k", 1)
    for r in (b, c):
        r.merge(T0, [d], src="a")
    tomb = a.delete(T0, "t", "k")
    assert a.gc(T0 + grace, {"b", "c"}).removed == ()           # nobody acknowledged yet
    # b got it and gossips its (full) set back to a: a learns b holds it.
    for r in (b, c):
        r.merge(T0, [tomb], src="a")
    a.merge(T0, b.versions("t", "k"), src="b")
    assert a.acked_by("t", "k") == {"b"}
    assert a.gc(T0 + grace, {"b", "c"}).removed == ()
    # c answers by anti-entropy: equal digests are an acknowledgement too.
    exchange(c, a)
    assert a.acked_by("t", "k") == {"b", "c"}
    assert a.gc(T0 + grace - 1, {"b", "c"}).removed == ()       # still within the grace
    got = a.gc(T0 + grace, {"b", "c"})
    assert got.removed == (("t", "k"),) and a.versions("t", "k") == () and len(a) == 0
    assert a.get("t", "k") is None and a.winner("t", "k") is None and list(a.all_versions()) == []
    assert a.stats["tombstones_collected"] == 1
    checked(a)
    # A ghost: b, which has not collected yet, hands the tombstone (and d, late) back: no change,
    # and anti-entropy sees equal digests, so b can acknowledge a and collect too.
    assert a.merge(T0 + grace, [tomb, d], src="b") == [] and len(a) == 0
    assert exchange(a, b)["docs"] == 0
    assert b.acked_by("t", "k") == {"a"}
    # After another grace the ghost is forgotten.
    a.gc(T0 + 2 * grace - 1, {"b", "c"})
    assert a._ghosts
    a.gc(T0 + 2 * grace, {"b", "c"})
    assert not a._ghosts and a.stats["ghosts_forgotten"] == 1 and a.root_hash() == 0
    checked(a)
    # A newer write revives a ghost at once.
    a2 = Replica("a", tombstone_grace_ms=0)
    a2.merge(T0, [d, tomb])
    a2.gc(T0, set())
    assert a2._ghosts and a2.get("t", "k") is None
    e = c.put(T0 + 1, "t", "k", "again")
    assert a2.merge(T0 + 1, [e]) == [e] and a2.get("t", "k") == e and not a2._ghosts
    checked(a2)


def test_a_dead_member_does_not_hold_up_collection_and_a_change_resets_acks():
    a, b = Replica("a", tombstone_grace_ms=0), Replica("b", tombstone_grace_ms=0)
    a.put(T0, "t", "k", 1)
    a.delete(T0, "t", "k")
    exchange(a, b)
    exchange(b, a)
    assert a.acked_by("t", "k") == {"b"}
    # A concurrent tombstone from c changes the document: acknowledgements start over.
    c = Replica("c")
    c.put(T0, "t", "k", 0)
    other = c.delete(T0, "t", "k")
    a.merge(T0, [other])
    assert len(a.versions("t", "k")) == 2 and a.acked_by("t", "k") == frozenset()
    assert a.gc(T0, {"b"}).removed == ()
    exchange(b, a)
    assert a.gc(T0, {"b"}).removed == (("t", "k"),)         # c is not live: not waited for


# ---- pruning -------------------------------------------------------------------------------

def test_entries_of_nodes_gone_past_the_horizon_are_pruned_everywhere():
    h = 10_000
    a, b, c = (Replica(n, prune_after_ms=h) for n in "abc")
    dc = c.put(T0, "t", "k", "by c")
    for r in (a, b):
        r.merge(T0, [dc])
    da = a.put(T0 + 1, "t", "k", "by a")
    b.merge(T0 + 1, [da])
    assert da.vc == VectorClock({"a": 1, "c": 1})
    # c leaves; a and b notice at different times.
    assert a.gc(T0 + 2, {"b"}) == Collected()
    assert b.gc(T0 + 1_000, {"a"}) == Collected()
    got = a.gc(T0 + 2 + h, {"b"})
    assert got.pruned_ids == {"c"} and len(got.docs) == 1
    pruned = got.docs[0]
    assert pruned.vc == VectorClock({"a": 1}) and pruned.value == "by a" and pruned.hlc == da.hlc
    assert a.stats["ids_pruned"] == 1
    # b has not pruned yet and sends the unpruned version: a strips it, nothing changes.
    stripped = a.stats["stripped"]
    assert a.merge(T0 + 3 + h, b.versions("t", "k")) == [] and a.stats["stripped"] == stripped + 1
    # b prunes later and reaches the same version.
    b.gc(T0 + 1_000 + h, {"a"})
    assert state(a) == state(b)
    checked(a, b)
    # c comes back and writes: its new entry is kept (c is live again).
    a.gc(T0 + 2 * h, {"b", "c"})
    c.merge(T0 + 2 * h, a.versions("t", "k"))
    dc2 = c.put(T0 + 2 * h, "t", "k", "c again")
    assert dc2.vc == VectorClock({"a": 1, "c": 2})
    assert a.merge(T0 + 2 * h, [dc2]) == [dc2]
    checked(a)


def test_pruning_that_makes_clocks_equal_is_resolved_deterministically():
    h = 100
    a, b, n = Replica("a", prune_after_ms=h), Replica("b", prune_after_ms=h), Replica("n")
    base = a.put(T0, "t", "k", "base")
    n.merge(T0, [base])
    older = n.put(T0 + 1, "t", "k", "n1")
    newer = n.put(T0 + 2, "t", "k", "n2")              # n's last write
    for r in (a, b):
        r.gc(T0, {"a", "b"})
    a.merge(T0 + h, [older])
    b.merge(T0 + h, [newer])
    a.gc(T0 + h, {"b"})
    b.gc(T0 + h, {"a"})
    # Both stripped of n the versions have the clock {a: 1}; merging the other side's
    # version makes the resolver decide, identically on both.
    a.merge(T0 + h, b.versions("t", "k"))
    b.merge(T0 + h, a.versions("t", "k"))
    assert state(a) == state(b) and a.get("t", "k").value == "n2"
    checked(a, b)


# ---- property: any delivery order, with duplicates, gives the same state -----------------

OPS = st.lists(st.tuples(st.sampled_from(["put", "put", "delete", "send", "send"]),
                         st.integers(0, 2), st.integers(0, 2), st.integers(0, 3)),
               min_size=1, max_size=40)


def run_history(ops, resolvers=None) -> tuple[list[Replica], list[Doc]]:
    """Three nodes write and exchange partial state; returns them and every version made."""
    nodes = [Replica(f"n{i}", resolvers) for i in range(3)]
    made: list[Doc] = []
    now = T0
    for op, i, j, k in ops:
        now += 1
        key = f"k{k}"
        if op == "put":
            made.append(nodes[i].put(now, "t", key, {"state": ["pending", "running", "succeeded"][j],
                                                     "by": i, "at": now}))
        elif op == "delete":
            d = nodes[i].delete(now, "t", key)
            if d is not None:
                made.append(d)
        elif i != j:
            nodes[j].merge(now, nodes[i].versions("t", key), src=nodes[i].node_id)
        nodes[i]._check()
        nodes[j]._check()
    return nodes, made


def lattice_rank(doc: Doc) -> int:
    return 9 if doc.deleted else ["pending", "running", "succeeded"].index(doc.value["state"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS, st.randoms(use_true_random=False), st.booleans())
def test_any_delivery_order_with_duplicates_gives_the_same_state(ops, rnd, lattice):
    res = {"t": Lattice(lattice_rank)} if lattice else None
    nodes, made = run_history(ops, res)
    finals = []
    for _ in range(3):
        deliveries = made + rnd.sample(made, k=len(made) // 2)        # duplicates
        rnd.shuffle(deliveries)
        r = Replica("observer", res)
        while deliveries:                                              # random batch sizes
            n = rnd.randint(1, 4)
            r.merge(T0 + 10_000, deliveries[:n])
            deliveries = deliveries[n:]
            r._check()
        finals.append(r)
    assert state(finals[0]) == state(finals[1]) == state(finals[2])
    keys = {(d.doc_type, d.key) for d in made}
    for k in keys:
        assert finals[0].winner(*k) == finals[1].winner(*k) == finals[2].winner(*k)
    # The writers themselves converge after a full exchange, to the same state.
    for x, y in itertools.permutations(nodes, 2):
        y.merge(T0 + 20_000, list(x.all_versions()))
    for n in nodes:
        n._check()
        assert state(n) == state(finals[0])


VCS = st.dictionaries(st.sampled_from(["a", "b", "c"]), st.integers(0, 2), max_size=3)
ARBITRARY = st.lists(st.tuples(VCS, st.integers(0, 2), st.sampled_from(["a", "b"]), st.integers(0, 3),
                               st.booleans(), st.integers(0, 1)), min_size=1, max_size=25)


@settings(max_examples=200, deadline=None)
@given(ARBITRARY, st.randoms(use_true_random=False))
def test_merge_is_a_join_even_for_arbitrary_clocks(specs, rnd):
    """Clocks no correct history makes (equal clocks, different values: what pruning and
    lost disks produce) still merge to one state whatever the order."""
    docs = []
    for vc, wall, node, value, deleted, key in specs:
        raw = msgpack.packb(None if deleted else value)
        docs.append(make_doc("t", f"k{key}", raw, deleted, VectorClock(vc), Hlc(T0 + wall, 0, node)))
    states = []
    for _ in range(3):
        order = docs + rnd.sample(docs, k=len(docs) // 3)
        rnd.shuffle(order)
        r = Replica("o")
        for d in order:
            r.merge(T0, [d])
            r._check()
        states.append(state(r))
    assert states[0] == states[1] == states[2]


# ---- anti-entropy ----------------------------------------------------------------------------

def diverge(seed: int, n_common: int, n_diff: int, **kw) -> tuple[Replica, Replica]:
    rnd = random.Random(seed)
    a, b, w = Replica("a", **kw), Replica("b", **kw), Replica("w", **kw)
    common = [w.put(T0, rnd.choice(["task", "member"]), f"key-{i}", {"i": i}) for i in range(n_common)]
    a.merge(T0, common)
    b.merge(T0, common)
    for i in range(n_diff):
        k = rnd.choice(common)
        match rnd.randrange(5):
            case 0: a.put(T0 + i, k.doc_type, k.key, {"a": i})                    # a newer
            case 1: b.put(T0 + i, k.doc_type, k.key, {"b": i})                    # b newer
            case 2:                                                             # concurrent
                a.put(T0 + i, k.doc_type, k.key, {"a": i})
                b.put(T0 + i, k.doc_type, k.key, {"b": i})
            case 3: (a if i % 2 else b).delete(T0 + i, k.doc_type, k.key)
            case 4: (a if i % 2 else b).put(T0 + i, "new", f"only-{i}", i)
    return a, b


@pytest.mark.parametrize("seed", range(6))
def test_sync_converges_through_the_wire_codec(seed):
    a, b = diverge(seed, n_common=300, n_diff=40)
    assert a.root_hash() != b.root_hash()
    stats = exchange(a, b, codec=True)
    assert a.root_hash() == b.root_hash() and state(a) == state(b)
    assert stats["rounds"] <= 8
    # A second session finds nothing to do: one message each way.
    again = exchange(b, a, codec=True)
    assert again["rounds"] == 1 and again["docs"] == 0


def test_sync_of_small_replicas_and_of_an_empty_one():
    a, b = Replica("a"), Replica("b")
    assert exchange(a, b)["rounds"] == 1
    a.put(T0, "t", "k", 1)
    exchange(b, a)                                    # the empty side starts
    assert state(a) == state(b) != {}


@pytest.mark.parametrize("new_node_starts", [False, True])
def test_a_new_node_catches_up_in_one_session_with_small_frames(new_node_starts):
    a, _ = diverge(1, n_common=3_000, n_diff=0)
    b = Replica("b")
    stats = exchange(b, a, frame_max_bytes=65_000, codec=True) if new_node_starts else \
        exchange(a, b, frame_max_bytes=65_000, codec=True)
    assert state(a) == state(b) and len(b) == 3_000
    assert stats["frame_bytes_max"] <= 65_000 and stats["rounds"] > 2


def test_digest_for_20k_docs_differing_by_10_is_a_few_kb():
    w = Replica("w")
    docs = [w.put(T0, "task", f"task-{i:06d}", {"state": "pending", "n": i}) for i in range(20_000)]
    a, b = Replica("a"), Replica("b")
    a.merge(T0, docs)
    b.merge(T0, docs)
    for i in range(10):
        a.put(T0 + 1, "task", f"task-{i * 1999:06d}", {"state": "succeeded"})
    stats = exchange(a, b, codec=True)
    assert state(a) == state(b)
    assert stats["digest_bytes"] < 8_000, stats
    assert stats["rounds"] <= 5, stats


def test_malformed_sync_messages_are_refused():
    r = Replica("r")
    s = r.sync("p")
    for node in (DigestNode(16, 0), DigestNode(1, 16), DigestNode(-1, 0), DigestNode(0, 0, b"x" * 7),
                 DigestNode(rp.DEPTH_MAX, 0, b"\0" * 128), DigestNode(0, 0, b"", b"\0" * 15),
                 DigestNode(1, 0, b"", (2**63).to_bytes(8, "big") + bytes(8))):
        with pytest.raises(SyncError):
            s.step(T0, DocSync(nodes=(node,)))
    with pytest.raises(SyncError):
        s.step(T0, DocSync(want=b"123"))
    # Wanting unknown keys is harmless.
    assert s.step(T0, DocSync(want=bytes(16))).reply is None


# ---- sizes against the real codec ----------------------------------------------------------

def test_size_bounds_hold_for_the_real_encoding():
    codec = wire.Codec("galaxy", [KEY], "n" * 63, frame_max_bytes=1_000_000)
    r = Replica("n" * 63)
    big = {"cmd": ["x" * 1000] * 30, "env": {f"K{i}": "v" * 20 for i in range(20)}}
    docs = [r.put(T0, "task", f"t{i}", big if i % 3 == 0 else i) for i in range(40)]
    for i in range(30):   # a clock with many entries
        other = Replica(f"node-{i:02d}-" + "x" * 50)
        other.merge(T0, r.versions("task", "t1"))
        r.merge(T0, [other.put(T0, "task", "t1", i)])
    docs = list(r.all_versions())
    for d in docs:
        alone = codec.encode(DocUpdate((to_wire(d),)), T0)
        empty = codec.encode(DocUpdate(()), T0)
        assert len(alone) - len(empty) <= rp.doc_bytes_max(d)
    for frame_max in (40_000, 65_000):
        ups = pack_updates(docs, frame_max, r.node_id, "galaxy-cluster-name")
        c = wire.Codec("galaxy-cluster-name", [KEY], r.node_id, frame_max_bytes=frame_max)
        assert [len(w.docs) for w in ups] and sum(len(u.docs) for u in ups) == len(docs)
        for u in ups:
            assert len(c.encode(u, T0)) <= frame_max
    with pytest.raises(ValueError):
        pack_updates(docs, 20_000, r.node_id, "galaxy")
    # A digest node's bound.
    node = DigestNode(rp.DEPTH_MAX, 2**60 - 1, b"", bytes(16 * rp.LEAF_KEYS_MAX))
    alone = codec.encode(DocSync(nodes=(node,)), T0)
    assert len(alone) - len(codec.encode(DocSync(), T0)) <= rp.NODE_FIXED_BYTES + len(node.entries)


# ---- seeded mesh: gossip with loss and delay, anti-entropy, gc, a node leaving ------------

@pytest.mark.parametrize("seed", range(16))
def test_seeded_mesh_converges_to_the_writes_made(seed):
    """Safety phase: five replicas write, gossip with loss, delay and duplication, run
    anti-entropy and gc, and one leaves for good (its clock entries get pruned).  Liveness
    phase: no more writes, no loss; all replicas converge, every tombstone is collected,
    and every document shows the value a replica holding every version ever made shows."""
    rnd = random.Random(seed)
    names = [f"n{i}" for i in range(5)]
    horizon_ms, grace_ms = 1_000, 4_000        # as in production: grace >> horizon >> gossip
    nodes = {n: Replica(n, prune_after_ms=horizon_ms, tombstone_grace_ms=grace_ms) for n in names}
    leaver, leave_ms = "n4", T0 + 4_000
    made: list[Doc] = []
    flight: list[tuple[int, int, str, str, tuple[Doc, ...]]] = []     # (due, seq, src, dst, docs)
    seq = itertools.count()
    now = T0

    def live(at: int) -> list[str]:
        return [n for n in names if n in nodes]

    def send(src: str, docs: list[Doc], fanout: int) -> None:
        for dst in rnd.sample([n for n in live(now) if n != src], k=min(fanout, len(live(now)) - 1)):
            for _ in range(2 if rnd.random() < 0.1 else 1):                # duplicates
                if rnd.random() < 0.25:                                    # loss
                    continue
                flight.append((now + rnd.randint(1, 300), next(seq), src, dst, tuple(docs)))

    while now < T0 + 12_000:
        now += rnd.randint(1, 40)
        flight.sort()
        while flight and flight[0][0] <= now:
            _, _, src, dst, docs = flight.pop(0)
            if dst in live(now):
                changed = nodes[dst].merge(now, docs, src=src)
                if changed and rnd.random() < 0.5:
                    send(dst, changed, 1)
        writer = rnd.choice(live(now))
        r = nodes[writer]
        key = f"k{rnd.randrange(12)}"
        if rnd.random() < 0.2:
            d = r.delete(now, "t", key)
        else:
            d = r.put(now, "t", key, {"by": writer, "at": now})
        if d is not None:
            made.append(d)
            send(writer, [d], 2)
        if rnd.random() < 0.05:
            a, b = rnd.sample(live(now), 2)
            exchange(nodes[a], nodes[b], now)
        if rnd.random() < 0.05:
            n = rnd.choice(live(now))
            nodes[n].gc(now, [m for m in live(now) if m != n])
        if leaver in nodes and now >= leave_ms:
            exchange(nodes[leaver], nodes[rnd.choice(names[:-1])], now)   # a graceful leave
            del nodes[leaver]
        for r in nodes.values():
            r._check()

    # Liveness: deliver nothing more; anti-entropy between all pairs; gc after the grace.
    survivors = [nodes[n] for n in live(now)]
    for _ in range(80):          # pruning, acknowledgements, the grace, the ghosts' grace
        for a, b in itertools.permutations(survivors, 2):
            exchange(a, b, now)
        now += 250
        for r in survivors:
            r.gc(now, [m.node_id for m in survivors if m is not r])
        if all(state(r) == state(survivors[0]) and not r._dead and not r._ghosts for r in survivors):
            break
    ref = Replica("ref")
    ref.merge(now, made)
    for r in survivors:
        r._check()
        assert state(r) == state(survivors[0]), f"seed={seed}: replicas differ"
        assert not any(leaver in d.vc for d in r.all_versions()), f"seed={seed}: not pruned"
        assert not r._dead and not r._ghosts, f"seed={seed}: tombstones left"
    for d in ref.all_versions():
        want = ref.winner(d.doc_type, d.key)
        got = survivors[0].winner(d.doc_type, d.key)
        if got is None:
            assert want.deleted, f"seed={seed}: {d.key} lost"
        else:
            assert (got.raw, got.deleted, got.hlc) == (want.raw, want.deleted, want.hlc), f"seed={seed}: {d.key}"


def test_a_version_held_or_superseded_is_recognised_without_decoding(monkeypatch):
    a, b = Replica("a"), Replica("b")
    d1 = a.put(T0, "task", "t1", {"n": 1})
    d2 = a.put(T0 + 1, "task", "t1", {"n": 2})
    assert b.merge(T0, [to_wire(d2)], src="a") == [d2]
    decoded = []
    real = rp.from_wire
    monkeypatch.setattr(rp, "from_wire", lambda w, **kw: decoded.append(w) or real(w, **kw))
    assert b.merge(T0, [to_wire(d2), to_wire(d1)], src="a") == []    # held, then superseded
    assert decoded == []
    # same clock and hlc but another value (a writer that lost its disk): the exact path decides
    odd = DocWire("task", "t1", msgpack.packb({"n": 3}), False, d2.vc.to_dict(), d2.hlc.wall_ms,
                  d2.hlc.logical, "a")
    b.merge(T0, [odd], src="a")
    assert len(decoded) == 1
    # a clock not below the held one (concurrent) is merged for real
    c = Replica("c").put(T0, "task", "t1", {"n": 9})
    assert set(b.merge(T0, [to_wire(c)], src="c")) >= {c}
    checked(b)
