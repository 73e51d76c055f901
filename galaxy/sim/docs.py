"""Replicated documents in the deterministic simulation: every node a replica too.

Theory of operation
-------------------
``DocSim`` is a ``MeshSim`` whose nodes are ``DocNode``s: the membership core, a
``Replica`` and a ``DocGossip`` — the pure cores a real node runs — driven the way
``gossip/docs_runner.py`` drives them, with the network simulated:

* rumours: ``Push(peer, docs)`` becomes ``pack_updates(...)`` DocUpdates, each sent as a
  ``DocFrame`` datagram (lossy, like UDP);
* anti-entropy: ``Sync(peer)`` opens a ``SyncSession`` whose DocSync messages travel as
  ``SyncFrame``s, one request and one answer at a time as on the real TCP connection.
  Frames are never lost at random (TCP retransmits), but a partition or a crash cuts
  them; a side that hears nothing for ``SYNC_READ_TIMEOUT_MS`` gives the session up,
  as the runner's read timeout does.  An initiator ends a session with a close frame
  (the connection's FIN);
* the doc loop ticks when ``DocGossip`` asks, after any change (the runner's wake
  event), and at least every ``DOC_LOOP_MAX_MS`` (the runner's one-second cap); the
  live peers it sees are the membership's alive peers, as in ``node._doc_peers``;
* every change is written to the node's ``SimStore`` before anything is sent (the
  store is a dict of full version sets, like ``store.Store``'s docs table), and
  ``gc`` runs every ``GC_INTERVAL_MS``.  A crash loses the node object — replica,
  rumours, sessions — and keeps its store; a restart restores a new replica from it.

Each node's wall clock is the simulated clock plus a per-node skew (drawn from the
seed), so HLCs see clocks that disagree a little, as on a LAN.

Invariants: a node holds at most ``SYNC_SESSIONS_MAX`` sessions each way (more incoming
are refused, counted) and at most one outgoing per peer; every ``DocNode`` step runs the
replica's own per-key checks, and ``check_all()`` its full ``_check()``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from galaxy.config import Config
from galaxy.gossip.docs import DocGossip, Peer, Push, Sync
from galaxy.gossip.docs_runner import GC_INTERVAL_MS, READ_TIMEOUT_S, SESSION_ROUNDS_MAX
from galaxy.gossip.membership import Membership
from galaxy.gossip.replica import (
    SYNC_FRAME_BYTES_MAX,
    TOMBSTONE_GRACE_MS,
    Doc,
    Replica,
    SyncError,
    SyncSession,
    pack_updates,
    to_wire,
)
from galaxy.messages import ALIVE, DocSync, DocUpdate, DocWire
from galaxy.sim import MeshSim, addr_of, nid, rng_for

__all__ = ["DocNode", "DocSim", "SimStore", "DocFrame", "SyncFrame", "KV"]

KV = "kv"                          # the key-value API's doc type (node.KV_TYPE)
DOC_LOOP_MAX_MS = 1000             # docs_runner wakes at least once a second
SYNC_READ_TIMEOUT_MS = int(READ_TIMEOUT_S * 1000)
SYNC_SESSIONS_MAX = 64             # sessions per direction per node (a real server has sockets to spare)
WALL_SKEW_MS_MAX = 50              # NTP on a LAN: tens of ms at worst
Addr = tuple[str, int]


# ---------------------------------------------------------------------------- messages

@dataclass(frozen=True, slots=True)
class DocFrame:
    """A DocUpdate as a datagram; ``sender`` is what the wire envelope authenticates."""
    sender: str
    msg: DocUpdate


@dataclass(frozen=True, slots=True)
class SyncFrame:
    """One DocSync on a simulated TCP connection ``session`` opened by ``initiator``;
    ``msg`` None closes it.  ``to_initiator`` tells the two directions apart."""
    sender: str
    initiator: str
    session: int
    msg: DocSync | None
    to_initiator: bool


@dataclass(frozen=True, slots=True)
class SimSend:
    host: str
    port: int
    msg: Any


def is_stream(msg: Any) -> bool:
    return type(msg) is SyncFrame


# ---------------------------------------------------------------------------- the store

class SimStore:
    """The docs table of ``store.Store``: (doc_type, key) -> full version set.  Outlives
    crashes; holds exactly what was persisted."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], tuple[DocWire, ...]] = {}
        self.writes = 0

    def put_docs(self, rows: Iterable[DocWire]) -> None:
        batch: dict[tuple[str, str], list[DocWire]] = {}
        for r in rows:
            batch.setdefault((r.doc_type, r.key), []).append(r)
        for k, rs in batch.items():
            self.rows[k] = tuple(rs)
        self.writes += 1

    def delete_docs(self, keys: Iterable[tuple[str, str]]) -> None:
        for k in keys:
            self.rows.pop(k, None)
        self.writes += 1

    def load_docs(self) -> list[DocWire]:
        return [r for k in sorted(self.rows) for r in self.rows[k]]


# ---------------------------------------------------------------------------- a node

class _Session:
    __slots__ = ("peer", "session", "rounds", "deadline_ms")

    def __init__(self, peer: Peer | Addr, session: SyncSession, deadline_ms: int) -> None:
        self.peer = peer
        self.session = session
        self.rounds = 0
        self.deadline_ms = deadline_ms


class DocNode:
    """Membership + replica + doc gossip at one address, stepped by the network."""

    def __init__(self, membership: Membership, replica: Replica, core: DocGossip, store: SimStore,
                 cfg: Config, now_ms: int, wall_offset_ms: int) -> None:
        self.membership = membership
        self.replica = replica
        self.core = core
        self.store = store
        self.id = membership.me().id
        self._cfg = cfg
        self._wall_offset_ms = wall_offset_ms
        self._events: list[tuple[str, str, str]] = []
        self._peer_map = {v.record.id: Peer(v.record.id, v.record.host, v.record.gossip_port)
                          for v in membership.alive_peers()}
        self._peers: list[Peer] | None = None
        self._next_doc_ms = now_ms              # tick the doc loop at once (the runner's start)
        self._next_gc_ms = now_ms + GC_INTERVAL_MS
        self._out: dict[int, _Session] = {}     # session id -> initiated session
        self._in: dict[tuple[str, int], _Session] = {}   # (initiator, session id) -> served
        self._syncing: set[str] = set()
        self._session_ids = 0
        self.stats = {"updates_in": 0, "updates_bad": 0, "syncs_out": 0, "syncs_in": 0, "sync_errors": 0,
                      "sync_timeouts": 0, "syncs_refused": 0, "repairs": 0}
        restored_bad = replica.restore(self.wall_ms(now_ms), store.load_docs())
        assert restored_bad == 0, f"{self.id}: {restored_bad} stored versions did not load"

    def wall_ms(self, now_ms: int) -> int:
        return now_ms + self._wall_offset_ms

    # ------------------------------------------------------------------ SimNode

    def tick(self, now_ms: int) -> list[Any]:
        out: list[Any] = self._from_membership(self.membership.tick(now_ms))
        if now_ms >= self._next_doc_ms:
            out += self._doc_tick(now_ms)
        if now_ms >= self._next_gc_ms:
            self._next_gc_ms = now_ms + GC_INTERVAL_MS
            self._gc(now_ms)
        self._expire(now_ms)
        return out

    def receive(self, now_ms: int, src: Addr, msg: Any) -> list[Any]:
        if type(msg) is DocFrame:
            self._on_update(now_ms, msg)
            return []
        if type(msg) is SyncFrame:
            return self._on_sync(now_ms, src, msg)
        return self._from_membership(self.membership.receive(now_ms, src, msg))

    def next_deadline_ms(self) -> int:
        d = min(self.membership.next_deadline_ms(), self._next_doc_ms, self._next_gc_ms)
        for s in self._out.values():
            d = min(d, s.deadline_ms)
        for s in self._in.values():
            d = min(d, s.deadline_ms)
        return d

    def events(self) -> list[tuple[str, str, str]]:
        self._drain()
        out, self._events = self._events, []
        return out

    def _from_membership(self, sends: list[Any]) -> list[Any]:
        self._drain()
        return sends

    def _drain(self) -> None:
        """Keep membership's events for ``events()`` and follow who is alive from them (the
        runner reads ``alive_peers()`` afresh each time; following the events keeps a
        1,000-node run fast; ``check_all`` compares the two)."""
        evs = self.membership.events()
        if evs:
            self._events += evs
            peer_map = self._peer_map
            for member, old, new in evs:
                if new == ALIVE:
                    rec = self.membership.get(member).record  # type: ignore[union-attr]
                    peer_map[member] = Peer(member, rec.host, rec.gossip_port)
                    self._peers = None
                elif old == ALIVE:
                    peer_map.pop(member, None)
                    self._peers = None

    def peers(self) -> list[Peer]:
        """The live peers docs gossip to (``node._doc_peers``), cached between changes."""
        if self._peers is None:
            self._peers = sorted(self._peer_map.values(), key=lambda p: p.id)
        return self._peers

    def check(self) -> None:
        self._drain()
        assert self.peers() == [Peer(v.record.id, v.record.host, v.record.gossip_port)
                                for v in self.membership.alive_peers()], f"{self.id}: peer list"
        self.replica._check()

    # ------------------------------------------------------------------ writes (the KV API)

    def put(self, now_ms: int, doc_type: str, key: str, value: Any) -> Doc:
        return self._local(now_ms, self.replica.put(self.wall_ms(now_ms), doc_type, key, value))

    def delete(self, now_ms: int, doc_type: str, key: str) -> Doc | None:
        doc = self.replica.delete(self.wall_ms(now_ms), doc_type, key)
        return None if doc is None else self._local(now_ms, doc)

    def _local(self, now_ms: int, doc: Doc) -> Doc:
        self._changed(now_ms, [doc])
        return doc

    def _changed(self, now_ms: int, changed: list[Doc], sender: str | None = None, sent: Any = ()) -> None:
        if changed:
            self.store.put_docs(to_wire(d) for d in changed)      # persist before any send
            self.core.changed(changed, len(self.peers()) + 1, src=sender, sent=sent)
            self._next_doc_ms = now_ms                            # the runner's wake event

    # ------------------------------------------------------------------ rumours

    def _doc_tick(self, now_ms: int) -> list[Any]:
        out: list[Any] = []
        for effect in self.core.tick(now_ms, self.peers()):
            if type(effect) is Push:
                for msg in pack_updates(effect.docs, self._cfg.frame_max_bytes, self.id, self._cfg.cluster):
                    out.append(SimSend(effect.peer.host, effect.peer.port, DocFrame(self.id, msg)))
            elif type(effect) is Sync:
                out += self._open(now_ms, effect.peer)
        self._next_doc_ms = min(self.core.next_deadline_ms(), now_ms + DOC_LOOP_MAX_MS)
        return out

    def _on_update(self, now_ms: int, frame: DocFrame) -> None:
        self.stats["updates_in"] += 1
        try:
            changed = self.replica.merge(self.wall_ms(now_ms), frame.msg.docs, src=frame.sender)
        except (ValueError, SyncError):
            self.stats["updates_bad"] += 1
            return
        self._changed(now_ms, changed, frame.sender, frame.msg.docs)

    # ------------------------------------------------------------------ anti-entropy

    def _session(self, peer: str) -> SyncSession:
        return self.replica.sync(peer, frame_max_bytes=SYNC_FRAME_BYTES_MAX, cluster=self._cfg.cluster)

    def _open(self, now_ms: int, peer: Peer) -> list[Any]:
        if peer.id in self._syncing or len(self._out) >= SYNC_SESSIONS_MAX:
            return []
        self._session_ids += 1
        sid = self._session_ids
        s = _Session(peer, self._session(peer.id), now_ms + SYNC_READ_TIMEOUT_MS)
        s.rounds = 1
        self._out[sid] = s
        self._syncing.add(peer.id)
        self.stats["syncs_out"] += 1
        return [SimSend(peer.host, peer.port, SyncFrame(self.id, self.id, sid, s.session.start(), False))]

    def _close_out(self, sid: int) -> None:
        s = self._out.pop(sid)
        self._syncing.discard(s.peer.id)  # type: ignore[union-attr]

    def _on_sync(self, now_ms: int, src: Addr, f: SyncFrame) -> list[Any]:
        wall = self.wall_ms(now_ms)
        if f.to_initiator:
            s = self._out.get(f.session)
            if s is None or f.initiator != self.id or s.peer.id != f.sender or f.msg is None:  # type: ignore[union-attr]
                return []                      # a session we gave up: the connection is gone
            try:
                step = s.session.step(wall, f.msg)
            except (SyncError, ValueError):
                self.stats["sync_errors"] += 1
                self._close_out(f.session)
                return [SimSend(*src, SyncFrame(self.id, self.id, f.session, None, False))]
            self._repaired(now_ms, step.changed)
            if step.reply is None or s.rounds >= SESSION_ROUNDS_MAX:
                self._close_out(f.session)
                return [SimSend(*src, SyncFrame(self.id, self.id, f.session, None, False))]
            s.rounds += 1
            s.deadline_ms = now_ms + SYNC_READ_TIMEOUT_MS
            return [SimSend(*src, SyncFrame(self.id, self.id, f.session, step.reply, False))]
        key = (f.initiator, f.session)
        s = self._in.get(key)
        if f.msg is None:                      # the initiator closed the connection
            self._in.pop(key, None)
            return []
        if s is None:
            if len(self._in) >= SYNC_SESSIONS_MAX:
                self.stats["syncs_refused"] += 1
                return []
            s = self._in[key] = _Session(src, self._session(f.sender), 0)
            self.stats["syncs_in"] += 1
        s.rounds += 1
        s.deadline_ms = now_ms + SYNC_READ_TIMEOUT_MS
        try:
            if s.rounds > SESSION_ROUNDS_MAX:
                raise SyncError("too many rounds")
            step = s.session.step(wall, f.msg)
        except (SyncError, ValueError):
            self.stats["sync_errors"] += 1
            del self._in[key]
            return []
        self._repaired(now_ms, step.changed)
        return [SimSend(*src, SyncFrame(self.id, f.initiator, f.session, step.reply or DocSync(), True))]

    def _repaired(self, now_ms: int, changed: Iterable[Doc]) -> None:
        changed = list(changed)
        if changed:
            self.stats["repairs"] += len(changed)
            self._changed(now_ms, changed)

    def _expire(self, now_ms: int) -> None:
        for sid in [sid for sid, s in self._out.items() if now_ms >= s.deadline_ms]:
            self.stats["sync_timeouts"] += 1
            self._close_out(sid)
        for key in [k for k, s in self._in.items() if now_ms >= s.deadline_ms]:
            self.stats["sync_timeouts"] += 1
            del self._in[key]

    # ------------------------------------------------------------------ gc

    def _gc(self, now_ms: int) -> None:
        live = [p.id for p in self.peers()] + [self.id]
        collected = self.replica.gc(self.wall_ms(now_ms), live)
        if collected.docs:
            self.store.put_docs(to_wire(d) for d in collected.docs)
        if collected.removed:
            self.store.delete_docs(collected.removed)


# ---------------------------------------------------------------------------- the mesh

class DocSim(MeshSim):
    """``MeshSim`` with a replica on every node; node ``i``'s store outlives its crashes."""

    def __init__(self, seed: int, cfg: Config | None = None, *, tombstone_grace_ms: int = TOMBSTONE_GRACE_MS,
                 wall_skew_ms_max: int = WALL_SKEW_MS_MAX, **kw: Any) -> None:
        super().__init__(seed, cfg, **kw)
        self.net.lossless = is_stream
        self.tombstone_grace_ms = tombstone_grace_ms
        self.stores: dict[int, SimStore] = {}
        self._skew = random.Random(seed ^ 0x5EED)
        self._skew_ms: dict[int, int] = {}
        self._wall_skew_ms_max = wall_skew_ms_max

    def _wrap(self, i: int, incarnation: int, m: Membership) -> DocNode:
        cfg = self.cfg
        store = self.stores.setdefault(i, SimStore())
        if i not in self._skew_ms:
            self._skew_ms[i] = self._skew.randint(-self._wall_skew_ms_max, self._wall_skew_ms_max)
        # The doc core's rng is its own stream, so doc traffic does not shift membership's draws.
        rng = rng_for(self.seed ^ 0xD0C5, i, incarnation)
        replica = Replica(nid(i), tombstone_grace_ms=self.tombstone_grace_ms)
        return DocNode(m, replica, DocGossip(nid(i), cfg, rng, self.now_ms), store, cfg, self.now_ms,
                       self.net.clock.wall_ms() - self.now_ms + self._skew_ms[i])

    def restart(self, i: int, seeds: Iterable[int] = (), **kw: Any) -> DocNode:
        """Node ``i`` again after a crash: a higher incarnation, its replica from its store."""
        assert not self.is_up(i), f"{nid(i)} is up"
        inc = self.node(i).me().incarnation + 1
        self.start(i, incarnation=inc, seeds=seeds, **kw)
        return self.doc_node(i)

    def doc_node(self, i: int) -> DocNode:
        return self.net.nodes[addr_of(i)]  # type: ignore[return-value]

    def doc_nodes(self) -> list[DocNode]:
        return [n for _, n in self.net.up()]  # type: ignore[misc]

    def write(self, i: int, key: str, value: Any, doc_type: str = KV) -> Doc:
        """A KV write on node ``i`` (a step of the run); returns the new version."""
        got: list[Doc] = []
        self.call(i, lambda now: got.append(self.doc_node(i).put(now, doc_type, key, value)))
        return got[0]

    def delete(self, i: int, key: str, doc_type: str = KV) -> Doc | None:
        got: list[Doc | None] = []
        self.call(i, lambda now: got.append(self.doc_node(i).delete(now, doc_type, key)))
        return got[0]

    # ------------------------------------------------------------------ views

    def view(self, node: DocNode, doc_type: str = KV) -> dict[str, tuple[Any, frozenset[bytes]]]:
        """What a node serves: key -> (winning value, the vids of its versions), deleted
        documents left out (tombstones, ghosts and collected ones read alike)."""
        r = node.replica
        out = {}
        for d in r.items(doc_type):
            out[d.key] = (d.value, frozenset(v.vid for v in r.versions(doc_type, d.key)))
        return out

    def docs_converged(self, doc_type: str = KV) -> bool:
        nodes = self.doc_nodes()
        if not nodes:
            return True
        first = self.view(nodes[0], doc_type)
        return all(self.view(n, doc_type) == first for n in nodes[1:])

    def settled(self) -> bool:
        """Membership and documents converged."""
        return self.converged() and self.docs_converged()

    def check_all(self) -> None:
        super().check_all()
        for n in self.doc_nodes():
            n.check()

    def fingerprint(self) -> str:
        """A digest of the whole run's outcome: every replica's versions, every node's
        counters and the network's; two runs of one seed must agree."""
        h = hashlib.sha256()
        for addr, n in sorted(self.net.nodes.items()):
            h.update(repr(addr).encode())
            if isinstance(n, DocNode):
                for d in sorted(n.replica.all_versions(), key=lambda d: d.vid):
                    h.update(d.vid)
                h.update(repr((sorted(n.stats.items()), sorted(n.replica.stats.items()),
                               sorted(n.core.stats.items()), n.replica.root_hash())).encode())
            m = self._membership(n)
            h.update(repr([(v.record, v.state, v.last_heard_ms) for v in m.members()]).encode())
        for e in self.events:
            h.update(repr(e).encode())
        h.update(repr(sorted(self.net.stats.items())).encode())
        return h.hexdigest()
