"""Deterministic voter choice: bootstrap, growth, replacement, retirement (pure table tests)."""

from __future__ import annotations

import random

from galaxy.consensus.voters import (
    Add, Found, Invite, Local, PeerInfo, Remove, Retire, Start, current_leader, plan)
from galaxy.messages import RaftView

KW = dict(voters=3, bootstrap_window_ms=1000, voter_replace_after_ms=30_000)


def peer(i: str, *, state="alive", role="auto", raft=None, silent_ms=0) -> PeerInfo:
    return PeerInfo(id=i, state=state, role=role, raft_addr=f"h{i}:7947", raft=raft or RaftView(), silent_ms=silent_ms)


def local(i: str, **kw) -> Local:
    base = dict(id=i, role="auto", raft_addr=f"h{i}:7947", running=False, member=False, is_leader=False, term=0,
                config=(), change_pending=False, uptime_ms=5_000, has_seeds=False)
    base.update(kw)
    return Local(**base)


def leader_view(term=3, voters=("a",), invited=()) -> RaftView:
    return RaftView(term=term, leader="a", voters=tuple(voters), invited=tuple(invited), raft_state="leader")


def test_lone_node_founds_after_window_only():
    assert plan(local("a", uptime_ms=10), [], **KW) == []
    assert plan(local("a", uptime_ms=1000), [], **KW) == [Found()]


def test_voters_one_with_no_peer_founds_at_once_but_not_with_seeds():
    kw = dict(KW, voters=1)
    assert plan(local("a", uptime_ms=0), [], **kw) == [Found()]
    assert plan(local("a", uptime_ms=0, has_seeds=True), [], **kw) == []


def test_only_smallest_eligible_id_founds_so_simultaneous_starters_agree():
    peers_seen_by = {"a": [peer("b"), peer("c")], "b": [peer("a"), peer("c")], "c": [peer("a"), peer("b")]}
    founders = [me for me, peers in peers_seen_by.items() if plan(local(me), peers, **KW) == [Found()]]
    assert founders == ["a"]


def test_workers_never_found_or_join_and_do_not_block_founding():
    assert plan(local("a", role="worker"), [], **KW) == []
    assert plan(local("b"), [peer("a", role="worker")], **KW) == [Found()]


def test_a_spare_cut_off_from_its_group_never_founds_another():
    # It has known the mesh's group: alone now (a partition), it must wait, not found a
    # second group whose log would sequence money the first never sees.
    assert plan(local("a", seen_group=True, uptime_ms=600_000), [], **KW) == []
    assert plan(local("a", seen_group=False, uptime_ms=600_000), [], **KW) == [Found()]


def test_no_founding_when_a_group_exists():
    running = peer("z", raft=RaftView(term=1, voters=("z",), raft_state="follower"))
    assert plan(local("a"), [running], **KW) == []


def test_invited_spare_starts_with_leader_voters_as_partners():
    lead = peer("a", raft=leader_view(voters=("a", "b"), invited=("c",)))
    out = plan(local("c"), [lead, peer("b", raft=RaftView(term=3, leader="a", voters=("a", "b"),
                                                          raft_state="follower"))], **KW)
    assert out == [Start(("ha:7947", "hb:7947"))]


def test_restarting_voter_rejoins_union_of_known_and_current_config():
    lead = peer("a", raft=leader_view(voters=("a", "b", "d")))
    out = plan(local("b", member=True, config=("ha:7947", "hb:7947", "hc:7947")), [lead, peer("d")], **KW)
    assert out == [Start(("ha:7947", "hc:7947", "hd:7947"))]


def test_restarting_voter_without_leader_waits_for_window_then_uses_stored_config():
    assert plan(local("b", member=True, config=("ha:7947", "hb:7947"), uptime_ms=10), [], **KW) == []
    assert plan(local("b", member=True, config=("ha:7947", "hb:7947")), [], **KW) == [Start(("ha:7947",))]


def leader_local(config, **kw):
    return local("a", running=True, member=True, is_leader=True, term=3, config=tuple(config), **kw)


def test_leader_invites_smallest_spare_then_adds_it_once_started():
    spares = [peer("c"), peer("b")]
    assert plan(leader_local(["ha:7947"]), spares, **KW) == [Invite("b")]
    started = [peer("c"), peer("b", raft=RaftView(raft_state="starting"))]
    assert plan(leader_local(["ha:7947"]), started, **KW) == [Add("b", "hb:7947")]


def test_leader_stops_growing_at_voters_and_never_invites_workers():
    assert plan(leader_local(["ha:7947", "hb:7947", "hc:7947"]), [peer("b"), peer("c"), peer("d")], **KW) == []
    assert plan(leader_local(["ha:7947"]), [peer("w", role="worker")], **KW) == []


def test_one_change_at_a_time():
    assert plan(leader_local(["ha:7947"], change_pending=True), [peer("b")], **KW) == []


def test_left_voter_removed_at_once_dead_voter_only_after_replace_after():
    cfg = ["ha:7947", "hb:7947", "hc:7947"]
    assert plan(leader_local(cfg), [peer("b", state="left"), peer("c")], **KW) == [Remove("b", "hb:7947")]
    assert plan(leader_local(cfg), [peer("b", state="dead", silent_ms=29_000), peer("c")], **KW) == []
    assert plan(leader_local(cfg), [peer("b", state="dead", silent_ms=30_000), peer("c")], **KW) == \
        [Remove("b", "hb:7947")]


def test_a_voter_back_at_another_address_has_its_old_one_removed_then_is_added_again():
    """The group knows voters by address, gossip by id: b restarted on another Raft port
    (or its host was renumbered).  Its old address, which nobody claims now, is removed at
    once, and growth brings b back in at its new address."""
    cfg = ["ha:7947", "hb:7947", "hc:7947"]
    moved = PeerInfo(id="b", state="alive", role="auto", raft_addr="hb:9000", raft=RaftView(raft_state="starting"),
                     silent_ms=0)
    ids = (("ha:7947", "a"), ("hb:7947", "b"), ("hc:7947", "c"))
    assert plan(leader_local(cfg, config_ids=ids), [moved, peer("c")], **KW) == [Remove("b", "hb:7947")]
    assert plan(leader_local(["ha:7947", "hc:7947"], config_ids=ids), [moved, peer("c")], **KW) == \
        [Add("b", "hb:9000")]
    # running this group's Raft already (restarted as a voter, its old address as a partner):
    # added as it is, since a running node ignores invitations; another group's follower is not
    running = PeerInfo(id="b", state="alive", role="auto", raft_addr="hb:9000", silent_ms=0,
                       raft=RaftView(term=3, voters=("a", "b", "c"), raft_state="follower"))
    assert plan(leader_local(["ha:7947", "hc:7947"], config_ids=ids), [running, peer("c")], **KW) == \
        [Add("b", "hb:9000")]
    stranger = PeerInfo(id="b", state="alive", role="auto", raft_addr="hb:9000", silent_ms=0,
                        raft=RaftView(term=3, voters=("b", "z"), raft_state="follower"))
    assert plan(leader_local(["ha:7947", "hc:7947"]), [stranger, peer("c")], **KW) == [Invite("b")]
    # not while its new incarnation is only suspected (it may be flapping): then as any address
    suspect = PeerInfo(id="b", state="suspect", role="auto", raft_addr="hb:9000", raft=RaftView(), silent_ms=0)
    assert plan(leader_local(cfg, config_ids=ids), [suspect, peer("c")], **KW) == []
    # one change at a time
    assert plan(leader_local(cfg, config_ids=ids, change_pending=True), [moved, peer("c")], **KW) == []


def test_an_address_nobody_claims_is_removed_after_replace_after_as_a_dead_voter():
    """Its voter is unknown to this leader (it never saw it, or gossip forgot it): the
    address goes after voter_replace_after_ms unclaimed, not before."""
    cfg = ["ha:7947", "hb:7947", "hc:7947"]
    assert plan(leader_local(cfg, unclaimed_ms=(("hb:7947", 29_999),)), [peer("c")], **KW) == []
    assert plan(leader_local(cfg, unclaimed_ms=(("hb:7947", 30_000),)), [peer("c")], **KW) == \
        [Remove("hb:7947", "hb:7947")]
    assert plan(leader_local(cfg, unclaimed_ms=(("hb:7947", 30_000),), config_ids=(("hb:7947", "b"),)),
                [peer("c")], **KW) == [Remove("b", "hb:7947")]
    # a claimed address is judged by its member's state as before, whatever the timer says
    assert plan(leader_local(cfg, unclaimed_ms=(("hb:7947", 99_000),)), [peer("b"), peer("c")], **KW) == []


def test_a_leaving_voter_is_removed_at_once_and_never_taken_back_as_a_spare():
    # It gossips "leaving" while it still runs Raft and acks: removing it now commits even
    # with two voters; once it has gone the survivor alone is no majority of two.
    leaving = RaftView(term=3, leader="a", voters=("a", "b"), raft_state="leaving")
    assert plan(leader_local(["ha:7947", "hb:7947"]), [peer("b", raft=leaving)], **KW) == [Remove("b", "hb:7947")]
    # removed, still alive and running this group's Raft for a moment: not added back
    assert plan(leader_local(["ha:7947"]), [peer("b", raft=leaving)], **KW) == []
    follower = RaftView(term=3, leader="a", voters=("a", "b"), raft_state="follower")
    assert plan(leader_local(["ha:7947"]), [peer("b", raft=follower)], **KW) == [Add("b", "hb:7947")]


def test_replacement_after_removal_brings_spare_in():
    cfg = ["ha:7947", "hc:7947"]
    assert plan(leader_local(cfg), [peer("c"), peer("d")], **KW) == [Invite("d")]


def test_removed_voter_retires_when_newer_leader_omits_it():
    lead = peer("a", raft=leader_view(term=9, voters=("a", "c", "d")))
    me = local("b", running=True, member=True, term=4, config=("ha:7947", "hb:7947", "hc:7947"))
    assert isinstance(plan(me, [lead], **KW)[0], Retire)
    # ...but not while the leader is at an older term, or lists or invites it
    assert plan(local("b", running=True, member=True, term=9, config=("ha:7947", "hb:7947", "hc:7947")),
                [lead], **KW) == []
    invited = peer("a", raft=leader_view(term=9, voters=("a",), invited=("b",)))
    assert plan(local("b", running=True, term=2), [invited], **KW) == []


def test_two_groups_meet_the_larger_min_id_retires():
    other = peer("a", raft=RaftView(term=1, leader="a", voters=("a",), raft_state="leader"))
    me = local("b", running=True, member=True, is_leader=True, term=1, config=("hb:7947",))
    assert isinstance(plan(me, [other], **KW)[0], Retire)
    mine_older = peer("c", raft=RaftView(term=1, leader="c", voters=("c",), raft_state="leader"))
    assert plan(me, [mine_older], **KW) in ([], [Invite("c")])


def test_current_leader_prefers_highest_term_among_alive():
    a = peer("a", raft=leader_view(term=3))
    b = peer("b", raft=RaftView(term=5, leader="b", voters=("b",), raft_state="leader"))
    dead = peer("c", state="dead", raft=RaftView(term=9, leader="c", raft_state="leader"))
    assert current_leader([a, b, dead])[0] == "b"


def test_plan_is_deterministic_for_shuffled_input():
    peers = [peer(x) for x in "bcdef"]
    first = plan(leader_local(["ha:7947"]), peers, **KW)
    for seed in range(20):
        shuffled = peers[:]
        random.Random(seed).shuffle(shuffled)
        assert plan(leader_local(["ha:7947"]), shuffled, **KW) == first


def test_member_with_unknown_config_never_restarts_alone_but_a_lone_voter_does():
    assert plan(local("b", member=True, config=()), [], **KW) == []
    assert plan(local("b", member=True, config=("hb:7947",)), [], **KW) == [Start(())]


def test_three_lone_founders_collapse_into_the_smallest_group():
    views = {x: RaftView(term=1, leader=x, voters=(x,), raft_state="leader") for x in "abc"}
    def lead(x):
        return local(x, running=True, member=True, is_leader=True, term=1, config=(f"h{x}:7947",))
    for x in "bc":
        others = [peer(y, raft=views[y]) for y in "abc" if y != x]
        assert isinstance(plan(lead(x), others, **KW)[0], Retire), x
    assert not any(isinstance(a, Retire) for a in plan(lead("a"), [peer("b", raft=views["b"]),
                                                                   peer("c", raft=views["c"])], **KW))


def test_follower_of_a_younger_group_retires_when_it_meets_the_older_leader():
    older = peer("a", raft=RaftView(term=1, leader="a", voters=("a",), raft_state="leader"))
    mine = peer("b", raft=RaftView(term=1, leader="b", voters=("b", "c"), raft_state="follower"))
    me = local("c", running=True, member=True, term=1, config=("hb:7947", "hc:7947"))
    assert isinstance(plan(me, [older, mine], **KW)[0], Retire)
