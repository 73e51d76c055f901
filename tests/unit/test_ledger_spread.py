"""Range documents of the ledger (galaxy/ledger/spread.py): how the coordinator cuts what it
applied, and how a view applies the ranges in contiguous order through gaps, duplicates,
re-cuts by a later coordinator and a diverged outcome."""

from __future__ import annotations

import random

import pytest

from galaxy.consensus.commands import COMMAND_INDEX_STRIDE
from galaxy.ledger import spread
from galaxy.ledger.core import Ledger
from galaxy.messages import Mint, OpenAccount, Transfer


def coordinator_ledger(raft_entries: list[int]) -> Ledger:
    """A ledger that applied len(raft_entries) Raft entries, the i-th holding raft_entries[i]
    commands (group commit), transfers among funded accounts with some rejections."""
    led = Ledger()
    r = 1
    for cmd in (OpenAccount("o-a", "a", "user", "", 0), OpenAccount("o-b", "b", "user", "", 0),
                Mint("m-a", "a", 1_000, "admin", 0)):
        led.apply(r * COMMAND_INDEX_STRIDE, 1, cmd)
        r += 1
    n = 0
    for size in raft_entries:
        for pos in range(size):
            n += 1
            amount = 5_000 if n % 7 == 0 else 1         # every 7th is rejected: insufficient funds
            src, dst = ("a", "b") if n % 2 else ("b", "a")
            led.apply(r * COMMAND_INDEX_STRIDE + pos, 2, Transfer(f"tx:{src}:{n}", src, dst, amount, src, n))
        r += 1
    return led


def published_of(docs: dict[int, dict]):
    return lambda seq: docs.get(seq)


def test_one_range_per_raft_entry_and_the_cut_covers_everything_in_order() -> None:
    led = coordinator_ledger([1, 5, 40, 1])
    ranges = spread.pack(led.applied, 1, complete_index=10**9)
    assert spread.ranges_cover(ranges) == list(range(1, led.seq + 1))
    assert [len(spread.range_entries(v, f)) for f, v in ranges] == [1, 1, 1, 1, 5, 40, 1]
    assert all(v["first"] == first for first, v in ranges)


def test_a_large_raft_entry_is_cut_within_both_bounds_and_the_same_from_any_boundary() -> None:
    led = coordinator_ledger([700])
    ranges = spread.pack(led.applied, 1, 10**9, entries_max=256, bytes_max=8_000)
    sizes = [len(spread.range_entries(v, f)) for f, v in ranges]
    assert sum(sizes) == led.seq and max(sizes) <= 256
    assert all(sum(len(e[2]) + spread.ENTRY_OVERHEAD_BYTES for e in spread.range_entries(v, f)) <= 8_000
               for f, v in ranges)
    # a later coordinator whose view stopped at any range boundary cuts the rest the same way
    for first, _ in ranges:
        again = spread.pack(led.applied[first - 1:], first, 10**9, entries_max=256, bytes_max=8_000)
        assert again == [r for r in ranges if r[0] >= first]


def test_a_raft_entry_not_wholly_applied_is_not_published() -> None:
    led = coordinator_ledger([3, 4])
    last_raft = spread.raft_index(led.applied[-1][0])
    ranges = spread.pack(led.applied, 1, complete_index=last_raft - 1)
    assert spread.ranges_cover(ranges) == list(range(1, led.seq - 4 + 1))
    # half of the last entry visible (the tick thread is applying it): still not published
    assert spread.pack(led.applied[:-2], 1, complete_index=last_raft - 1) == ranges


def test_a_view_applies_ranges_in_order_through_gaps_and_duplicates() -> None:
    led = coordinator_ledger([2, 9, 1, 30, 3, 1, 12])
    ranges = spread.pack(led.applied, 1, 10**9)
    rng = random.Random(7)
    arrivals = ranges + rng.sample(ranges, 5)         # some arrive twice
    rng.shuffle(arrivals)
    view = Ledger()
    docs: dict[int, dict] = {}
    for first, value in arrivals:
        docs[first] = value                            # the replica keeps one version per key
        before = view.seq
        spread.apply_published(view, published_of(docs))
        # contiguous: the view only ever stops at the end of a range it has, never past a gap
        assert view.seq == before or view.seq in {f + len(spread.range_entries(v, f)) - 1 for f, v in docs.items()}
        assert all(s in docs or s > view.seq for s in [f for f, _ in ranges if f <= view.seq])
    assert (view.seq, view.hash) == (led.seq, led.hash)
    assert spread.apply_published(view, published_of(docs)) == 0        # nothing applied twice


def test_a_view_stuck_at_a_gap_moves_once_it_is_filled() -> None:
    led = coordinator_ledger([1, 1, 1, 2])
    ranges = dict(spread.pack(led.applied, 1, 10**9))
    firsts = sorted(ranges)
    missing = firsts[2]
    view = Ledger()
    docs = {f: v for f, v in ranges.items() if f != missing}
    assert spread.apply_published(view, published_of(docs)) == missing - 1
    assert view.seq == missing - 1
    docs[missing] = ranges[missing]
    assert spread.apply_published(view, published_of(docs)) == led.seq - (missing - 1)
    assert (view.seq, view.hash) == (led.seq, led.hash)


def test_another_outcome_or_a_malformed_range_stops_the_view() -> None:
    led = coordinator_ledger([4])
    ranges = dict(spread.pack(led.applied, 1, 10**9))
    last = max(ranges)
    entries = spread.range_entries(ranges[last], last)
    entries[-1][3] = not entries[-1][3]                              # flip the coordinator's outcome
    forged = spread.range_value(last, entries)
    with pytest.raises(spread.Diverged):
        spread.apply_published(Ledger(), published_of({**ranges, last: forged}))
    for bad in ({"first": 2, "entries": ranges[1]["entries"]}, {"first": 1, "entries": []},
                spread.range_value(1, []), {"first": 1, "entries": b"\xc1not msgpack"},
                {"first": 1, "entries": [[1, 1, b"\x00junk", True, None]]}, spread.range_value(1, [[1, 1, b"\x00junk", True, None]]),
                {"first": 1, "entries": 7}, "not a range"):
        with pytest.raises(spread.Diverged):
            spread.apply_published(Ledger(), published_of({1: bad}))


def test_ranges_after_never_splits_a_raft_entry_at_its_bound_and_continues_the_same_cut() -> None:
    led = coordinator_ledger([30, 50, 20, 70, 5])
    whole = spread.pack(led.applied, 1, 10**9)
    got: list = []
    end = 0
    while end < led.seq:
        more = spread.ranges_after(led.applied, end, 10**9, entries_max=100)     # >= the largest Raft entry
        assert more, "a call must make progress while a whole Raft entry fits"
        assert sum(len(spread.range_entries(v, f)) for f, v in more) <= 100
        got += more
        end = more[-1][0] + len(spread.range_entries(more[-1][1], more[-1][0])) - 1
    assert got == whole


def test_ranges_a_view_applied_from_its_own_log_are_checked_when_published() -> None:
    led = coordinator_ledger([3, 8, 2])
    ranges = spread.pack(led.applied, 1, 10**9)
    view = Ledger()
    spread.apply_published(view, dict(spread.ranges_after(led.applied, 0, 10**9, 10_000)).get)
    assert (view.seq, view.hash) == (led.seq, led.hash)
    for first, value in ranges:
        spread.check_applied(view, first, value)          # the same entries and outcomes: fine
    first, value = ranges[-1]
    entries = spread.range_entries(value, first)
    entries[0][0] += 1                                    # another log: another command index
    with pytest.raises(spread.Diverged):
        spread.check_applied(view, first, spread.range_value(first, entries))
    # a range written before entries were one blob (a list per entry) still reads
    spread.check_applied(view, first, {"first": first, "entries": spread.range_entries(value, first)})


def test_a_range_keeps_its_entries_out_of_the_garbage_collectors_sight() -> None:
    """Every node keeps every range: a list per entry was a GC-tracked object per transfer
    on every node, and full collections grew with the ledger (the p99 of settling)."""
    import gc

    import msgpack

    from galaxy.gossip.replica import pack_value, unpack_value
    led = coordinator_ledger([40])
    first, value = spread.pack(led.applied, 1, 10**9)[-1]     # the 40 transfers of one Raft entry
    stored = unpack_value(pack_value(value))                # as every replica holds it
    assert type(stored["entries"]) is bytes and not gc.is_tracked(stored["entries"])
    assert spread.range_entries(stored, first) == msgpack.unpackb(value["entries"])


def test_applied_entries_and_their_keys_are_untracked_after_one_young_collection() -> None:
    """A ledger keeps every entry for the life of the node: an entry still tracked after a
    young collection reaches the older generations, whose collections then walk it
    (a gen1 collection of 450k nested rows took 170 ms, on every node at once)."""
    import gc
    led = coordinator_ledger([60, 40])
    gc.collect(0)
    assert not any(gc.is_tracked(row) for row in led.applied._rows)
    assert not any(gc.is_tracked(v) for v in led._keys.values())
    key = next(iter(led._keys))
    assert led.result_of(key)["ok"] is True and list(led.applied)[-1][3]["seq"] == led.seq
