"""Document rumours and anti-entropy scheduling (pure core)."""

from __future__ import annotations

import random

from galaxy.config import Config
from galaxy.gossip.docs import PENDING_MAX, DocGossip, Peer, Push, Sync, rounds_for
from galaxy.gossip.replica import Replica

CFG = Config.sim()


def peers(*ids: str) -> list[Peer]:
    return [Peer(i, "10.0.0." + str(n + 1), 7946) for n, i in enumerate(ids)]


def docs(n: int):
    r = Replica("me")
    return [r.put(1_000, "kv", f"k{i}", i) for i in range(n)]


def test_rounds_grow_with_log_of_members():
    assert rounds_for(1, 4) == 4 and rounds_for(9, 4) == 4 and rounds_for(10, 4) == 8
    assert rounds_for(0, 1) == 2


def test_a_change_is_pushed_to_fanout_peers_for_its_rounds_then_stops():
    g = DocGossip("me", CFG, random.Random(1), now_ms=0)
    ps = peers("a", "b", "c", "d", "e")
    g.tick(0, ps)                      # the start-up sync
    g.changed(docs(1), members=6)
    rounds = rounds_for(6, CFG.retransmit_mult)
    pushes = []
    now = 0
    for _ in range(rounds + 3):
        now += CFG.gossip_interval_ms
        pushes.append([e for e in g.tick(now, ps) if isinstance(e, Push)])
    sent = [p for p in pushes if p]
    assert len(sent) == rounds
    assert all(len(p) == min(CFG.gossip_fanout, 5) for p in sent)
    assert g.pending == 0


def test_syncs_at_start_then_every_period_and_when_it_was_the_one_away():
    g = DocGossip("me", CFG, random.Random(2), now_ms=0)
    ps = peers("a", "b", "c")
    assert [e for e in g.tick(0, ps) if isinstance(e, Sync)]              # start
    assert not [e for e in g.tick(10, ps) if isinstance(e, Sync)]
    # a new node appears: only the member after it on the hash ring syncs it at once
    # (for "ab" that is "c", not me)
    assert not [e for e in g.tick(15, peers("a", "ab", "b", "c")) if isinstance(e, Sync)]
    # ... and for "d" it is me
    out = [e for e in g.tick(20, peers("a", "ab", "b", "c", "d")) if isinstance(e, Sync)]
    assert [e.peer.id for e in out] == ["d"]
    # the period comes round
    assert [e for e in g.tick(20 + CFG.push_pull_interval_ms, peers("a", "b", "c", "d")) if isinstance(e, Sync)]
    # this node was cut off (saw one peer) and now sees three more: it syncs at once, with a newcomer
    g.tick(30 + CFG.push_pull_interval_ms, peers("a"))
    out = [e for e in g.tick(40 + CFG.push_pull_interval_ms, peers("a", "b", "c", "d")) if isinstance(e, Sync)]
    assert out and out[0].peer.id in {"b", "c", "d"}


def test_pending_is_bounded_and_same_seed_same_schedule():
    g = DocGossip("me", CFG, random.Random(3), now_ms=0)
    g.changed(docs(50), members=3)
    assert g.pending == 50
    many = DocGossip("me", CFG, random.Random(3), now_ms=0)
    r = Replica("me")
    many.changed((r.put(1, "kv", f"x{i}", 0) for i in range(PENDING_MAX + 5)), members=3)
    assert many.pending == PENDING_MAX and many.stats["dropped_pending"] == 5

    def run(seed: int):
        x = DocGossip("me", CFG, random.Random(seed), now_ms=0)
        x.changed(docs(3), members=4)
        return [(type(e).__name__, e.peer.id) for t in range(0, 2000, 100) for e in x.tick(t, peers("a", "b", "c"))]
    assert run(9) == run(9)


def test_a_node_alone_sleeps_until_its_next_sync():
    # Regression: with no peers the sync deadline stayed in the past and the runner's loop
    # spun (a lone node used ~65 % of a core).
    g = DocGossip("me", CFG, random.Random(1), now_ms=0)
    assert g.tick(0, []) == []
    assert g.next_deadline_ms() > 0
    assert [type(e) for e in g.tick(5, peers("a"))] == [Sync]     # the first peer: a sync at once
