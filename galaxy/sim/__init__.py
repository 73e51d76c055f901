"""Deterministic simulation: protocol cores on a simulated network, a run per seed.

Theory of operation
-------------------
``network.SimNetwork`` moves opaque messages between addresses on one event queue and one
``SimClock``, with latency, loss, partitions, crashes and restarts, all decided by one
seeded ``random.Random``.  ``MeshSim`` puts gossip membership cores on it: node ``i``
lives at ``addr_of(i)`` with id ``nid(i)``, and every core gets its own rng derived from
the seed, so a run is a pure function of the seed and the calls made (a failing test
names its seed; rerunning that seed replays it).

``MeshSim`` records every membership event as ``(t, observer, member, old, new)`` and,
after every step of a node, checks across steps what a core cannot check alone: no
member's version key goes back (after every step up to ``KEY_CHECK_SMALL`` nodes, every
``KEY_CHECK_EVERY``-th step of a node up to ``KEY_CHECK_NODES``; above that the cores' own
checks and ``check_all()`` at phase ends carry the load).

Convergence (``converged()``): every up node sees exactly the up nodes as alive (and
nothing else as alive or suspect), with the same record version each up node has of
itself.

A node on the network is the membership core itself, or (``docs.DocSim``) a composite
that also holds a replica; ``_wrap`` makes it and ``_membership`` finds the membership
core in it, and a node's ``events()`` drains its membership events either way.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any

from galaxy.config import Config
from galaxy.gossip.membership import Membership, SendTo, version_key
from galaxy.messages import ALIVE, SUSPECT, MemberRecord
from galaxy.sim.network import SimNetwork

__all__ = ["MeshSim", "SimNetwork", "addr_of", "host_of", "nid", "record", "rng_for"]

PORT = 7946
# The cross-step key check walks a node's table: after every step in small meshes, after
# every KEY_CHECK_EVERY-th step of each node in bigger ones (up to KEY_CHECK_NODES).
KEY_CHECK_NODES = 64
KEY_CHECK_SMALL = 8
KEY_CHECK_EVERY = 16
Addr = tuple[str, int]


def host_of(i: int) -> str:
    return f"10.77.{i // 250}.{i % 250 + 1}"


def addr_of(i: int) -> Addr:
    return (host_of(i), PORT)


def nid(i: int) -> str:
    return f"n-{i:04d}"


def rng_for(seed: int, i: int, incarnation: int) -> random.Random:
    """Node ``i``'s own rng in run ``seed``, at one incarnation (a restart draws anew)."""
    return random.Random(seed * 1_000_003 + i * 101 + incarnation)


def record(i: int, incarnation: int = 1, cluster: str = "galaxy", **kw: Any) -> MemberRecord:
    return MemberRecord(
        id=nid(i), incarnation=incarnation, heartbeat=0, state=ALIVE, host=host_of(i),
        gossip_port=PORT, http_port=8000, raft_port=7947, role="auto", version="0.1.0",
        cluster=cluster, started_ms=1_700_000_000_000, **kw)


class MeshSim:
    """Membership cores on a ``SimNetwork``; node ``i`` is ``nid(i)`` at ``addr_of(i)``."""

    def __init__(self, seed: int, cfg: Config | None = None, *, latency_ms: tuple[int, int] = (1, 5),
                 loss: float = 0.0, size_of: Callable[[Any], int] | None = None,
                 check_keys: bool | None = None) -> None:
        self.seed = seed
        self.cfg = cfg or Config.sim()
        self.net = SimNetwork(seed, latency_ms=latency_ms, loss=loss, size_of=size_of)
        self.net.on_step = self._on_step
        self.check_keys = check_keys
        self.events: list[tuple[int, str, str, str, str]] = []
        self.record_events = True
        self._keys: dict[Addr, dict[str, tuple[int, bool, int]]] = {}
        self._steps: dict[Addr, int] = {}
        self._index: dict[Addr, int] = {}
        # Per observer id: how many members it holds alive, and how many suspect (from events).
        self._alive_n: dict[str, int] = {}
        self._suspect_n: dict[str, int] = {}

    # ------------------------------------------------------------------ nodes

    @property
    def now_ms(self) -> int:
        return self.net.now_ms

    def start(self, i: int, incarnation: int = 1, seeds: Iterable[int] = (), *, cfg: Config | None = None,
              cluster: str = "galaxy", known: Iterable[MemberRecord] = (), **fields: Any) -> Membership:
        addr = addr_of(i)
        rng = rng_for(self.seed, i, incarnation)
        m = Membership(record(i, incarnation, cluster, **fields), cfg or self.cfg, rng, self.now_ms, known=known)
        me = m.me().id
        self._alive_n[me] = self._suspect_n[me] = 0
        self._count(me, m.events())   # a snapshot's members: counted, not events of the run
        self._keys.pop(addr, None)
        self._index[addr] = i
        self.net.add(addr, self._wrap(i, incarnation, m))
        for s in seeds:
            self.net.call(addr, lambda now, s=s: m.discovered(now, *addr_of(s)))
        return m

    def _wrap(self, i: int, incarnation: int, m: Membership) -> Any:
        """The object the network steps at node ``i``'s address (here: the core itself)."""
        return m

    @staticmethod
    def _membership(node: Any) -> Membership:
        return node if isinstance(node, Membership) else node.membership

    def _count(self, observer: str, events: list[tuple[str, str, str]]) -> None:
        alive, suspect = self._alive_n[observer], self._suspect_n[observer]
        for _, old, new in events:
            alive += (new == ALIVE) - (old == ALIVE)
            suspect += (new == SUSPECT) - (old == SUSPECT)
        self._alive_n[observer], self._suspect_n[observer] = alive, suspect

    def start_mesh(self, n: int, snapshot: bool = True, first: int = 0) -> None:
        """Nodes ``first .. first+n-1``: from a snapshot of each other (no join traffic), or
        each joining through node ``first`` (and converged before returning)."""
        ids = range(first, first + n)
        if snapshot:
            records = [record(i) for i in ids]
            for i in ids:
                self.start(i, known=records)
            return
        self.start(first)
        for i in ids[1:]:
            self.start(i, seeds=[first])
        self.run_until(self.converged, 30_000 + 100 * n, what=f"{n} nodes joined")

    def crash(self, i: int) -> None:
        self.net.crash(addr_of(i))

    def node(self, i: int) -> Membership:
        return self._membership(self.net.nodes[addr_of(i)])

    def is_up(self, i: int) -> bool:
        return self.net.is_up(addr_of(i))

    def up(self) -> list[Membership]:
        return [self._membership(n) for _, n in self.net.up()]

    def up_ids(self) -> list[int]:
        return [self._index[a] for a, _ in self.net.up()]

    def partition(self, *groups: Iterable[int]) -> None:
        self.net.partition(*[[addr_of(i) for i in g] for g in groups])

    def heal(self) -> None:
        self.net.heal()

    def call(self, i: int, step: Callable[[int], Any]) -> list[Any]:
        return self.net.call(addr_of(i), step)

    # ------------------------------------------------------------------ running

    def run(self, duration_ms: int) -> None:
        self.net.run(duration_ms)

    def run_until(self, pred: Callable[[], bool], limit_ms: int, step_ms: int = 50, what: str = "convergence") -> int:
        return self.net.run_until(pred, limit_ms, step_ms, what)

    def _on_step(self, addr: Addr, node: Any, effects: list[SendTo]) -> None:
        m = self._membership(node)
        evs = node.events()
        if evs:
            me, now = m.me().id, self.now_ms
            self._count(me, evs)
            if self.record_events:
                self.events.extend((now, me, *e) for e in evs)
        n = len(self.net.nodes)
        check = self.check_keys if self.check_keys is not None else n <= KEY_CHECK_NODES
        if check:
            steps = self._steps[addr] = self._steps.get(addr, 0) + 1
            if n > KEY_CHECK_SMALL and steps % KEY_CHECK_EVERY:
                return
            keys = self._keys.setdefault(addr, {})
            for v in m.members():
                k = version_key(v.record)
                assert k >= keys.get(v.record.id, k), f"seed={self.seed}: key went back {v}"
                keys[v.record.id] = k

    # ------------------------------------------------------------------ views

    def converged(self) -> bool:
        live = self.up()
        # Cheap first (counts kept from events), then member by member.
        n = len(live)
        for m in live:
            me = m.me().id
            if self._alive_n[me] != n - 1 or self._suspect_n[me]:
                return False
        truth = {m.me().id: version_key(m.me()) for m in live}
        for m in live:
            me = m.me().id
            for rid, key in truth.items():
                if rid == me:
                    continue
                v = m.get(rid)
                if v is None or v.state != ALIVE or version_key(v.record) != key:
                    return False
        return True

    def alive_count(self, observer: str) -> int:
        return self._alive_n[observer]

    def all_see(self, ids: Iterable[str], state: str, observers: Iterable[Membership] | None = None) -> bool:
        ids = list(ids)
        for m in (self.up() if observers is None else observers):
            for i in ids:
                v = m.get(i)
                if v is None or v.state != state:
                    return False
        return True

    def events_about(self, member: str) -> list[tuple[int, str, str, str, str]]:
        return [e for e in self.events if e[2] == member]

    def check_all(self) -> None:
        for m in self.up():
            m.check()
