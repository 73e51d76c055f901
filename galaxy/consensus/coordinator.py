"""The consensus adapter: runs the hardened pysyncobj group and carries out ``voters.plan``.

Theory of operation
-------------------
The node calls ``step(now_ms, peers)`` a few times per heartbeat from its event loop.
``step`` reads the Raft state (plain attribute reads of pysyncobj's tick thread, safe
under the GIL), asks the pure planner what to do, and does it: start or stop the
SyncObj, invite a spare, request one membership change.  Results of membership changes
arrive on pysyncobj's tick thread and only flip a flag read by the next step.

Leaving (``begin_leave`` / ``leave_step``, from ``Node.stop``): a voter that stops
gracefully gossips ``raft_state`` ``leaving``, hands leadership over if it leads
(``HardenedSyncObj.hand_over``), and keeps running Raft until the leader's gossiped view
no longer lists it: the leader removes a leaving voter at once (``voters.plan``), while
the leaver still acks, so the removal commits even when only two voters were left.  A
follower that has not heard its leader for ``LEADER_SILENT_TIMEOUTS`` election timeouts
reports no leader (pysyncobj keeps naming it while it can reach no voter).

What the rest of Galaxy sees is narrow: ``view()`` (gossiped), ``leader()``,
``is_coordinator()`` (leader *and* a quorum acked within ``leader_lease_ms``), ``term``
(the fencing token every coordinator decision carries) and ``voters``.

Commands: ``submit(cmd, timeout_ms)`` appends a command (``messages.COMMAND_TYPES``) to
the log and returns the result of applying it here (``commands.Replicated``, built fresh
from ``machines()`` each time Raft starts, so that replaying the journal rebuilds it).
On a follower pysyncobj forwards the call to the leader and answers once the entry is
applied locally.  Failures are ``commands.CommandError``: ``no_coordinator`` when no
leader is known (retried until the deadline: nothing was appended), ``timeout`` when the
outcome is unknown, ``busy`` when the submit queue is full.

Group commit (``_Batcher``): a Raft round trip costs about the same for one command as for
hundreds, so ``submit`` only queues the command; one pump task per event loop sends the
queue head as one log entry (``commands.encode_batch``: the command itself when alone,
else a ``CommandBatch`` of up to ``BATCH_COMMANDS_MAX`` commands / ``BATCH_PACK_BYTES_MAX``
bytes) whenever fewer than ``BATCHES_IN_FLIGHT_MAX`` entries are in flight.  An idle
coordinator therefore sends a command at once; a busy one batches exactly what arrived
during the previous round trip.  The entry's result is routed back per command: each
submitter gets its own command's result (``results[i]``), and a failed entry fails every
member the way a lone command would fail (``busy``, ``timeout``, or — when pysyncobj says
nothing was appended — back to the queue head, in order, retried until each member's own
deadline).  A member whose deadline passes while still queued gets ``no_coordinator`` (no
leader known) or ``busy`` (nothing was appended either way); one whose entry is in flight
gets ``timeout``.  ``submit_many`` queues several commands at once, adjacent (a batch of
transfers from one request): they share one or few entries, and each gets its own outcome,
a result or the CommandError a lone submit would have raised.  Bounds:
``SUBMIT_QUEUE_MAX`` queued commands, ``BATCHES_IN_FLIGHT_MAX`` entries in flight, each
in-flight entry given up at its last member's deadline.

Durable state: ``raft/journal`` (+ ``.vote``) holds the Raft log, term and vote; the
store keeps whether this node is a confirmed voter and the last configuration it saw,
so that a restarted voter rejoins with its old identity, and the recovery epoch
(``raft.epoch``) with the last recovery order (``raft.recover``).

Recovery (``reform``, docs/recover.md): ``galaxy recover`` tells every survivor the same
``recover.Order``.  The node stores the order first, then stops Raft and rewrites its
files — the chosen node keeps its log with the old group's membership changes turned
into no-ops, the others discard theirs — sets the order's term, and only then marks the
order done and starts Raft with the survivors as the whole configuration, in the new
epoch (whose transport key differs, so old voters cannot talk to the new group).  A
crash in between redoes the file step at the next start.  Nodes of an older epoch that
meet the new group's leader forget their Raft state and join as new spares
(``voters.plan``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
from collections import deque
from typing import Any, Callable, Iterable

from pysyncobj.config import FAIL_REASON

from galaxy.consensus import raft as raft_files
from galaxy.consensus import recover as recovery
from galaxy.consensus import voters as planner
from galaxy.consensus.commands import (BATCH_COMMANDS_MAX, BATCH_PACK_BYTES_MAX, CommandError, Replicated,
                                       StateMachine, batch_cut, encode, encode_batch)
from galaxy.consensus.raft import LEADER, HardenedSyncObj, check_hooks, make_conf
from galaxy.messages import ALIVE, CommandBatch, RaftView

log = logging.getLogger("galaxy.consensus")

INVITE_TIMEOUT_MS = 10_000          # give up on a spare that never starts Raft, try the next
OBSERVATIONS_MAX = 1_000            # (term, leader) history kept for /v1/status and tests
SUBMIT_RETRY_MS = 50                # while no leader is known: about one heartbeat between tries
# pysyncobj reasons after which the command was certainly not appended (safe to try again)
_NOT_APPENDED = (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED,
                 FAIL_REASON.LEADER_CHANGED, FAIL_REASON.REQUEST_DENIED)
_GAVE_UP = -1                       # our own reason: the entry's last member deadline passed
SUBMIT_QUEUE_MAX = 10_000           # commands waiting for an entry: ~2 s of the 5k/s target, then busy
# Two entries in flight: while one is being replicated and fsynced, the next is already
# appended (pipelining); more only splits the same load into smaller batches.
BATCHES_IN_FLIGHT_MAX = 2
# A follower that heard no AppendEntries for this many max election timeouts (1.2 s LAN)
# names no leader: it would otherwise show a departed one for good (module docstring).
LEADER_SILENT_TIMEOUTS = 2
HAND_OVER_RETRY_MS = 200            # a denied transfer (no follower caught up yet) is asked again


class Coordinator:
    def __init__(self, *, cfg, node_id: str, raft_host: str, raft_port: int, data_dir: str, secret: bytes,
                 raft_hold: socket.socket | None = None,
                 store, safe: bool = True, on_leader_change: Callable[[int, str | None], None] | None = None,
                 machines: Callable[[], Iterable[StateMachine]] = tuple,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 on_epoch: Callable[[int], None] | None = None) -> None:
        check_hooks()
        self._cfg = cfg
        self.node_id = node_id
        self.raft_addr = f"{raft_host}:{raft_port}"
        self._bind_addr = f"{cfg.bind}:{raft_port}"
        self._raft_hold = raft_hold         # the port, held until pysyncobj binds it (node.hold_tcp_port)
        self._dir = os.path.join(data_dir, "raft")
        self._secret = secret
        self._store = store
        self._safe = safe
        self._on_leader_change = on_leader_change
        self._machines = machines
        self._on_fatal = on_fatal
        self.commands: Replicated | None = None     # the state machines of the running Raft group
        self._obj: HardenedSyncObj | None = None
        self._member = store.get("raft.member") == "1"
        self._seen_group = store.get("raft.seen_group") == "1" or self._member
        self._config: tuple[str, ...] = tuple(json.loads(store.get("raft.config") or "[]"))
        self._stored_config = self._config
        self._addr_to_id: dict[str, str] = {self.raft_addr: node_id}
        self._unclaimed_since: dict[str, int] = {}    # config address no member advertises -> since (ms)
        self._invited: tuple[str, ...] = ()
        self._invited_at_ms = 0
        self._change_pending = False
        self._change_deadline_ms = 0
        self._started_ms: int | None = None
        self._last_leader: tuple[int, str | None] = (0, None)
        self.leader_changes = 0
        self.founded = False                 # this node founded the group (for the start-up message)
        self.observations: deque[tuple[int, str | None, str]] = deque(maxlen=OBSERVATIONS_MAX)
        self._batcher: _Batcher | None = None
        self._on_epoch = on_epoch            # the Raft transport key follows the epoch (recover.raft_label)
        self.epoch = int(store.get("raft.epoch") or 0)
        self.plan_id = ""
        self._reforming = False
        self.leaving = False                 # stopping: gossiped as raft_state "leaving"
        self._hand_over_at_ms = 0
        self._finish_interrupted_reform()
        # called on pysyncobj's tick thread after a tick that applied commands (at most once
        # a tick): e.g. the ledger service wakes its publisher.  Must not block.
        self.applied_listeners: list[Callable[[], None]] = []

    # -- what the rest of Galaxy reads
    @property
    def running(self) -> bool:
        return self._obj is not None

    @property
    def term(self) -> int:
        return self._obj.raftCurrentTerm if self._obj is not None else 0

    def is_coordinator(self) -> bool:
        return self._obj is not None and self._obj.is_valid_leader(self._cfg.leader_lease_ms / 1000)

    def caught_up(self) -> bool:
        """Leader whose state machines hold every committed command (see HardenedSyncObj.caught_up)."""
        obj = self._obj
        return obj is not None and self.is_coordinator() and obj.caught_up()

    def reconfigure(self, cfg) -> None:
        """Take new cluster-wide settings (voter_replace_after_ms) from the next step on."""
        self._cfg = cfg

    def voters(self) -> list[str]:
        addrs = self._obj.config_addrs() if self._obj is not None else []
        return sorted(self._addr_to_id.get(a, a) for a in addrs)

    def leader(self) -> tuple[str | None, int]:
        """(leader id, term) as this voter knows it; (None, 0) when not running Raft."""
        obj = self._obj
        if obj is None:
            return None, 0
        if obj.raft_state == LEADER:
            return (self.node_id if self.is_coordinator() else None), obj.raftCurrentTerm
        addr = obj.leader_addr()
        if addr and not obj.heard_leader_within(LEADER_SILENT_TIMEOUTS * self._cfg.raft_max_timeout_ms / 1000):
            addr = None
        return (self._addr_to_id.get(addr, addr) if addr else None), obj.raftCurrentTerm

    def view(self) -> RaftView:
        obj = self._obj
        if obj is None:
            return RaftView(raft_state="none")
        leader, term = self.leader()
        if self.leaving:
            state = planner.LEAVING
        elif self.is_coordinator():
            state = "leader"
        elif not obj.contacted():
            state = "starting"
        else:
            state = {0: "follower", 1: "candidate"}.get(obj.raft_state, "follower")
        return RaftView(term=term, leader=leader or "", voters=tuple(self.voters()),
                        invited=self._invited if state == "leader" else (), raft_state=state, epoch=self.epoch)

    def status(self) -> dict:
        obj = self._obj
        return {
            "running": obj is not None,
            "member": self._member,
            "raft_addr": self.raft_addr,
            "config": list(self._config),
            "commit_index": obj.raftCommitIndex if obj is not None else 0,
            "leader_changes": self.leader_changes,
            "fsyncs": getattr(obj.journal, "fsyncs", 0) if obj is not None else 0,
            "last_applied": obj.raftLastApplied if obj is not None else 0,
            "commands_applied": self.commands.applied_total if self.commands is not None else 0,
            "submit": self._batcher.stats() if self._batcher is not None else {},
        }

    # -- commands
    async def submit(self, cmd: Any, timeout_ms: int) -> dict:
        """Commit ``cmd`` through the log; the result of applying it (CommandError if not).
        Concurrent submits share log entries (group commit, module docstring)."""
        if type(cmd) is CommandBatch:
            raise CommandError("invalid", "batches are made by the coordinator; submit each command")
        data = encode(cmd)
        if self._obj is None:
            raise CommandError("no_coordinator", "this node does not run Raft")
        return await self._loop_batcher().submit(data, timeout_ms)

    async def submit_many(self, cmds: list[Any], timeout_ms: int) -> list[dict | CommandError]:
        """Commit several commands queued together (so they share one or few log entries);
        one outcome per command, in order: its result, or the CommandError ``submit`` would
        have raised for it alone.  Raises only when none was queued (``invalid``, ``busy``,
        ``no_coordinator``): then nothing was appended."""
        if any(type(cmd) is CommandBatch for cmd in cmds):
            raise CommandError("invalid", "batches are made by the coordinator; submit each command")
        datas = [encode(cmd) for cmd in cmds]
        if self._obj is None:
            raise CommandError("no_coordinator", "this node does not run Raft")
        return await self._loop_batcher().submit_many(datas, timeout_ms)

    def _loop_batcher(self) -> _Batcher:
        loop = asyncio.get_running_loop()
        batcher = self._batcher
        if batcher is None or batcher.loop is not loop or batcher.closed:
            # One batcher per event loop: tests run several loops over one Coordinator.
            if batcher is not None:
                batcher.close()
            batcher = self._batcher = _Batcher(loop, lambda: self._obj)
        return batcher

    # -- driven by the node
    def step(self, now_ms: int, peers: list[planner.PeerInfo], has_seeds: bool) -> None:
        if self._started_ms is None:
            self._started_ms = now_ms
        if self._raft_hold is not None:
            self._refuse_early()
        if self._reforming:
            return
        if self._pending_reform is not None:
            order, self._pending_reform = self._pending_reform, None
            self._finish_reform(order)
            return
        for p in peers:
            self._addr_to_id[p.raft_addr] = p.id
        obj = self._obj
        if obj is not None:
            self._persist_membership(obj)
        if self._change_pending and now_ms > self._change_deadline_ms:
            # every call has a timeout: a lost callback must not freeze the group's growth
            log.info("membership change timed out after %d ms; will retry", self._cfg.raft_call_timeout_ms)
            self._change_pending = False
        if self._invited and (now_ms - self._invited_at_ms > INVITE_TIMEOUT_MS or
                              any(self._addr_to_id.get(a) in self._invited for a in self._config)):
            self._invited = ()
        if not self._seen_group and (self._member or any(p.raft.voters for p in peers)):
            self._seen_group = True
            self._store.put("raft.seen_group", "1")
        claimed = {p.raft_addr for p in peers}
        claimed.add(self.raft_addr)
        since = self._unclaimed_since
        self._unclaimed_since = {a: since.get(a, now_ms) for a in self._config if a not in claimed}
        local = planner.Local(
            id=self.node_id, role=self._cfg.role, raft_addr=self.raft_addr, running=obj is not None,
            member=self._member, is_leader=self.is_coordinator(), term=self.term,
            config=self._config, change_pending=self._change_pending,
            uptime_ms=now_ms - self._started_ms, has_seeds=has_seeds, seen_group=self._seen_group,
            epoch=self.epoch,
            config_ids=tuple((a, self._addr_to_id[a]) for a in self._config if a in self._addr_to_id),
            unclaimed_ms=tuple((a, now_ms - t) for a, t in self._unclaimed_since.items()))
        actions = planner.plan(local, peers, voters=self._cfg.voters,
                               bootstrap_window_ms=self._cfg.bootstrap_window_ms,
                               voter_replace_after_ms=self._cfg.voter_replace_after_ms)
        for action in actions:
            self._execute(now_ms, action)

    def _persist_membership(self, obj: HardenedSyncObj) -> None:
        if obj.contacted() and not self._member:
            self._member = True
            self._store.put("raft.member", "1")
        config = tuple(obj.config_addrs())
        if config != self._stored_config:
            log.info("raft configuration: %s", ", ".join(self._addr_to_id.get(a, a) for a in config),
                     extra={"event": "raft_config", "voters": [self._addr_to_id.get(a, a) for a in config]})
            self._config = self._stored_config = config
            self._store.put("raft.config", json.dumps(list(config)))

    def _execute(self, now_ms: int, action: planner.Action) -> None:
        match action:
            case planner.Found():
                log.info("founding a new coordinator group", extra={"event": "raft_found"})
                self._member = self.founded = True
                self._store.put("raft.member", "1")
                self._start(())
            case planner.Start(partners, epoch):
                if epoch != self.epoch:
                    log.info("joining the group of recovery epoch %d", epoch, extra={"event": "raft_epoch"})
                    self._set_epoch(epoch, "joined")
                log.info("starting Raft with partners %s", list(partners), extra={"event": "raft_start"})
                self._start(partners)
            case planner.Invite(node_id):
                if node_id not in self._invited:
                    log.info("inviting %s to become a voter", node_id, extra={"event": "raft_invite"})
                    self._invited, self._invited_at_ms = (node_id,), now_ms
            case planner.Add(node_id, addr):
                log.info("adding voter %s (%s)", node_id, addr, extra={"event": "raft_add"})
                self._change(now_ms, lambda cb: self._obj.addNodeToCluster(addr, callback=cb))
            case planner.Remove(node_id, addr):
                log.info("removing voter %s (%s)", node_id, addr, extra={"event": "raft_remove"})
                self._change(now_ms, lambda cb: self._obj.removeNodeFromCluster(addr, callback=cb))
            case planner.Retire(reason):
                log.warning("leaving the Raft group: %s", reason, extra={"event": "raft_retire"})
                self._retire()

    def _change(self, now_ms: int, request: Callable[[Callable], None]) -> None:
        if self._obj is None:
            return
        self._change_pending = True
        self._change_deadline_ms = now_ms + self._cfg.raft_call_timeout_ms

        def done(_result, error) -> None:   # pysyncobj tick thread
            self._change_pending = False
            if error:
                log.info("membership change not applied (pysyncobj reason %s); will retry", error)

        request(done)

    def _start(self, partners: tuple[str, ...]) -> None:
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        self._store.put("raft.journal", os.path.join(self._dir, "journal"))
        conf = make_conf(min_timeout_s=self._cfg.raft_min_timeout_ms / 1000,
                         max_timeout_s=self._cfg.raft_max_timeout_ms / 1000,
                         heartbeat_s=self._cfg.raft_heartbeat_ms / 1000,
                         connection_retry_s=self._cfg.raft_connection_retry_ms / 1000,
                         bind_addr=self._bind_addr)
        # Fresh machines: pysyncobj replays the whole journal into them from index 1.
        self.commands = Replicated(self._machines())
        self._release_port()
        self._obj = HardenedSyncObj(
            self.raft_addr, list(partners), conf, secret=self._secret,
            journal_file=os.path.join(self._dir, "journal"), may_campaign=self._member, safe=self._safe,
            on_observe=self._observe, commands=self.commands, on_fatal=self._on_fatal, on_applied=self._applied)
        self._config = tuple(self._obj.config_addrs())

    def _observe(self, term: int, leader_addr: str | None, state: str) -> None:
        """pysyncobj tick thread: log every (term, leader) this node sees, once."""
        leader = self._addr_to_id.get(leader_addr, leader_addr) if leader_addr else None
        self.observations.append((term, leader, state))
        if leader is not None and (term, leader) != self._last_leader:
            self._last_leader = (term, leader)
            self.leader_changes += 1
            log.info("coordinator is %s (term %d)", leader, term,
                     extra={"event": "leader", "term": term, "leader": leader, "raft_state": state})
            if self._on_leader_change is not None:
                self._on_leader_change(term, leader)

    def _applied(self) -> None:
        for listener in self.applied_listeners:      # pysyncobj tick thread
            listener()

    def _retire(self) -> None:
        self.stop()
        # The state machines go with the log: what this group committed is not the mesh's.
        self.commands = None
        self._member = False
        self._config = self._stored_config = ()
        self._store.put("raft.member", "0")
        self._store.put("raft.config", "[]")
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- recovery (module docstring, docs/recover.md)
    def raft_facts(self) -> dict:
        """What this node's Raft state says, for ``galaxy recover``."""
        obj = self._obj
        last_term, last_index = obj.log_position() if obj is not None else (0, 0)
        return {"raft_addr": self.raft_addr, "voter": obj is not None and last_index > 0, "epoch": self.epoch,
                "plan_id": self.plan_id, "voters": self.voters(), "term": self.term,
                "last_log_term": last_term, "last_log_index": last_index,
                "commit_index": obj.raftCommitIndex if obj is not None else 0}

    def reform(self, order: recovery.Order) -> None:
        """Carry out a checked order (``recover.check_order`` said APPLY).  Blocking (it stops
        and starts pysyncobj): call it off the event loop."""
        self._reforming = True
        try:
            self._store.put("raft.recover", json.dumps({"order": order.to_json(), "done": False}))
            self.stop()
            self._reform_files(order)
            self._finish_reform(order)
        finally:
            self._reforming = False

    def _reform_files(self, order: recovery.Order) -> None:
        journal = os.path.join(self._dir, "journal")
        if order.chosen == self.node_id:
            replaced = raft_files.neutralize_membership(journal)
            log.warning("recovery epoch %d: keeping this node's log (%d old membership changes neutralized)",
                        order.epoch, replaced, extra={"event": "raft_recover"})
        else:
            shutil.rmtree(self._dir, ignore_errors=True)
            log.warning("recovery epoch %d: discarding this node's log; it catches up from %s", order.epoch,
                        order.chosen, extra={"event": "raft_recover"})
        os.makedirs(self._dir, mode=0o700, exist_ok=True)
        raft_files.write_vote(journal, order.term)

    def _finish_reform(self, order: recovery.Order) -> None:
        """Files are rewritten: record the new group, then run it."""
        addrs = tuple(sorted(a for _, a in order.voters))
        for node_id, addr in order.voters:
            self._addr_to_id[addr] = node_id
        chosen = order.chosen == self.node_id
        # Only the chosen node may campaign at once; the others wait for its first contact,
        # so no empty log can win an election.
        self._member = chosen
        self._store.put("raft.member", "1" if chosen else "0")
        self._seen_group = True
        self._store.put("raft.seen_group", "1")
        self._config = self._stored_config = addrs
        self._store.put("raft.config", json.dumps(list(addrs)))
        self._set_epoch(order.epoch, order.plan_id)
        self._store.put("raft.recover", json.dumps({"order": order.to_json(), "done": True}))
        self._invited, self._change_pending = (), False
        self._start(tuple(a for a in addrs if a != self.raft_addr))

    def _set_epoch(self, epoch: int, plan_id: str) -> None:
        self.epoch, self.plan_id = epoch, plan_id
        self._store.put("raft.epoch", str(epoch))
        self._store.put("raft.plan_id", plan_id)
        if self._on_epoch is not None:
            self._on_epoch(epoch)

    def _finish_interrupted_reform(self) -> None:
        raw = self._store.get("raft.recover")
        self.plan_id = self._store.get("raft.plan_id") or ""
        if not raw:
            return
        doc = json.loads(raw)
        if doc.get("done"):
            return
        order = recovery.Order.from_json(doc["order"])
        log.warning("finishing the recovery order of epoch %d interrupted by a stop", order.epoch)
        self._reform_files(order)
        # the rest runs at the first step: _finish_reform starts Raft
        self._pending_reform = order

    _pending_reform: recovery.Order | None = None

    # -- leaving (module docstring)
    def begin_leave(self) -> None:
        """This node is stopping: from now on its view says ``leaving``."""
        self.leaving = True

    def leave_step(self, now_ms: int, peers: list[planner.PeerInfo]) -> str | None:
        """One step of leaving the group; None while it must go on, else why it is over:
        ``removed`` (the leader's gossiped view no longer lists this node), ``last`` (no
        other voter stays: the only one, or the others are gone or leaving too), or
        ``not_running``."""
        obj = self._obj
        if obj is None:
            return "not_running"
        others = set(obj.config_addrs()) - {self.raft_addr}
        if not any(p.raft_addr in others and p.state == ALIVE and p.raft.raft_state != planner.LEAVING
                   for p in peers):
            return "last"
        if obj.raft_state == LEADER:
            if now_ms - self._hand_over_at_ms >= HAND_OVER_RETRY_MS:
                if not self._hand_over_at_ms:
                    log.info("handing the coordinator role over before leaving", extra={"event": "leader_transfer"})
                self._hand_over_at_ms = now_ms
                obj.hand_over()
            return None
        removed = any(p.state == ALIVE and p.raft.raft_state == "leader" and p.raft.epoch == self.epoch
                      and p.raft.term >= self.term and self.node_id not in p.raft.voters for p in peers)
        return "removed" if removed else None

    def _refuse_early(self) -> None:
        """Close what connected to the held Raft port (a voter restarted before its Raft
        runs again): the peer retries at once instead of waiting out its connection timeout."""
        while True:
            try:
                conn, _ = self._raft_hold.accept()
            except OSError:              # BlockingIOError: nobody waiting
                return
            conn.close()

    def _release_port(self) -> None:
        hold, self._raft_hold = self._raft_hold, None
        if hold is not None:
            hold.close()

    def stop(self) -> None:
        self._release_port()
        obj, self._obj = self._obj, None
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.close()
        if obj is not None:
            obj.destroy_synchronous()


class _Pending:
    """One submitted command, from ``submit`` until its submitter has an answer."""

    __slots__ = ("data", "future", "deadline", "sent")

    def __init__(self, data: bytes, future: asyncio.Future, deadline: float) -> None:
        self.data = data
        self.future = future
        self.deadline = deadline            # loop time
        self.sent = False                   # in an entry handed to pysyncobj (outcome may be unknown)


class _Entry:
    """One log entry in flight: its members, in order."""

    __slots__ = ("members", "batched", "finished", "timer")

    def __init__(self, members: list[_Pending], batched: bool) -> None:
        self.members = members
        self.batched = batched
        self.finished = False
        self.timer: asyncio.TimerHandle | None = None


class _Batcher:
    """Group commit for one event loop (module docstring).  Runs on the loop's thread only;
    pysyncobj's tick thread reaches it through ``call_soon_threadsafe``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, obj: Callable[[], HardenedSyncObj | None]) -> None:
        self.loop = loop
        self._obj = obj
        self._queue: deque[_Pending] = deque()
        self._in_flight = 0
        self._flying: set[_Entry] = set()
        self._retry_at = 0.0                # loop time before which nothing is sent (after "not appended")
        self._wake = asyncio.Event()
        self.closed = False
        self._entries = self._commands = self._largest = self._requeued = 0
        self._task = loop.create_task(self._pump(), name="raft-submit")

    def stats(self) -> dict:
        return {"entries": self._entries, "commands": self._commands, "largest_batch": self._largest,
                "requeued": self._requeued, "queued": len(self._queue), "in_flight": self._in_flight}

    async def submit(self, data: bytes, timeout_ms: int) -> dict:
        if len(self._queue) >= SUBMIT_QUEUE_MAX:
            raise CommandError("busy", f"{len(self._queue)} commands are waiting for the coordinator; try again")
        p = _Pending(data, self.loop.create_future(), self.loop.time() + timeout_ms / 1000)
        self._queue.append(p)
        self._wake.set()
        try:
            return await asyncio.wait_for(p.future, max(0.0, p.deadline - self.loop.time()))
        except TimeoutError:
            raise self._late(p, timeout_ms) from None

    async def submit_many(self, datas: list[bytes], timeout_ms: int) -> list[dict | CommandError]:
        """Queue all of ``datas`` at once, in order (adjacent in the queue, so they share
        entries); each one's result or CommandError."""
        if len(self._queue) + len(datas) > SUBMIT_QUEUE_MAX:
            raise CommandError("busy", f"{len(self._queue)} commands are waiting for the coordinator; try again")
        deadline = self.loop.time() + timeout_ms / 1000
        pending = [_Pending(d, self.loop.create_future(), deadline) for d in datas]
        self._queue.extend(pending)
        self._wake.set()
        try:
            if pending:
                await asyncio.wait([p.future for p in pending], timeout=max(0.0, deadline - self.loop.time()))
        except BaseException:
            for p in pending:
                p.future.cancel()            # the submitter is gone: the pump skips what is still queued
            raise
        out: list[dict | CommandError] = []
        for p in pending:
            if not p.future.done():
                late = self._late(p, timeout_ms)
                p.future.cancel()
                out.append(late)
            elif p.future.cancelled():
                out.append(CommandError("no_coordinator", "this node stopped running Raft"))
            elif (error := p.future.exception()) is not None:
                out.append(error if isinstance(error, CommandError) else
                           CommandError("timeout", f"the outcome is unknown ({error.__class__.__name__})"))
            else:
                out.append(p.future.result())
        return out

    def _late(self, p: _Pending, timeout_ms: int) -> CommandError:
        """The error of a command whose deadline passed without an answer."""
        if p.sent:
            return CommandError("timeout", f"no answer from the coordinator within {timeout_ms} ms; the "
                                           "change may still be applied (check the version)")
        if not self._leader_known():
            return CommandError("no_coordinator", "no coordinator: the voters have no quorum or an election "
                                                  f"is running (waited {timeout_ms} ms)")
        return CommandError("busy", f"the command waited {timeout_ms} ms behind others and was not sent; "
                                    "try again")

    def close(self) -> None:
        """Fail what is queued (nothing of it was appended) and what is in flight (unknown),
        and stop the pump; callable from any thread."""
        if self.closed:
            return
        self.closed = True
        if self.loop.is_closed():
            self._queue.clear()
            return
        try:
            here = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            here = False
        if here:
            self._close_now()
        else:
            self.loop.call_soon_threadsafe(self._close_now)

    def _close_now(self) -> None:
        self._fail(list(self._queue), CommandError("no_coordinator", "this node stopped running Raft"))
        self._queue.clear()
        for entry in list(self._flying):
            self._finish(entry, None, _GAVE_UP)
        self._task.cancel()

    def _leader_known(self) -> bool:
        obj = self._obj()
        return obj is not None and (obj.raft_state == LEADER or obj.leader_addr() is not None)

    async def _pump(self) -> None:
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and self._in_flight < BATCHES_IN_FLIGHT_MAX and not self.closed:
                while self._queue and self._queue[0].future.done():
                    self._queue.popleft()          # its submitter gave up before it was sent
                if not self._queue:
                    break
                obj = self._obj()
                if obj is None:
                    self.close()
                    return
                wait_s = self._retry_at - self.loop.time()
                if not self._leader_known():
                    # pysyncobj would refuse it (MISSING_LEADER) a tick later; wait for a leader here
                    wait_s = max(wait_s, SUBMIT_RETRY_MS / 1000)
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                    continue
                self._send(obj)

    def _send(self, obj: HardenedSyncObj) -> None:
        members: list[_Pending] = []
        # lazy: batch_cut stops reading at the first command that does not fit
        n = batch_cut((len(p.data) for p in self._queue if not p.future.done()), BATCH_COMMANDS_MAX,
                      BATCH_PACK_BYTES_MAX)
        while len(members) < n:
            p = self._queue.popleft()
            if not p.future.done():
                p.sent = True
                members.append(p)
        entry = _Entry(members, batched=n > 1)
        data = encode_batch([p.data for p in members])
        self._in_flight += 1
        self._flying.add(entry)
        self._entries += 1
        self._commands += n
        self._largest = max(self._largest, n)
        loop = self.loop

        def done(result: Any, error: int) -> None:   # pysyncobj tick thread
            try:
                loop.call_soon_threadsafe(self._finish, entry, result, error)
            except RuntimeError:        # the loop closed while the entry was in flight
                pass

        entry.timer = loop.call_at(max(p.deadline for p in members), self._finish, entry, None, _GAVE_UP)
        obj.apply_command(data, callback=done)

    def _finish(self, entry: _Entry, result: Any, error: int) -> None:
        if entry.finished:
            return
        entry.finished = True
        if entry.timer is not None:
            entry.timer.cancel()
        self._flying.discard(entry)
        self._in_flight -= 1
        self._wake.set()
        members = entry.members
        if error == FAIL_REASON.SUCCESS:
            self._route(entry, result)
        elif error == FAIL_REASON.QUEUE_FULL:
            self._fail(members, CommandError("busy", "the coordinator's command queue is full; try again"))
        elif error in _NOT_APPENDED:
            # Nothing was appended: back to the head of the queue, in order, for another try.
            again = [p for p in members if not p.future.done()]
            for p in reversed(again):
                p.sent = False
                self._queue.appendleft(p)
            self._requeued += len(again)
            self._retry_at = self.loop.time() + SUBMIT_RETRY_MS / 1000
        elif error == _GAVE_UP:
            self._fail(members, CommandError("timeout", "no answer from the coordinator in time; the change may "
                                                        "still be applied (check the version)"))
        else:
            self._fail(members, CommandError("timeout", f"the outcome is unknown (pysyncobj reason {error}); "
                                                        "check the version"))

    def _route(self, entry: _Entry, result: Any) -> None:
        members = entry.members
        if not isinstance(result, dict):
            self._fail(members, CommandError("no_coordinator", "this node stopped applying the log"))
            return
        if not entry.batched:
            _answer(members[0], result)
            return
        results = result.get("results")
        if result.get("ok") is False:
            # The entry as a whole was rejected (this node cannot decode it): a committed,
            # deterministic outcome, the same for every member.
            for p in members:
                _answer(p, result)
        elif isinstance(results, list) and len(results) == len(members):
            for p, r in zip(members, results):
                _answer(p, r)
        else:
            self._fail(members, CommandError("timeout", f"the batch's result does not list {len(members)} results; "
                                                        "check the version"))

    @staticmethod
    def _fail(members: list[_Pending], error: CommandError) -> None:
        for p in members:
            if not p.future.done():
                p.future.set_exception(CommandError(error.code, error.message))


def _answer(p: _Pending, result: Any) -> None:
    if not p.future.done():
        p.future.set_result(result)
