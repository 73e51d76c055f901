"""Membership core (SWIM + Lifeguard): table tests for the rules, small seeded simulations.

The simulations run on ``galaxy.sim.MeshSim`` (one SimClock, one event queue, latency 1-5
ms, optional loss); every run is a pure function of its seed and a failure names the
seed.  The core runs its own ``_check()`` after every step, and the harness checks across
steps that no member's version key goes back.  The big seeded runs live in tests/sim/.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import pytest

from galaxy import wire
from galaxy.config import Config
from galaxy.gossip import membership as ms
from galaxy.gossip.membership import (
    RECORDS_MAX, Membership, detection_bound_ms, message_bytes_max, record_bytes_max,
    rumor_bytes_max, suspicion_timeouts, version_key,
)
from galaxy.messages import (
    ALIVE, DEAD, LEFT, SUSPECT, Ack, Gossip, MemberRecord, Nack, Ping, PingReq, RaftView,
    Resources, Rumor, Spread, Sync,
)
from galaxy.sim import MeshSim, addr_of, nid, record


def sim_cfg(**changes) -> Config:
    return dataclasses.replace(Config.sim(), **changes)


CFG = sim_cfg()
P = CFG.probe_interval_ms


def mesh(seed: int, n: int, cfg: Config = CFG, **kw) -> MeshSim:
    sim = MeshSim(seed, cfg, **kw)
    sim.start_mesh(n, snapshot=False)
    return sim


def bad_events(sim: MeshSim, since_ms: int = 0, about: set[str] | None = None) -> list:
    return [e for e in sim.events if e[0] >= since_ms and e[4] in (SUSPECT, DEAD)
            and (about is None or e[2] in about)]


# ------------------------------------------------------------------------ simulations

@pytest.mark.parametrize("seed", range(5))
def test_three_nodes_join_via_one_seed(seed: int) -> None:
    sim = MeshSim(seed, CFG)
    sim.start(0)
    sim.start(1, seeds=[0])
    sim.start(2, seeds=[0])
    took_ms = sim.run_until(sim.converged, limit_ms=2_000)
    assert took_ms <= 3 * CFG.gossip_interval_ms, f"seed={seed}: {took_ms} ms"
    for node in sim.up():
        assert [v.record.id for v in node.members()] == [nid(0), nid(1), nid(2)]
        assert {v.state for v in node.members()} == {ALIVE}


@pytest.mark.parametrize("seed", range(3))
def test_fifty_nodes_join_through_one_seed_and_stay_alive(seed: int) -> None:
    sim = mesh(seed, 50)
    assert sim.now_ms <= 10_000, f"seed={seed}: 50 joins took {sim.now_ms} simulated ms"
    sim.run(20_000)
    assert not bad_events(sim), f"seed={seed}"
    assert sim.converged()
    sim.check_all()


@pytest.mark.parametrize("n", [3, 10, 40])
def test_an_update_reaches_everyone_within_a_few_gossip_rounds(n: int) -> None:
    sim = MeshSim(n, CFG)
    sim.start_mesh(n)
    sim.run(3_000)
    sim.call(0, lambda now: sim.node(0).update_self(now, raft=RaftView(term=7, leader=nid(0))))
    took_ms = sim.run_until(lambda: all(m.get(nid(0)).record.raft.term == 7 for m in sim.up()), 5_000, step_ms=5)
    assert took_ms <= 3 * CFG.gossip_interval_ms, took_ms


@pytest.mark.parametrize("seed", range(4))
def test_crashed_node_is_suspect_then_dead_everywhere(seed: int) -> None:
    cfg = sim_cfg(dead_reap_after_ms=60_000)
    n = 8
    sim = MeshSim(seed, cfg)
    sim.start_mesh(n)
    sim.run(2_000 + 97 * seed)
    crash_ms = sim.now_ms
    sim.crash(n - 1)
    took_ms = sim.run_until(lambda: sim.all_see([nid(n - 1)], DEAD), detection_bound_ms(cfg, n), what="dead")
    for observer in (nid(i) for i in range(n - 1)):
        seen = [(old, new) for t, obs, member, old, new in sim.events if obs == observer and member == nid(n - 1)]
        assert seen == [(ALIVE, SUSPECT), (SUSPECT, DEAD)], (seed, observer, seen)
    # Typical, far inside the bound: a probe interval to notice, then the suspicion's min.
    min_ms, _, _ = suspicion_timeouts(cfg, n)
    assert took_ms <= 4 * P + min_ms + 1_000, f"seed={seed}: {took_ms} ms"
    assert not bad_events(sim, about={nid(i) for i in range(n - 1)})
    # Dead members are reaped after dead_reap_after_ms, and nobody resurrects them.
    sim.run(cfg.dead_reap_after_ms + 1_000)
    assert all(m.get(nid(n - 1)) is None for m in sim.up()), f"seed={seed}"
    assert all(len(m.alive_peers()) == n - 2 for m in sim.up())
    assert crash_ms < sim.now_ms


@pytest.mark.parametrize("seed", range(3))
def test_graceful_leave_is_left_everywhere_never_suspect(seed: int) -> None:
    sim = mesh(seed, 5)
    leaver = sim.node(4)
    sends = sim.call(4, leaver.leave)
    assert {(s.host, s.port) for s in sends} == {addr_of(i) for i in range(4)}
    assert all(s.msg.members == (leaver.me(),) and leaver.me().state == LEFT for s in sends)
    assert leaver.leave(sim.now_ms) == sends            # idempotent: the runner repeats it
    sim.run(50)
    sim.crash(4)
    assert sim.all_see([nid(4)], LEFT)
    sim.run(30_000)
    assert sim.all_see([nid(4)], LEFT)
    about = [e[3:] for e in sim.events_about(nid(4)) if e[1] != nid(4)]
    assert all(new in (ALIVE, LEFT) for _, new in about), about


def test_left_record_spreads_to_a_peer_that_missed_the_leave() -> None:
    sim = mesh(3, 5)
    leaver = sim.node(4)
    sends = [s for s in leaver.leave(sim.now_ms) if (s.host, s.port) != addr_of(3)]
    sim.crash(4)
    for s in sends:
        sim.net.send(addr_of(4), (s.host, s.port), s.msg)
    sim.run(1_000)
    assert sim.all_see([nid(4)], LEFT)


@pytest.mark.parametrize("how,incarnation", [
    ("crash", 2),      # the normal restart: the store hands out a higher incarnation
    ("crash", 1),      # a stale store: refutation has to lift the incarnation
    ("leave", 2),      # left at 2 (leave bumps it), restarted with a store that says 2
])
def test_restarted_node_is_alive_again(how: str, incarnation: int) -> None:
    sim = mesh(11, 5)
    if how == "leave":
        sim.call(4, sim.node(4).leave)
        sim.run(50)
        sim.crash(4)
        gone = LEFT
    else:
        sim.crash(4)
        sim.run_until(lambda: sim.all_see([nid(4)], DEAD), detection_bound_ms(CFG, 5))
        gone = DEAD
    assert sim.all_see([nid(4)], gone)
    old_key = version_key(sim.node(0).get(nid(4)).record)
    sim.events.clear()
    node = sim.start(4, incarnation=incarnation, seeds=[0])
    sim.run_until(sim.converged, limit_ms=3_000)
    assert version_key(node.me()) > old_key
    assert all(m.get(nid(4)).record.incarnation == node.me().incarnation for m in sim.up())
    # Nobody else was disturbed by the restart.
    assert not [e for e in sim.events if e[2] != nid(4) and e[4] != ALIVE]


@pytest.mark.parametrize("seed", range(3))
def test_ten_percent_loss_kills_nobody(seed: int) -> None:
    sim = MeshSim(seed, CFG, loss=0.10)
    sim.start_mesh(8)
    sim.run(60_000)
    assert not [e for e in sim.events if e[4] == DEAD], f"seed={seed}"
    sim.net.loss = 0.0
    sim.run_until(sim.converged, 10_000)


def test_an_indirect_probe_saves_a_node_behind_a_broken_link() -> None:
    sim = MeshSim(5, CFG)
    sim.start_mesh(6)
    sim.run(1_000)
    sim.net.set_link(addr_of(0), addr_of(5), loss=1.0)   # 0 cannot reach 5; the others can
    sim.run(30 * P)
    assert not bad_events(sim), bad_events(sim)[:3]
    assert sim.node(0).stats["indirect_probes"] >= 1
    assert sim.node(0).health() == 0
    assert sum(m.stats["relays"] for m in sim.up()) >= 1


def test_foreign_cluster_nodes_never_join() -> None:
    sim = mesh(5, 3)
    other = sim_cfg(cluster="other")
    sim.start(9, seeds=[0], cfg=other, cluster="other")
    sim.run(3_000)
    assert all(m.get(nid(9)) is None for m in sim.up() if m.me().cluster == "galaxy")
    assert sim.node(0).stats["foreign_cluster"] > 0
    assert sim.node(9).alive_peers() == []


def test_unanswered_seed_is_retried_with_growing_backoff() -> None:
    sim = MeshSim(1, CFG)
    sent: list[tuple[int, object, object]] = []
    sim.net.on_send = lambda src, dst, msg, size: sent.append((sim.now_ms, dst, msg))
    sim.start(0, seeds=[99])                 # nobody listens at node 99's address
    sim.run(60_000)
    tries = [t for t, dst, _ in sent if dst == addr_of(99)]
    assert all(type(m) is Sync and m.want_reply for _, _, m in sent)
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    expected = [min(CFG.seed_retry_min_ms * 2 ** k, CFG.seed_retry_max_ms) for k in range(len(gaps))]
    assert tries[0] == 0 and gaps == expected, gaps
    assert len(tries) < 15                    # 200 ms .. 10 s: not a packet per round


def test_discovered_known_member_costs_nothing_and_seeds_rest_while_connected() -> None:
    sim = mesh(2, 3, cfg=sim_cfg(push_pull_interval_ms=60_000))
    sim.run(2_000)
    joins = {i: sim.node(i).stats["joins_sent"] for i in range(3)}
    node = sim.node(0)
    assert node.discovered(sim.now_ms, *addr_of(1)) == []
    assert node.discovered(sim.now_ms, *addr_of(0)) == []      # my own address
    sim.run(5_000)
    assert {i: sim.node(i).stats["joins_sent"] for i in range(3)} == joins


def test_two_groups_that_formed_apart_merge_when_they_meet() -> None:
    sim = MeshSim(4, CFG)
    sim.start(0)
    sim.start(1, seeds=[0])
    sim.start(2)
    sim.start(3, seeds=[2])
    sim.run(1_000)
    assert len(sim.node(0).alive_peers()) == 1 and len(sim.node(2).alive_peers()) == 1
    sim.call(0, lambda now: sim.node(0).discovered(now, *addr_of(2)))   # e.g. mDNS
    sim.run_until(sim.converged, limit_ms=2_000)


@pytest.mark.parametrize("seed", range(3))
def test_partition_heals(seed: int) -> None:
    sim = mesh(seed, 6)
    sim.partition({0, 1, 2}, {3, 4, 5})
    a, b = [nid(i) for i in (0, 1, 2)], [nid(i) for i in (3, 4, 5)]
    sim.run_until(lambda: sim.all_see(b, DEAD, [sim.node(i) for i in (0, 1, 2)])
                  and sim.all_see(a, DEAD, [sim.node(i) for i in (3, 4, 5)]), detection_bound_ms(CFG, 6, degraded=True))
    sim.heal()
    heal_ms = sim.now_ms
    # Dead members' addresses are contacts, retried with backoff: the groups find each other.
    sim.run_until(sim.converged, limit_ms=CFG.seed_retry_max_ms + 5_000)
    # Nobody inside a group suspected a group mate on the other side's stale news for long
    # enough to kill it.
    assert not [e for e in sim.events if e[0] > heal_ms and e[4] == DEAD], f"seed={seed}"


# ------------------------------------------------------------------------ table tests

def _solo(i: int = 0, **cfg) -> Membership:
    return Membership(record(i), sim_cfg(**cfg), random.Random(0), 0)


def _bump(r: MemberRecord, **kw) -> MemberRecord:
    return dataclasses.replace(r, **kw)


def _state(m: Membership, i: int) -> tuple[str, int] | None:
    v = m.get(nid(i))
    return None if v is None else (v.state, m._members[nid(i)].inc)


def _with(m: Membership, state: str, inc: int = 1) -> Membership:
    """``m`` holding node 1 (record at incarnation 1) in ``state`` at ``inc``.

    Node 1's record comes through node 3: a first-hand message from node 1 would make a
    dead claim doubtful (see test_a_dead_claim_about_a_member_that_just_spoke_is_doubted)."""
    m.receive(0, addr_of(3), Spread((record(3), record(1))))
    if state in (SUSPECT, DEAD):
        m.receive(0, addr_of(2), Spread((), (Rumor(nid(1), inc, state, nid(2)),)))
    elif state == LEFT:
        m.receive(0, addr_of(1), Spread((_bump(record(1), state=LEFT),)))
    return m


R = record(1)
# (state before, input, state after): the transition table of the module docstring.
TRANSITIONS = [
    (ALIVE, _bump(R, heartbeat=5), (ALIVE, 1)),                      # content only
    (ALIVE, _bump(R, incarnation=2), (ALIVE, 2)),
    (ALIVE, _bump(R, state=LEFT), (LEFT, 1)),                        # a leave beats alive at one incarnation
    (ALIVE, Rumor(nid(1), 1, SUSPECT, nid(3)), (SUSPECT, 1)),
    (ALIVE, Rumor(nid(1), 0, SUSPECT, nid(3)), (ALIVE, 1)),          # about an older life
    (ALIVE, Rumor(nid(1), 1, DEAD, nid(3)), (DEAD, 1)),
    (ALIVE, Rumor(nid(1), 3, SUSPECT, nid(3)), (SUSPECT, 3)),        # a newer life we have not seen
    (SUSPECT, _bump(R, heartbeat=5), (SUSPECT, 1)),                  # only a refutation clears it
    (SUSPECT, _bump(R, incarnation=2), (ALIVE, 2)),                  # the refutation
    (SUSPECT, Rumor(nid(1), 1, DEAD, nid(3)), (DEAD, 1)),
    (SUSPECT, Rumor(nid(1), 2, SUSPECT, nid(3)), (SUSPECT, 2)),
    (SUSPECT, _bump(R, state=LEFT), (LEFT, 1)),
    (DEAD, _bump(R, heartbeat=5), (DEAD, 1)),                        # it does not know yet
    (DEAD, _bump(R, incarnation=2), (ALIVE, 2)),                     # refuted, or restarted
    (DEAD, Rumor(nid(1), 1, SUSPECT, nid(3)), (DEAD, 1)),
    (DEAD, _bump(R, incarnation=2, state=LEFT), (LEFT, 2)),
    (LEFT, _bump(R, heartbeat=99), (LEFT, 1)),                       # no resurrection by an older life
    (LEFT, Rumor(nid(1), 1, DEAD, nid(3)), (LEFT, 1)),
    (LEFT, _bump(R, incarnation=2), (ALIVE, 2)),                     # a restart is alive again
]


@pytest.mark.parametrize("before,news,after", TRANSITIONS)
def test_transition_table(before: str, news: MemberRecord | Rumor, after: tuple[str, int]) -> None:
    m = _with(_solo(), before)
    assert _state(m, 1) == (before, 1)
    msg = Spread((news,)) if isinstance(news, MemberRecord) else Spread((), (news,))
    m.receive(10, addr_of(3), msg)
    assert _state(m, 1) == after


def test_a_dead_claim_about_a_member_that_just_spoke_is_doubted() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Spread((record(1),)))            # first-hand
    m.receive(P - 1, addr_of(2), Spread((), (Rumor(nid(1), 1, DEAD, nid(2)),)))
    assert _state(m, 1) == (SUSPECT, 1) and m.stats["dead_claims_doubted"] == 1
    m.receive(P, addr_of(2), Spread((), (Rumor(nid(1), 1, DEAD, nid(2)),)))
    assert _state(m, 1) == (DEAD, 1)


def test_full_state_takes_dead_as_suspect() -> None:
    m = _with(_solo(), ALIVE)
    m.receive(5, addr_of(2), Sync((record(2),), (Rumor(nid(1), 1, DEAD, nid(2)),)))
    assert _state(m, 1) == (SUSPECT, 1)
    m.receive(6, addr_of(2), Spread((), (Rumor(nid(1), 1, DEAD, nid(2)),)))
    assert _state(m, 1) == (DEAD, 1)


@pytest.mark.parametrize("claim,bumped", [
    (Rumor(nid(0), 1, SUSPECT, nid(1)), True),
    (Rumor(nid(0), 1, DEAD, nid(1)), True),
    (Rumor(nid(0), 0, DEAD, nid(1)), False),                # about an older life: harmless
    (_bump(record(0), heartbeat=50), True),                 # my previous life was further along
    (_bump(record(0), state=LEFT), True),                   # someone says I left: I did not
    (_bump(record(0), incarnation=0, state=LEFT), False),
    (record(0), False),                                     # my own record, as it is
])
def test_refutation(claim: MemberRecord | Rumor, bumped: bool) -> None:
    m = _solo()
    before = m.me()
    msg = Spread((claim,)) if isinstance(claim, MemberRecord) else Spread((), (claim,))
    m.receive(200, addr_of(1), msg)
    after = m.me()
    assert after.state == ALIVE and after.id == before.id
    assert (after.incarnation > max(before.incarnation, claim.incarnation)) is bumped
    assert m.get(nid(0)).state == ALIVE
    assert ((nid(0), False) in m._queue._items) is bumped   # a refutation is news


@pytest.mark.parametrize("n,expected", [
    (1, (2000, 12000, 0)), (3, (2000, 12000, 0)), (4, (2000, 12000, 2)), (10, (2000, 12000, 2)),
    (100, (4000, 24000, 2)), (1000, (6000, 36000, 2)),
])
def test_suspicion_timeouts(n: int, expected: tuple[int, int, int]) -> None:
    cfg = dataclasses.replace(Config.lan(), probe_interval_ms=500, suspicion_mult=4)   # memberlist's LAN
    assert suspicion_timeouts(cfg, n) == expected


def test_confirmations_shrink_the_suspicion_toward_min() -> None:
    m = _solo(suspicion_mult=4)
    for i in range(1, 10):
        m.receive(0, addr_of(i), Spread((record(i),)))
    min_ms, max_ms, k = suspicion_timeouts(sim_cfg(suspicion_mult=4), 10)
    assert k == 2
    m.receive(0, addr_of(2), Spread((), (Rumor(nid(1), 1, SUSPECT, nid(2)),)))
    s = m._members[nid(1)].suspicion
    assert s.deadline_ms == max_ms
    m.receive(100, addr_of(2), Spread((), (Rumor(nid(1), 1, SUSPECT, nid(2)),)))   # same accuser again
    assert s.deadline_ms == max_ms
    m.receive(200, addr_of(3), Spread((), (Rumor(nid(1), 1, SUSPECT, nid(3)),)))
    frac = math.log(2) / math.log(3)
    assert s.deadline_ms == int(max_ms - frac * (max_ms - min_ms))
    m.receive(300, addr_of(4), Spread((), (Rumor(nid(1), 1, SUSPECT, nid(4)),)))
    assert s.deadline_ms == min_ms
    m.receive(400, addr_of(5), Spread((), (Rumor(nid(1), 1, SUSPECT, nid(5)),)))   # beyond k: no change
    assert s.deadline_ms == min_ms
    m.tick(min_ms - 1)
    assert _state(m, 1) == (SUSPECT, 1)
    sends = m.tick(min_ms)
    assert _state(m, 1) == (DEAD, 1) and m.stats["deaths_declared"] == 1
    rumors = [u for s in sends for u in getattr(s.msg, "rumors", ())]
    assert Rumor(nid(1), 1, DEAD, nid(0)) in rumors


def test_probe_ack_and_the_probe_cycle_covers_everyone() -> None:
    m = _solo()
    for i in range(1, 5):
        m.receive(0, addr_of(i), Spread((record(i),)))
    targets = []
    now = 0
    for _ in range(8):
        sends = m.tick(now)
        pings = [s for s in sends if type(s.msg) is Ping]
        assert len(pings) == 1
        ping = pings[0]
        targets.append(ping.msg.target)
        assert (ping.host, ping.port) == addr_of(int(ping.msg.target[2:]))
        m.receive(now + 2, (ping.host, ping.port), Ack(ping.msg.seq))
        now = m._next_probe_ms       # (gossip rounds in between do not matter here)
    assert sorted(targets[:4]) == sorted(targets[4:]) == [nid(i) for i in range(1, 5)]
    assert m.health() == 0 and m.stats["probes_failed"] == 0


def test_failed_probe_goes_indirect_then_suspects_and_health_rises_by_missing_nacks() -> None:
    m = _solo()
    for i in range(1, 6):
        m.receive(0, addr_of(i), Spread((record(i),)))
    sends = m.tick(0)
    ping = next(s for s in sends if type(s.msg) is Ping)
    target = ping.msg.target
    sends = m.tick(CFG.probe_timeout_ms)
    reqs = [s for s in sends if type(s.msg) is PingReq]
    retry = [s for s in sends if type(s.msg) is Ping]
    assert len(reqs) == CFG.indirect_checks and len(retry) == 1 and retry[0].msg.seq == ping.msg.seq
    assert all(r.msg.target == target and (r.msg.host, r.msg.port) == (ping.host, ping.port) for r in reqs)
    id_at = {addr_of(i): nid(i) for i in range(6)}
    assert target not in {id_at[(r.host, r.port)] for r in reqs}
    # One relay answers that it could not reach the target either.
    m.receive(CFG.probe_timeout_ms + 10, (reqs[0].host, reqs[0].port), Nack(ping.msg.seq))
    assert m.next_deadline_ms() <= P
    m.tick(P)
    assert m.get(target).state == SUSPECT
    assert m.health() == CFG.indirect_checks - 1
    # The next probe interval is stretched by the health score.
    assert m._next_probe_ms == P + P * (m.health() + 1)


def test_a_relay_forwards_the_ack_or_nacks() -> None:
    relay = _solo(2)
    relay.receive(0, addr_of(0), Spread((record(0), record(5))))
    req = PingReq(seq=77, target=nid(5), host=addr_of(5)[0], port=addr_of(5)[1])
    sends = relay.receive(0, addr_of(0), req)
    (ping,) = sends
    assert type(ping.msg) is Ping and (ping.host, ping.port) == addr_of(5) and ping.msg.target == nid(5)
    (ack,) = relay.receive(3, addr_of(5), Ack(ping.msg.seq))
    assert (ack.host, ack.port) == addr_of(0) and type(ack.msg) is Ack and ack.msg.seq == 77
    # Silence: a nack when the probe timeout has passed.
    (ping2,) = relay.receive(10, addr_of(0), dataclasses.replace(req, seq=78))
    assert relay.tick(10 + CFG.probe_timeout_ms - 1) == [] or all(type(s.msg) is not Nack for s in
                                                                   relay.tick(10 + CFG.probe_timeout_ms - 1))
    nacks = [s for s in relay.tick(10 + CFG.probe_timeout_ms) if type(s.msg) is Nack]
    assert [(s.host, s.port, s.msg.seq) for s in nacks] == [(*addr_of(0), 78)]


def test_only_the_named_target_acks_and_a_suspect_hears_of_its_suspicion() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Spread((record(1),)))
    assert m.receive(0, addr_of(1), Ping(seq=5, target=nid(9))) == []
    assert m.stats["misdirected"] == 1
    (ack,) = m.receive(0, addr_of(1), Ping(seq=6, target=nid(0)))
    assert type(ack.msg) is Ack and ack.msg.seq == 6
    # The buddy system: a ping to a suspect carries its suspicion first.
    m = _with(_solo(), SUSPECT)
    now = 0
    for _ in range(5):
        sends = m.tick(now)
        pings = [s for s in sends if type(s.msg) is Ping and s.msg.target == nid(1)]
        if pings:
            assert pings[0].msg.rumors[0] == Rumor(nid(1), 1, SUSPECT, nid(2))
            return
        now = m.next_deadline_ms()
    raise AssertionError("the suspect was never probed")


def test_a_refutation_raises_health_and_a_successful_probe_lowers_it() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Spread((record(1),), (Rumor(nid(0), 1, SUSPECT, nid(1)),)))
    assert m.health() == 1 and m.me().incarnation == 2 and m.stats["refutations"] == 1
    (ping,) = [s for s in m.tick(0) if type(s.msg) is Ping]
    m.receive(1, addr_of(1), Ack(ping.msg.seq))
    assert m.health() == 0


def test_health_is_bounded() -> None:
    m = _solo(awareness_max=3)
    for i in range(1, 10):
        m.receive(0, addr_of(i), Spread((), (Rumor(nid(0), m.me().incarnation, SUSPECT, nid(i)),)))
    assert m.health() == 2


def test_queue_sends_each_entry_a_limited_number_of_times_least_sent_first() -> None:
    q = ms._Queue()
    for i in range(5):
        q.add((nid(i), False), record(i), 400)
    records, rumors, used = q.take(1000, limit=3)
    assert [r.id for r in records] == [nid(4), nid(3)] and used == 800 and not rumors   # newest first
    records, _, _ = q.take(1000, limit=3)
    assert [r.id for r in records] == [nid(2), nid(1)]                                  # then the unsent
    q.add((nid(0), False), _bump(record(0), heartbeat=1), 400)                          # replaces the old
    records, _, _ = q.take(10_000, limit=3)
    assert [(r.id, r.heartbeat) for r in records] == [(nid(0), 1), (nid(1), 0), (nid(2), 0), (nid(3), 0), (nid(4), 0)]
    for _ in range(5):
        q.take(10_000, limit=3)
    assert len(q) == 0
    q.check()
    big = _bump(record(7), labels={"k": "v" * 100})
    q.add((nid(7), False), big, 5000)
    assert q.take(1000, limit=3)[0] == []
    assert q.take(1000, limit=3, alone_bytes=6000)[0] == [big]


def test_retransmit_limit_scales_with_log_n() -> None:
    m = _solo()
    assert m._retransmit_limit() == CFG.retransmit_mult
    for i in range(1, 20):
        m.receive(0, addr_of(i), Spread((record(i),)))
    assert m._retransmit_limit() == 2 * CFG.retransmit_mult


def test_foreign_cluster_and_malformed_input_are_dropped_and_counted() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Spread((record(1, cluster="other"), record(2))))
    assert m.get(nid(1)) is None and m.get(nid(2)) is not None
    assert m.stats["foreign_cluster"] == 1
    m.receive(0, addr_of(1), Spread((_bump(record(3), state=SUSPECT),), (Rumor(nid(2), 1, "alive", nid(1)),
                                                                       Rumor(nid(2), 1, "bogus", nid(1)))))
    assert m.get(nid(3)) is None and m.get(nid(2)).state == ALIVE
    assert m.stats["invalid"] == 3
    recs = tuple(record(i) for i in range(10, 10 + RECORDS_MAX + 5))
    m.receive(0, addr_of(1), Spread(recs))
    assert m.stats["records_truncated"] == 1
    assert m.get(recs[RECORDS_MAX - 1].id) is not None and m.get(recs[RECORDS_MAX].id) is None
    assert m.receive(0, addr_of(1), object()) == [] and m.stats["invalid"] == 4   # type: ignore[arg-type]


def test_table_bound_and_dead_members_make_room(monkeypatch) -> None:
    monkeypatch.setattr(ms, "MEMBERS_MAX", 8)
    m = _solo()
    m.receive(0, addr_of(40), Spread(tuple(record(i) for i in range(1, 21))))
    assert len(m.members()) == 1 + 8 and m.stats["table_full"] == 12   # me + the bound
    m.receive(1, addr_of(2), Spread((), (Rumor(nid(1), 1, DEAD, nid(2)),)))
    m.receive(2, addr_of(30), Spread((record(30),)))
    assert m.get(nid(30)).state == ALIVE and m.get(nid(1)) is None and len(m.members()) == 1 + 8


def test_join_request_gets_the_table_back_and_legacy_gossip_is_read() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Spread(tuple(record(i) for i in range(1, 4))))
    m.receive(0, addr_of(2), Spread((), (Rumor(nid(3), 1, DEAD, nid(2)),)))
    out = m.receive(5, ("10.77.9.9", 4000), Sync((record(9),), want_reply=True))
    assert [(s.host, s.port) for s in out] == [("10.77.9.9", 4000)]
    reply = out[0].msg
    assert type(reply) is Sync and not reply.want_reply and reply.members[0] == m.me()
    assert {r.id for r in reply.members} == {nid(i) for i in (0, 1, 2, 9)}     # dead: not as a record
    assert reply.rumors == ()                      # no claims about third parties in full state
    (back,) = m.receive(7, addr_of(3), Sync((record(3),), want_reply=True))
    assert back.msg.rumors == (Rumor(nid(3), 1, DEAD, nid(2)),)    # but the recipient hears its own
    out = m.receive(8, ("10.77.9.8", 4000), Gossip((record(8),), want_reply=True))
    assert m.get(nid(8)).state == ALIVE and type(out[0].msg) is Sync


def test_update_self_spreads_and_protocol_fields_are_refused() -> None:
    m = _solo()
    hb = m.me().heartbeat
    m.update_self(5, http_port=8123, raft=RaftView(term=3, leader="n-0001"))
    assert m.me().http_port == 8123 and m.me().raft.term == 3 and m.me().heartbeat == hb + 1
    assert (nid(0), False) in m._queue._items
    for field in ("incarnation", "heartbeat", "state", "id", "cluster"):
        with pytest.raises(ValueError):
            m.update_self(6, **{field: 1})


def test_time_never_goes_back() -> None:
    m = _solo()
    m.tick(100)
    with pytest.raises(ValueError):
        m.tick(99)


def test_next_deadline_is_in_the_future_after_every_tick() -> None:
    sim = mesh(8, 6)
    for node in sim.up():
        node.tick(sim.now_ms)
        assert node.next_deadline_ms() > sim.now_ms


def test_snapshot_start_is_quiet() -> None:
    recs = [record(i) for i in range(5)]
    m = Membership(record(0), CFG, random.Random(1), 0, known=recs)
    assert [v.state for v in m.members()] == [ALIVE] * 5
    assert len(m._queue) == 0
    assert [type(s.msg) for s in m.tick(0)] == [Ping]


# ------------------------------------------------------------------------ frame size

def _big_labels(n: int = 64) -> dict[str, str]:
    return {f"k{i:02d}" + "x" * 59: "é" * 128 for i in range(n)}


def _codec(sender: str = nid(0)) -> wire.Codec:
    return wire.Codec("galaxy", [wire.parse_key(wire.generate_key())], sender)


BIG = record(2, resources=Resources(64.0, 2**40, 8, 63.5, 2**40, 8), labels=_big_labels(),
             raft=RaftView(2**40, "n-" + "z" * 60, tuple("n-" + "v" * 60 for _ in range(7)),
                           tuple("n-" + "i" * 60 for _ in range(7)), "candidate"), tls=b"\xff" * 32)
RUMOR = Rumor("n-" + "q" * 60, 2**62, SUSPECT, "n-" + "b" * 60)


@pytest.mark.parametrize("msg", [
    Ping(2**62, "n-" + "t" * 60, (record(1),), (RUMOR,)),
    PingReq(2**62, "n-" + "t" * 60, "h" * 200, 65535, (record(1), BIG), (RUMOR, RUMOR)),
    Ack(2**62, (BIG,), (RUMOR,)),
    Nack(2**62),
    Spread((record(1),), (RUMOR,)),
    Sync((record(1), BIG), (RUMOR,), want_reply=True),
    Gossip((record(1),), want_reply=True),
])
def test_message_size_bound_holds_against_the_real_codec(msg) -> None:
    sender = "n-" + "s" * 60
    frame = _codec(sender).encode(msg, 2**62)
    assert len(frame) <= message_bytes_max(msg, sender, "galaxy"), (len(frame), type(msg))
    assert message_bytes_max(msg, sender, "galaxy") - len(frame) < 200 + 40 * len(getattr(msg, "members", ()))


def test_record_and_rumor_bounds() -> None:
    for r in (record(1), BIG):
        assert record_bytes_max(r) >= len(_codec().encode(Spread((r,)), 0)) - len(_codec().encode(Spread(), 0))
    assert rumor_bytes_max(RUMOR) >= len(_codec().encode(Spread((), (RUMOR,)), 0)) - len(_codec().encode(Spread(), 0))


def test_messages_fit_their_budget_even_with_big_records() -> None:
    codec = _codec()
    m = Membership(record(0, labels=_big_labels(8)), CFG, random.Random(3), 0)
    for i in range(1, 120):
        m.receive(0, addr_of(i), Spread((record(i, labels=_big_labels(16 if i % 3 else 64)),)))
    sends = m.tick(0)
    sends += m.receive(1, addr_of(999), Sync((record(999),), want_reply=True))
    sends += m.receive(2, addr_of(5), Ping(seq=1, target=nid(0)))
    assert len(sends) > 3
    for s in sends:
        frame = codec.encode(s.msg, 0)
        budget = {Sync: ms.SYNC_BYTES, Spread: ms.SPREAD_BYTES}.get(type(s.msg), ms.PACKET_BYTES)
        assert len(frame) <= CFG.frame_max_bytes
        assert len(frame) <= budget or len(s.msg.members) <= 2, (type(s.msg), len(frame))
    pings = [s for s in sends if type(s.msg) in (Ping, Ack)]
    assert pings and all(len(codec.encode(s.msg, 0)) <= ms.PACKET_BYTES for s in pings)
