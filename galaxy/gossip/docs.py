"""Spreading replicated documents: rumour rounds plus push-pull anti-entropy (pure).

Theory of operation
-------------------
The replica (``gossip/replica.py``) decides what a document *is*; this module decides
who hears about a change and when.  Two mechanisms, as in Serf and Cassandra:

* **Rumours.**  A version that changed this replica (a local write, or news merged from
  a peer) is pushed to ``gossip_fanout`` random live peers each ``gossip_interval_ms``,
  for ``retransmit_mult * ceil(log10(N + 1))`` rounds (at least 2), riding UDP.  With
  fanout 3 that reaches every node of a LAN mesh in a few rounds with high probability.
  Besides, a version is pushed *at once* (on the next tick, which the runner runs as soon
  as something changed) to ``gossip_fanout`` random peers the first time it changes this
  replica, so news crosses a hop in a round trip instead of waiting up to a gossip
  interval (a task's submission reaching the coordinator, its assignment reaching the
  worker).  Each node does this once per version, so it costs one extra round's worth of
  messages per change; the paced rounds still carry every version, so losing an eager
  push costs nothing but the wait it would have saved.  Eager pushes are at least
  ``EAGER_GAP_MS`` apart: the first change after a quiet spell goes at once, and a
  stream of changes (tasks ending one by one on a busy worker) shares frames instead
  of costing every node a frame, a merge, a commit and a wake-up per version.  Neither kind of push sends a
  version back to the member this node received it from: that member holds it.  (A
  tombstone does go back: hearing it back is how members learn they may collect it.)
  Nor to a member known to hold it: an eager push names the other members it went to
  (``also``; a receiver does not relay to them: the sender re-sends to them in its rounds
  until they answer), and a receiver answers every push with the ids of the versions it
  now holds (``DocHave``, ``acked``).  A round leaves out a version pushed less than a
  gossip interval before, whose answers may still be on their way (it rides the next
  round instead, which still counts): under load, answers that took longer than the gap
  to the next round made rounds re-send most of what every member already held, and each
  such push, naming no others, set its receivers relaying it to each other (a 3-node mesh
  under a task burst, its CPU saturated, received ~1.8 copies of each version; ~1.4 with the wait).  So on a
  lossless LAN each member receives each version about once, and a round re-sends only to
  members that did not answer (a lost push).  The price: if the sender dies before re-sending a push that was lost, the
  member it was for waits for anti-entropy instead of a relay.  Without those two, a 3-node mesh received each version ~3.5
  times: the rounds re-sent it to members that held it, until the rounds ran out.
* **Named interest.**  A document type may name who must hear a version at once
  (``interest``): its eager push goes to those members only (a task's submission to the
  coordinator, its assignment to the worker).  The rounds bring it to the others an
  interval later, and not at all if a newer version superseded it meanwhile (a task that
  ended within the interval), so the members with nothing to do about a step never merge,
  store or index it.  A version its writer sent by other means (a DocPut, ``sent_ms``)
  gets no eager push: the rounds wait an interval for its answers, as after one.
* **Anti-entropy.**  Every ``push_pull_interval_ms`` this node runs one push-pull
  session over TCP with a random live peer, which repairs whatever the rumours missed
  (loss, partitions, a node that was down).  A node that was away syncs at once: when
  it starts, and when more peers appear than it saw before (the small side of a healed
  partition), so catching up does not wait for the next period.  On the big side, each
  peer that comes back is synced at once by one member, the next id after it: a node
  cut off for a short time may not have noticed (it still held the others alive), and
  a joining node is still synced once, not by every member.

Invariants: at most ``PENDING_MAX`` versions wait to be retransmitted (the oldest go
first when the queue is full; anti-entropy repairs what that drops); a round sends at
most ``ROUND_DOCS_MAX`` versions, and so does an eager push (``FRESH_MAX``; beyond that
a burst, e.g. an anti-entropy repair, waits for the rounds); ``next_deadline_ms() > now``
after a tick.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import random

    from galaxy.gossip.replica import Doc

PENDING_MAX = 10_000          # versions queued for rumour rounds; beyond this anti-entropy repairs
ROUND_DOCS_MAX = 512          # versions per round per peer (a few UDP frames)
FRESH_MAX = ROUND_DOCS_MAX    # versions pushed at once per tick; a bigger burst waits for the rounds
RETURN_SYNCS_MAX = 4          # syncs with returning peers per tick (more wait for the period)
EAGER_GAP_MS = 2              # eager pushes at most this often: a stream of changes shares frames
ANSWER_DELAY_MAX_MS = 20      # a receiver gathers its answers (DocHave) this long at most


class DocGossipConfig(Protocol):
    gossip_interval_ms: int
    gossip_fanout: int
    retransmit_mult: int
    push_pull_interval_ms: int


@dataclass(frozen=True, slots=True)
class Peer:
    id: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class Push:
    """Send these versions to this peer (the runner packs them into DocUpdate frames)."""
    peer: Peer
    docs: tuple[Doc, ...]
    also: tuple[str, ...] = ()     # the other members this push goes to (or who hold its versions)


@dataclass(frozen=True, slots=True)
class Sync:
    """Run one anti-entropy session with this peer over TCP."""
    peer: Peer


def _ring_pos(node_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(node_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _hlc_key(w: Any) -> tuple:
    """(type, key, hlc wall, logical, node) of a DocWire: one version of a correct writer."""
    return (w.doc_type, w.key, w.hlc_wall_ms, w.hlc_logical, w.origin)


def rounds_for(members: int, retransmit_mult: int) -> int:
    return max(2, retransmit_mult * math.ceil(math.log10(members + 1)))


class DocGossip:
    def __init__(self, node_id: str, cfg: DocGossipConfig, rng: random.Random, now_ms: int) -> None:
        self.node_id = node_id
        self._cfg = cfg
        self._rng = rng
        # (doc_type, key, vid) -> [doc, rounds left, members known to hold it, last pushed at
        # (ms; -1: never)]; insertion order = age
        self._pending: OrderedDict[tuple[str, str, bytes], list] = OrderedDict()
        self._by_key: dict[tuple[str, str], set[tuple[str, str, bytes]]] = {}     # the pending versions of a key
        self._by_hlc: dict[tuple, tuple[str, str, bytes]] = {}     # (type, key, hlc wall, logical, node) -> pending
        self._by_vid: dict[bytes, tuple[str, str, bytes]] = {}     # version id -> pending
        self._next_round_ms = now_ms
        self._next_sync_ms = now_ms          # sync once at start
        self._seen_alive: set[str] = set()
        # versions that changed this replica since the last tick: pushed at once (no round spent)
        self._fresh: dict[tuple[str, str, bytes], tuple[Doc, set[str]]] = {}
        self._next_eager_ms = now_ms         # eager pushes are at least EAGER_GAP_MS apart
        # doc_type -> who must hear a version of it at once (member ids; None: anyone)
        self.interest: dict[str, Callable[[Doc], Collection[str] | None]] = {}
        self.stats = {"rounds": 0, "pushed": 0, "dropped_pending": 0, "syncs": 0, "eager": 0,
                      "superseded": 0, "everywhere": 0, "waited": 0}

    def reconfigure(self, cfg: DocGossipConfig) -> None:
        """Take new gossip settings (cluster-wide settings changed); the next round uses them."""
        self._cfg = cfg

    def changed(self, docs: Iterable[Doc], members: int, *, src: str | None = None,
                sent: Iterable[Any] = (), sent_ms: int = -1) -> None:
        """Versions that changed this replica (each key's full set of versions): spread them.
        A pending version of the same key that is no longer in its set was superseded: it is
        dropped (whoever lacks it gets the newer one).  ``sent``: the versions (DocWires)
        member ``src`` gave us; it holds those, so their pushes leave it out.  ``sent_ms``:
        the caller sent these versions itself at that time (a DocPut): no eager push, and
        the rounds wait an interval for their answers as after one."""
        rounds = rounds_for(members, self._cfg.retransmit_mult)
        theirs = {_hlc_key(w) for w in sent} if src else ()
        now: dict[tuple[str, str], list[Doc]] = {}
        for doc in docs:
            now.setdefault((doc.doc_type, doc.key), []).append(doc)
        for dk, versions in now.items():
            keep = {(d.doc_type, d.key, d.vid) for d in versions}
            for k in [k for k in self._by_key.get(dk, ()) if k not in keep]:
                self._drop(k)
                self.stats["superseded"] += 1
            for doc in versions:
                k = (doc.doc_type, doc.key, doc.vid)
                old = self._pending.pop(k, None)
                holders = old[2] if old is not None else set()
                # (type, key, hlc) names one version of a correct writer; were it ever
                # ambiguous, anti-entropy would repair the one push skipped
                if theirs and (doc.doc_type, doc.key, doc.hlc.wall_ms, doc.hlc.logical, doc.hlc.node) in theirs:
                    holders.add(src)
                self._pending[k] = [doc, rounds, holders, sent_ms]
                self._by_key.setdefault(dk, set()).add(k)
                self._by_hlc[(doc.doc_type, doc.key, doc.hlc.wall_ms, doc.hlc.logical, doc.hlc.node)] = k
                self._by_vid[doc.vid] = k
                if sent_ms < 0 and len(self._fresh) < FRESH_MAX:
                    self._fresh[k] = (doc, holders)
        while len(self._pending) > PENDING_MAX:
            self._drop(next(iter(self._pending)))
            self.stats["dropped_pending"] += 1

    def heard(self, src: str, sent: Iterable[Any], also: Iterable[str] = ()) -> None:
        """Member ``src`` sent us these versions (DocWires): it holds them, so the pending
        ones are not pushed to it again, and one every live peer holds is not pushed at
        all.  (Tombstones are: hearing one back is how members learn they may collect it,
        replica.py, Tombstones.)  ``also``: the members ``src`` pushed them to besides us;
        they are not pushed to them either (``src`` retransmits until they say they have
        them, see ``acked``)."""
        holders = {src, *also}
        holders.discard(self.node_id)
        for w in sent:
            k = self._by_hlc.get(_hlc_key(w))
            if k is not None and not w.deleted:
                self._pending[k][2].update(holders)

    def acked(self, src: str, vids: Iterable[bytes]) -> None:
        """Member ``src`` says it holds these versions (DocHave): no more pushes of them to it."""
        for vid in vids:
            k = self._by_vid.get(vid)
            if k is not None:
                self._pending[k][2].add(src)

    def _drop(self, k: tuple[str, str, bytes]) -> None:
        doc = self._pending.pop(k)[0]
        self._fresh.pop(k, None)
        ks = self._by_key[(doc.doc_type, doc.key)]
        ks.discard(k)
        if not ks:
            del self._by_key[(doc.doc_type, doc.key)]
        self._by_hlc.pop((doc.doc_type, doc.key, doc.hlc.wall_ms, doc.hlc.logical, doc.hlc.node), None)
        self._by_vid.pop(doc.vid, None)

    def tick(self, now_ms: int, peers: list[Peer]) -> list[Push | Sync]:
        out: list[Push | Sync] = []
        ids = {p.id for p in peers}
        # Catch up at once when this node is the one that was away: it just started, or
        # more peers appeared than it saw before (the small side of a healed partition).
        fresh = ids - self._seen_alive
        stayed = self._seen_alive & ids
        self._seen_alive = ids
        if fresh and len(fresh) < len(stayed):
            # The big side: a few peers are back (or new).  Each is synced at once by one
            # member only, the next one after it on a hash ring of those that stayed (as
            # this node sees the mesh; hashing spreads a group of returning neighbours
            # over many members), so a joining node is not synced N times over, and a node
            # that was cut off without noticing (it held the others alive, so no peers
            # "appeared" to it) catches up now, not a push-pull period later.
            ring = sorted((_ring_pos(i), i) for i in stayed | {self.node_id})
            mine = sorted(p for p in fresh
                          if ring[bisect.bisect_right(ring, (_ring_pos(p), p)) % len(ring)][1] == self.node_id)
            for pid in mine[:RETURN_SYNCS_MAX]:
                out.append(Sync(next(p for p in peers if p.id == pid)))
                self.stats["syncs"] += 1
            fresh = set()
        if self._fresh and now_ms >= self._next_round_ms:   # the round due now carries them
            self._fresh = {}
        elif self._fresh and now_ms >= self._next_eager_ms:
            out += self._eager(now_ms, peers)
            self._fresh = {}
            self._next_eager_ms = now_ms + EAGER_GAP_MS
        if now_ms >= self._next_round_ms:
            self._next_round_ms = now_ms + self._cfg.gossip_interval_ms
            out += self._round(now_ms, peers)
        if peers and (fresh or now_ms >= self._next_sync_ms):
            self._next_sync_ms = now_ms + self._cfg.push_pull_interval_ms
            pool = sorted((p for p in peers if p.id in fresh) if fresh else peers, key=lambda p: p.id)
            out.append(Sync(self._rng.choice(pool)))
            self.stats["syncs"] += 1
        elif now_ms >= self._next_sync_ms:
            # Nobody to sync with (alone, or cut off).  The first peers to appear are fresh
            # and trigger a sync at once, so the period can start over; leaving the
            # deadline in the past made the runner's loop spin (a lone node used ~65 % CPU).
            self._next_sync_ms = now_ms + self._cfg.push_pull_interval_ms
        return out

    def _round(self, now_ms: int, peers: list[Peer]) -> list[Push]:
        if not self._pending or not peers:
            return []
        self.stats["rounds"] += 1
        ids = {p.id for p in peers}
        recent = now_ms - self._cfg.gossip_interval_ms
        batch = []
        for k, entry in list(self._pending.items())[:ROUND_DOCS_MAX]:
            if not entry[0].deleted and ids <= entry[2]:
                self._drop(k)                 # every live peer holds it
                self.stats["everywhere"] += 1
                continue
            if entry[3] > recent:
                # pushed less than an interval ago (at once): its targets' answers may be on
                # their way, so this round leaves it for the next one, which still counts
                self.stats["waited"] += 1
                continue
            entry[3] = now_ms
            batch.append((entry[0], entry[2]))
            entry[1] -= 1
            if entry[1] <= 0:
                self._drop(k)
        return self._pushes(peers, batch, name_others=False)

    def _eager(self, now_ms: int, peers: list[Peer]) -> list[Push]:
        """The fresh versions: each to the members its type's ``interest`` names (a task's
        submission to the coordinator, its assignment to the worker), or else to
        ``gossip_fanout`` random peers.  The others hear a named-interest version from the
        rounds, an interval later, and not at all if it was superseded meanwhile (a task
        that ran and ended within the interval): every node would otherwise merge, store
        and index each step of a task that most of them never act on."""
        if not peers:
            return []
        self.stats["eager"] += 1
        anyone: list[tuple[Doc, set[str]]] = []
        named: dict[str, list[Doc]] = {}
        for k, (doc, holders) in self._fresh.items():
            self._pending[k][3] = now_ms
            want = self.interest.get(doc.doc_type)
            ids = want(doc) if want is not None and not doc.deleted else None
            if ids is None:
                anyone.append((doc, holders))
                continue
            for i in ids:
                if i not in holders:
                    named.setdefault(i, []).append(doc)
        return self._pushes(peers, anyone, name_others=True, named=named)

    def _pushes(self, peers: list[Peer], batch: list[tuple[Doc, set[str]]], *, name_others: bool,
                named: dict[str, list[Doc]] | None = None) -> list[Push]:
        """``batch`` to ``gossip_fanout`` random peers, each without what it is known to hold,
        and ``named[id]`` to peer ``id`` (in the same push when it is one of them).
        ``name_others``: each push names the other targets (``also``), which its receivers
        then do not relay to: only for an eager push, whose versions this node still has
        every round for (at least 2) to re-send to a target that does not answer."""
        targets = self._rng.sample(sorted(peers, key=lambda p: p.id), min(self._cfg.gossip_fanout, len(peers))) \
            if batch else []
        out = []
        for p in targets:
            docs = tuple(d for d, holders in batch if p.id not in holders or d.deleted)
            extra = named.pop(p.id, ()) if named else ()
            if docs or extra:
                self.stats["pushed"] += len(docs) + len(extra)
                also = tuple(q.id for q in targets if q is not p) if name_others else ()
                out.append(Push(p, docs + tuple(extra), also))
        if named:
            for p in peers:
                extra = named.get(p.id)
                if extra:
                    self.stats["pushed"] += len(extra)
                    out.append(Push(p, tuple(extra)))
        return out

    def answer_delay_ms(self) -> int:
        """How long a receiver may gather its answers to pushes before sending them: a tenth
        of a gossip interval (at most ``ANSWER_DELAY_MAX_MS``).  An answer only spares a
        round re-sending, and a round leaves out what was pushed less than an interval
        before, so answers this prompt spare every re-send they can."""
        return min(ANSWER_DELAY_MAX_MS, self._cfg.gossip_interval_ms // 10)

    def next_deadline_ms(self) -> int:
        due = min(self._next_round_ms if self._pending else self._next_sync_ms, self._next_sync_ms)
        return min(due, self._next_eager_ms) if self._fresh else due

    @property
    def pending(self) -> int:
        return len(self._pending)
