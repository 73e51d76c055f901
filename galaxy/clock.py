"""Clocks: the only place that reads real time.

Theory of operation: protocol cores never read a clock; runners read one of these once
per event and pass ``now_ms`` down.  ``SystemClock`` uses the monotonic clock for
deadlines and the wall clock for timestamps that cross the wire (replay windows,
``last_heard`` shown to users).  ``SimClock`` is advanced explicitly by tests and the
simulator, so a run is a pure function of its seed.

Logical clocks (pure values; nothing below ``SimClock`` reads time)
------------------------------------------------------------------
*HLC* (Kulkarni et al., 2014).  A timestamp ``Hlc(wall_ms, logical, node)`` stays close to
the wall clock of the node that made it, yet respects causality: an event's timestamp is
greater than every timestamp its node sent or received before it.  ``Hlc`` orders totally
by ``(wall_ms, logical, node)``; ``node`` keeps two nodes' timestamps distinct, so "last
writer wins by HLC, then node id" is one comparison.  ``HlcClock`` invariants:

1. ``send()`` and ``recv()`` return strictly increasing timestamps, whatever the wall
   clock does (when it steps back the clock keeps counting ``logical``).
2. ``recv(now, r)`` returns a timestamp greater than ``r`` unless ``r.wall_ms`` is more
   than ``max_drift_ms`` ahead of ``now``.  Such a remote is *clamped*, not rejected: the
   clock advances as if ``r`` were at ``now + max_drift_ms`` (counted in
   ``stats["clamped"]``).  Rejecting would make this node refuse a document its peers
   accept, which breaks convergence; clamping bounds how far one broken clock drags the
   others.  The price: an event after a clamped remote may carry a smaller timestamp than
   that remote, which matters only to last-writer-wins between *concurrent* versions
   (vector clocks, not HLCs, order causally related ones).

*Vector clocks.*  ``VectorClock`` maps node ids to positive counters (a missing id is 0),
immutable and hashable.  ``a.compare(b)`` is EQUAL, BEFORE (a <= b entry-wise, a != b),
AFTER (the mirror) or CONCURRENT.  ``merge`` is the entry-wise maximum, a join:
commutative, associative and idempotent; ``compare`` is antisymmetric and agrees with
``merge`` (a <= b iff a.merge(b) == b).  The hypothesis tests check these laws.

*Pruning.*  A clock has an entry for every node that ever wrote the value, so unpruned its
size follows the cluster's history.  ``without(ids)`` / ``prune(live_ids)`` drop entries and
``Departures`` decides which ids may go: those absent from the live membership for at
least ``horizon_ms``.  What dropping node n's entry (from one clock or both) can do to a
comparison:

* lose an order: BEFORE or AFTER becomes CONCURRENT or EQUAL when the later version's
  only lead was at n.  Acceptable: the replica hands concurrent versions, and distinct
  versions with equal clocks, to a deterministic resolver, so every replica still picks
  the same value (with last-writer-wins even the same value as unpruned, since a
  causally later write has the greater HLC).  It costs extra conflicts.
* invent an order: CONCURRENT becomes BEFORE when a's only lead over b was at n, i.e. a
  carries a write of n that b has not seen.  That would silently lose n's write.  The
  horizon rules it out: n has been gone for ``horizon_ms`` and wrote nothing since, so
  anti-entropy has long carried its last writes to every live replica and no live
  version lacks them.  Hence ``horizon_ms`` must exceed anti-entropy's convergence time
  (seconds to minutes) by a wide margin; the replica's default is one hour.

Replicas that prune a little apart hold clocks that differ until both have pruned; the
replica strips pruned ids from incoming clocks so that this does not ping-pong.  A node
that returns after being pruned is live again and continues its counter from its own
copy, so its new writes still dominate what it wrote before.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int: ...          # monotonic milliseconds, for deadlines
    def wall_ms(self) -> int: ...         # Unix epoch milliseconds, for the wire and users


class SystemClock:
    def now_ms(self) -> int:
        return time.monotonic_ns() // 1_000_000

    def wall_ms(self) -> int:
        return time.time_ns() // 1_000_000


class SimClock:
    """A clock that moves only when told to; monotonic and wall time move together."""

    def __init__(self, start_ms: int = 0, wall_offset_ms: int = 1_700_000_000_000) -> None:
        self._now_ms = start_ms
        self._wall_offset_ms = wall_offset_ms

    def now_ms(self) -> int:
        return self._now_ms

    def wall_ms(self) -> int:
        return self._now_ms + self._wall_offset_ms

    def advance(self, delta_ms: int) -> None:
        if delta_ms < 0:
            raise ValueError("a clock never goes back")
        self._now_ms += delta_ms

    def set(self, now_ms: int) -> None:
        self.advance(now_ms - self._now_ms)


# ---- logical clocks (pure: no clock is read below this line) ---------------------------


@dataclass(frozen=True, slots=True, order=True)
class Hlc:
    """A hybrid logical timestamp; ordered by (wall_ms, logical, node)."""

    wall_ms: int          # Unix epoch milliseconds (of the node that made it, or later)
    logical: int          # events at the same wall_ms
    node: str             # the node that made it; breaks ties between nodes

    @classmethod
    def zero(cls, node: str = "") -> Hlc:
        return cls(0, 0, node)


HLC_MAX_DRIFT_MS = 60_000   # NTP-synced LAN clocks agree to milliseconds; a minute is a broken clock


class HlcClock:
    """One node's hybrid logical clock.  Pure: the caller passes the wall clock in."""

    def __init__(self, node_id: str, *, max_drift_ms: int = HLC_MAX_DRIFT_MS,
                 last: Hlc | None = None) -> None:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError("node_id must be a non-empty str")
        if max_drift_ms < 0:
            raise ValueError("max_drift_ms must be >= 0")
        self.node_id = node_id
        self.max_drift_ms = max_drift_ms
        self._wall_ms = 0
        self._logical = 0
        self.stats: dict[str, int] = {"clamped": 0}
        if last is not None:
            self.restore(last)

    @property
    def last(self) -> Hlc:
        """The latest timestamp this clock issued or absorbed (with its own node id)."""
        return Hlc(self._wall_ms, self._logical, self.node_id)

    def send(self, now_wall_ms: int) -> Hlc:
        """A timestamp for a local event (a write) at wall time ``now_wall_ms``."""
        if now_wall_ms > self._wall_ms:
            self._wall_ms, self._logical = now_wall_ms, 0
        else:
            self._logical += 1
        self._check()
        return self.last

    def recv(self, now_wall_ms: int, remote: Hlc) -> Hlc:
        """Absorb a remote timestamp; returns the timestamp of the receive event."""
        r_wall, r_logical = remote.wall_ms, remote.logical
        ceiling_ms = now_wall_ms + self.max_drift_ms
        if r_wall > ceiling_ms:
            self.stats["clamped"] += 1
            r_wall, r_logical = ceiling_ms, 0
        wall = max(self._wall_ms, r_wall, now_wall_ms)
        if wall == self._wall_ms and wall == r_wall:
            logical = max(self._logical, r_logical) + 1
        elif wall == self._wall_ms:
            logical = self._logical + 1
        elif wall == r_wall:
            logical = r_logical + 1
        else:
            logical = 0
        self._wall_ms, self._logical = wall, logical
        self._check()
        return self.last

    def restore(self, seen: Hlc) -> None:
        """After a restart: never issue a timestamp at or below one issued before."""
        if (seen.wall_ms, seen.logical) > (self._wall_ms, self._logical):
            self._wall_ms, self._logical = seen.wall_ms, seen.logical
        self._check()

    def _check(self) -> None:
        assert self._wall_ms >= 0 and self._logical >= 0, (self._wall_ms, self._logical)


class Order(enum.Enum):
    BEFORE = "before"
    AFTER = "after"
    EQUAL = "equal"
    CONCURRENT = "concurrent"


class VectorClock:
    """An immutable map node id -> positive counter.  Missing ids count as 0."""

    __slots__ = ("_d", "_hash")

    def __init__(self, entries: Mapping[str, int] | Iterable[tuple[str, int]] = ()) -> None:
        d: dict[str, int] = {}
        for node, n in (entries.items() if isinstance(entries, Mapping) else entries):
            if not isinstance(node, str) or not node:
                raise ValueError("vector clock ids must be non-empty str")
            if type(n) is not int or n < 0:
                raise ValueError(f"vector clock counter for {node!r} must be an int >= 0")
            if n:
                d[node] = max(n, d.get(node, 0))
        self._d = d
        self._hash: int | None = None

    @classmethod
    def _of(cls, d: dict[str, int]) -> VectorClock:
        """Wrap a dict already in normal form (positive counters), without copying."""
        vc = cls.__new__(cls)
        vc._d = d
        vc._hash = None
        return vc

    # ---- reading
    def get(self, node: str) -> int:
        return self._d.get(node, 0)

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __contains__(self, node: object) -> bool:
        return node in self._d

    def items(self) -> list[tuple[str, int]]:
        """Entries sorted by node id (a canonical order, for hashing and encoding)."""
        return sorted(self._d.items())

    def to_dict(self) -> dict[str, int]:
        return dict(self._d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VectorClock) and self._d == other._d

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._d.items()))
        return self._hash

    def __repr__(self) -> str:
        return "VectorClock({" + ", ".join(f"{k!r}: {v}" for k, v in self.items()) + "})"

    # ---- algebra
    def increment(self, node: str) -> VectorClock:
        if not isinstance(node, str) or not node:
            raise ValueError("vector clock ids must be non-empty str")
        d = dict(self._d)
        d[node] = d.get(node, 0) + 1
        return VectorClock._of(d)

    def merge(self, other: VectorClock) -> VectorClock:
        """Entry-wise maximum (the least clock >= both)."""
        a, b = self._d, other._d
        if len(a) < len(b):
            a, b = b, a
        d = dict(a)
        for k, v in b.items():
            if v > d.get(k, 0):
                d[k] = v
        return VectorClock._of(d)

    def compare(self, other: VectorClock) -> Order:
        a, b = self._d, other._d
        le = True       # self <= other entry-wise
        ge = True       # self >= other entry-wise
        for k, v in a.items():
            w = b.get(k, 0)
            if v > w:
                le = False
            elif v < w:
                ge = False
        if ge:
            for k, w in b.items():
                if k not in a:       # w > 0 == a's entry
                    ge = False
                    break
        if le and ge:
            return Order.EQUAL
        if le:
            return Order.BEFORE
        if ge:
            return Order.AFTER
        return Order.CONCURRENT

    def without(self, nodes: Collection[str]) -> VectorClock:
        """This clock with the entries of ``nodes`` dropped (see Pruning above)."""
        if not nodes or not any(k in nodes for k in self._d):
            return self
        return VectorClock._of({k: v for k, v in self._d.items() if k not in nodes})

    def prune(self, live_ids: Collection[str]) -> VectorClock:
        """Keep only the entries of ``live_ids``.  Safe only under the horizon rule."""
        if all(k in live_ids for k in self._d):
            return self
        return VectorClock._of({k: v for k, v in self._d.items() if k in live_ids})


DEPARTURES_MAX = 65_536     # node ids ever seen in clocks and not live; far above any mesh


class Departures:
    """Which node ids may be pruned from vector clocks: gone from the live set >= horizon_ms.

    The caller passes, on each ``update``, the live member ids and the ids that appear in
    its clocks.  An id is *gone* from the first update that finds it not live, and
    becomes *prunable* ``horizon_ms`` later; it is forgotten only when it is live again
    (or, past ``ids_max``, the longest gone first).  A prunable id stays remembered after
    no local clock mentions it any more, because peers that prune later may still send
    clocks with it, and those must be stripped, not taken in.  This state is soft: after
    a restart every absent id starts a fresh horizon, which only delays pruning.
    """

    def __init__(self, horizon_ms: int, *, ids_max: int = DEPARTURES_MAX) -> None:
        if horizon_ms < 0 or ids_max < 1:
            raise ValueError("horizon_ms must be >= 0 and ids_max >= 1")
        self.horizon_ms = horizon_ms
        self.ids_max = ids_max
        self._gone_since_ms: dict[str, int] = {}

    def update(self, now_ms: int, live: Collection[str], present: Collection[str]) -> frozenset[str]:
        """Record who is gone among ``present`` (ids in some clock); return the prunable ids."""
        gone = self._gone_since_ms
        for node in [n for n in gone if n in live]:
            del gone[node]
        for node in present:
            if node not in live and node not in gone:
                if len(gone) >= self.ids_max:     # evict the longest gone: prunable long ago
                    del gone[min(gone, key=gone.__getitem__)]
                gone[node] = now_ms
        return frozenset(node for node, since_ms in gone.items() if now_ms - since_ms >= self.horizon_ms)

    def gone_since_ms(self, node: str) -> int | None:
        return self._gone_since_ms.get(node)
