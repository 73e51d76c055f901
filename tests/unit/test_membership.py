"""Membership core: table tests for the rules, and seeded runs on a tiny simulated network.

The network is a heap of datagrams in flight (latency 1-5 ms, optional loss) and a heap
of node deadlines, on one SimClock; every run is a pure function of its seed, and a
failure names the seed.  Membership runs its own ``_check()`` after every step; the
network adds a cross-step check that no member's version key ever goes back.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
import time
from collections.abc import Callable, Iterable

import pytest

from galaxy import wire
from galaxy.clock import SimClock
from galaxy.config import Config
from galaxy.gossip import membership as ms
from galaxy.gossip.membership import (
    GOSSIP_RECORDS_MAX, Membership, SendTo, record_bytes_max, version_key,
)
from galaxy.messages import ALIVE, DEAD, LEFT, SUSPECT, Gossip, MemberRecord, RaftView, Resources


def sim_cfg(**changes) -> Config:
    return dataclasses.replace(Config.sim(), **changes)


CFG = sim_cfg()
PORT = 7946
Addr = tuple[str, int]


def host_of(i: int) -> str:
    return f"10.77.{i // 250}.{i % 250 + 1}"


def addr_of(i: int) -> Addr:
    return (host_of(i), PORT)


def nid(i: int) -> str:
    return f"n-{i:04d}"


def record(i: int, incarnation: int = 1, cluster: str = "galaxy", **kw) -> MemberRecord:
    return MemberRecord(
        id=nid(i), incarnation=incarnation, heartbeat=0, state=ALIVE, host=host_of(i),
        gossip_port=PORT, http_port=8000, raft_port=7947, role="auto", version="0.1.0",
        cluster=cluster, started_ms=1_700_000_000_000, **kw)


class Net:
    """Nodes by address, datagrams in flight, node deadlines; one SimClock."""

    def __init__(self, seed: int, cfg=CFG, loss: float = 0.0, latency_ms: tuple[int, int] = (1, 5),
                 check_keys: bool = True) -> None:
        self.seed = seed
        self.cfg = cfg
        self.loss = loss
        self.latency_ms = latency_ms
        self.check_keys = check_keys
        self.rng = random.Random(seed)
        self.clock = SimClock()
        self.nodes: dict[Addr, Membership] = {}
        self.down: set[Addr] = set()
        self.events: list[tuple[int, str, str, str, str]] = []   # (t, observer, member, old, new)
        self.sent: list[tuple[int, Addr, SendTo]] = []
        self._flight: list[tuple[int, int, Addr, Addr, Gossip]] = []
        self._timers: list[tuple[int, int, Addr]] = []
        self._deadline: dict[Addr, int] = {}
        self._keys: dict[Addr, dict[str, tuple]] = {}
        self._seq = itertools.count()
        self.record_sends = False
        self.groups: list[set[Addr]] = []   # a partition: datagrams cross no group border

    def partition(self, *groups: Iterable[int]) -> None:
        self.groups = [{addr_of(i) for i in g} for g in groups]

    def heal(self) -> None:
        self.groups = []

    def _cut(self, src: Addr, dst: Addr) -> bool:
        return any((src in g) != (dst in g) for g in self.groups)

    @property
    def now_ms(self) -> int:
        return self.clock.now_ms()

    def start(self, i: int, incarnation: int = 1, seeds: Iterable[int] = (), cfg=None,
              cluster: str = "galaxy") -> Membership:
        addr = addr_of(i)
        m = Membership(record(i, incarnation, cluster), cfg or self.cfg,
                       random.Random(self.seed * 1_000_003 + i * 101 + incarnation), self.now_ms)
        self.nodes[addr] = m
        self.down.discard(addr)
        self._keys.pop(addr, None)
        for s in seeds:
            self._after(addr, m.discovered(self.now_ms, *addr_of(s)))
        self._reschedule(addr)
        return m

    def stop(self, i: int) -> None:
        """A crash: the node neither sends nor receives from now on."""
        self.down.add(addr_of(i))

    def node(self, i: int) -> Membership:
        return self.nodes[addr_of(i)]

    def up(self) -> list[Membership]:
        return [m for a, m in self.nodes.items() if a not in self.down]

    def deliver(self, src: Addr, sends: list[SendTo]) -> None:
        self._after(src, sends)

    def _after(self, addr: Addr, sends: list[SendTo]) -> None:
        node = self.nodes[addr]
        for e in node.events():
            self.events.append((self.now_ms, node.me().id, *e))
        if self.check_keys:
            keys = self._keys.setdefault(addr, {})
            for v in node.members():
                k = version_key(v.record)
                assert k >= keys.get(v.record.id, k), f"seed={self.seed}: key went back {v}"
                keys[v.record.id] = k
        for s in sends:
            assert len(s.msg.members) <= GOSSIP_RECORDS_MAX
            assert s.msg.members[0] == node.me(), "the sender's own record comes first"
            if self.record_sends:
                self.sent.append((self.now_ms, addr, s))
            if self.loss and self.rng.random() < self.loss:
                continue
            at = self.now_ms + self.rng.randint(*self.latency_ms)
            heapq.heappush(self._flight, (at, next(self._seq), (s.host, s.port), addr, s.msg))

    def _reschedule(self, addr: Addr) -> None:
        d = self.nodes[addr].next_deadline_ms()
        if self._deadline.get(addr) != d:
            self._deadline[addr] = d
            heapq.heappush(self._timers, (d, next(self._seq), addr))

    def run(self, duration_ms: int) -> None:
        until = self.now_ms + duration_ms
        while True:
            while self._timers and (self._timers[0][2] in self.down
                                    or self._deadline.get(self._timers[0][2]) != self._timers[0][0]):
                heapq.heappop(self._timers)
            t_msg = self._flight[0][0] if self._flight else math.inf
            t_timer = self._timers[0][0] if self._timers else math.inf
            t = min(t_msg, t_timer)
            if t > until:
                self.clock.set(until)
                return
            self.clock.set(int(t))
            if t_msg <= t_timer:
                _, _, dst, src, msg = heapq.heappop(self._flight)
                if dst in self.down or dst not in self.nodes or self._cut(src, dst):
                    continue
                addr, sends = dst, self.nodes[dst].receive(self.now_ms, src, msg)
            else:
                _, _, addr = heapq.heappop(self._timers)
                del self._deadline[addr]
                sends = self.nodes[addr].tick(self.now_ms)
            self._after(addr, sends)
            self._reschedule(addr)

    def run_until(self, pred: Callable[[], bool], limit_ms: int, step_ms: int = 100) -> int:
        """Run until ``pred()``; return the simulated time it took."""
        start = self.now_ms
        while not pred():
            assert self.now_ms - start < limit_ms, f"seed={self.seed}: no convergence in {limit_ms} ms"
            self.run(step_ms)
        return self.now_ms - start

    def all_see(self, ids: Iterable[str], state: str, observers: Iterable[Membership] | None = None) -> bool:
        ids = list(ids)
        for node in (self.up() if observers is None else observers):
            for i in ids:
                v = node.get(i)
                if v is None or v.state != state:
                    return False
        return True

    def converged(self) -> bool:
        live = self.up()
        ids = [m.me().id for m in live]
        return all(len(m.alive_peers()) == len(live) - 1 for m in live) and self.all_see(ids, ALIVE)

    def events_about(self, member: str) -> list[tuple[int, str, str, str, str]]:
        return [e for e in self.events if e[2] == member]


def mesh(seed: int, n: int, **kw) -> Net:
    net = Net(seed, **kw)
    net.start(0)
    for i in range(1, n):
        net.start(i, seeds=[0])
    net.run_until(net.converged, limit_ms=5_000)
    return net


# ------------------------------------------------------------------------ simulations

@pytest.mark.parametrize("seed", range(5))
def test_three_nodes_join_via_one_seed(seed: int) -> None:
    net = Net(seed)
    net.start(0)
    net.start(1, seeds=[0])
    net.start(2, seeds=[0])
    took_ms = net.run_until(net.converged, limit_ms=2_000)
    assert took_ms <= 5 * CFG.gossip_interval_ms, f"seed={seed}: {took_ms} ms"
    for node in net.up():
        assert [v.record.id for v in node.members()] == [nid(0), nid(1), nid(2)]
        assert {v.state for v in node.members()} == {ALIVE}


def test_200_nodes_converge_and_stay_alive() -> None:
    seed, n = 7, 200
    wall_start = time.monotonic()
    net = Net(seed, check_keys=False)
    net.start(0)
    for i in range(1, n):
        net.start(i, seeds=[0])
    took_ms = net.run_until(net.converged, limit_ms=5_000)
    assert took_ms <= 2_000, f"seed={seed}: 200 nodes took {took_ms} simulated ms"
    # The table no longer fits one frame; every heartbeat must still keep up, for longer
    # than it takes to suspect a member.
    net.events.clear()
    net.run(CFG.suspect_after_ms + 500)
    assert not [e for e in net.events if e[4] != ALIVE], f"seed={seed}: {net.events[:5]}"
    assert net.converged()
    assert time.monotonic() - wall_start < 30  # a budget for a loaded 2-core box; ~2 s idle


@pytest.mark.parametrize("seed", range(3))
def test_stopped_node_is_suspect_then_dead_everywhere(seed: int) -> None:
    cfg = sim_cfg(dead_reap_after_ms=10_000)
    net = mesh(seed, 5, cfg=cfg)
    net.run(1_000)
    stop_ms = net.now_ms
    net.events.clear()
    net.stop(4)
    net.run(cfg.dead_after_ms + 1_000)
    lag_ms = 5 * cfg.gossip_interval_ms   # heartbeats reach everyone within a few rounds
    for observer in (nid(i) for i in range(4)):
        seen = [(t, old, new) for t, obs, member, old, new in net.events if obs == observer and member == nid(4)]
        assert [(old, new) for _, old, new in seen] == [(ALIVE, SUSPECT), (SUSPECT, DEAD)], seen
        (t_suspect, _, _), (t_dead, _, _) = seen
        assert stop_ms + cfg.suspect_after_ms - lag_ms <= t_suspect <= stop_ms + cfg.suspect_after_ms + lag_ms
        assert stop_ms + cfg.dead_after_ms - lag_ms <= t_dead <= stop_ms + cfg.dead_after_ms + lag_ms
    # Dead members are reaped after dead_reap_after_ms, and nobody resurrects them.
    net.run(cfg.dead_reap_after_ms)
    assert all(m.get(nid(4)) is None for m in net.up()), f"seed={seed}"
    assert all(len(m.alive_peers()) == 3 for m in net.up())


@pytest.mark.parametrize("seed", range(3))
def test_graceful_leave_is_left_everywhere_never_dead(seed: int) -> None:
    net = mesh(seed, 5)
    leaver = net.node(4)
    sends = leaver.leave(net.now_ms)
    assert {(s.host, s.port) for s in sends} == {addr_of(i) for i in range(4)}
    assert all(s.msg.members == (leaver.me(),) and leaver.me().state == LEFT for s in sends)
    assert leaver.leave(net.now_ms) == sends            # idempotent: the runner repeats it
    net.deliver(addr_of(4), sends)
    net.run(50)
    net.stop(4)
    assert net.all_see([nid(4)], LEFT)
    net.run(2 * CFG.dead_after_ms)
    assert net.all_see([nid(4)], LEFT)
    about = [e[3:] for e in net.events_about(nid(4)) if e[1] != nid(4)]
    assert all(new in (ALIVE, LEFT) for _, new in about), about


def test_left_record_spreads_to_a_peer_that_missed_the_leave() -> None:
    net = mesh(3, 5)
    leaver = net.node(4)
    sends = [s for s in leaver.leave(net.now_ms) if (s.host, s.port) != addr_of(3)]
    net.deliver(addr_of(4), sends)
    net.stop(4)
    net.run(1_000)
    assert net.all_see([nid(4)], LEFT)


@pytest.mark.parametrize("how,incarnation", [
    ("crash", 2),      # the normal restart: the store hands out a higher incarnation
    ("crash", 1),      # a stale store: refutation has to lift the incarnation
    ("leave", 2),      # left at 2 (leave bumps it), restarted with a store that says 2
])
def test_restarted_node_is_alive_again(how: str, incarnation: int) -> None:
    net = mesh(11, 5)
    if how == "leave":
        net.deliver(addr_of(4), net.node(4).leave(net.now_ms))
        net.run(50)
        net.stop(4)
        gone = LEFT
    else:
        net.stop(4)
        net.run(CFG.dead_after_ms + 1_000)
        gone = DEAD
    assert net.all_see([nid(4)], gone)
    old_key = version_key(net.node(0).get(nid(4)).record)
    net.events.clear()
    node = net.start(4, incarnation=incarnation, seeds=[0])
    net.run_until(net.converged, limit_ms=3_000)
    assert version_key(node.me()) > old_key
    assert all(m.get(nid(4)).record.incarnation == node.me().incarnation for m in net.up())
    # Nobody else was disturbed by the restart.
    assert not [e for e in net.events if e[2] != nid(4) and e[4] != ALIVE]


@pytest.mark.parametrize("seed", range(3))
def test_ten_percent_loss_makes_nobody_suspect(seed: int) -> None:
    net = Net(seed, loss=0.10)
    net.start(0)
    for i in range(1, 5):
        net.start(i, seeds=[0])
    net.run_until(net.converged, limit_ms=5_000)
    net.run(60_000)
    assert not [e for e in net.events if e[4] in (SUSPECT, DEAD)], f"seed={seed}"
    assert net.converged()


def test_foreign_cluster_nodes_never_join() -> None:
    net = mesh(5, 3)
    other = sim_cfg(cluster="other")
    net.start(9, seeds=[0], cfg=other, cluster="other")
    net.run(3_000)
    assert all(m.get(nid(9)) is None for m in net.up() if m.me().cluster == "galaxy")
    assert net.node(0).stats["foreign_cluster"] > 0
    assert net.node(9).alive_peers() == []


def test_unanswered_seed_is_retried_with_growing_backoff() -> None:
    net = Net(1)
    net.record_sends = True
    net.start(0, seeds=[99])                 # nobody listens at node 99's address
    net.run(60_000)
    tries = [t for t, _, s in net.sent if (s.host, s.port) == addr_of(99)]
    assert all(s.msg.want_reply for _, _, s in net.sent)
    gaps = [b - a for a, b in itertools.pairwise(tries)]
    expected = [min(CFG.seed_retry_min_ms * 2 ** k, CFG.seed_retry_max_ms) for k in range(len(gaps))]
    assert tries[0] == 0 and gaps == expected, gaps
    assert len(tries) < 15                    # 200 ms .. 10 s: not a packet per round


def test_discovered_known_member_costs_nothing_and_seeds_rest_while_connected() -> None:
    net = mesh(2, 3)
    net.record_sends = True
    node = net.node(0)
    assert node.discovered(net.now_ms, *addr_of(1)) == []
    assert node.discovered(net.now_ms, *addr_of(0)) == []      # my own address
    net.run(5_000)
    assert not [s for _, _, s in net.sent if s.msg.want_reply]


def test_two_groups_that_formed_apart_merge_when_they_meet() -> None:
    net = Net(4)
    net.start(0)
    net.start(1, seeds=[0])
    net.start(2)
    net.start(3, seeds=[2])
    net.run(1_000)
    assert len(net.node(0).alive_peers()) == 1 and len(net.node(2).alive_peers()) == 1
    net.deliver(addr_of(0), net.node(0).discovered(net.now_ms, *addr_of(2)))   # e.g. mDNS
    net.run_until(net.converged, limit_ms=2_000)


@pytest.mark.parametrize("seed", range(3))
def test_partition_heals(seed: int) -> None:
    net = mesh(seed, 4)
    net.partition({0, 1}, {2, 3})
    net.run(CFG.dead_after_ms + 1_000)
    assert net.all_see([nid(2), nid(3)], DEAD, [net.node(0), net.node(1)])
    assert net.all_see([nid(0), nid(1)], DEAD, [net.node(2), net.node(3)])
    net.heal()
    # Dead members' addresses are contacts, retried with backoff: the groups find each other.
    net.run_until(net.converged, limit_ms=CFG.seed_retry_max_ms + 2_000)


# ------------------------------------------------------------------------ table tests

def _solo(i: int = 0, **cfg) -> Membership:
    return Membership(record(i), sim_cfg(**cfg), random.Random(0), 0)


def _bump(r: MemberRecord, **kw) -> MemberRecord:
    return dataclasses.replace(r, **kw)


def test_merge_takes_only_newer_and_left_beats_alive_at_one_incarnation() -> None:
    m = _solo()
    r = record(1)
    m.receive(10, addr_of(1), Gossip((_bump(r, heartbeat=5),)))
    assert m.get(nid(1)).record.heartbeat == 5 and m.get(nid(1)).last_heard_ms == 10
    m.receive(20, addr_of(2), Gossip((record(2), _bump(r, heartbeat=3))))
    assert m.get(nid(1)).record.heartbeat == 5 and m.get(nid(1)).last_heard_ms == 10
    m.receive(30, addr_of(2), Gossip((record(2), _bump(r, heartbeat=1, state=LEFT))))
    assert m.get(nid(1)).state == LEFT
    m.receive(40, addr_of(2), Gossip((record(2), _bump(r, heartbeat=99))))
    assert m.get(nid(1)).state == LEFT                     # no resurrection by an older life
    m.receive(50, addr_of(1), Gossip((_bump(r, incarnation=2),)))
    assert m.get(nid(1)).state == ALIVE                    # a restart is alive again
    assert [e for e in m.events() if e[0] == nid(1)] == [
        (nid(1), "", ALIVE), (nid(1), ALIVE, LEFT), (nid(1), LEFT, ALIVE)]


def test_local_judgement_thresholds() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Gossip((record(1),)))
    assert m.next_deadline_ms() == 0                      # first round is due
    m.tick(CFG.suspect_after_ms - 1)
    assert m.get(nid(1)).state == ALIVE
    m.tick(CFG.suspect_after_ms)
    assert m.get(nid(1)).state == SUSPECT
    m.tick(CFG.dead_after_ms - 1)
    assert m.get(nid(1)).state == SUSPECT
    m.tick(CFG.dead_after_ms)
    assert m.get(nid(1)).state == DEAD
    assert m.alive_peers() == []
    m.tick(CFG.dead_after_ms + CFG.dead_reap_after_ms)
    assert m.get(nid(1)) is None
    assert [e[1:] for e in m.events()] == [("", ALIVE), (ALIVE, SUSPECT), (SUSPECT, DEAD), (DEAD, "")]


@pytest.mark.parametrize("about_me,bumped", [
    (dict(heartbeat=50), True),                          # my previous life was further along
    (dict(state=LEFT), True),                            # someone says I left: I did not
    (dict(state=DEAD), True),
    (dict(state=SUSPECT), True),
    (dict(incarnation=0, state=DEAD), False),            # about an older life: harmless
    (dict(heartbeat=0), False),                          # my own older record
])
def test_refutation(about_me: dict, bumped: bool) -> None:
    m = _solo()
    m.tick(0), m.tick(100)                               # my heartbeat is 2 now
    before = m.me()
    m.receive(200, addr_of(1), Gossip((record(1), _bump(before, **about_me))))
    after = m.me()
    assert after.state == ALIVE and after.id == before.id
    assert (after.incarnation > max(before.incarnation, about_me.get("incarnation", 0))) is bumped
    assert m.get(nid(0)).state == ALIVE


def test_stale_own_record_of_a_sender_gets_the_newer_version_back() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Gossip((_bump(record(1), heartbeat=40),)))
    out = m.receive(10, addr_of(1), Gossip((_bump(record(1), heartbeat=1),)))
    assert [(s.host, s.port) for s in out] == [addr_of(1)]
    assert out[0].msg.members[1].heartbeat == 40
    # A third party's older heartbeat is normal gossip lag: no reply.
    assert m.receive(20, addr_of(2), Gossip((record(2), _bump(record(1), heartbeat=2)))) == []


def test_join_request_gets_the_table_back() -> None:
    m = _solo()
    for i in range(1, 4):
        m.receive(0, addr_of(i), Gossip((record(i),)))
    out = m.receive(5, ("10.77.9.9", 4000), Gossip((record(9),), want_reply=True))
    assert [(s.host, s.port) for s in out] == [("10.77.9.9", 4000)]
    assert {r.id for r in out[0].msg.members} == {nid(i) for i in (0, 1, 2, 3, 9)}
    assert out[0].msg.members[0] == m.me() and not out[0].msg.want_reply


def test_foreign_cluster_records_are_ignored() -> None:
    m = _solo()
    m.receive(0, addr_of(1), Gossip((record(1, cluster="other"), record(2))))
    assert m.get(nid(1)) is None and m.get(nid(2)) is not None
    assert m.stats["foreign_cluster"] == 1


def test_table_and_message_bounds(monkeypatch) -> None:
    monkeypatch.setattr(ms, "MEMBERS_MAX", 8)
    m = _solo()
    recs = tuple(record(i) for i in range(1, GOSSIP_RECORDS_MAX + 50))
    m.receive(0, addr_of(1), Gossip(recs[:20]))
    assert len(m.members()) == 1 + 8 and m.stats["table_full"] == 12   # me + the bound
    # Dead members make room for new ones when the table is full.
    m.tick(CFG.dead_after_ms)
    m.receive(CFG.dead_after_ms, addr_of(30), Gossip((record(30),)))
    assert m.get(nid(30)).state == ALIVE and len(m.members()) == 1 + 8
    monkeypatch.setattr(ms, "MEMBERS_MAX", 4096)
    m.receive(CFG.dead_after_ms, addr_of(1), Gossip(recs))
    # Only a message's worth is read.
    assert m.get(recs[GOSSIP_RECORDS_MAX - 1].id) is not None and m.get(recs[GOSSIP_RECORDS_MAX].id) is None
    assert m.stats["records_truncated"] == 1


def test_update_self_spreads_and_protocol_fields_are_refused() -> None:
    m = _solo()
    hb = m.me().heartbeat
    m.update_self(5, http_port=8123, raft=RaftView(term=3, leader="n-0001"))
    assert m.me().http_port == 8123 and m.me().raft.term == 3 and m.me().heartbeat == hb + 1
    for field in ("incarnation", "heartbeat", "state", "id", "cluster"):
        with pytest.raises(ValueError):
            m.update_self(6, **{field: 1})


def test_time_never_goes_back() -> None:
    m = _solo()
    m.tick(100)
    with pytest.raises(ValueError):
        m.tick(99)


def test_next_deadline_is_in_the_future_after_every_tick() -> None:
    net = mesh(8, 6)
    for node in net.up():
        node.tick(net.now_ms)
        assert node.next_deadline_ms() > net.now_ms


# ------------------------------------------------------------------------ frame size

def _big_labels(n: int = 64) -> dict[str, str]:
    return {f"k{i:02d}" + "x" * 59: "é" * 128 for i in range(n)}


def test_record_size_bound_holds_against_the_real_codec() -> None:
    codec = wire.Codec("galaxy", [wire.parse_key(wire.generate_key())], nid(0))
    samples = [
        record(1),
        record(2, resources=Resources(64.0, 2**40, 8, 63.5, 2**40, 8), labels=_big_labels(),
               raft=RaftView(2**40, "n-" + "z" * 60, tuple("n-" + "v" * 60 for _ in range(7)),
                             tuple("n-" + "i" * 60 for _ in range(7)), "candidate")),
    ]
    for r in samples:
        frame = codec.encode(Gossip((r,), want_reply=True), 2**62)
        envelope = ms.FRAME_FIXED_BYTES + ms._str_bytes(nid(0)) + ms._str_bytes("galaxy")
        assert len(frame) <= envelope + record_bytes_max(r), (len(frame), record_bytes_max(r))


def test_messages_fit_a_frame_even_with_big_records() -> None:
    codec = wire.Codec("galaxy", [wire.parse_key(wire.generate_key())], nid(0))
    m = Membership(record(0, labels=_big_labels(8)), CFG, random.Random(3), 0)
    for i in range(1, 120):
        m.receive(0, addr_of(i), Gossip((record(i, labels=_big_labels(16 if i % 3 else 64)),)))
    sends = m.tick(0)
    sends += m.receive(1, addr_of(999), Gossip((record(999),), want_reply=True))
    assert len(sends) > 3
    for s in sends:
        assert len(codec.encode(s.msg, 0)) <= CFG.frame_max_bytes
