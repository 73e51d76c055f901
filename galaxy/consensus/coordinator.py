"""The consensus adapter: runs the hardened pysyncobj group and carries out ``voters.plan``.

Theory of operation
-------------------
The node calls ``step(now_ms, peers)`` a few times per heartbeat from its event loop.
``step`` reads the Raft state (plain attribute reads of pysyncobj's tick thread, safe
under the GIL), asks the pure planner what to do, and does it: start or stop the
SyncObj, invite a spare, request one membership change.  Results of membership changes
arrive on pysyncobj's tick thread and only flip a flag read by the next step.

What the rest of Galaxy sees is narrow: ``view()`` (gossiped), ``leader()``,
``is_coordinator()`` (leader *and* a quorum acked within ``leader_lease_ms``), ``term``
(the fencing token every coordinator decision carries) and ``voters``.

Commands: ``submit(cmd, timeout_ms)`` appends a command (``messages.COMMAND_TYPES``) to
the log and returns the result of applying it here (``commands.Replicated``, built fresh
from ``machines()`` each time Raft starts, so that replaying the journal rebuilds it).
On a follower pysyncobj forwards the call to the leader and answers once the entry is
applied locally.  Failures are ``commands.CommandError``: ``no_coordinator`` when no
leader is known (retried until the deadline: nothing was appended), ``timeout`` when the
outcome is unknown.

Durable state: ``raft/journal`` (+ ``.vote``) holds the Raft log, term and vote; the
store keeps whether this node is a confirmed voter and the last configuration it saw,
so that a restarted voter rejoins with its old identity.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from collections import deque
from typing import Any, Callable, Iterable

from pysyncobj.config import FAIL_REASON

from galaxy.consensus import voters as planner
from galaxy.consensus.commands import CommandError, Replicated, StateMachine, encode
from galaxy.consensus.raft import LEADER, HardenedSyncObj, check_hooks, make_conf
from galaxy.messages import RaftView

log = logging.getLogger("galaxy.consensus")

INVITE_TIMEOUT_MS = 10_000          # give up on a spare that never starts Raft, try the next
OBSERVATIONS_MAX = 1_000            # (term, leader) history kept for /v1/status and tests
SUBMIT_RETRY_MS = 50                # while no leader is known: about one heartbeat between tries
# pysyncobj reasons after which the command was certainly not appended (safe to try again)
_NOT_APPENDED = (FAIL_REASON.MISSING_LEADER, FAIL_REASON.NOT_LEADER, FAIL_REASON.DISCARDED,
                 FAIL_REASON.LEADER_CHANGED, FAIL_REASON.REQUEST_DENIED)


class Coordinator:
    def __init__(self, *, cfg, node_id: str, raft_host: str, raft_port: int, data_dir: str, secret: bytes,
                 store, safe: bool = True, on_leader_change: Callable[[int, str | None], None] | None = None,
                 machines: Callable[[], Iterable[StateMachine]] = tuple,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        check_hooks()
        self._cfg = cfg
        self.node_id = node_id
        self.raft_addr = f"{raft_host}:{raft_port}"
        self._bind_addr = f"{cfg.bind}:{raft_port}"
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
        self._invited: tuple[str, ...] = ()
        self._invited_at_ms = 0
        self._change_pending = False
        self._change_deadline_ms = 0
        self._started_ms: int | None = None
        self._last_leader: tuple[int, str | None] = (0, None)
        self.leader_changes = 0
        self.founded = False                 # this node founded the group (for the start-up message)
        self.observations: deque[tuple[int, str | None, str]] = deque(maxlen=OBSERVATIONS_MAX)

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
        return (self._addr_to_id.get(addr, addr) if addr else None), obj.raftCurrentTerm

    def view(self) -> RaftView:
        obj = self._obj
        if obj is None:
            return RaftView(raft_state="none")
        leader, term = self.leader()
        if self.is_coordinator():
            state = "leader"
        elif not obj.contacted():
            state = "starting"
        else:
            state = {0: "follower", 1: "candidate"}.get(obj.raft_state, "follower")
        return RaftView(term=term, leader=leader or "", voters=tuple(self.voters()),
                        invited=self._invited if state == "leader" else (), raft_state=state)

    def status(self) -> dict:
        obj = self._obj
        return {
            "running": obj is not None,
            "member": self._member,
            "raft_addr": self.raft_addr,
            "commit_index": obj.raftCommitIndex if obj is not None else 0,
            "leader_changes": self.leader_changes,
            "fsyncs": getattr(obj.journal, "fsyncs", 0) if obj is not None else 0,
            "last_applied": obj.raftLastApplied if obj is not None else 0,
            "commands_applied": self.commands.applied_total if self.commands is not None else 0,
        }

    # -- commands
    async def submit(self, cmd: Any, timeout_ms: int) -> dict:
        """Commit ``cmd`` through the log; the result of applying it (CommandError if not)."""
        data = encode(cmd)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_ms / 1000
        while True:
            obj = self._obj
            if obj is None:
                raise CommandError("no_coordinator", "this node does not run Raft")
            if obj.raft_state != LEADER and obj.leader_addr() is None:
                # pysyncobj would refuse it (MISSING_LEADER) a tick later; wait for a leader here
                if loop.time() + SUBMIT_RETRY_MS / 1000 >= deadline:
                    raise CommandError("no_coordinator", "no coordinator: the voters have no quorum or an "
                                                         f"election is running (waited {timeout_ms} ms)")
                await asyncio.sleep(SUBMIT_RETRY_MS / 1000)
                continue
            fut: asyncio.Future = loop.create_future()

            def done(result: Any, error: int, fut: asyncio.Future = fut) -> None:   # pysyncobj tick thread
                try:
                    loop.call_soon_threadsafe(_settle, fut, result, error)
                except RuntimeError:        # the loop closed while the entry was in flight
                    pass

            obj.apply_command(data, callback=done)
            try:
                result, error = await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise CommandError("timeout", f"no answer from the coordinator within {timeout_ms} ms; the change "
                                              "may still be applied (check the version)") from None
            if error == FAIL_REASON.SUCCESS:
                if not isinstance(result, dict):
                    raise CommandError("no_coordinator", "this node stopped applying the log")
                return result
            if error == FAIL_REASON.QUEUE_FULL:
                raise CommandError("busy", "the coordinator's command queue is full; try again")
            if error not in _NOT_APPENDED:
                raise CommandError("timeout", f"the outcome is unknown (pysyncobj reason {error}); check the version")
            if loop.time() + SUBMIT_RETRY_MS / 1000 >= deadline:
                raise CommandError("no_coordinator", "no coordinator: the voters have no quorum or an election "
                                                     f"is running (waited {timeout_ms} ms)")
            await asyncio.sleep(SUBMIT_RETRY_MS / 1000)

    # -- driven by the node
    def step(self, now_ms: int, peers: list[planner.PeerInfo], has_seeds: bool) -> None:
        if self._started_ms is None:
            self._started_ms = now_ms
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
        local = planner.Local(
            id=self.node_id, role=self._cfg.role, raft_addr=self.raft_addr, running=obj is not None,
            member=self._member, is_leader=self.is_coordinator(), term=self.term,
            config=self._config, change_pending=self._change_pending,
            uptime_ms=now_ms - self._started_ms, has_seeds=has_seeds, seen_group=self._seen_group)
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
            case planner.Start(partners):
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
        self._obj = HardenedSyncObj(
            self.raft_addr, list(partners), conf, secret=self._secret,
            journal_file=os.path.join(self._dir, "journal"), may_campaign=self._member, safe=self._safe,
            on_observe=self._observe, commands=self.commands, on_fatal=self._on_fatal)
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

    def _retire(self) -> None:
        self.stop()
        # The state machines go with the log: what this group committed is not the mesh's.
        self.commands = None
        self._member = False
        self._config = self._stored_config = ()
        self._store.put("raft.member", "0")
        self._store.put("raft.config", "[]")
        shutil.rmtree(self._dir, ignore_errors=True)

    def transfer_leadership(self) -> bool:
        """Before a graceful stop: hand leadership to a caught-up follower (Raft TimeoutNow)."""
        obj = self._obj
        if obj is None or obj.raft_state != LEADER or not obj.otherNodes:
            return False
        obj.transferLeadership()
        return True

    def stop(self) -> None:
        obj, self._obj = self._obj, None
        if obj is not None:
            obj.destroy_synchronous()


def _settle(fut: asyncio.Future, result: Any, error: int) -> None:
    if not fut.done():
        fut.set_result((result, error))
