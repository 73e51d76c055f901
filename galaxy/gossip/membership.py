"""Gossip membership: who is in the mesh and whether they are alive.

Theory of operation
-------------------
A gossip-style heartbeat failure detector (van Renesse, Minsky and Hayden, 1998).  This is
the first, simple layer; full SWIM (probes, indirect probes, Lifeguard) replaces the failure
detection later behind the same public interface.

*Records.*  Every node owns one ``MemberRecord``.  Only the node itself writes it; everyone
else passes it on unchanged.  Versions of a record are ordered by the key
``(incarnation, state == "left", heartbeat)``: the heartbeat is bumped every gossip round,
the incarnation by a restart (the caller brings a higher one from its store) or by a
refutation.  Putting ``left`` before the heartbeat means that a leave at incarnation *i*
beats every alive record of incarnation *i*, so a stale alive record never resurrects a
member that left; a restart comes with a higher incarnation and is alive again.

*Rounds.*  Every ``gossip_interval_ms`` a node bumps its heartbeat and pushes its table
(alive, suspect and recently left members) to ``gossip_fanout`` random alive/suspect
peers.  The first record of every ``Gossip`` this module sends is the sender's own
(receivers rely on it: see refutation).  A ``Gossip`` fits one frame of ``frame_max_bytes``
by ``record_bytes_max()``, an upper bound of a record's encoded size (~0.4 KB typical, up
to ~13 KB with many labels), so a large table goes out as several frames, at most
``ROUND_MESSAGES_PER_TARGET_MAX`` per target.  Each entry must reach each node about
``fanout`` times a round, or heartbeats lag and live members get suspected (measured in
the simulator: a 200-node mesh flaps at one copy a round and is steady at three).  Records are
packed least sent first, so when the table outgrows the frames a round allows, the fresh
versions go first and the rest rotate through the rounds.

*Merge.*  A received record about another node of our cluster replaces the known one when
its key is greater; that is news, so the member's ``last_heard_ms`` becomes now and its
local state becomes alive (or left, when the record says so).  Records of another cluster
are ignored.

*Local judgement.*  Silence is measured from ``last_heard_ms``: an alive member becomes
suspect after ``suspect_after_ms`` and dead after ``dead_after_ms`` of silence (both
measured from the last news, so ``dead_after_ms`` is the total silence before death).
Dead and left members are dropped ``dead_reap_after_ms`` after they entered that state.
Suspect and dead are local judgements: the gossiped record keeps the origin's own state.
Everyone sees the same heartbeats, so everyone judges within a few rounds of each other.
Dead records are never gossiped (they carry no news and would make a node that never
heard of the member believe it alive); left records are gossiped for ``dead_after_ms``
after the leave so that a peer that missed the leave still learns of it.

*Refutation.*  A record about me with a greater key than mine (my previous life with a
stale store), or one that calls me suspect, dead or left at my incarnation or later while
I run, makes me take an incarnation above it.  A receiver that knows a newer version of a
sender's own record (``members[0]``) sends it back, so a restarted node with a stale
store learns the version it has to beat.  A receiver also sends back a newer incarnation,
or a leave, of a third party that the sender still gossips in an older version.

*Contacts.*  Addresses handed to ``discovered()`` (seeds, mDNS, beacons) and the addresses
of members judged dead are contacts.  A contact whose address is not that of an alive or
suspect member is sent a join (``want_reply=True``: the receiver pushes its table back at
once) with exponential backoff from ``seed_retry_min_ms`` to ``seed_retry_max_ms``.  The
brief asked for contacts only while no peer is known; contacting unknown addresses also
while connected is what merges two groups that formed before they saw each other, and
retrying dead members is what heals a partition.  A contact made for a dead member goes
when the member is reaped; a discovered one stays (bounded, least recently seen evicted),
because it is how an isolated node finds its way back.

Invariants (``_check()`` after every step)
------------------------------------------
1. No record about me in the table; every record's id is its key and its cluster is mine.
2. The table holds at most ``MEMBERS_MAX`` members, contacts at most ``CONTACTS_MAX``,
   pending events at most ``EVENTS_MAX``; no message carries more than
   ``GOSSIP_RECORDS_MAX`` records, nor more bytes than a frame holds.
3. A member's key never decreases (the merge only takes greater keys); the cached key is
   ``version_key(record)``.
4. After ``tick(now)``: an alive member was heard within ``suspect_after_ms``, a suspect
   one within ``dead_after_ms``, and ``next_deadline_ms() > now`` (the runner never spins).
   Always: ``next_deadline_ms()`` is no later than any member's or contact's deadline.
5. My own state is alive until ``leave()``, then left; my key only grows.
6. The address index maps each address to a member that has that address.

Invariants 3 (across steps) and the frame bound are checked by the tests' simulated
network, the rest by ``_check()``: per touched member after a receive, in full after a
tick (a tick is O(N) anyway).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from galaxy.messages import ALIVE, DEAD, LEFT, MEMBER_STATES, SUSPECT, Gossip, MemberRecord

if TYPE_CHECKING:  # the core takes an injected rng and never imports random at run time
    import random

# A gossip-heartbeat detector sends O(N) records per round, so it stops paying off at a
# few thousand members (SWIM takes over there); 4096 records of ~0.5 KB is ~2 MB of table.
MEMBERS_MAX = 4096
# A Gossip travels in one UDP datagram of at most frame_max_bytes.  Bytes are what bind:
# a record encodes to at least ~0.33 KB (a typical one ~0.4 KB, one with many labels up to
# ~13 KB), so a 65 KB frame never holds more than ~200; this bounds the receive loop without
# truncating an honest message.
GOSSIP_RECORDS_MAX = 256
# A heartbeat detector needs every entry refreshed about fanout times a round, so a round
# sends the whole table to each target, in up to this many frames: ~600 typical members.
# A larger table is spread over rounds, least sent first, and detection slows (SWIM's job).
ROUND_MESSAGES_PER_TARGET_MAX = 4
# Upper bound of a record's encoding without its strings' bytes: field names, headers,
# numbers at their widest (324 measured with wire.py's msgpack maps, plus array16/map16).
RECORD_FIXED_BYTES = 336
# Upper bound of a frame's bytes around the records and the sender and cluster strings:
# header, nonce, AEAD tag, envelope, the Gossip body's keys (74 measured, with margin).
FRAME_FIXED_BYTES = 96
# A join reply pushes at most this many frames (~1 300 typical records); the rest of a
# larger table follows by ordinary gossip.  It bounds what one join request makes us send.
REPLY_MESSAGES_MAX = 8
# Seeds, discovery hints and dead members we try to (re)join through.
CONTACTS_MAX = 256
# State changes kept for the caller's log until drained.
EVENTS_MAX = 1024

# The fields the protocol owns; update_self() may change everything else.
_PROTOCOL_FIELDS = frozenset({"id", "cluster", "incarnation", "heartbeat", "state"})
_LIVE = (ALIVE, SUSPECT)
NONE = ""  # the "state" of a member not (or no longer) in the table, in events()


class MembershipConfig(Protocol):
    """The ``galaxy.config.Config`` fields membership reads."""

    gossip_interval_ms: int
    gossip_fanout: int
    suspect_after_ms: int
    dead_after_ms: int
    dead_reap_after_ms: int
    seed_retry_min_ms: int
    seed_retry_max_ms: int
    cluster: str
    frame_max_bytes: int


@dataclass(frozen=True, slots=True)
class SendTo:
    host: str
    port: int
    msg: Gossip


@dataclass(frozen=True, slots=True)
class MemberView:
    record: MemberRecord
    state: str               # this node's judgement: alive, suspect, dead or left
    last_heard_ms: int       # when this node last got news of the member (monotonic ms)


@dataclass(slots=True)
class _Member:
    record: MemberRecord
    key: tuple[int, bool, int]   # version_key(record)
    state: str
    last_heard_ms: int
    changed_ms: int          # when ``state`` was entered (the reap timer of dead/left)
    size_bytes: int          # record_bytes_max(record), kept so packing a message is cheap
    sent: int = 0            # how often this version went out; the least sent goes first


@dataclass(slots=True)
class _Contact:
    backoff_ms: int
    next_ms: int | None      # None: parked, the address belongs to a live member
    seen_ms: int             # last time discovered (or made a contact); eviction order
    discovered: bool         # handed to discovered(), as opposed to a dead member's address
    attempts: int = 0


def version_key(r: MemberRecord) -> tuple[int, bool, int]:
    """The order of versions of one member's record (see Theory of operation)."""
    return (r.incarnation, r.state == LEFT, r.heartbeat)


def _str_bytes(s: str) -> int:
    """msgpack's size of ``s``, header included (the header is 1 to 5 bytes)."""
    n = len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65_536 else 5)


def record_bytes_max(r: MemberRecord) -> int:
    """An upper bound of the encoded size of ``r`` (checked against wire.py in the tests)."""
    v = r.raft
    n = RECORD_FIXED_BYTES
    for s in (r.id, r.state, r.host, r.role, r.version, r.cluster, v.leader, v.raft_state,
              *v.voters, *v.invited):
        n += _str_bytes(s)
    for k, val in r.labels.items():
        n += _str_bytes(k) + _str_bytes(val)
    return n


def _sent(m: _Member) -> int:
    return m.sent


def _same_size(a: MemberRecord, b: MemberRecord) -> bool:
    """Whether ``record_bytes_max`` must be the same for both (a heartbeat changes nothing)."""
    return (a.state == b.state and a.host == b.host and a.role == b.role and a.version == b.version
            and (a.raft is b.raft or a.raft == b.raft) and (a.labels is b.labels or a.labels == b.labels))


class Membership:
    def __init__(self, me: MemberRecord, cfg: MembershipConfig, rng: random.Random,
                 now_ms: int) -> None:
        if me.state != ALIVE:
            raise ValueError(f"a node starts alive, got state {me.state!r}")
        if me.cluster != cfg.cluster:
            raise ValueError(f"record cluster {me.cluster!r} != config cluster {cfg.cluster!r}")
        if cfg.gossip_interval_ms <= 0 or cfg.gossip_fanout <= 0:
            raise ValueError("gossip_interval_ms and gossip_fanout must be positive")
        if not 0 < cfg.seed_retry_min_ms <= cfg.seed_retry_max_ms:
            raise ValueError("need 0 < seed_retry_min_ms <= seed_retry_max_ms")
        self._cfg = cfg
        self._rng = rng
        # An alive member turns suspect at this silence (dead first, if so configured).
        self._suspect_ms = min(cfg.suspect_after_ms, cfg.dead_after_ms)
        # The room for records in one frame; the sender id and cluster are in every envelope.
        self._frame_budget_bytes = (cfg.frame_max_bytes - FRAME_FIXED_BYTES
                                    - _str_bytes(me.id) - _str_bytes(me.cluster))
        self._me = me
        self._me_bytes = record_bytes_max(me)
        self._me_heard_ms = now_ms
        self._left = False
        self._leave_sends: list[SendTo] = []
        self._now_ms = now_ms
        self._next_gossip_ms = now_ms
        # No later than the earliest member or contact deadline; exact after each tick.
        self._timer_ms = now_ms + cfg.dead_reap_after_ms
        self._members: dict[str, _Member] = {}
        self._by_addr: dict[tuple[str, int], str] = {}
        self._contacts: dict[tuple[str, int], _Contact] = {}
        self._events: deque[tuple[str, str, str]] = deque(maxlen=EVENTS_MAX)
        self.stats: dict[str, int] = {
            "foreign_cluster": 0, "refutations": 0, "table_full": 0, "records_truncated": 0,
            "joins_sent": 0, "corrections_sent": 0,
        }
        self._check(full=True)

    # ---------------------------------------------------------------- steps

    def tick(self, now_ms: int) -> list[SendTo]:
        self._advance(now_ms)
        timer_ms = self._judge(now_ms)
        sends: list[SendTo] = []
        if now_ms >= self._next_gossip_ms:
            # Scheduled from now, not from the missed deadline: a late runner gets one
            # round, not a burst of catch-up rounds.
            self._next_gossip_ms = now_ms + self._cfg.gossip_interval_ms
            if not self._left:
                self._set_me(dataclasses.replace(self._me, heartbeat=self._me.heartbeat + 1))
                sends.extend(self._gossip_round(now_ms))
        if not self._left:
            for addr, c in self._contacts.items():
                send = self._poll_contact(now_ms, addr, c)
                if send is not None:
                    sends.append(send)
                if c.next_ms is not None and c.next_ms < timer_ms:
                    timer_ms = c.next_ms
        self._timer_ms = timer_ms
        self._check(full=True, ticked=True)
        return sends

    def receive(self, now_ms: int, src: tuple[str, int], msg: Gossip) -> list[SendTo]:
        self._advance(now_ms)
        if self._left or not msg.members:
            return []
        records = msg.members
        if len(records) > GOSSIP_RECORDS_MAX:
            self.stats["records_truncated"] += 1
            records = records[:GOSSIP_RECORDS_MAX]
        touched: list[_Member] = []
        replies: dict[str, _Member] = {}
        cluster, members = self._me.cluster, self._members
        # The hot loop of a round (N records per message): version_key() inlined.
        for i, r in enumerate(records):
            if r.cluster != cluster:
                self.stats["foreign_cluster"] += 1
                continue
            known = members.get(r.id)
            if known is None:
                if r.id == self._me.id:
                    self._refute(r)
                elif (known := self._learn(now_ms, r)) is not None:
                    touched.append(known)
                continue
            if r is known.record:  # the very same object: nothing new (the simulator's case)
                continue
            key = (r.incarnation, r.state == LEFT, r.heartbeat)
            if key > known.key:
                self._take(now_ms, known, r, key)
                touched.append(known)
            elif key < known.key and (i == 0 or (known.state != ALIVE or key[0] < known.key[0])
                                      and self._should_correct(r, known)):
                replies[r.id] = known
        sends: list[SendTo] = []
        if replies:
            self.stats["corrections_sent"] += 1
        if msg.want_reply:
            for m in self._gossipable(now_ms):
                replies.setdefault(m.record.id, m)
        if msg.want_reply or replies:
            for chunk in self._pack(list(replies.values()), REPLY_MESSAGES_MAX):
                sends.append(SendTo(src[0], src[1], Gossip(members=chunk)))
        self._check(touched)
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
        send = self._poll_contact(now_ms, addr, c)
        if c.next_ms is not None:
            self._timer_ms = min(self._timer_ms, c.next_ms)
        self._check()
        return [] if send is None else [send]

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
            msg = Gossip(members=(self._me,))
            self._leave_sends = [SendTo(m.record.host, m.record.gossip_port, msg)
                                 for m in self._members.values() if m.state in _LIVE]
            self._check()
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
        """When ``tick`` has work: a round, a judgement, a reap or a contact retry.

        Never later than the true deadline; it may be earlier after a receive (a tick
        then finds nothing to do and sets it exactly).
        """
        return min(self._next_gossip_ms, self._timer_ms)

    def events(self) -> list[tuple[str, str, str]]:
        """Drain ``(node_id, old_state, new_state)``; ``""`` means not in the table."""
        out = list(self._events)
        self._events.clear()
        return out

    # ---------------------------------------------------------------- internals

    def _my_view(self) -> MemberView:
        return MemberView(self._me, self._me.state, self._me_heard_ms)

    def _set_me(self, me: MemberRecord) -> None:
        if not _same_size(me, self._me):
            self._me_bytes = record_bytes_max(me)
        self._me = me
        self._me_heard_ms = self._now_ms

    def _advance(self, now_ms: int) -> None:
        if now_ms < self._now_ms:
            raise ValueError(f"time went back: {now_ms} < {self._now_ms}")
        self._now_ms = now_ms

    def _deadline(self, m: _Member) -> int:
        if m.state == ALIVE:
            return m.last_heard_ms + self._suspect_ms
        if m.state == SUSPECT:
            return m.last_heard_ms + self._cfg.dead_after_ms
        return m.changed_ms + self._cfg.dead_reap_after_ms

    def _set_state(self, now_ms: int, m: _Member, state: str) -> None:
        if state != m.state:
            self._events.append((m.record.id, m.state, state))
            m.state = state
            m.changed_ms = now_ms

    def _judge(self, now_ms: int) -> int:
        """Judge every member by its silence; return the earliest member deadline."""
        cfg = self._cfg
        timer_ms = now_ms + cfg.dead_reap_after_ms
        reaped: list[_Member] = []
        for m in self._members.values():
            if m.state in _LIVE:
                silence_ms = now_ms - m.last_heard_ms
                if silence_ms >= cfg.dead_after_ms:
                    self._set_state(now_ms, m, DEAD)
                    self._contact_dead(now_ms, m.record)
                elif silence_ms >= self._suspect_ms:
                    self._set_state(now_ms, m, SUSPECT)
            elif now_ms - m.changed_ms >= cfg.dead_reap_after_ms:
                reaped.append(m)
                continue
            t = self._deadline(m)
            if t < timer_ms:
                timer_ms = t
        for m in reaped:
            self._drop(m)
        return timer_ms

    def _drop(self, m: _Member) -> None:
        rid = m.record.id
        del self._members[rid]
        addr = (m.record.host, m.record.gossip_port)
        if self._by_addr.get(addr) == rid:
            del self._by_addr[addr]
            c = self._contacts.get(addr)
            if c is not None and not c.discovered:
                del self._contacts[addr]
        self._events.append((rid, m.state, NONE))

    def _contact_dead(self, now_ms: int, r: MemberRecord) -> None:
        addr = (r.host, r.gossip_port)
        if addr != (self._me.host, self._me.gossip_port) and addr not in self._contacts:
            self._add_contact(addr, _Contact(self._cfg.seed_retry_min_ms, now_ms, now_ms,
                                             discovered=False))

    def _add_contact(self, addr: tuple[str, int], c: _Contact) -> None:
        if len(self._contacts) >= CONTACTS_MAX:
            # Evict the least recently seen, dead members' addresses before discovered ones.
            victim = min(self._contacts, key=lambda a: (self._contacts[a].discovered,
                                                        self._contacts[a].seen_ms))
            del self._contacts[victim]
        self._contacts[addr] = c

    def _is_live_addr(self, addr: tuple[str, int]) -> bool:
        rid = self._by_addr.get(addr)
        if rid is None:
            return False
        m = self._members.get(rid)
        return m is not None and m.state in _LIVE

    def _poll_contact(self, now_ms: int, addr: tuple[str, int], c: _Contact) -> SendTo | None:
        if self._is_live_addr(addr):
            # Parked: ordinary gossip reaches this address.  Reset the backoff so that a
            # later loss of the member is retried promptly.
            c.next_ms = None
            c.backoff_ms = self._cfg.seed_retry_min_ms
            return None
        if c.next_ms is None:
            c.next_ms = now_ms
        if c.next_ms > now_ms:
            return None
        c.next_ms = now_ms + c.backoff_ms
        c.backoff_ms = min(c.backoff_ms * 2, self._cfg.seed_retry_max_ms)
        c.attempts += 1
        self.stats["joins_sent"] += 1
        msg = Gossip(members=self._fill(self._gossipable(now_ms), 1)[0], want_reply=True)
        return SendTo(addr[0], addr[1], msg)

    def _gossipable(self, now_ms: int) -> list[_Member]:
        left_gossip_ms = self._cfg.dead_after_ms
        return [m for m in self._members.values()
                if m.state in _LIVE or (m.state == LEFT and now_ms - m.changed_ms < left_gossip_ms)]

    def _pack(self, others: list[_Member], messages_max: int) -> list[tuple[MemberRecord, ...]]:
        """Fill messages in order, each my record first, within the record and byte bounds.

        Always at least one message; a record too big for any frame is skipped.
        """
        room_bytes = self._frame_budget_bytes - self._me_bytes
        out: list[tuple[MemberRecord, ...]] = []
        cur: list[MemberRecord] = [self._me]
        used = 0
        for m in others:
            if len(cur) >= GOSSIP_RECORDS_MAX or used + m.size_bytes > room_bytes:
                if m.size_bytes > room_bytes:
                    continue
                out.append(tuple(cur))
                if len(out) >= messages_max:
                    return out
                cur, used = [self._me], 0
            cur.append(m.record)
            used += m.size_bytes
            m.sent += 1
        out.append(tuple(cur))
        return out

    def _fill(self, others: list[_Member], messages_max: int) -> list[tuple[MemberRecord, ...]]:
        """Up to ``messages_max`` messages, the least sent records first."""
        # Stable: among equally sent records the table order decides, and it rotates
        # because every record sent moves behind the ones not sent.
        others.sort(key=_sent)
        return self._pack(others, messages_max)

    def _gossip_round(self, now_ms: int) -> list[SendTo]:
        peers = [m.record for m in self._members.values() if m.state in _LIVE]
        if not peers:
            return []
        targets = self._rng.sample(peers, min(self._cfg.gossip_fanout, len(peers)))
        msgs = [Gossip(members=chunk)
                for chunk in self._fill(self._gossipable(now_ms), ROUND_MESSAGES_PER_TARGET_MAX)]
        return [SendTo(t.host, t.gossip_port, msg) for t in targets for msg in msgs]

    @staticmethod
    def _should_correct(r: MemberRecord, known: _Member) -> bool:
        """Whether to send back our newer version of a third party's record.

        (The sender's own record, ``members[0]``, is always answered when it is older than
        ours: only a restart with a stale store, or a reordered datagram, does that.)
        """
        if known.state == DEAD:
            return False  # spreading a dead member's record would make others think it alive
        return r.incarnation < known.record.incarnation or (known.state == LEFT and r.state != LEFT)

    def _refute(self, r: MemberRecord) -> None:
        me = self._me
        accused = r.state != ALIVE and r.incarnation >= me.incarnation
        if accused or version_key(r) > version_key(me):
            self._set_me(dataclasses.replace(me, incarnation=max(me.incarnation, r.incarnation) + 1,
                                             heartbeat=me.heartbeat + 1, state=ALIVE))
            self.stats["refutations"] += 1

    @staticmethod
    def _state_of(r: MemberRecord) -> str:
        return r.state if r.state in (LEFT, DEAD) else ALIVE

    def _index(self, r: MemberRecord, old: MemberRecord | None) -> None:
        if old is not None:
            old_addr = (old.host, old.gossip_port)
            if old_addr != (r.host, r.gossip_port) and self._by_addr.get(old_addr) == r.id:
                del self._by_addr[old_addr]
        self._by_addr[(r.host, r.gossip_port)] = r.id

    def _learn(self, now_ms: int, r: MemberRecord) -> _Member | None:
        if len(self._members) >= MEMBERS_MAX:
            gone = [m for m in self._members.values() if m.state not in _LIVE]
            if not gone:
                self.stats["table_full"] += 1
                return None
            self._drop(min(gone, key=lambda m: m.changed_ms))
        state = self._state_of(r)
        m = _Member(r, version_key(r), state, now_ms, now_ms, record_bytes_max(r))
        self._members[r.id] = m
        self._index(r, None)
        self._events.append((r.id, NONE, state))
        self._timer_ms = min(self._timer_ms, self._deadline(m))
        return m

    def _take(self, now_ms: int, m: _Member, r: MemberRecord, key: tuple[int, bool, int]) -> None:
        old = m.record
        m.record = r
        m.key = key
        m.last_heard_ms = now_ms
        m.sent = 0
        if not _same_size(r, old):
            m.size_bytes = record_bytes_max(r)
        if r.host != old.host or r.gossip_port != old.gossip_port:
            self._index(r, old)
        state = ALIVE if r.state == ALIVE else self._state_of(r)
        if state != m.state:
            self._set_state(now_ms, m, state)
        deadline = self._deadline(m)
        if deadline < self._timer_ms:
            self._timer_ms = deadline

    def _check(self, touched: Iterable[_Member] = (), full: bool = False,
               ticked: bool = False) -> None:
        """The invariants of the module docstring: the touched members, or all of them."""
        me, cfg, now = self._me, self._cfg, self._now_ms
        assert me.id not in self._members, "a record about me in the table"
        assert me.state == (LEFT if self._left else ALIVE), me.state
        assert len(self._members) <= MEMBERS_MAX and len(self._contacts) <= CONTACTS_MAX
        assert self._timer_ms >= 0 and self._next_gossip_ms >= 0
        timer_ms, table = self._timer_ms, self._members
        for m in (table.values() if full else touched):
            r = m.record
            assert (table.get(r.id) is m and r.cluster == me.cluster and m.state in MEMBER_STATES
                    and m.last_heard_ms <= now and m.changed_ms <= now
                    and m.key == (r.incarnation, r.state == LEFT, r.heartbeat)), m
            if m.state == ALIVE:
                assert timer_ms <= m.last_heard_ms + self._suspect_ms, (timer_ms, m)
                assert not ticked or now - m.last_heard_ms < self._suspect_ms, m
            elif m.state == SUSPECT:
                assert timer_ms <= m.last_heard_ms + cfg.dead_after_ms, (timer_ms, m)
                assert not ticked or now - m.last_heard_ms < cfg.dead_after_ms, m
            else:
                assert timer_ms <= m.changed_ms + cfg.dead_reap_after_ms, (timer_ms, m)
        if full:
            for addr, rid in self._by_addr.items():
                m = self._members.get(rid)
                assert m is not None and (m.record.host, m.record.gossip_port) == addr, (addr, rid)
            if not self._left:
                for c in self._contacts.values():
                    assert c.next_ms is None or self._timer_ms <= c.next_ms, c
        if ticked:
            assert self.next_deadline_ms() > now, "the runner would spin"
