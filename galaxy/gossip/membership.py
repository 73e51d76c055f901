"""Gossip membership: who is in the mesh and whether they are alive (SWIM + Lifeguard).

Theory of operation
-------------------
SWIM (Das, Gupta and Motivala, 2002) as hashicorp/memberlist runs it, with Lifeguard's
local health awareness (Dadgar et al., 2018), over full member records instead of bare
names.  Pure: time comes in as ``now_ms``, randomness from the injected ``rng``, and
every step returns the datagrams to send as ``SendTo`` effects.

*Records and rumors.*  Every node owns one ``MemberRecord`` and only it writes that
record; everyone else passes it on unchanged.  Versions of a record are ordered by
``(incarnation, state == "left", heartbeat)``: ``update_self`` bumps the heartbeat, a
restart (a higher incarnation from the store) or a refutation bumps the incarnation, and
a leave at incarnation *i* beats every alive record of *i*.  Liveness claims about
others travel as ``Rumor(id, incarnation, suspect|dead, by)``.  Locally each member has a
state and ``inc``, the incarnation that state is about (never below its record's).  The
rules, memberlist's:

    input                            applies when                    effect
    record, greater version          always                         take it; left -> left;
                                                                    incarnation > inc -> alive
    suspect rumor at i               alive and i >= inc             suspect (timer starts)
                                     suspect and i == inc           a confirmation by ``by``
                                     suspect and i > inc            suspicion restarts at i
    dead rumor at i                  alive/suspect and i >= inc     dead (suspect if it spoke
                                                                    to me first-hand within
                                                                    probe_interval_ms)
    suspicion timer runs out         suspect                        dead, rumored by me
    any claim about me at i          i >= my incarnation            refute: incarnation i+1

Every change taken is news and goes into the broadcast queue; nothing else does, so a
rumor dies out once everybody has it.  A sender that shows an older incarnation of a
member than ours (a record, or a claim about it, me included) gets our record back at
once: its suspicion of a life that already refuted would otherwise run out into a false
death.

*Probes.*  Every ``probe_interval_ms`` (times the health multiplier) a node pings the next
member of a shuffled round-robin order of the alive and suspect members; while it holds
suspects, every other probe goes to one of them in turn.  A suspect
target gets its own suspicion in the ping (Lifeguard's buddy system: it learns at once
and refutes).  No ack within ``probe_timeout_ms``: ``indirect_checks`` random alive
members get a ``PingReq`` and the target a second direct ping (our stand-in for
memberlist's TCP fallback: a lost datagram alone suspects nobody).  A relay pings the
target with its own seq and forwards the ack, or sends a ``Nack`` when the target stays
silent for ``probe_timeout_ms``.  Still no ack when the interval ends: the target is
suspect (rumored by me).

*Local health (Lifeguard).*  A score in ``0 .. awareness_max - 1`` multiplies the probe
interval: a successful probe lowers it by one; a failed one raises it by the relays that
did not even nack (by one when there were none), and refuting a suspicion of myself
raises it by one, since both say that *my* messages are late or lost.  A slow node thus
probes less often and accuses less readily.

*Suspicion.*  With ``n`` live members (me included) a suspicion lasts between
``min = suspicion_mult * max(1, log10(n)) * probe_interval_ms`` and
``max = suspicion_max_mult * min``.  It starts at ``max`` and each independent
confirmation (a suspect rumor at the same incarnation from another accuser) shrinks it
toward ``min`` as ``max - (max - min) * log(c + 1) / log(k + 1)`` after ``c`` of the
``k = suspicion_mult - 2`` expected confirmations; with too few members to confirm
(``n - 2 < k``) it is ``min`` from the start.  Every node that hears the rumor runs its
own timer, and the first to run out rumors "dead", which everyone takes.
``detection_bound_ms(cfg, n)`` bounds the time from a crash to "dead" at every survivor
(no loss); in practice it is ~1.5 probe intervals plus the suspicion's ``min``.

*Dissemination.*  News waits in a queue and rides on every ping, ping-req and ack we
send, and every ``gossip_interval_ms`` (only while the queue holds anything; at once
when news arrives after a quiet spell) a ``Spread`` goes to ``gossip_fanout`` random
live members.  Each entry is sent at most ``retransmit_mult * ceil(log10(n + 1))``
times, the least sent first (among equals the one that got there last: for unsent
news, the newest); a newer entry about the same member replaces the older one.  Probes and
gossip stay within ``PACKET_BYTES`` (one Ethernet frame, so a 10 % lossy link loses 10 %
of them, not the 1 - 0.9^k of a k-fragment datagram), except that a gossip round's
``Spread`` may grow to ``SPREAD_BYTES`` while news piles up; a record too big for its
message travels alone in its own frame.

*Full state (push-pull).*  Every ``push_pull_interval_ms`` (times
``1 + ceil(log2(n / 32))`` above 32 members, memberlist's scaling) a node sends its whole
table to one random live member, ``want_reply`` set on its first frame; the receiver
merges it and sends its own back.  A join is the same exchange, with whatever contact
we have.  Full state holds the records of alive, suspect and left members and one claim:
the one about the recipient, so that a recipient we hold dead or suspect refutes.  Claims
about third parties stay out: they are time-bound and every node judges by its own
probes, and a healing minority that holds the majority dead would otherwise make the
majority suspect itself wholesale (memberlist sends them and softens "dead" to
"suspect"; we soften a received one the same way).  Full state goes in frames of
``SYNC_BYTES`` (<= 6 IP fragments), at most ``SYNC_MESSAGES_MAX`` of them.

*Contacts.*  Addresses handed to ``discovered()`` (seeds, mDNS, beacons) and those of
members judged dead are contacts: one whose address is not that of an alive or suspect
member gets a join (``Sync(want_reply=True)``) with exponential backoff from
``seed_retry_min_ms`` to ``seed_retry_max_ms``, and a node sends at most one join per
``gossip_interval_ms`` (a partition makes hundreds of contacts due at once; one answer
is enough to merge).  Contacting unknown addresses while connected merges groups that
formed apart; retrying dead members is what heals a partition (Serf's reconnect).  A
datagram from a member we hold dead is answered with its death rumor, so it refutes;
one from an unknown address makes that address a contact: that member knows us and the
news of its join died out before reaching us (an epidemic's tail), and the exchange
repairs that at once instead of at the next push-pull.

*Leave.*  ``leave()`` takes a left record at a higher incarnation and sends it to every
live member; receivers spread it like any news.  Dead and left members stay in the table
for ``dead_reap_after_ms``, then go.

Invariants (``_check()``)
-------------------------
1. No record about me in the table; every record's id is its key and its cluster is mine.
2. Bounds: at most ``MEMBERS_MAX`` members, ``CONTACTS_MAX`` contacts, ``BROADCASTS_MAX``
   queued broadcasts, ``RELAYS_MAX`` relayed probes, ``EVENTS_MAX`` events; no message we
   send is bigger than its budget (``message_bytes_max`` bounds the real encoding).
3. A member's version key never decreases; its ``inc`` is at least its record's
   incarnation; it is suspect exactly when it has a suspicion; it is left exactly when
   its record is a left record.
4. After ``tick(now)``: no suspicion and no reap is overdue and ``next_deadline_ms() > now``
   (the runner never spins).  ``next_deadline_ms()`` is never later than a due timer.
5. My own state is alive until ``leave()``, then left; my key only grows.
6. The address index maps each address to a member at that address; the live list holds
   exactly the alive and suspect members, the suspect rotation exactly the suspects.
7. The health score stays in ``0 .. awareness_max - 1``.

Each step checks the members it touched and the bounds; a tick checks everything (the
table, and the size of what it sends), every ``N // FULL_CHECK_MEMBERS``-th tick in a big
table (so the check costs O(1) per step).
Invariant 3 across steps is checked by the simulator.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from galaxy.messages import (
    ALIVE, DEAD, LEFT, MEMBER_STATES, SUSPECT, Ack, Gossip, MemberRecord, Nack, Ping, PingReq,
    Rumor, Spread, Sync,
)

if TYPE_CHECKING:  # the core takes an injected rng and never imports random at run time
    import random

# SWIM sends O(1) per round whatever the size; the table itself (~0.5 KB a record) and the
# full-state exchange bound it: 4096 records is ~2 MB of table and a ~2 MB push-pull.
MEMBERS_MAX = 4096
# A message's records and rumors are read up to these counts; wire.py bounds any tuple to
# 1024 items, and no honest message carries more than a frame holds (>= 330 B a record).
RECORDS_MAX = 256
RUMORS_MAX = 1024
# Probes, acks and gossip fit one Ethernet frame (1500 - IP - UDP headers, with margin):
# memberlist's UDPBufferSize.
PACKET_BYTES = 1400
# A gossip round's Spread may grow to 3 IP fragments when news piles up (a join storm);
# in steady state it holds an entry or two and stays within one packet.
SPREAD_BYTES = 4096
# Full-state frames: 6 IP fragments on a 1500-byte MTU, ~20 typical records each.
SYNC_BYTES = 8192
# A full-state exchange sends at most this many frames (~2 000 records at their bound, which
# now counts owner, runtime and machine load); a larger table is sent from a random offset,
# so successive exchanges cover all of it.
SYNC_MESSAGES_MAX = 128
# A join request carries one frame of our table (the reply carries the rest of theirs).
JOIN_MESSAGES_MAX = 1
# Seeds, discovery hints and dead members we try to (re)join through.
CONTACTS_MAX = 256
# Queued news; when full, the entry sent most often goes first.  Ample: a rumor lives
# ~retransmit_mult * log10(N) messages, a few gossip rounds.
BROADCASTS_MAX = 1024
# Indirect probes we run for others at a time (each is one timer and one map entry).
RELAYS_MAX = 256
# State changes kept for the caller's log until drained.
EVENTS_MAX = 1024
# A full _check() walks the table; above this many members it runs every N/this ticks.
FULL_CHECK_MEMBERS = 2
# Upper bound of a record's encoding without its strings' bytes: field names, headers,
# numbers at their widest (324 measured with wire.py's msgpack maps, plus array16/map16;
# +70 for the machine load fields of Resources: three names and two float64s and an int64;
# +20 for the names and headers of owner and runtime; the bytes of tls are counted by length,
# its name and header (6) fit in the margin: the bound is still ~60 bytes above a measured record).
RECORD_FIXED_BYTES = 426
# Upper bound of a rumor's encoding without its strings: a 4-key map, the keys, an int64.
RUMOR_FIXED_BYTES = 40
# Upper bound of a frame's bytes around the piggyback and the sender, cluster, target and
# host strings: header, nonce, AEAD tag, envelope, body keys, seq/port ints, tuple headers
# (134 measured for a PingReq, the widest; see the tests).
FRAME_FIXED_BYTES = 160

_PROTOCOL_FIELDS = frozenset({"id", "cluster", "incarnation", "heartbeat", "state"})
_LIVE = (ALIVE, SUSPECT)
NONE = ""  # the "state" of a member not (or no longer) in the table, in events()
_FOREVER_MS = 1 << 62

# Timer kinds in the heap; an entry is valid only while it matches the state it was set for.
_T_SUSPICION, _T_REAP, _T_RELAY, _T_CONTACT = 0, 1, 2, 3


class MembershipConfig(Protocol):
    """The ``galaxy.config.Config`` fields membership reads."""

    cluster: str
    gossip_interval_ms: int
    gossip_fanout: int
    probe_interval_ms: int
    probe_timeout_ms: int
    indirect_checks: int
    suspicion_mult: int
    suspicion_max_mult: int
    retransmit_mult: int
    push_pull_interval_ms: int
    awareness_max: int
    dead_reap_after_ms: int
    seed_retry_min_ms: int
    seed_retry_max_ms: int
    frame_max_bytes: int


Message = Ping | PingReq | Ack | Nack | Spread | Sync | Gossip


@dataclass(frozen=True, slots=True)
class SendTo:
    host: str
    port: int
    msg: Message


@dataclass(frozen=True, slots=True)
class MemberView:
    record: MemberRecord
    state: str               # this node's judgement: alive, suspect, dead or left
    last_heard_ms: int       # when this node last had first-hand or fresh news of it (monotonic ms)


@dataclass(slots=True)
class _Suspicion:
    started_ms: int
    min_ms: int
    max_ms: int
    k: int                   # confirmations that take the timeout down to min_ms
    accuser: str             # who suspected first (carried on in full state)
    confirmers: set[str]     # membership tests only: never iterated (str hashing is salted)
    deadline_ms: int

    def confirm(self, by: str) -> bool:
        """Count an independent accuser; True when it shortened the timeout."""
        if self.k < 1 or len(self.confirmers) > self.k or by in self.confirmers:
            return False
        self.confirmers.add(by)
        c = len(self.confirmers) - 1
        frac = math.log(c + 1) / math.log(self.k + 1)
        timeout_ms = max(self.min_ms, int(self.max_ms - frac * (self.max_ms - self.min_ms)))
        self.deadline_ms = self.started_ms + timeout_ms
        return True


@dataclass(slots=True)
class _Member:
    record: MemberRecord
    state: str
    inc: int                 # the incarnation ``state`` is about (>= record.incarnation)
    by: str                  # who made the suspect/dead claim ("" while alive or left)
    last_heard_ms: int
    changed_ms: int          # when ``state`` was entered (the reap timer of dead/left)
    suspicion: _Suspicion | None = None
    contact_ms: int = -_FOREVER_MS   # when it last answered or wrote to me first-hand


@dataclass(slots=True)
class _Contact:
    backoff_ms: int
    next_ms: int | None      # None: parked, the address belongs to a live member
    seen_ms: int             # last time discovered (or made a contact); eviction order
    discovered: bool         # handed to discovered(), as opposed to a dead member's address
    attempts: int = 0


@dataclass(slots=True)
class _Probe:
    seq: int
    target: str
    addr: tuple[str, int]
    timeout_ms: int          # when the indirect probes go out
    end_ms: int              # when it is judged
    acked: bool = False
    indirect: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class _Relay:
    requester: tuple[str, int]
    seq: int                 # the requester's seq
    target: str
    deadline_ms: int


@dataclass(slots=True)
class _Item:
    payload: MemberRecord | Rumor
    size_bytes: int
    sent: int = 0


class _Queue:
    """memberlist's TransmitLimitedQueue: the least sent first.

    Among entries sent equally often the one that got there last goes first (for unsent
    entries: the newest, as in memberlist).  One entry per (member, record or rumor): a
    newer one about the same member replaces the older.  ``_levels[t]`` holds the entries
    sent ``t`` times, in the order they got there.
    """

    __slots__ = ("_items", "_levels", "dropped")

    def __init__(self) -> None:
        self._items: dict[tuple[str, bool], int] = {}       # key -> level
        self._levels: list[dict[tuple[str, bool], _Item]] = [{}]
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: tuple[str, bool], payload: MemberRecord | Rumor, size_bytes: int) -> None:
        self.discard(key)
        if len(self._items) >= BROADCASTS_MAX:
            self._evict()
        self._items[key] = 0
        self._levels[0][key] = _Item(payload, size_bytes)

    def discard(self, key: tuple[str, bool]) -> None:
        level = self._items.pop(key, None)
        if level is not None:
            del self._levels[level][key]

    def _evict(self) -> None:
        for level in range(len(self._levels) - 1, -1, -1):
            d = self._levels[level]
            if d:
                key = next(iter(d))
                del d[key]
                del self._items[key]
                self.dropped += 1
                return

    def take(self, room_bytes: int, limit: int, alone_bytes: int = 0) -> tuple[list[MemberRecord], list[Rumor], int]:
        """Entries that fit ``room_bytes``; each taken counts one transmission.

        An entry bigger than ``room_bytes`` but within ``alone_bytes`` is taken alone when it
        comes first (nothing else taken yet), so a big record still travels.
        Returns (records, rumors, bytes used).
        """
        records: list[MemberRecord] = []
        rumors: list[Rumor] = []
        used = 0
        taken: list[tuple[int, tuple[str, bool]]] = []
        misses = 0
        done = False
        levels = self._levels
        for level in range(len(levels)):
            d = levels[level]
            if not d:
                continue
            if level >= limit:   # the limit fell as the mesh shrank: these are done
                for key in d:
                    del self._items[key]
                d.clear()
                continue
            for key in reversed(d):
                size = d[key].size_bytes
                if used + size <= room_bytes:
                    taken.append((level, key))
                    used += size
                elif not taken and size <= alone_bytes:
                    taken.append((level, key))
                    used = size
                    done = True
                    break
                else:
                    # Full, or nearly: a few smaller entries may still fit; do not scan on.
                    misses += 1
                    if misses > 8:
                        done = True
                        break
            if done:
                break
        for level, key in taken:
            item = levels[level].pop(key)
            if type(item.payload) is Rumor:
                rumors.append(item.payload)  # type: ignore[arg-type]
            else:
                records.append(item.payload)  # type: ignore[arg-type]
            item.sent += 1
            if item.sent >= limit:
                del self._items[key]
                continue
            if item.sent == len(levels):
                levels.append({})
            levels[item.sent][key] = item
            self._items[key] = item.sent
        return records, rumors, used

    def check(self) -> None:
        assert len(self._items) <= BROADCASTS_MAX
        assert sum(len(d) for d in self._levels) == len(self._items)
        for level, d in enumerate(self._levels):
            for key, item in d.items():
                assert self._items[key] == level and item.sent == level, (key, level)


def version_key(r: MemberRecord) -> tuple[int, bool, int]:
    """The order of versions of one member's record (see Theory of operation)."""
    return (r.incarnation, r.state == LEFT, r.heartbeat)


def _str_bytes(s: str) -> int:
    """msgpack's size of ``s``, header included (the header is 1 to 5 bytes)."""
    n = len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65_536 else 5)


# record_bytes_max by record object: a record is sized once, not per message it rides on.
# It holds the record, so an id is never reused while cached; cleared when full.
_SIZES: dict[int, tuple[MemberRecord, int]] = {}
SIZE_CACHE_MAX = 16_384


def record_bytes_max(r: MemberRecord) -> int:
    """An upper bound of the encoded size of ``r`` (checked against wire.py in the tests)."""
    hit = _SIZES.get(id(r))
    if hit is not None and hit[0] is r:
        return hit[1]
    n = _record_bytes_max(r)
    if len(_SIZES) >= SIZE_CACHE_MAX:
        _SIZES.clear()
    _SIZES[id(r)] = (r, n)
    return n


def _record_bytes_max(r: MemberRecord) -> int:
    v = r.raft
    n = RECORD_FIXED_BYTES + len(r.tls)
    for s in (r.id, r.state, r.host, r.role, r.version, r.cluster, v.leader, v.raft_state, r.owner, r.runtime,
              *v.voters, *v.invited):
        n += _str_bytes(s)
    for k, val in r.labels.items():
        n += _str_bytes(k) + _str_bytes(val)
    return n


def rumor_bytes_max(u: Rumor) -> int:
    return RUMOR_FIXED_BYTES + _str_bytes(u.id) + _str_bytes(u.state) + _str_bytes(u.by)


def message_bytes_max(msg: Message, sender: str, cluster: str) -> int:
    """An upper bound of the frame ``wire.Codec`` makes of ``msg`` (checked in the tests)."""
    n = FRAME_FIXED_BYTES + _str_bytes(sender) + _str_bytes(cluster)
    if type(msg) is Nack:
        return n
    if type(msg) in (Ping, PingReq):
        n += _str_bytes(msg.target)  # type: ignore[union-attr]
    if type(msg) is PingReq:
        n += _str_bytes(msg.host)
    n += sum(record_bytes_max(r) for r in msg.members)  # type: ignore[union-attr]
    if type(msg) is not Gossip:
        n += sum(rumor_bytes_max(u) for u in msg.rumors)  # type: ignore[union-attr]
    return n


def suspicion_timeouts(cfg: MembershipConfig, n: int) -> tuple[int, int, int]:
    """(min_ms, max_ms, k) of a suspicion in a mesh of ``n`` live members (me included)."""
    k = cfg.suspicion_mult - 2
    if n - 2 < k:
        k = 0   # too few others to confirm it: the timeout is min_ms from the start
    min_ms = int(cfg.suspicion_mult * max(1.0, math.log10(max(1, n))) * cfg.probe_interval_ms)
    return min_ms, cfg.suspicion_max_mult * min_ms, k


def detection_bound_ms(cfg: MembershipConfig, n: int, degraded: bool = False) -> int:
    """How long after a crash, without loss, every one of ``n - 1`` survivors holds it dead.

    ``degraded``: when the survivors' own datagrams are being lost too (loss, a partition),
    their health scores may rise and stretch each probe interval up to ``awareness_max``
    times; the bound stretches with them.

    Each survivor probes every live member once per cycle of ``n - 1`` probe intervals, in a
    fresh order each cycle, so two probes of one member are at most ``2(n - 1) - 1``
    intervals apart: within ``2n`` intervals it has failed a probe of the dead node (or
    heard the suspicion, which reaches everyone sooner); its own timer then runs out within
    the suspicion's ``max_ms`` (earlier with confirmations, or when the first "dead"
    arrives).  The ``gossip_interval_ms`` per doubling of ``n`` is slack for hearing.  In practice it is far shorter: the first survivor to probe the dead
    node suspects it within ~1.5 intervals, everyone hears within a few gossip rounds, and
    confirmations cut the timeout to ``min_ms`` (measured in benchmarks/gossip.py).
    """
    _, max_ms, _ = suspicion_timeouts(cfg, n)
    return 2 * n * cfg.probe_interval_ms * (cfg.awareness_max if degraded else 1) + max_ms + cfg.gossip_interval_ms * (2 + math.ceil(math.log2(max(2, n))))


def _same_size(a: MemberRecord, b: MemberRecord) -> bool:
    """Whether ``record_bytes_max`` must be the same for both (a heartbeat changes nothing)."""
    return (a.state == b.state and a.host == b.host and a.role == b.role and a.version == b.version
            and (a.raft is b.raft or a.raft == b.raft) and (a.labels is b.labels or a.labels == b.labels))


def _check_config(cfg: MembershipConfig) -> None:
    if cfg.gossip_interval_ms <= 0 or cfg.gossip_fanout <= 0:
        raise ValueError("gossip_interval_ms and gossip_fanout must be positive")
    if not 0 < cfg.probe_timeout_ms < cfg.probe_interval_ms:
        raise ValueError("need 0 < probe_timeout_ms < probe_interval_ms")
    if not 0 < cfg.seed_retry_min_ms <= cfg.seed_retry_max_ms:
        raise ValueError("need 0 < seed_retry_min_ms <= seed_retry_max_ms")
    if min(cfg.suspicion_mult, cfg.suspicion_max_mult, cfg.retransmit_mult, cfg.awareness_max,
           cfg.push_pull_interval_ms, cfg.dead_reap_after_ms) < 1 or cfg.indirect_checks < 0:
        raise ValueError("SWIM multipliers and intervals must be positive")


class Membership:
    def __init__(self, me: MemberRecord, cfg: MembershipConfig, rng: random.Random, now_ms: int,
                 known: Iterable[MemberRecord] = ()) -> None:
        """``known``: records to start with, as alive members (a snapshot; the simulator
        starts big meshes this way).  They are not news: nothing is broadcast about them."""
        if me.state != ALIVE:
            raise ValueError(f"a node starts alive, got state {me.state!r}")
        if me.cluster != cfg.cluster:
            raise ValueError(f"record cluster {me.cluster!r} != config cluster {cfg.cluster!r}")
        _check_config(cfg)
        self._cfg = cfg
        self._rng = rng
        frame_max = cfg.frame_max_bytes
        self._packet_bytes = min(PACKET_BYTES, frame_max)
        self._spread_bytes = min(SPREAD_BYTES, frame_max)
        self._sync_bytes = min(SYNC_BYTES, frame_max)
        self._frame_bytes = frame_max
        self._me = me
        self._me_bytes = record_bytes_max(me)
        self._me_heard_ms = now_ms
        self._left = False
        self._leave_sends: list[SendTo] = []
        self._now_ms = now_ms
        self._members: dict[str, _Member] = {}
        self.changes = 0       # bumped when a member (this one too) comes, goes, or changes state or record
        self._by_addr: dict[tuple[str, int], str] = {}
        self._contacts: dict[tuple[str, int], _Contact] = {}
        self._undiscovered: dict[tuple[str, int], None] = {}   # contacts not from discovery, oldest first
        self._next_join_ms = now_ms
        self._events: deque[tuple[str, str, str]] = deque(maxlen=EVENTS_MAX)
        self._queue = _Queue()
        # Alive and suspect members, for O(1) random choice: a list and each id's index.
        self._live: list[str] = []
        self._live_at: dict[str, int] = {}
        self._order: list[str] = []          # the probe round-robin
        self._order_at = 0
        self._suspects: dict[str, None] = {}  # suspect members, in probe rotation order
        self._suspect_turn = False
        self._probe: _Probe | None = None
        self._relays: dict[int, _Relay] = {}
        self._seq = 0
        self._health = 0
        self._timers: list[tuple[int, int, int, Any]] = []
        self._timer_seq = 0
        self._ticks = 0
        self._next_probe_ms = now_ms
        self._next_gossip_ms = now_ms
        # Staggered, so nodes started together do not exchange state together.
        self._next_sync_ms = now_ms + rng.randrange(cfg.push_pull_interval_ms)
        self.stats: dict[str, int] = {
            "foreign_cluster": 0, "invalid": 0, "refutations": 0, "table_full": 0,
            "records_truncated": 0, "joins_sent": 0, "syncs_sent": 0, "probes": 0,
            "probes_failed": 0, "indirect_probes": 0, "relays": 0, "relays_refused": 0,
            "nacks_sent": 0, "misdirected": 0, "stale_acks": 0, "suspicions": 0,
            "deaths_declared": 0, "broadcasts_dropped": 0, "gossip_sent": 0, "corrections_sent": 0,
            "dead_claims_doubted": 0,
        }
        for r in known:
            if r.cluster == me.cluster and r.id != me.id and r.state == ALIVE and r.id not in self._members:
                self._learn(now_ms, r, news=False)
        self._check(full=True)

    # ---------------------------------------------------------------- steps

    def reconfigure(self, cfg: MembershipConfig) -> None:
        """Take new timing settings (cluster-wide settings changed); the next timers use them.

        The cluster name and frame size are fixed for a node's life and must not change."""
        if cfg.cluster != self._cfg.cluster or cfg.frame_max_bytes != self._cfg.frame_max_bytes:
            raise ValueError("cluster and frame_max_bytes cannot change while running")
        _check_config(cfg)
        self._cfg = cfg

    def tick(self, now_ms: int) -> list[SendTo]:
        self._advance(now_ms)
        self._ticks += 1
        sends: list[SendTo] = []
        if self._left:
            return sends
        self._run_timers(now_ms, sends)
        self._probe_step(now_ms, sends)
        if len(self._queue) and now_ms >= self._next_gossip_ms:
            # From now, not from the missed deadline: a late runner gets one round, not a burst.
            self._next_gossip_ms = now_ms + self._cfg.gossip_interval_ms
            self._gossip_round(sends)
        if now_ms >= self._next_sync_ms:
            self._next_sync_ms = now_ms + self._sync_interval_ms()
            self._push_pull(sends)
        # A failed probe may have confirmed a suspicion past its (shortened) deadline.
        self._run_timers(now_ms, sends)
        self._check(full=self._ticks % max(1, len(self._members) // FULL_CHECK_MEMBERS) == 0,
                    ticked=True, sends=sends)
        return sends

    def receive(self, now_ms: int, src: tuple[str, int], msg: Message) -> list[SendTo]:
        self._advance(now_ms)
        if self._left:
            return []
        sends: list[SendTo] = []
        touched: list[_Member] = []
        t = type(msg)
        if t is Ping:
            self._merge(now_ms, src, msg.members, msg.rumors, False, touched, sends)
            if msg.target == self._me.id:
                sends.append(self._with_piggyback(src, Ack, seq=msg.seq))
            else:
                self.stats["misdirected"] += 1   # another node at an address we had for it
        elif t is Ack:
            self._merge(now_ms, src, msg.members, msg.rumors, False, touched, sends)
            self._on_ack(now_ms, src, msg.seq, sends, touched)
        elif t is Nack:
            p = self._probe
            if p is not None and p.seq == msg.seq and p.indirect:
                p.nacks += 1
        elif t is PingReq:
            self._merge(now_ms, src, msg.members, msg.rumors, False, touched, sends)
            self._relay(now_ms, src, msg, sends)
        elif t is Spread:
            self._merge(now_ms, src, msg.members, msg.rumors, False, touched, sends)
        elif t is Sync or t is Gossip:   # Gossip: the heartbeat detector's push, read as full state
            rumors = msg.rumors if t is Sync else ()
            self._merge(now_ms, src, msg.members, rumors, True, touched, sends)
            if msg.want_reply:
                sends.extend(SendTo(src[0], src[1], m) for m in self._sync_messages(SYNC_MESSAGES_MAX, False, src))
        else:
            self.stats["invalid"] += 1
            return sends
        # After the merge: a message may introduce its sender.
        heard = self._heard_from(now_ms, src, sends, exchange=t is Sync or t is Gossip)
        if heard is not None:
            touched.append(heard)
        self._check(touched, sends=sends)
        return sends

    def discovered(self, now_ms: int, host: str, port: int) -> list[SendTo]:
        self._advance(now_ms)
        addr = (host, port)
        if self._left or addr == (self._me.host, self._me.gossip_port):
            return []
        c = self._contacts.get(addr)
        if c is None:
            c = _Contact(self._cfg.seed_retry_min_ms, now_ms, now_ms, discovered=True)
            self._add_contact(addr, c)
        else:
            c.seen_ms = now_ms
            c.discovered = True
            self._undiscovered.pop(addr, None)
        sends: list[SendTo] = []
        self._poll_contact(now_ms, addr, c, sends)
        self._check(sends=sends)
        return sends

    def update_self(self, now_ms: int, **fields: object) -> None:
        self._advance(now_ms)
        bad = _PROTOCOL_FIELDS.intersection(fields)
        if bad:
            raise ValueError(f"membership owns these record fields: {sorted(bad)}")
        if self._left:
            return  # a left record is final; nobody would take a change to it anyway
        self._set_me(dataclasses.replace(self._me, **fields, heartbeat=self._me.heartbeat + 1))
        self._check()

    def leave(self, now_ms: int) -> list[SendTo]:
        """Graceful stop: a left record at a higher incarnation, sent to every live member.

        Idempotent: a second call returns the same sends (the runner repeats them to
        survive a lost datagram).  The caller should persist ``me().incarnation`` so the
        next start uses a higher one.
        """
        self._advance(now_ms)
        if not self._left:
            self._left = True
            self._set_me(dataclasses.replace(self._me, state=LEFT,
                                             incarnation=self._me.incarnation + 1,
                                             heartbeat=self._me.heartbeat + 1))
            msg = Spread(members=(self._me,))
            self._leave_sends = [SendTo(self._members[i].record.host, self._members[i].record.gossip_port, msg)
                                 for i in self._live]
            self._probe = None
            self._check(sends=self._leave_sends)
        return list(self._leave_sends)

    # ---------------------------------------------------------------- queries

    def me(self) -> MemberRecord:
        return self._me

    def members(self) -> list[MemberView]:
        views = [MemberView(m.record, m.state, m.last_heard_ms) for m in self._members.values()]
        views.append(self._my_view())
        views.sort(key=lambda v: v.record.id)
        return views

    def get(self, node_id: str) -> MemberView | None:
        if node_id == self._me.id:
            return self._my_view()
        m = self._members.get(node_id)
        return None if m is None else MemberView(m.record, m.state, m.last_heard_ms)

    def alive_peers(self) -> list[MemberView]:
        views = [MemberView(m.record, m.state, m.last_heard_ms)
                 for m in self._members.values() if m.state == ALIVE]
        views.sort(key=lambda v: v.record.id)
        return views

    def next_deadline_ms(self) -> int:
        """When ``tick`` has work: a probe step, a gossip round, a push-pull or a timer.

        Never later than the true deadline; it may be earlier (a timer that no longer
        applies), and a tick then finds nothing to do and moves on.
        """
        if self._left:
            return self._now_ms + self._cfg.dead_reap_after_ms
        t = min(self._next_probe_ms, self._next_sync_ms)
        p = self._probe
        if p is not None and not p.acked:
            t = min(t, p.end_ms if p.indirect else p.timeout_ms)
        if len(self._queue):
            t = min(t, self._next_gossip_ms)
        if self._timers:
            t = min(t, self._timers[0][0])
        return t

    def events(self) -> list[tuple[str, str, str]]:
        """Drain ``(node_id, old_state, new_state)``; ``""`` means not in the table."""
        out = list(self._events)
        self._events.clear()
        return out

    def health(self) -> int:
        """Lifeguard's local health score: 0 is healthy; the probe interval is x(score+1)."""
        return self._health

    def check(self) -> None:
        """Every invariant, over the whole table (the simulator calls this between phases)."""
        self._check(full=True)

    # ---------------------------------------------------------------- time and timers

    def _advance(self, now_ms: int) -> None:
        if now_ms < self._now_ms:
            raise ValueError(f"time went back: {now_ms} < {self._now_ms}")
        self._now_ms = now_ms

    def _timer(self, at_ms: int, kind: int, key: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (at_ms, self._timer_seq, kind, key))

    def _run_timers(self, now_ms: int, sends: list[SendTo]) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now_ms:
            at_ms, _, kind, key = heapq.heappop(timers)
            if kind == _T_SUSPICION:
                m = self._members.get(key)
                # (A confirmation moves the deadline earlier with a new entry; the old one is
                # then stale, as is any entry of a suspicion that ended.)
                if m is not None and m.suspicion is not None and m.suspicion.deadline_ms <= now_ms:
                    self.stats["deaths_declared"] += 1
                    self._set_dead(now_ms, m, m.inc, self._me.id)
            elif kind == _T_REAP:
                m = self._members.get(key)
                if (m is not None and m.state not in _LIVE
                        and m.changed_ms + self._cfg.dead_reap_after_ms <= now_ms):
                    self._drop(m)
            elif kind == _T_RELAY:
                relay = self._relays.get(key)
                if relay is not None and relay.deadline_ms <= now_ms:
                    del self._relays[key]
                    self.stats["nacks_sent"] += 1
                    sends.append(SendTo(relay.requester[0], relay.requester[1], Nack(relay.seq)))
            else:
                c = self._contacts.get(key)
                if c is not None and c.next_ms is not None and c.next_ms <= now_ms:
                    self._poll_contact(now_ms, key, c, sends)

    # ---------------------------------------------------------------- probing

    def _probe_interval_ms(self) -> int:
        return self._cfg.probe_interval_ms * (self._health + 1)

    def _adjust_health(self, delta: int) -> None:
        self._health = min(max(self._health + delta, 0), self._cfg.awareness_max - 1)

    def _probe_step(self, now_ms: int, sends: list[SendTo]) -> None:
        p = self._probe
        if p is not None and not p.acked:
            if not p.indirect and now_ms >= p.timeout_ms:
                self._indirect(p, sends)
            if now_ms >= p.end_ms:
                self._probe_failed(now_ms, p)
        if p is not None and (p.acked or now_ms >= p.end_ms):
            self._probe = None
        if self._probe is None and now_ms >= self._next_probe_ms:
            interval_ms = self._probe_interval_ms()
            self._next_probe_ms = now_ms + interval_ms
            target = self._next_target()
            if target is None:
                return
            self._seq += 1
            r = target.record
            p = _Probe(self._seq, r.id, (r.host, r.gossip_port), now_ms + self._cfg.probe_timeout_ms,
                       now_ms + interval_ms)
            self._probe = p
            self.stats["probes"] += 1
            sends.append(self._ping(p, target))

    def _next_target(self) -> _Member | None:
        order, members = self._order, self._members
        # Every other probe goes to a suspect, if any (oldest suspicion first, rotating): it
        # carries the suspicion, so a live suspect refutes within a few intervals instead of
        # waiting for its turn in a cycle of N (which after a healed partition, with the
        # health score up, can outlast the suspicion).
        self._suspect_turn = not self._suspect_turn
        if self._suspect_turn and self._suspects:
            rid = next(iter(self._suspects))
            del self._suspects[rid]
            self._suspects[rid] = None
            return members[rid]
        for _ in range(2):
            while self._order_at < len(order):
                m = members.get(order[self._order_at])
                self._order_at += 1
                if m is not None and m.state in _LIVE:
                    return m
            # A new cycle: every live member once, in a fresh random order (SWIM's round robin
            # bounds the time to first probe of a dead member to one cycle).
            order = self._order = list(self._live)
            self._rng.shuffle(order)
            self._order_at = 0
        return None

    def _ping(self, p: _Probe, target: _Member) -> SendTo:
        first: list[Rumor] = []
        if target.state == SUSPECT:   # tell the suspect, so it refutes at once (Lifeguard)
            first.append(Rumor(target.record.id, target.inc, SUSPECT, target.by))
        return self._with_piggyback(p.addr, Ping, first, seq=p.seq, target=p.target)

    def _indirect(self, p: _Probe, sends: list[SendTo]) -> None:
        p.indirect = True
        target = self._members.get(p.target)
        if target is None or target.state not in _LIVE:
            return
        k = self._cfg.indirect_checks
        helpers: list[_Member] = []
        if k:
            pool = self._rng.sample(self._live, min(len(self._live), k + 2))
            for i in pool:
                m = self._members[i]
                if i != p.target and m.state == ALIVE and len(helpers) < k:
                    helpers.append(m)
        for h in helpers:
            r = h.record
            sends.append(self._with_piggyback((r.host, r.gossip_port), PingReq, seq=p.seq,
                                              target=p.target, host=p.addr[0], port=p.addr[1]))
        p.expected_nacks = len(helpers)
        self.stats["indirect_probes"] += 1
        sends.append(self._ping(p, target))

    def _probe_failed(self, now_ms: int, p: _Probe) -> None:
        m = self._members.get(p.target)
        if m is None or m.state not in _LIVE:
            return   # it left, or others found it dead meanwhile: nothing to learn
        self.stats["probes_failed"] += 1
        # No ack: either the target or we are in trouble.  Relays that did not even nack
        # say it is us (Lifeguard).
        if p.expected_nacks:
            self._adjust_health(p.expected_nacks - min(p.nacks, p.expected_nacks))
        else:
            self._adjust_health(1)
        self._accuse(now_ms, m, m.inc, SUSPECT, self._me.id)

    def _on_ack(self, now_ms: int, src: tuple[str, int], seq: int, sends: list[SendTo],
                touched: list[_Member]) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            if not p.acked:
                p.acked = True
                self._adjust_health(-1)
                m = self._members.get(p.target)
                if m is not None and m.state in _LIVE:
                    m.last_heard_ms = m.contact_ms = now_ms
                    touched.append(m)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            m = self._members.get(relay.target)
            if m is not None and m.state in _LIVE:
                m.last_heard_ms = m.contact_ms = now_ms
            sends.append(self._with_piggyback(relay.requester, Ack, seq=relay.seq))
            return
        self.stats["stale_acks"] += 1

    def _relay(self, now_ms: int, src: tuple[str, int], req: PingReq, sends: list[SendTo]) -> None:
        if len(self._relays) >= RELAYS_MAX:
            self.stats["relays_refused"] += 1
            return
        self._seq += 1
        deadline_ms = now_ms + self._cfg.probe_timeout_ms
        self._relays[self._seq] = _Relay(src, req.seq, req.target, deadline_ms)
        self._timer(deadline_ms, _T_RELAY, self._seq)
        self.stats["relays"] += 1
        sends.append(self._with_piggyback((req.host, req.port), Ping, seq=self._seq, target=req.target))

    # ---------------------------------------------------------------- dissemination

    def _retransmit_limit(self) -> int:
        return self._cfg.retransmit_mult * max(1, math.ceil(math.log10(len(self._live) + 2)))

    def _with_piggyback(self, addr: tuple[str, int], cls: type, first: Sequence[Rumor] = (),
                        **fields: Any) -> SendTo:
        """``cls(**fields)`` with as much queued news as fits one packet."""
        room = self._packet_bytes - FRAME_FIXED_BYTES - _str_bytes(self._me.id) - _str_bytes(self._me.cluster)
        for key in ("target", "host"):
            if key in fields:
                room -= _str_bytes(fields[key])
        room -= sum(rumor_bytes_max(u) for u in first)
        records: list[MemberRecord] = []
        rumors = list(first)
        if len(self._queue) and room > 0:
            records, more, _ = self._queue.take(room, self._retransmit_limit())
            rumors.extend(more)
        return SendTo(addr[0], addr[1], cls(members=tuple(records), rumors=tuple(rumors), **fields))

    def _gossip_round(self, sends: list[SendTo]) -> None:
        live = self._live
        if not live:
            return
        room = self._spread_bytes - FRAME_FIXED_BYTES - _str_bytes(self._me.id) - _str_bytes(self._me.cluster)
        alone = self._frame_bytes - FRAME_FIXED_BYTES - _str_bytes(self._me.id) - _str_bytes(self._me.cluster)
        limit = self._retransmit_limit()
        for i in self._rng.sample(live, min(self._cfg.gossip_fanout, len(live))):
            if not len(self._queue):
                break
            records, rumors, _ = self._queue.take(room, limit, alone)
            if records or rumors:
                r = self._members[i].record
                self.stats["gossip_sent"] += 1
                sends.append(SendTo(r.host, r.gossip_port, Spread(tuple(records), tuple(rumors))))

    def _broadcast_record(self, r: MemberRecord, size_bytes: int | None = None) -> None:
        self._queue.add((r.id, False), r, record_bytes_max(r) if size_bytes is None else size_bytes)

    def _broadcast_rumor(self, u: Rumor) -> None:
        self._queue.add((u.id, True), u, rumor_bytes_max(u))

    def _sync_interval_ms(self) -> int:
        n = len(self._live) + 1
        scale = 1 if n <= 32 else 1 + math.ceil(math.log2(n) - 5)   # memberlist's pushPullScale
        return self._cfg.push_pull_interval_ms * scale

    def _push_pull(self, sends: list[SendTo]) -> None:
        if not self._live:
            return
        m = self._members[self._rng.choice(self._live)]
        self.stats["syncs_sent"] += 1
        r = m.record
        addr = (r.host, r.gossip_port)
        sends.extend(SendTo(r.host, r.gossip_port, msg) for msg in self._sync_messages(SYNC_MESSAGES_MAX, True, addr))

    def _sync_messages(self, messages_max: int, want_reply: bool, to: tuple[str, int]) -> list[Sync]:
        """My table in frames, each led by my own record; only the first asks for a reply
        (one exchange, not one per frame).

        Records of alive, suspect and left members only: a dead member's record would make
        a node that never heard of it believe it alive.  No claims about third parties
        (they are time-bound, and each node judges by its own probes; a healing minority
        would otherwise make the majority suspect itself wholesale); only the one about the
        recipient, so that it refutes if it is alive.
        """
        me = self._me
        head = self._sync_bytes - FRAME_FIXED_BYTES - _str_bytes(me.id) - _str_bytes(me.cluster)
        room = head - self._me_bytes
        alone = self._frame_bytes - FRAME_FIXED_BYTES - _str_bytes(me.id) - _str_bytes(me.cluster) - self._me_bytes
        out: list[Sync] = []
        records: list[MemberRecord] = [me]
        rumors: list[Rumor] = []
        used = 0
        rid = self._by_addr.get(to)
        if rid is not None and (m := self._members[rid]).state in (SUSPECT, DEAD):
            u = Rumor(rid, m.inc, m.state, m.by)
            rumors.append(u)
            used += rumor_bytes_max(u)
        members = list(self._members.values())
        if members and (messages_max < SYNC_MESSAGES_MAX or len(members) > 20 * messages_max):
            # Too many to be sure they fit: start somewhere else each time.
            at = self._rng.randrange(len(members))
            members = members[at:] + members[:at]
        for m in members:
            if m.state == DEAD:
                continue
            item = m.record
            size = record_bytes_max(item)
            if used + size > room:
                if size > room:
                    if size <= alone:   # a record too big for a full-state frame goes alone
                        out.append(Sync((me, item), (), want_reply and not out))
                        if len(out) >= messages_max:
                            return out
                    continue
                out.append(Sync(tuple(records), tuple(rumors), want_reply and not out))
                if len(out) >= messages_max:
                    return out
                records, rumors, used = [me], [], 0
            records.append(item)
            used += size
        out.append(Sync(tuple(records), tuple(rumors), want_reply and not out))
        return out[:messages_max]

    # ---------------------------------------------------------------- merging news

    def _heard_from(self, now_ms: int, src: tuple[str, int], sends: list[SendTo], exchange: bool) -> _Member | None:
        rid = self._by_addr.get(src)
        if rid is None:
            # A member we do not know (the key vouches for it) knows us: the rumor of its
            # join died out before reaching us.  Exchange state with it, as with a contact
            # (unless this is such an exchange already).
            if not exchange and src not in self._contacts and src != (self._me.host, self._me.gossip_port):
                self._add_contact(src, _Contact(self._cfg.seed_retry_min_ms, now_ms, now_ms, discovered=False))
                self._poll_contact(now_ms, src, self._contacts[src], sends)
            return None
        m = self._members[rid]
        if m.state in _LIVE:
            m.last_heard_ms = m.contact_ms = now_ms
            return m
        if m.state == DEAD and not exchange:
            # A dead member talks to us: it does not know.  Tell it (one small datagram per
            # datagram it sends; a full-state exchange tells it in the reply), so it refutes.
            u = Rumor(rid, m.inc, DEAD, m.by)
            sends.append(SendTo(src[0], src[1], Spread((), (u,))))
        return None

    def _merge(self, now_ms: int, src: tuple[str, int], records: tuple[MemberRecord, ...],
               rumors: tuple[Rumor, ...], full_state: bool, touched: list[_Member], sends: list[SendTo]) -> None:
        if len(records) > RECORDS_MAX or len(rumors) > RUMORS_MAX:
            self.stats["records_truncated"] += 1
            records, rumors = records[:RECORDS_MAX], rumors[:RUMORS_MAX]
        members, me, cluster = self._members, self._me, self._me.cluster
        # Records the sender has an older life of (or makes claims about one): it gets ours
        # back, so a stale suspicion ends now rather than by timing out into a false death.
        stale: dict[str, MemberRecord] = {}
        for r in records:
            known = members.get(r.id)
            if known is not None and r is known.record:   # the very same object (the simulator's case)
                continue
            if r.cluster != cluster:
                self.stats["foreign_cluster"] += 1
                continue
            if r.state != ALIVE and r.state != LEFT:
                self.stats["invalid"] += 1
                continue
            if known is None:
                if r.id == me.id:
                    if r.incarnation < self._me.incarnation:
                        stale[r.id] = self._me
                    else:
                        self._refute_record(r)
                elif (m := self._learn(now_ms, r, news=True)) is not None:
                    touched.append(m)
                continue
            old = known.record
            if (r.incarnation, r.state == LEFT, r.heartbeat) > (old.incarnation, old.state == LEFT, old.heartbeat):
                self._take(now_ms, known, r)
                touched.append(known)
            elif r.incarnation < old.incarnation and known.state != DEAD:
                stale[r.id] = old
        for u in rumors:
            if u.state != SUSPECT and u.state != DEAD:
                self.stats["invalid"] += 1
                continue
            state = SUSPECT if full_state else u.state   # a dead claim in full state may be stale
            if state == DEAD and u.id in members:
                m = members[u.id]
                if m.state in _LIVE and now_ms - m.contact_ms < self._cfg.probe_interval_ms:
                    # It spoke to me within a probe interval; a true death needs an interval
                    # and a suspicion's min_ms of silence toward its accuser.  Doubt the claim.
                    state = SUSPECT
                    self.stats["dead_claims_doubted"] += 1
            if u.id == self._me.id:
                if u.incarnation >= self._me.incarnation:
                    self._refute(u.incarnation)
                    self._adjust_health(1)   # being suspected says my messages are late
                elif not self._left:
                    stale[u.id] = self._me
                continue
            m = members.get(u.id)
            if m is None:
                continue
            if self._accuse(now_ms, m, u.incarnation, state, u.by):
                touched.append(m)
            elif u.incarnation < m.record.incarnation and m.state != DEAD:
                stale[u.id] = m.record
        if stale:
            self._correct(src, stale, sends)

    def _correct(self, src: tuple[str, int], stale: dict[str, MemberRecord], sends: list[SendTo]) -> None:
        room = self._spread_bytes - FRAME_FIXED_BYTES - _str_bytes(self._me.id) - _str_bytes(self._me.cluster)
        out: list[MemberRecord] = []
        for r in stale.values():
            size = record_bytes_max(r)
            if size <= room:
                out.append(r)
                room -= size
        if out:
            self.stats["corrections_sent"] += 1
            sends.append(SendTo(src[0], src[1], Spread(tuple(out))))

    def _accuse(self, now_ms: int, m: _Member, inc: int, state: str, by: str) -> bool:
        """Apply a suspect or dead claim; True when it changed anything."""
        if m.state == LEFT or inc < m.inc:
            return False
        if state == DEAD:
            if m.state == DEAD:
                return False
            self._set_dead(now_ms, m, inc, by)
            return True
        if m.state == DEAD:
            return False
        if m.state == SUSPECT and inc == m.inc:
            assert m.suspicion is not None
            if not m.suspicion.confirm(by):
                return False
            self._timer(m.suspicion.deadline_ms, _T_SUSPICION, m.record.id)
            self._broadcast_rumor(Rumor(m.record.id, inc, SUSPECT, by))
            return True
        # Alive at inc or older, or suspect at an older incarnation: a new suspicion.
        self.stats["suspicions"] += 1
        min_ms, max_ms, k = suspicion_timeouts(self._cfg, len(self._live) + 1)
        s = _Suspicion(now_ms, min_ms, max_ms, k, by, {by}, now_ms + (max_ms if k >= 1 else min_ms))
        m.suspicion = s
        m.inc = inc
        m.by = by
        self._set_state(now_ms, m, SUSPECT)
        self._timer(s.deadline_ms, _T_SUSPICION, m.record.id)
        self._broadcast_rumor(Rumor(m.record.id, inc, SUSPECT, by))
        return True

    def _set_dead(self, now_ms: int, m: _Member, inc: int, by: str) -> None:
        m.inc = inc
        m.by = by
        m.suspicion = None
        self._set_state(now_ms, m, DEAD)
        self._broadcast_rumor(Rumor(m.record.id, inc, DEAD, by))
        self._queue.discard((m.record.id, False))
        self._contact_dead(now_ms, m.record)

    def _refute(self, inc: int) -> None:
        """Someone says I am suspect, dead or left at ``inc``: outbid it."""
        me = self._me
        if self._left:
            return
        self._set_me(dataclasses.replace(me, incarnation=max(me.incarnation, inc) + 1,
                                         heartbeat=me.heartbeat + 1, state=ALIVE))
        self.stats["refutations"] += 1

    def _refute_record(self, r: MemberRecord) -> None:
        """A record of mine newer than mine (a previous life, a stale store) or a leave of it."""
        me = self._me
        if version_key(r) > version_key(me) or (r.state == LEFT and r.incarnation >= me.incarnation):
            self._refute(r.incarnation)

    def _learn(self, now_ms: int, r: MemberRecord, news: bool) -> _Member | None:
        if len(self._members) >= MEMBERS_MAX:
            gone = [m for m in self._members.values() if m.state not in _LIVE]
            if not gone:
                self.stats["table_full"] += 1
                return None
            self._drop(min(gone, key=lambda m: m.changed_ms))
        state = LEFT if r.state == LEFT else ALIVE
        m = _Member(r, state, r.incarnation, "", now_ms, now_ms)
        self._members[r.id] = m
        self.changes += 1
        self._by_addr[(r.host, r.gossip_port)] = r.id
        self._events.append((r.id, NONE, state))
        if state == ALIVE:
            self._live_add(r.id, probe_soon=news)
        else:
            self._timer(now_ms + self._cfg.dead_reap_after_ms, _T_REAP, r.id)
        if news:
            self._broadcast_record(r)
        return m

    def _take(self, now_ms: int, m: _Member, r: MemberRecord) -> None:
        old = m.record
        m.record = r
        m.last_heard_ms = now_ms
        self.changes += 1
        if r.host != old.host or r.gossip_port != old.gossip_port:
            old_addr = (old.host, old.gossip_port)
            if self._by_addr.get(old_addr) == r.id:
                del self._by_addr[old_addr]
            self._by_addr[(r.host, r.gossip_port)] = r.id
        if r.state == LEFT:
            m.inc = r.incarnation
            m.by = ""
            m.suspicion = None
            self._set_state(now_ms, m, LEFT)
            self._queue.discard((r.id, True))
        elif r.incarnation > m.inc:
            m.inc = r.incarnation
            m.by = ""
            m.suspicion = None
            self._set_state(now_ms, m, ALIVE)
            self._queue.discard((r.id, True))   # the rumors it refutes are stale now
        if m.state != DEAD:
            # (A dead member's record is not spread: it could make a node that never knew
            # the member believe it alive.  It refutes, and that record spreads.)
            self._broadcast_record(r)

    def _set_state(self, now_ms: int, m: _Member, state: str) -> None:
        if state == m.state:
            return
        rid = m.record.id
        self.changes += 1
        self._events.append((rid, m.state, state))
        was_live = m.state in _LIVE
        if m.state == SUSPECT:
            del self._suspects[rid]
        elif state == SUSPECT:
            self._suspects[rid] = None
        m.state = state
        m.changed_ms = now_ms
        if state in _LIVE:
            if not was_live:
                self._live_add(rid)
                c = self._contacts.get((m.record.host, m.record.gossip_port))
                if c is not None:
                    c.next_ms = None          # parked: gossip reaches it now
                    c.backoff_ms = self._cfg.seed_retry_min_ms
        else:
            if was_live:
                self._live_remove(rid)
            self._timer(now_ms + self._cfg.dead_reap_after_ms, _T_REAP, rid)
            self._unpark(now_ms, (m.record.host, m.record.gossip_port))

    def _unpark(self, now_ms: int, addr: tuple[str, int]) -> None:
        """The member at ``addr`` is gone: its contact, if any, is tried again."""
        c = self._contacts.get(addr)
        if c is not None and c.next_ms is None:
            c.next_ms = now_ms
            self._timer(now_ms, _T_CONTACT, addr)

    def _live_add(self, rid: str, probe_soon: bool = True) -> None:
        self._live_at[rid] = len(self._live)
        self._live.append(rid)
        if probe_soon:
            # New members join this probe cycle at a random place (memberlist does the same).
            self._order.insert(self._order_at + self._rng.randrange(len(self._order) - self._order_at + 1), rid)

    def _live_remove(self, rid: str) -> None:
        at = self._live_at.pop(rid)
        last = self._live.pop()
        if last != rid:
            self._live[at] = last
            self._live_at[last] = at

    def _drop(self, m: _Member) -> None:
        rid = m.record.id
        del self._members[rid]
        self.changes += 1
        if m.state in _LIVE:
            self._live_remove(rid)
        self._queue.discard((rid, False))
        self._queue.discard((rid, True))
        addr = (m.record.host, m.record.gossip_port)
        if self._by_addr.get(addr) == rid:
            del self._by_addr[addr]
            c = self._contacts.get(addr)
            if c is not None and not c.discovered:
                del self._contacts[addr]
                del self._undiscovered[addr]
            else:
                self._unpark(self._now_ms, addr)
        self._events.append((rid, m.state, NONE))

    # ---------------------------------------------------------------- me

    def _my_view(self) -> MemberView:
        return MemberView(self._me, self._me.state, self._me_heard_ms)

    def _set_me(self, me: MemberRecord) -> None:
        if not _same_size(me, self._me):
            self._me_bytes = record_bytes_max(me)
        self._me = me
        self.changes += 1
        self._me_heard_ms = self._now_ms
        if not self._left:
            self._broadcast_record(me, self._me_bytes)

    # ---------------------------------------------------------------- contacts

    def _contact_dead(self, now_ms: int, r: MemberRecord) -> None:
        addr = (r.host, r.gossip_port)
        if addr != (self._me.host, self._me.gossip_port) and addr not in self._contacts:
            self._add_contact(addr, _Contact(self._cfg.seed_retry_min_ms, now_ms, now_ms, discovered=False))
            self._timer(now_ms, _T_CONTACT, addr)

    def _add_contact(self, addr: tuple[str, int], c: _Contact) -> None:
        if len(self._contacts) >= CONTACTS_MAX:
            # Evict the oldest dead member's (or unknown sender's) address, and a discovered
            # one, least recently seen, only when there is none.
            if self._undiscovered:
                victim = next(iter(self._undiscovered))
                del self._undiscovered[victim]
            else:
                victim = min(self._contacts, key=lambda a: self._contacts[a].seen_ms)
            del self._contacts[victim]
        self._contacts[addr] = c
        if not c.discovered:
            self._undiscovered[addr] = None

    def _is_live_addr(self, addr: tuple[str, int]) -> bool:
        rid = self._by_addr.get(addr)
        return rid is not None and self._members[rid].state in _LIVE

    def _poll_contact(self, now_ms: int, addr: tuple[str, int], c: _Contact, sends: list[SendTo]) -> None:
        if self._is_live_addr(addr):
            # Parked: ordinary gossip reaches this address.  Reset the backoff so that a
            # later loss of the member is retried promptly.
            c.next_ms = None
            c.backoff_ms = self._cfg.seed_retry_min_ms
            return
        if c.next_ms is None:
            c.next_ms = now_ms
        if c.next_ms > now_ms:
            return
        if now_ms < self._next_join_ms:
            # One join per gossip interval, whatever the number of contacts due (a partition
            # makes hundreds of members dead at once); this one waits its backoff again.
            c.next_ms = max(self._next_join_ms, now_ms + c.backoff_ms)
            self._timer(c.next_ms, _T_CONTACT, addr)
            return
        self._next_join_ms = now_ms + self._cfg.gossip_interval_ms
        c.next_ms = now_ms + c.backoff_ms
        c.backoff_ms = min(c.backoff_ms * 2, self._cfg.seed_retry_max_ms)
        c.attempts += 1
        self._timer(c.next_ms, _T_CONTACT, addr)
        self.stats["joins_sent"] += 1
        for msg in self._sync_messages(JOIN_MESSAGES_MAX, True, addr):
            sends.append(SendTo(addr[0], addr[1], msg))

    # ---------------------------------------------------------------- invariants

    def _check(self, touched: Iterable[_Member] = (), full: bool = False, ticked: bool = False,
               sends: Iterable[SendTo] = ()) -> None:
        """The invariants of the module docstring: the touched members, or all of them."""
        me, cfg, now = self._me, self._cfg, self._now_ms
        assert me.id not in self._members, "a record about me in the table"
        assert me.state == (LEFT if self._left else ALIVE), me.state
        assert len(self._members) <= MEMBERS_MAX and len(self._contacts) <= CONTACTS_MAX
        assert len(self._undiscovered) <= len(self._contacts)
        assert len(self._queue) <= BROADCASTS_MAX and len(self._relays) <= RELAYS_MAX
        assert 0 <= self._health < cfg.awareness_max, self._health
        assert len(self._live) == len(self._live_at)
        table = self._members
        for s in (sends if full else ()):
            t = type(s.msg)
            limit = self._sync_bytes if t is Sync else self._spread_bytes if t is Spread else self._packet_bytes
            size = message_bytes_max(s.msg, me.id, me.cluster)
            parts = len(getattr(s.msg, "members", ())) + len(getattr(s.msg, "rumors", ()))
            assert size <= limit or (parts <= 2 and size <= self._frame_bytes), (size, limit, type(s.msg))
        for m in (table.values() if full else touched):
            r = m.record
            assert table.get(r.id) is m and r.cluster == me.cluster and m.state in MEMBER_STATES, m
            assert m.inc >= r.incarnation and m.last_heard_ms <= now and m.changed_ms <= now, m
            assert (m.state == SUSPECT) == (m.suspicion is not None), m
            assert (m.state == LEFT) == (r.state == LEFT), m
            assert (m.state in _LIVE) == (r.id in self._live_at), m
            if m.suspicion is not None:
                assert self._timers and self._timers[0][0] <= m.suspicion.deadline_ms, m
                assert not ticked or m.suspicion.deadline_ms > now, m
            if m.state in (DEAD, LEFT):
                assert not ticked or now < m.changed_ms + cfg.dead_reap_after_ms, m
        if full:
            for addr, rid in self._by_addr.items():
                m = table.get(rid)
                assert m is not None and (m.record.host, m.record.gossip_port) == addr, (addr, rid)
            for rid, at in self._live_at.items():
                assert self._live[at] == rid and table[rid].state in _LIVE, rid
            for rid in self._suspects:
                assert table[rid].state == SUSPECT, rid
            assert len(self._suspects) == sum(m.state == SUSPECT for m in table.values())
            self._queue.check()
        if ticked:
            assert self.next_deadline_ms() > now, "the runner would spin"
