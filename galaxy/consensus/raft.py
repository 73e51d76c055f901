"""pysyncobj 0.3.17, hardened: durable term/vote, fsync before ack, pre-vote, leases.

Theory of operation
-------------------
pysyncobj is the Raft engine; it runs its own tick thread, reads the real clock and
global randomness, so it is not simulated (the simulator swaps in a sequencer behind the
same ``consensus`` interface).  This module closes the safety gaps measured in
../shared/notes/pysyncobj-hardening.md, without forking pysyncobj, through the hooks
that note names:

* **Durable (term, votedFor).**  ``DurableJournal.setCurrentTerm`` writes a small vote
  file with write -> fsync -> rename -> fsync(dir) before returning.  pysyncobj calls it
  on its tick thread before it queues the vote reply or the vote request, so no message
  ever reflects a term or vote that a crash could forget.  A vote file that cannot be
  parsed stops the node (never "term 0" by accident).
* **Durable log before acknowledging.**  The journal marks itself dirty on every change;
  a follower fsyncs before it sends ``next_node_idx`` (its AppendEntries ack), and the
  leader fsyncs at the end of each tick, before the next tick counts its own copy
  towards a commit.
* **Pre-vote and stickiness.**  A node whose election timer fires first asks for
  pre-votes (no state change anywhere); only a quorum of grants lets the real election
  run.  A node grants a pre-vote, and a real vote, only if it has not heard from a
  leader within ``raftMinTimeout``.  Granting a pre-vote stands the granter's own
  candidacy down for a timeout, and of two nodes asking at once only the one with the
  better (log, address) is granted, so simultaneous timeouts rarely split the real vote.  A restarted or partitioned node therefore cannot
  depose a healthy leader, and its term does not inflate.
* **Campaign gate.**  A spare started ahead of its addition to the group does not
  campaign until a leader has contacted it (or it has been a confirmed member before).
* **Leader lease.**  ``is_valid_leader(lease_s)`` is true only while this node is leader
  and a quorum acked within ``lease_s``; Galaxy acts as coordinator only then.
* **Handing leadership over** (``hand_over``, before a graceful stop).  pysyncobj's
  ``transferLeadership`` sends TimeoutNow to a caught-up follower, but pre-vote and
  stickiness defeated it: the target asked for pre-votes instead of campaigning, and the
  leader (fresh by definition) refused them and dropped the real vote request.  A node
  told TimeoutNow by its own leader now campaigns at once (no pre-vote: the leader asked
  for it, as etcd's ``campaignTransfer``), and a leader handing over answers vote requests
  for the transfer's duration.  Voters that heard the leader lately still ignore the
  candidate; the outgoing leader's vote and the target's own are a majority of two or
  three.  The transfer is requested on the tick thread (pysyncobj's transport is not
  thread-safe).
* **Commands.**  Besides no-ops and membership changes the log holds commands: the one
  ``@replicated`` method ``apply_command(data)`` carries ``wire.encode_command`` bytes,
  and applying an entry hands (index, term, bytes) to a ``commands.Replicated``
  dispatcher.  Its result goes back to the caller's callback (on the leader, or on the
  follower that forwarded the call: pysyncobj 0.3.17's ``_checkCommandsToApply`` sends
  ``apply_command`` to the leader and answers when the entry is applied locally).  A
  broken invariant while applying stops the node (``on_fatal``) instead of letting the
  tick thread die with a half-applied state.
* **Keys.**  The transport is encrypted with a Fernet key derived from the cluster key
  (never the default PBKDF2-of-a-password), so no unauthenticated peer reaches the
  unpickler.

Every hook uses private names of pysyncobj 0.3.17, so ``check_hooks()`` asserts at start
that they exist and the dependency is pinned exactly.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import threading
from typing import Any, Callable

import pysyncobj.syncobj as _so
from cryptography.fernet import Fernet
from pysyncobj import SyncObj, SyncObjConf, replicated
from pysyncobj.journal import FileJournal, MemoryJournal
from pysyncobj.version import VERSION as PYSYNCOBJ_VERSION

log = logging.getLogger("galaxy.raft")

FOLLOWER, CANDIDATE, LEADER = 0, 1, 2
STATE_NAMES = {FOLLOWER: "follower", CANDIDATE: "candidate", LEADER: "leader"}

_HOOKS = (
    "_SyncObj__onMessageReceived", "_SyncObj__sendNextNodeIdx", "_SyncObj__setCurrentTerm",
    "_SyncObj__generateRaftTimeout", "_SyncObj__connectedToAnyone",
    "_SyncObj__getCurrentLogIndex", "_SyncObj__getCurrentLogTerm", "_SyncObj__applyLogEntries",
    "_SyncObj__getEntries", "_SyncObj__doApplyCommand", "transferLeadership",
)
# One tick applies committed entries for at most this long, then lets the tick go on
# (heartbeats, acks, new appends) and applies the rest at once in the next one: a backlog
# of large entries (group commit packs up to 1,000 commands into one) applied in a single
# tick kept the thread from sending heartbeats for longer than the election timeout.
APPLY_BUDGET_S = 0.010
# Commands (group-commit entries, up to 1,000 ledger commands each) waiting in pysyncobj's
# queue on the leader, its own and those followers forwarded; more are refused (QUEUE_FULL,
# answered "busy", nothing appended) instead of queueing into timeouts.
COMMANDS_QUEUE_MAX = 64


class RaftStateError(RuntimeError):
    """The durable Raft state on disk cannot be trusted; the node must not start."""


def check_hooks() -> None:
    """Fail at start, not at the first election, if pysyncobj's internals moved."""
    if PYSYNCOBJ_VERSION != "0.3.17":
        raise RuntimeError(f"galaxy needs pysyncobj 0.3.17 exactly, found {PYSYNCOBJ_VERSION}")
    missing = [name for name in _HOOKS if not hasattr(SyncObj, name)]
    if missing or not hasattr(_so, "createJournal"):
        raise RuntimeError(f"pysyncobj internals changed; missing hooks: {missing}")


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    """write -> fsync -> rename -> fsync(dir): after return the new content survives a crash."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path)


class DurableJournal(FileJournal):
    """pysyncobj's file journal plus a fsynced vote file and batched log fsync."""

    def __init__(self, journal_file: str) -> None:
        self._vote_path = journal_file + ".vote"
        self._dirty = False
        self._sync_fd: int | None = None
        self.fsyncs = 0
        super().__init__(journal_file)
        self._sync_fd = os.open(journal_file, os.O_RDWR)
        self._term, self._voted_for = self._read_vote()

    def _read_vote(self) -> tuple[int, str | None]:
        try:
            with open(self._vote_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            # Only a journal that never saw a term may lack its vote file.
            if len(self) and self[-1][2] > 0:
                raise RaftStateError(f"{self._vote_path} is missing but the Raft log has terms") from None
            return 0, None
        try:
            doc = json.loads(raw)
            term, voted_for = doc["term"], doc["voted_for"]
            if not isinstance(term, int) or term < 0 or not (voted_for is None or isinstance(voted_for, str)):
                raise ValueError("bad field types")
        except (ValueError, KeyError, TypeError) as e:
            raise RaftStateError(f"{self._vote_path} is corrupt ({e}); refusing to start") from None
        return term, voted_for

    # -- term and vote: durable before pysyncobj sends anything that reflects them
    def setCurrentTerm(self, term: int, votedForNodeId: str | None) -> None:  # noqa: N802 (pysyncobj API)
        if (term, votedForNodeId) == (self._term, self._voted_for):
            return
        write_atomic(self._vote_path, json.dumps({"term": term, "voted_for": votedForNodeId}).encode())
        self.fsyncs += 2
        self._term, self._voted_for = term, votedForNodeId

    def getCurrentTerm(self) -> int:  # noqa: N802
        return getattr(self, "_term", 0)

    def getVotedForNodeId(self) -> str | None:  # noqa: N802
        return getattr(self, "_voted_for", None)

    # -- log: marked dirty here, fsynced in one go before an ack or a commit count
    def add(self, command: bytes, idx: int, term: int) -> None:
        super().add(command, idx, term)
        self._dirty = True

    def clear(self) -> None:
        super().clear()
        self._dirty = True

    def deleteEntriesFrom(self, entryFrom: int) -> None:  # noqa: N802
        super().deleteEntriesFrom(entryFrom)
        self._dirty = True

    def sync(self) -> None:
        if self._dirty and self._sync_fd is not None:
            # fsync on any fd of the file flushes the mmap's dirty pages and its size.
            os.fsync(self._sync_fd)
            self.fsyncs += 1
            self._dirty = False

    def _destroy(self) -> None:
        self.sync()
        if self._sync_fd is not None:
            os.close(self._sync_fd)
            self._sync_fd = None
        super()._destroy()


_journal_lock = threading.Lock()

_NO_OP, _MEMBERSHIP = b"\x01", 2          # pysyncobj's _COMMAND_TYPE byte at the head of an entry


def neutralize_membership(journal_file: str) -> int:
    """Rewrite a stopped node's journal with every membership change replaced by a no-op of
    the same index and term; returns how many were replaced (0: the file is untouched).

    For ``galaxy recover`` (docs/recover.md): pysyncobj replays membership changes when it
    loads a journal, so the old group's "add X" entries would put the lost voters back into
    the re-formed group.  Raft matches logs by (index, term) only, so followers catching up
    from this log agree with it.  Written to a new file, fsynced, then renamed over."""
    old = FileJournal(journal_file)
    try:
        entries = [old[i] for i in range(len(old))]
    finally:
        old._destroy()
    replaced = sum(1 for cmd, _, _ in entries if cmd[:1] == bytes([_MEMBERSHIP]))
    if not replaced:
        return 0
    tmp = journal_file + ".rewrite"
    for leftover in (tmp, tmp + ".meta"):
        if os.path.exists(leftover):
            os.unlink(leftover)
    new = FileJournal(tmp)
    try:
        for cmd, idx, term in entries:
            new.add(_NO_OP if cmd[:1] == bytes([_MEMBERSHIP]) else cmd, idx, term)
        new.flush()
    finally:
        new._destroy()
    fd = os.open(tmp, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, journal_file)
    _fsync_dir(journal_file)
    return replaced


def write_vote(journal_file: str, term: int) -> None:
    """Set the durable term (no vote) of a stopped node's journal; never lowers it."""
    path = journal_file + ".vote"
    current = 0
    if os.path.exists(path):
        with open(path, "rb") as f:
            current = int(json.loads(f.read())["term"])
    write_atomic(path, json.dumps({"term": max(term, current), "voted_for": None}).encode())


class HardenedSyncObj(SyncObj):
    """A SyncObj with the hooks described in the module docstring.

    ``safe=False`` runs stock pysyncobj behaviour (memory journal, no pre-vote, no
    stickiness); it exists only so that tests can show the safety test fails without
    the fixes.
    """

    def __init__(self, self_addr: str, other_addrs: list[str], conf: SyncObjConf, *, secret: bytes,
                 journal_file: str | None, may_campaign: bool, safe: bool = True,
                 on_observe: Callable[[int, str | None, str], None] | None = None,
                 on_contacted: Callable[[], None] | None = None, commands: Any = None,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 on_applied: Callable[[], None] | None = None) -> None:
        self._commands = commands           # a commands.Replicated, or None: entries are refused
        self._on_applied = on_applied       # after a tick that applied commands (tick thread)
        self._applied_seen = 0
        self._on_fatal = on_fatal
        self._failed = False
        # a keyring's rotating encryptor (galaxy/keyring.py) is shared as is: it changes in place
        self._fernet = secret if hasattr(secret, "encrypt_at_time") else Fernet(base64.urlsafe_b64encode(secret))
        self._safe = safe
        self._may_campaign = may_campaign
        self._on_observe = on_observe
        self._on_contacted = on_contacted
        self._last_leader_contact = 0.0
        self._prevote_round = 0
        self._prevote_grants: set[str] = set()
        self._prevote_won = False
        self._prevote_active_until = 0.0
        self._hand_over_asked = False       # set by any thread; the tick thread sends TimeoutNow
        self._handing_over_until = 0.0      # while a transfer runs, this leader answers vote requests
        self._observed: tuple[int, str | None, int] = (-1, None, -1)
        self._rng = random.Random()
        with _journal_lock:
            original = _so.createJournal
            if safe and journal_file:
                _so.createJournal = lambda _path: DurableJournal(journal_file)
            else:
                _so.createJournal = lambda _path: MemoryJournal()
            try:
                super().__init__(self_addr, other_addrs, conf)
            finally:
                _so.createJournal = original

    # -- keys
    @property
    def encryptor(self) -> Fernet:
        return self._fernet

    def _getEncryptor(self) -> Fernet:  # noqa: N802
        return self._fernet

    # -- state, read from other threads (plain attribute reads are atomic under the GIL)
    @property
    def raft_state(self) -> int:
        return self._SyncObj__raftState  # type: ignore[attr-defined]

    @property
    def journal(self) -> Any:
        return self._SyncObj__raftLog  # type: ignore[attr-defined]

    def leader_addr(self) -> str | None:
        leader = self._getLeader()
        return leader.address if leader is not None else None

    def config_addrs(self) -> list[str]:
        """The Raft configuration (self included), as this node knows it."""
        others = [n.address for n in self.otherNodes]
        return sorted([self.selfNode.address, *others])

    def is_valid_leader(self, lease_s: float) -> bool:
        if self.raft_state != LEADER:
            return False
        now = _so.monotonicTime()
        responses = dict(self._SyncObj__lastResponseTime)  # type: ignore[attr-defined]
        others = self.otherNodes
        fresh = sum(1 for n in others if now - responses.get(n, 0.0) < lease_s)
        return 1 + fresh > (len(others) + 1) / 2

    def heard_leader_within(self, seconds: float) -> bool:
        """A follower heard a leader (AppendEntries of its term) within ``seconds``.  pysyncobj
        keeps naming the last leader while it cannot reach anyone (it campaigns only when
        connected to some voter), so a voter whose every peer has gone still showed the
        departed leader; this says whether that leader is still heard."""
        return _so.monotonicTime() - self._last_leader_contact < seconds

    def hand_over(self) -> None:
        """Ask the tick thread to hand leadership to the most caught-up connected follower
        (Raft TimeoutNow; module docstring).  Asked again until another node leads: pysyncobj
        denies a transfer while no follower holds the whole log."""
        self._hand_over_asked = True
        notifier = getattr(self, "_SyncObj__pipeNotifier", None)
        if notifier is not None:
            notifier.notify()

    def contacted(self) -> bool:
        return self._may_campaign

    def log_position(self) -> tuple[int, int]:
        """(last log term, last log index)."""
        return self._SyncObj__getCurrentLogTerm(), self._SyncObj__getCurrentLogIndex()  # type: ignore[attr-defined]

    def entry_term(self, index: int) -> int | None:
        """The term of log entry ``index``, None if this log does not hold it (tick thread or GIL-atomic reads)."""
        journal = self.journal
        if not len(journal):
            return None
        pos = index - journal[0][1]
        if pos < 0 or pos >= len(journal):
            return None
        return journal[pos][2]

    def caught_up(self) -> bool:
        """Leader that applied everything committed, including an entry of its own term: its
        state machines now hold every command any earlier leader got committed."""
        if self.raft_state != LEADER:
            return False
        commit = self.raftCommitIndex
        return self.raftLastApplied >= commit and self.entry_term(commit) == self.raftCurrentTerm

    # -- commands
    @replicated
    def apply_command(self, data: bytes) -> Any:
        # pysyncobj applies entry raftLastApplied + 1 and only then advances the counter.
        index = self.raftLastApplied + 1
        term = self.entry_term(index) or self.raftCurrentTerm
        if self._failed:
            return None
        if self._commands is None:
            return {"ok": False, "error": "no_state_machine", "message": "this node applies no commands", "key": None}
        try:
            return self._commands.apply_bytes(index, term, data)
        except Exception as exc:            # a broken invariant: never run on in a wrong state
            self._failed = True
            log.critical("applying log entry %d failed: %s", index, exc, exc_info=exc)
            if self._on_fatal is not None:
                self._on_fatal(exc)
            return None

    # -- hooks
    def _SyncObj__sendNextNodeIdx(self, node: Any, reset: bool = False, nextNodeIdx: int | None = None,  # noqa: N802
                                  success: bool = False) -> None:
        if self._safe:
            self.journal.sync()
        SyncObj._SyncObj__sendNextNodeIdx(self, node, reset=reset, nextNodeIdx=nextNodeIdx,  # type: ignore[attr-defined]
                                          success=success)

    def _SyncObj__onMessageReceived(self, node: Any, message: Any) -> None:  # noqa: N802
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return
        kind = message["type"]
        now = _so.monotonicTime()
        if kind == "timeout_now" and self._safe and message.get("term", -1) >= self.raftCurrentTerm \
                and node == self._getLeader():
            # our leader hands over: campaign now, without a pre-vote round it would refuse
            self._prevote_won = True
        if kind == "append_entries" and message.get("term", -1) >= self.raftCurrentTerm:
            self._last_leader_contact = now
            if not self._may_campaign:
                self._may_campaign = True
                if self._on_contacted is not None:
                    self._on_contacted()
        if kind == "next_node_idx" and message.get("success") and not message.get("reset") \
                and self.raft_state == LEADER:
            self._ack_without_rewind(node, message)
            return
        if self._safe:
            if kind == "galaxy_prevote":
                self._answer_prevote(node, message, now)
                return
            if kind == "galaxy_prevote_resp":
                self._count_prevote(node, message)
                return
            if kind == "request_vote" and self._leader_is_fresh(now) and now >= self._handing_over_until:
                return  # stickiness: a live leader exists, this candidate would only disrupt it
        SyncObj._SyncObj__onMessageReceived(self, node, message)  # type: ignore[attr-defined]

    def _ack_without_rewind(self, node: Any, message: dict) -> None:
        """A follower acked up to an index: pysyncobj sets nextIndex to just past it, even when
        later entries are already on their way.  With AppendEntries sent per entry (no
        pysyncobj batching) acks always trail the sends, so every ack rewound nextIndex and
        the next AppendEntries re-sent entries the follower held, which it truncated and
        re-added ("truncating already-applied log entries", logged as critical).  Keep the
        larger nextIndex, as etcd's pipelined replication does; a send that was really lost
        comes back as a ``reset`` (log mismatch), which still rewinds."""
        next_index = self._SyncObj__raftNextIndex  # type: ignore[attr-defined]
        sent = next_index.get(node)
        SyncObj._SyncObj__onMessageReceived(self, node, message)  # type: ignore[attr-defined]
        if sent is not None and next_index.get(node, 0) < sent:
            next_index[node] = sent

    def _leader_is_fresh(self, now: float) -> bool:
        if self.raft_state == LEADER:
            return True
        return now - self._last_leader_contact < self.conf.raftMinTimeout

    def _answer_prevote(self, node: Any, msg: dict, now: float) -> None:
        try:
            term, last_idx, last_term = int(msg["term"]), int(msg["last_log_index"]), int(msg["last_log_term"])
            round_ = int(msg["round"])
        except (KeyError, TypeError, ValueError):
            return
        mine = (self._SyncObj__getCurrentLogTerm(), self._SyncObj__getCurrentLogIndex())  # type: ignore[attr-defined]
        theirs = (last_term, last_idx)
        granted = term > self.raftCurrentTerm and theirs >= mine and not self._leader_is_fresh(now)
        if granted and now < self._prevote_active_until and \
                (*mine, self.selfNode.address) > (*theirs, node.address):
            # Both of us are asking at once: only one may go on, or the real votes split and
            # cost another election timeout.  The better log wins, then the larger address.
            granted = False
        if granted:
            # Give the candidate a head start: stand down our own candidacy for a timeout.
            self._prevote_round += 1
            self._prevote_active_until = 0.0
            self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()  # type: ignore[attr-defined]
        log.debug("pre-vote from %s for term %d (log %s, ours %s, our term %d): %s", node.address, term, theirs,
                  mine, self.raftCurrentTerm, "granted" if granted else "refused")
        self._SyncObj__transport.send(node, {  # type: ignore[attr-defined]
            "type": "galaxy_prevote_resp", "round": round_, "granted": granted, "term": self.raftCurrentTerm})

    def _count_prevote(self, node: Any, msg: dict) -> None:
        if msg.get("round") != self._prevote_round or self.raft_state == LEADER:
            return
        if not msg.get("granted"):
            # Refused by a node in a later term: take that term (as any Raft message would
            # make us do), so that our next round proposes a term it can accept.  Without
            # this, a node with the better log but the lower term and one with the higher
            # term but the worse log refuse each other forever (etcd's PreVote rule).
            their_term = msg.get("term")
            if isinstance(their_term, int) and their_term > self.raftCurrentTerm:
                log.debug("pre-vote refused by %s in term %d; adopting it", node.address, their_term)
                self._SyncObj__setCurrentTerm(their_term, None)  # type: ignore[attr-defined]
                self._SyncObj__setState(FOLLOWER)  # type: ignore[attr-defined]
                # a new term has no known leader yet (never report the old one with it)
                self._SyncObj__raftLeader = None  # type: ignore[attr-defined]
            return
        self._prevote_grants.add(node.address)
        if 1 + len(self._prevote_grants) > (len(self.otherNodes) + 1) / 2:
            self._prevote_won = True
            self._SyncObj__raftElectionDeadline = 0  # type: ignore[attr-defined]

    def _onTick(self, timeToWait: float = 0.0) -> None:  # noqa: N802
        if self._safe and self.raft_state in (FOLLOWER, CANDIDATE):
            self._gate_election()
        if self._hand_over_asked:
            self._hand_over_asked = False
            if self.raft_state == LEADER and self.otherNodes:
                self._handing_over_until = _so.monotonicTime() + 2 * self.conf.raftMaxTimeout
                self.transferLeadership()
        SyncObj._onTick(self, timeToWait)
        if self._safe and self.raft_state == LEADER:
            self.journal.sync()
        self._observe()
        commands = self._commands
        if self._on_applied is not None and commands is not None and commands.complete_index != self._applied_seen:
            self._applied_seen = commands.complete_index
            self._on_applied()

    def _SyncObj__applyLogEntries(self) -> bool:  # noqa: N802
        """pysyncobj's ``__applyLogEntries`` with a time budget (``APPLY_BUDGET_S``): the same
        order and callbacks, but a backlog is applied over several ticks; the pipe wakes
        the next tick at once."""
        last_applied = self._SyncObj__raftLastApplied  # type: ignore[attr-defined]
        commit = self._SyncObj__raftCommitIndex  # type: ignore[attr-defined]
        if commit <= last_applied:
            return False
        waiting = self._SyncObj__commandsWaitingCommit  # type: ignore[attr-defined]
        stop_at = _so.monotonicTime() + APPLY_BUDGET_S
        for entry in self._SyncObj__getEntries(last_applied + 1, commit - last_applied):  # type: ignore[attr-defined]
            term = entry[2]
            subscribers = waiting.pop(entry[1], [])
            try:
                result = self._SyncObj__doApplyCommand(entry[0])  # type: ignore[attr-defined]
            except _so.SyncObjExceptionWrongVer as e:     # as pysyncobj: logged, not counted
                log.error("log entry %d asks for code version %d", entry[1], e.ver)
                continue
            for subscriber_term, callback in subscribers:
                if subscriber_term == term:
                    callback(result, _so.FAIL_REASON.SUCCESS)
                else:
                    callback(None, _so.FAIL_REASON.DISCARDED)
            self._SyncObj__raftLastApplied += 1  # type: ignore[attr-defined]
            if _so.monotonicTime() >= stop_at and self._SyncObj__raftLastApplied < commit:  # type: ignore[attr-defined]
                notifier = getattr(self, "_SyncObj__pipeNotifier", None)
                if notifier is not None:
                    notifier.notify()          # the rest in the next tick, without waiting for a poll
                break
        return not self.conf.appendEntriesUseBatch

    def _gate_election(self) -> None:
        now = _so.monotonicTime()
        deadline = self._SyncObj__raftElectionDeadline  # type: ignore[attr-defined]
        if deadline >= now or not self._SyncObj__connectedToAnyone():  # type: ignore[attr-defined]
            return
        if self._prevote_won:
            self._prevote_won = False     # let pysyncobj run the real election this tick
            return
        # Hold the real election back and ask for pre-votes instead.
        if not self._may_campaign:
            self._SyncObj__raftElectionDeadline = now + self._SyncObj__generateRaftTimeout()  # type: ignore[attr-defined]
            return
        # A pre-vote round disturbs nobody, so a refused one (a peer heard the dead leader a
        # moment later than we did) is retried after 2-4 heartbeats, not a whole timeout.
        period = self.conf.appendEntriesPeriod
        self._SyncObj__raftElectionDeadline = now + period * (2 + 2 * self._rng.random())  # type: ignore[attr-defined]
        self._prevote_round += 1
        self._prevote_grants = set()
        self._prevote_active_until = now + self.conf.raftMinTimeout
        if not self.otherNodes:
            self._prevote_won = True
            self._SyncObj__raftElectionDeadline = 0  # type: ignore[attr-defined]
            return
        msg = {
            "type": "galaxy_prevote", "round": self._prevote_round, "term": self.raftCurrentTerm + 1,
            "last_log_index": self._SyncObj__getCurrentLogIndex(),  # type: ignore[attr-defined]
            "last_log_term": self._SyncObj__getCurrentLogTerm(),  # type: ignore[attr-defined]
        }
        log.debug("pre-vote round %d for term %d", self._prevote_round, msg["term"])
        for node in self.otherNodes:
            self._SyncObj__transport.send(node, msg)  # type: ignore[attr-defined]

    def _observe(self) -> None:
        """Report every (term, leader) this node sees, for logs and the safety test."""
        if self._on_observe is None:
            return
        state = self.raft_state
        leader = self.leader_addr()
        key = (self.raftCurrentTerm, leader, state)
        if key != self._observed:
            self._observed = key
            self._on_observe(self.raftCurrentTerm, leader, STATE_NAMES.get(state, "?"))


def make_conf(*, min_timeout_s: float, max_timeout_s: float, heartbeat_s: float, connection_retry_s: float,
              bind_addr: str | None) -> SyncObjConf:
    """pysyncobj settings for a LAN coordinator group (reasons in docs/consensus.md)."""
    return SyncObjConf(
        raftMinTimeout=min_timeout_s,
        raftMaxTimeout=max_timeout_s,
        appendEntriesPeriod=heartbeat_s,
        # An isolated leader steps down after one max election timeout instead of 30 s.
        leaderFallbackTimeout=max_timeout_s,
        connectionTimeout=max(max_timeout_s, 1.0),
        connectionRetryTime=connection_retry_s,
        dynamicMembershipChange=True,
        # Calls made without a leader fail at once instead of queueing silently.
        commandsWaitLeader=False,
        # Send AppendEntries as soon as an entry is appended (and wake the tick thread through
        # its pipe), not at the next heartbeat: with pysyncobj's batching every commit waits
        # up to a heartbeat (50 ms) plus a poll period.  Throughput comes from Galaxy's own
        # group commit instead (coordinator.py: many commands per entry, one fsync per entry).
        appendEntriesUseBatch=False,
        # Never fork a process that runs threads and an event loop.
        useFork=False,
        # The group's log holds only no-ops and membership changes: never compact it.
        logCompactionMinEntries=10**9,
        logCompactionMinTime=10**9,
        bindAddress=bind_addr,
        maxBindRetries=20,
        commandsQueueSize=COMMANDS_QUEUE_MAX,
        bindRetryTime=0.1,
    )
