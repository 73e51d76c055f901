"""Document rumours and anti-entropy scheduling (pure core)."""

from __future__ import annotations

import random

from galaxy.config import Config
from galaxy.gossip.docs import (ANSWER_DELAY_MAX_MS, FRESH_MAX, PENDING_MAX, DocGossip, Peer, Push, Sync,
                                rounds_for)
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


def test_a_new_version_is_pushed_at_once_then_still_rides_every_round():
    """The eager push saves a hop its wait (up to a gossip interval) and spends no round."""
    g = DocGossip("me", CFG, random.Random(4), now_ms=0)
    ps = peers("a", "b", "c", "d", "e")
    g.tick(0, ps)                       # start-up sync and the first (empty) round
    d = docs(2)
    g.changed(d, members=6)
    now = 1                             # well before the next round
    eager = [e for e in g.tick(now, ps) if isinstance(e, Push)]
    assert len(eager) == CFG.gossip_fanout and len({p.peer.id for p in eager}) == CFG.gossip_fanout
    assert all(p.docs == tuple(d) for p in eager)
    assert not g.tick(now + 1, ps)      # once per version: nothing new, no round due
    assert g.next_deadline_ms() == CFG.gossip_interval_ms
    rounds = rounds_for(6, CFG.retransmit_mult)
    sent = [[e for e in g.tick(t * CFG.gossip_interval_ms, ps) if isinstance(e, Push)] for t in range(1, rounds + 3)]
    assert len([p for p in sent if p]) == rounds and g.pending == 0
    # a version merged from a peer is forwarded at once too; with no live peer it waits for the rounds
    later = (rounds + 3) * CFG.gossip_interval_ms + 1
    g.changed([Replica("peer").put(5, "kv", "x", 1)], members=6)
    assert [e for e in g.tick(later, []) if isinstance(e, Push)] == [] and g.pending == 1
    assert not [e for e in g.tick(later + 1, ps) if isinstance(e, Push)]     # not eager twice


def test_an_eager_push_is_bounded_and_a_round_due_carries_the_news_alone():
    g = DocGossip("me", CFG, random.Random(5), now_ms=0)
    ps = peers("a", "b")
    g.tick(0, ps)
    r = Replica("me")
    g.changed([r.put(1, "kv", f"k{i}", i) for i in range(FRESH_MAX + 10)], members=3)
    eager = [e for e in g.tick(1, ps) if isinstance(e, Push)]
    assert len(eager) == 2 and all(len(p.docs) == FRESH_MAX for p in eager)
    g.changed(docs(1), members=3)
    due = [e for e in g.tick(CFG.gossip_interval_ms, ps) if isinstance(e, Push)]
    assert len(due) == 2        # the round alone: not the same versions twice in one tick


def test_a_node_alone_sleeps_until_its_next_sync():
    # Regression: with no peers the sync deadline stayed in the past and the runner's loop
    # spun (a lone node used ~65 % of a core).
    g = DocGossip("me", CFG, random.Random(1), now_ms=0)
    assert g.tick(0, []) == []
    assert g.next_deadline_ms() > 0
    assert [type(e) for e in g.tick(5, peers("a"))] == [Sync]     # the first peer: a sync at once


def test_a_version_is_not_pushed_back_to_the_member_it_came_from_but_a_tombstone_is():
    from galaxy.gossip.replica import to_wire
    g = DocGossip("me", CFG, random.Random(6), now_ms=0)
    ps = peers("a", "b")
    g.tick(0, ps)
    r = Replica("a")
    live, gone = r.put(1_000, "kv", "x", 1), r.put(1_000, "kv", "y", 1)
    gone = r.delete(1_001, "kv", "y")
    mine = Replica("me").put(1_000, "kv", "z", 1)           # merged with them, not sent by "a"
    g.changed([live, gone, mine], members=3, src="a", sent=[to_wire(live), to_wire(gone)])
    seen: dict[str, set[str]] = {"a": set(), "b": set()}
    now = 1
    for _ in range(rounds_for(3, CFG.retransmit_mult) + 2):
        for e in g.tick(now, ps):
            if isinstance(e, Push):
                seen[e.peer.id] |= {d.key for d in e.docs}
        now += CFG.gossip_interval_ms
    assert seen == {"a": {"y", "z"}, "b": {"x", "y", "z"}}


def test_a_push_names_its_other_targets_who_are_not_relayed_to_and_an_ack_ends_the_resends():
    from galaxy.gossip.replica import to_wire
    rounds = rounds_for(3, CFG.retransmit_mult)

    def run(g: DocGossip, ps: list[Peer], now: int, ticks: int) -> dict[str, int]:
        sent = {p.id: 0 for p in ps}
        for i in range(ticks):
            for e in g.tick(now, ps):
                if isinstance(e, Push):
                    sent[e.peer.id] += len(e.docs)
                    # the eager push (first tick) names the other targets (fanout 3 >= all
                    # peers); a round's does not: it may be the version's last
                    assert set(e.also) == ({p.id for p in ps} - {e.peer.id} if i == 0 else set())
            now += CFG.gossip_interval_ms
        return sent

    # the writer: pushed at once to both peers; without answers, each round re-sends
    w = DocGossip("me", CFG, random.Random(7), now_ms=0)
    ps = peers("a", "b")
    w.tick(0, ps)
    [x] = docs(1)
    w.changed([x], members=3)
    assert run(w, ps, 1, rounds + 2) == {"a": rounds + 1, "b": rounds + 1}
    # ... but once a peer says it holds the version, no more to it; once all do, none at all
    w = DocGossip("me", CFG, random.Random(7), now_ms=0)
    w.tick(0, ps)
    w.changed([x], members=3)
    assert run(w, ps, 1, 1) == {"a": 1, "b": 1}               # the eager push
    w.acked("a", [x.vid])
    assert run(w, ps, 2, 1)["a"] == 0
    w.acked("b", [x.vid])
    assert run(w, ps, 3 + CFG.gossip_interval_ms, rounds + 2) == {"a": 0, "b": 0}
    assert w.pending == 0
    # a receiver does not relay to the members the sender named (only the sender re-sends)
    r = DocGossip("me", CFG, random.Random(8), now_ms=0)
    ps = peers("w", "b", "c")
    r.tick(0, ps)
    r.changed([x], members=4, src="w", sent=[to_wire(x)])
    r.heard("w", [to_wire(x)], also=("me", "b"))
    assert run(r, ps, 1, rounds + 2) == {"w": 0, "b": 0, "c": rounds + 1}


def test_a_round_leaves_a_version_pushed_less_than_an_interval_ago_for_the_next():
    """Answers to an eager push take time under load: the round right after it must not
    re-send (to members that hold it, and who would relay a push that names no others)."""
    rounds = rounds_for(3, CFG.retransmit_mult)
    g = DocGossip("me", CFG, random.Random(8), now_ms=0)
    ps = peers("a", "b")
    g.tick(0, ps)
    [x] = docs(1)
    g.changed([x], members=3)
    late = CFG.gossip_interval_ms - 5
    assert len([e for e in g.tick(late, ps) if isinstance(e, Push)]) == 2        # at once
    assert not [e for e in g.tick(CFG.gossip_interval_ms, ps) if isinstance(e, Push)]
    assert g.stats["waited"] == 1
    g.acked("a", [x.vid])                                  # a answered in time; b did not
    sent = []
    for t in range(2, rounds + 4):
        sent += [e.peer.id for e in g.tick(t * CFG.gossip_interval_ms, ps) if isinstance(e, Push)]
    assert sent == ["b"] * rounds and g.pending == 0      # every round still carries it


def test_a_version_with_a_named_interest_goes_at_once_to_those_only_and_to_the_rest_if_still_current():
    """A task's submission must reach the coordinator at once, its assignment the worker;
    the others hear of it from the rounds, and not at all once a newer version (the task
    ended within the interval) superseded it."""
    g = DocGossip("me", CFG, random.Random(9), now_ms=0)
    ps = peers("a", "b", "c")
    g.tick(0, ps)
    g.interest["task"] = lambda d: (d.value["to"],) if d.value["to"] else None
    r = Replica("me")
    to_b, to_me, anyone = r.put(1, "task", "x", {"to": "b"}), r.put(1, "task", "y", {"to": "me"}), docs(1)[0]
    g.changed([to_b, to_me, anyone], members=4)
    got = {e.peer.id: {d.key for d in e.docs} for e in g.tick(1, ps) if isinstance(e, Push)}
    assert got == {"a": {"k0"}, "b": {"x", "k0"}, "c": {"k0"}}      # fanout 3: every peer gets k0
    # the round an interval later brings x and y to the others (each push without what it holds)
    g.acked("b", [to_b.vid])
    for p in ("a", "b", "c"):
        g.acked(p, [anyone.vid])
    later = [e for e in g.tick(CFG.gossip_interval_ms + 1, ps) if isinstance(e, Push)]
    assert {e.peer.id: {d.key for d in e.docs} for e in later} == {"a": {"x", "y"}, "b": {"y"}, "c": {"x", "y"}}
    # superseded before the rounds got to it: nobody else ever hears of the old version
    g2 = DocGossip("me", CFG, random.Random(9), now_ms=0)
    g2.tick(0, ps)
    g2.interest["task"] = g.interest["task"]
    v1 = r.put(2, "task", "z", {"to": "b"})
    g2.changed([v1], members=4)
    assert [(e.peer.id, e.docs) for e in g2.tick(1, ps) if isinstance(e, Push)] == [("b", (v1,))]
    v2 = r.put(3, "task", "z", {"to": None})
    g2.changed([v2], members=4)
    sent = [d for t in range(2, 2000, 50) for e in g2.tick(t, ps) if isinstance(e, Push) for d in e.docs]
    assert v1 not in sent and v2 in sent
    # a DocPut's versions (sent_ms) get no eager push; the rounds wait an interval for answers
    g3 = DocGossip("me", CFG, random.Random(9), now_ms=0)
    g3.tick(0, ps)
    g3.changed([r.put(4, "kv", "w", 1)], members=4, sent_ms=1)
    assert not [e for e in g3.tick(2, ps) if isinstance(e, Push)]
    assert not [e for e in g3.tick(CFG.gossip_interval_ms, ps) if isinstance(e, Push)]
    assert [e for e in g3.tick(2 * CFG.gossip_interval_ms, ps) if isinstance(e, Push)]


def test_answers_are_gathered_for_a_tenth_of_an_interval_so_they_arrive_before_the_round_that_would_resend():
    import dataclasses
    g = DocGossip("me", CFG, random.Random(10), now_ms=0)
    assert g.answer_delay_ms() == min(ANSWER_DELAY_MAX_MS, CFG.gossip_interval_ms // 10)
    g.reconfigure(dataclasses.replace(CFG, gossip_interval_ms=20))       # a fast LAN: answers too
    assert g.answer_delay_ms() == 2
    g.reconfigure(dataclasses.replace(CFG, gossip_interval_ms=5_000))    # a slow WAN: still capped
    assert g.answer_delay_ms() == ANSWER_DELAY_MAX_MS
