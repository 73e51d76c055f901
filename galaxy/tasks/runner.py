"""The node's task service: submission, scheduling (coordinator only) and execution.

Theory of operation: thin.  Every decision is a transition of ``tasks.core`` applied to the
task document this node's replica holds now, written back through ``DocsRunner`` (persisted
before it is gossiped); placement is ``scheduler.plan``; running is ``executor``.  One loop
wakes on every change of a task document, of membership (the node's events), of the
coordinator's lease, and of a local attempt, when a wait it started is over, and every
``LOOP_INTERVAL_MS`` for what nothing announces; it runs two steps:

* *worker step* (every node): start the attempts assigned here (fenced by Raft term, and
  only while they fit what this node offers, so a coordinator that has not yet seen its
  predecessor's assignments cannot overcommit it); report running, progress and the end;
  kill attempts that are no longer current (a newer attempt, a cancel, a terminal state);
  after a restart, settle attempts that were running here (their processes died with the
  node: PR_SET_PDEATHSIG).
* *coordinator step* (only while this node holds the Raft lease): give up attempts whose
  node is dead or left (retry or fail), re-issue assignments made under an older term, and
  place pending tasks with ``scheduler.plan``.

A submission is acknowledged only once the document is on this node's disk and on one
other live member's (``DocsRunner.put_acked``).  Draining: a ``node`` document per node
carries ``draining``; the scheduler skips such nodes and a draining node with nothing left
running leaves the mesh.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from galaxy.clock import Clock
from galaxy.config import Config
from galaxy.executor import ExecSpec, Executor
from galaxy.gossip.docs_runner import DocsRunner, NotReplicated
from galaxy.gossip.replica import Doc, Lattice
from galaxy.histogram import TASK_BUCKETS_S, Histogram
from galaxy.scheduler import (  # noqa: F401 (QUEUE_*: the auto queue's bounds, read here by tests)
    QUEUE_BUFFER_MS, QUEUE_FACTOR_MAX, Assigned, Demand, Fence, NodeView, PendingTask, Placed, auto_queue_max, plan,
    room_for_any, start_order,
)
from galaxy.tasks import core as tc
from galaxy.tasks.blobs import Blobs, BlobError
from galaxy.tasks.order import TaskOrder

log = logging.getLogger("galaxy.tasks")

NODE_TYPE = "node"                 # per-node settings every node sees: {"draining": bool}
RUNNING_REPORT_MS = 100           # an attempt still running this long after its spawn is recorded running
ENDS_FLUSH_MS = 20                 # a busy worker writes its attempts' ends at most this often (result
                                   # documents); well under QUEUE_BUFFER_MS, the work its queue holds
LOOP_INTERVAL_MS = 500             # also re-checks what no event announces (a lost node's timer)
PLAN_GAP_MS = 10                   # (coordinator) what only fits a worker's queue, not a free slot,
                                   # is placed at most this often (many to a pass on a busy mesh)
RUN_MS_WEIGHT = 0.2                # of the newest attempt in a node's moving average of run times
TOPUP_PENDING_MIN = 256            # more pending than this: plans between full ones see a bounded part
TOPUP_PER_OWNER_MIN = 64           # ... each owner's oldest of the highest priority, at least this many
UNKNOWN_NODE_GRACE_MS = 30_000     # a coordinator this new may not know every member yet
RETENTION_INTERVAL_MS = 60_000     # how often ended tasks are checked against the retention
RETENTION_BATCH_MAX = 10_000       # tasks forgotten per check: bounded work per loop round
FENCE_KEY = "tasks.fence_term"     # store key: the highest Raft term this worker has seen
SETTLE_QUEUE_MAX = 100_000         # ended tasks waiting for the ledger to settle them (credit, escrow)
BATCH_MAX = 1000                   # tasks in one batch submission (POST /v1/tasks {"tasks": [...]})
JOINING_MAX = 10 * BATCH_MAX       # single submissions waiting to be written together (group submission)
SETTLE_BATCH_MAX = 200             # ended tasks handed to the ledger per call (unsettled())
TASK_RESOLVER = Lattice(lambda doc: tc.rank(doc.value))
# the ends of an attempt after which its retry goes elsewhere if it can (PendingTask.avoid)
_FAILED_THERE = frozenset((tc.FAILED, tc.TIMED_OUT, tc.LOST))


# Bundle documents: type -> what reads the tasks one lists (docs/tasks.md)
BUNDLE_READERS: dict[str, Callable[[Any], tuple[tc.Task, ...]]] = {
    tc.BATCH_TYPE: tc.batch_tasks, tc.ASSIGN_TYPE: tc.assigned_tasks, tc.RESULT_TYPE: tc.ended_tasks}


def _log_tasks(tasks: Sequence[tc.Task], step: str, **extra: Any) -> None:
    """One INFO line for a step many tasks took at once (a batch, a scheduling pass, a
    worker's ends written together): each by id, a retry as id/attempt (docs/tasks.md)."""
    log.info("%d tasks %s: %s", len(tasks), step,
             " ".join(t.id if t.attempt <= 1 else f"{t.id}/{t.attempt}" for t in tasks),
             extra={"event": "task", "tasks": [t.id for t in tasks], **extra})


def _log_end(task_id: str, attempt: int, outcome: str, reason: str, state: str) -> None:
    log.info("task %s attempt %d ended: %s (%s)", task_id, attempt, outcome, reason,
             extra={"event": "task", "task": task_id, "attempt": attempt, "state": state})


@functools.lru_cache(maxsize=1024)
def _demand_of(cpu: float, memory_mb: int, gpu: int) -> Demand:
    """A task's needs (immutable: one per distinct value, shared; a worker's queue is
    looked at on every end, and most tasks of a mesh ask for the same few)."""
    return Demand(cpu=cpu, memory_mb=memory_mb, gpu=gpu)


def _doc_rank(doc: Doc) -> int:
    try:
        return tc.rank(doc.value)
    except (KeyError, TypeError):
        return -1                 # malformed: an entry of the task outranks it


class TooManyTasks(Exception):
    """The owner already has ``cfg.tasks_per_owner_max`` unfinished tasks (HTTP 429)."""


STOPPING = "this node is stopping: submit at another node"


class Unavailable(Exception):
    """This node takes no submission now: it is stopping, or too many wait to be written (HTTP 503)."""


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """What the task service needs to know of a member (built by the node from membership)."""

    id: str
    state: str
    role: str
    http: str
    cpu: float
    memory_mb: int
    gpu: int
    labels: dict[str, str] = field(default_factory=dict)
    owner: str = ""                  # the account paid for work done on this node
    memory_max_mb: int = 0           # the largest memory limit a task can get there; 0: no cap


def paid_owners(members: list[MemberInfo], per_owner_max: int) -> dict[str, str]:
    """node id -> the account paid for its work: an owner's first ``per_owner_max`` nodes
    (by id) among those not dead or left; the rest earn nothing (``max_nodes_per_owner``)."""
    out: dict[str, str] = {}
    count: dict[str, int] = {}
    for m in sorted(members, key=lambda m: m.id):
        if m.owner and m.state not in ("dead", "left") and count.get(m.owner, 0) < per_owner_max:
            count[m.owner] = count.get(m.owner, 0) + 1
            out[m.id] = m.owner
    return out


class TaskService:
    def __init__(self, *, cfg: Config, node_id: str, clock: Clock, docs: DocsRunner, executor: Executor,
                 blobs: Blobs, store: Any, members: Callable[[], list[MemberInfo]],
                 lease_term: Callable[[], int | None], known_term: Callable[[], int],
                 coordinator_id: Callable[[], str | None] = lambda: None,
                 on_fatal: Callable[[BaseException], Any], on_drained: Callable[[], Any]) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self._clock = clock
        self._docs = docs
        self.replica = docs.replica
        self.executor = executor
        self.blobs = blobs
        self._members = members
        self._lease_term = lease_term       # the Raft term while this node holds the leader lease, else None
        self._known_term = known_term       # the highest Raft term this node has heard of
        self._coordinator_id = coordinator_id   # the coordinator this node knows of, if any
        docs.interested(tc.TASK_TYPE, self._interest)
        docs.interested(tc.BATCH_TYPE, lambda doc: self._to_coordinator())
        docs.interested(tc.ASSIGN_TYPE, self._assign_interest)
        self._on_fatal = on_fatal
        self._on_drained = on_drained
        self._rng = random.Random()
        self._store = store
        # The highest Raft term seen survives restarts: a restarted worker must not take an
        # assignment from a deposed coordinator before it hears the current term again.
        self.fence = Fence(int(store.get(FENCE_KEY) or 0))
        self._wake = asyncio.Event()
        self._started_ms = 0
        self._stopping = False
        self._task: asyncio.Task | None = None
        self._watched: set[tuple[str, int]] = set()    # attempts started here, not yet recorded
        self._report_timer: asyncio.TimerHandle | None = None   # next "running" report due
        self._fetching: dict[str, asyncio.Task] = {}
        self._fetching_for: set[str] = set()     # task ids whose input is being fetched (not in the queue yet)
        self._progress_sent_ms: dict[tuple[str, int], int] = {}
        self._spawned_ms: dict[tuple[str, int], int] = {}   # attempts running here not yet recorded running
        self._pending_progress: dict[tuple[str, int], int] = {}
        # Ends of attempts here not written yet (task id -> the task it ended from, ended):
        # a busy worker writes them every ENDS_FLUSH_MS, several in one result document.
        self._ends: dict[str, tuple[tc.Task, tc.Task]] = {}
        self._ends_timer: asyncio.TimerHandle | None = None
        self._ends_written_ms = -ENDS_FLUSH_MS
        self._active: dict[str, tc.Task] = {}
        self._mine_ids: dict[str, None] = {}  # active tasks whose current attempt is on this node
        # The scheduler's views, kept up to date by _index instead of rebuilt every pass:
        self._pending_views: dict[str, PendingTask] = {}   # pending, not cancelled
        self._placed_views: dict[str, Placed] = {}         # scheduled or running
        self._pending_demands: dict[tuple[int, int, int], int] = {}   # Demand.key -> pending views with it
        # (owner, priority) -> its pending views in arrival order: the part a top-up plan sees
        self._pending_by: dict[tuple[str, int], dict[str, PendingTask]] = {}
        self._next_full_plan_ms = 0          # a plan over every pending task at least this often
        self._blocked: frozenset[str] = frozenset()   # what the last full plan found no node could take
        self._plan_shape: tuple = ()         # the last plan's nodes without their queue depths
        self._run_ms: dict[str, float] = {}  # node id -> moving average of its attempts' run times
        self._plan_due = True                # the pending or placed set changed since the last plan
        self._next_plan_ms = 0               # a plan at least this often, whatever changed
        self._planned_at = -PLAN_GAP_MS      # (monotonic ms) when the last plan ran
        # wakes the loop when a wait is over (the plan gap, scheduler_settle_ms): the earliest asked for
        self._wake_timer: asyncio.TimerHandle | None = None
        self._plan_nodes: tuple = ()         # the node views of the last plan
        self._active_per_owner: dict[str, int] = {}   # owner -> len of its tasks in _active (tasks_per_owner_max)
        self._order = TaskOrder()        # every task known here: its state, and the listing's order
        self._parsed: dict[str, tuple[Doc, tc.Task]] = {}     # active task -> (its version, parsed)
        # Bundles (batch and assignment documents, docs/tasks.md): (type, key) -> (its version,
        # (task id, its entry's rank) per task it lists); task id -> the bundles listing it;
        # and per task its best entry, (rank, task, bundle), while no document of its own
        # outranks it (only those are kept in memory)
        self._bundles: dict[tuple[str, str], tuple[Doc, tuple[tuple[str, int], ...]]] = {}
        self._listed_in: dict[str, set[tuple[str, str]]] = {}
        self._entries: dict[str, tuple[int, tc.Task, tuple[str, str]]] = {}
        self._settled_bundles: set[tuple[str, str]] = set()   # (coordinator) all outranked at the last check
        self._own_bundles: dict[tuple[str, str], tuple[tc.Task, ...]] = {}    # being written here: their tasks
        # Single submissions waiting to be written together (group submission, see submit):
        self._joining: list[tuple[tc.Task, asyncio.Future]] = []
        self._joining_per_owner: dict[str, int] = {}
        self._joiner: asyncio.Task | None = None       # writes what joined, one batch after another
        self._ended: dict[str, int] = {}     # ended task id -> when it ended (wall ms), for retention
        self._next_retention_ms = 0
        self._led_term = 0
        self._led_since_ms = 0
        self.waiting: dict[str, str] = {}    # (coordinator) pending task id -> why it is not placed
        self._held: dict[str, str] = {}      # (coordinator) node id -> the big task it is kept free for
        # Set by the node when it has a ledger: escrow of a task's price, and node trust.
        self.hold: Callable[[str, str, int], Any] | None = None
        self.trust_of: Callable[[str], str] = lambda node_id: "low"
        self._settle_after: dict[str, tuple[str, bool]] = {}   # ended task -> (node it last ran on, succeeded)
        self.draining = False
        self._drained = False
        self.stats = {"submitted": 0, "scheduled": 0, "started": 0, "finished": 0, "lost": 0, "refenced": 0,
                      "fenced_out": 0, "stale_killed": 0, "plans": 0}
        # Latencies of first attempts, observed by the node that writes the transition (so a
        # mesh counts each once); a retry's wait would include the failed run before it.
        self.latency = {"task_schedule_latency": Histogram(TASK_BUCKETS_S),
                        "task_submit_to_running": Histogram(TASK_BUCKETS_S)}
        docs.listeners.append(self._on_docs)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._order.bulk(True)           # every stored task, in no order: sorted once
        for doc_type in BUNDLE_READERS:
            for doc in self.replica.items(doc_type):
                self._index_bundle(doc_type, doc.key)
        for doc in self.replica.items(tc.TASK_TYPE):
            self._index(doc.key)
        self._order.bulk(False)
        self.draining = bool((self._node_doc(self.node_id) or {}).get("draining"))
        for task_id, attempt, _ in self.executor.reap_orphans():   # left by a previous run; recorded below
            log.info("task %s attempt %d was running when this node stopped", task_id, attempt,
                     extra={"event": "task", "task": task_id, "attempt": attempt})
        self._started_ms = self._clock.now_ms()
        self._task = asyncio.create_task(self._loop(), name="tasks")

    async def stop(self) -> None:
        self._write_ends()
        self._stopping = True
        self._wake.set()
        self._watched.clear()              # what ends from now on is the executor's close
        for timer in (self._report_timer, self._wake_timer):
            if timer is not None:
                timer.cancel()
        self._report_timer = self._wake_timer = None
        tasks = [t for t in (self._task, self._joiner, *self._fetching.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await self.executor.close()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ the index
    def _on_docs(self, docs: list[Doc]) -> None:
        for doc in docs:
            if doc.doc_type == tc.TASK_TYPE:
                self._index(doc.key)
            elif doc.doc_type in BUNDLE_READERS:
                self._index_bundle(doc.doc_type, doc.key)
            elif doc.doc_type == NODE_TYPE and doc.key == self.node_id:
                self.draining = bool((self._node_doc(self.node_id) or {}).get("draining"))
        self._wake.set()

    def _index(self, task_id: str) -> None:
        t = self.get(task_id)
        if t is None:
            self._deactivate(task_id)
            self._order.remove(task_id)
            self._ended.pop(task_id, None)
            return
        # (a state this build does not know, a newer writer's, is counted apart, not shown)
        self._order.set(task_id, t.submitted_ms, t.state, t.owner, t.attempts)
        if t.terminal:
            if task_id in self._active and t.attempts and t.attempts[-1].started_ms:
                a = t.attempts[-1]     # first time seen ended: its run time, for the node's queue
                ms = max(0, a.ended_ms - a.started_ms)
                avg = self._run_ms.get(a.node)
                self._run_ms[a.node] = ms if avg is None else avg + RUN_MS_WEIGHT * (ms - avg)
            self._deactivate(task_id)
            self._ended[task_id] = t.updated_ms
            if t.attempts and task_id not in self._settle_after and len(self._settle_after) < SETTLE_QUEUE_MAX:
                self._settle_after[task_id] = (t.attempts[-1].node, t.state == tc.SUCCEEDED)
        else:
            if task_id not in self._active:
                self._active_per_owner[t.owner] = self._active_per_owner.get(t.owner, 0) + 1
            self._active[task_id] = t
            if t.node == self.node_id:
                self._mine_ids[task_id] = None
            else:
                self._mine_ids.pop(task_id, None)
            if self._led_term:                # the scheduler's views: the coordinator's alone
                self._view(t)

    def _index_bundle(self, doc_type: str, key: str) -> None:
        """Index the tasks a batch or assignment document lists (added or deleted)."""
        k = (doc_type, key)
        doc = self.replica.get(doc_type, key)
        old = self._bundles.get(k)
        if old is not None and doc is old[0]:
            return
        tasks: tuple[tc.Task, ...] = ()
        own = self._own_bundles.pop(k, None)      # this node's write: the tasks as built, not read back
        if doc is not None:
            try:
                tasks = own if own is not None else BUNDLE_READERS[doc_type](doc.value)
            except (KeyError, TypeError, ValueError, AssertionError) as e:   # a document no writer here made
                log.warning("ignoring malformed %s document %s: %s", doc_type, key, e)
        ranked = tuple((t.id, tc.rank_of(t)) for t in tasks)
        if tasks:
            self._bundles[k] = (doc, ranked)           # type: ignore[assignment]
        else:
            self._bundles.pop(k, None)
            self._settled_bundles.discard(k)
        ids = {t.id for t in tasks}
        for task_id, _ in old[1] if old is not None else ():
            if task_id not in ids:
                listed = self._listed_in.get(task_id)
                if listed is not None:
                    listed.discard(k)
                    if not listed:
                        del self._listed_in[task_id]
                e = self._entries.get(task_id)
                if e is not None and e[2] == k:
                    del self._entries[task_id]
                self._index(task_id)
        for t, (task_id, r) in zip(tasks, ranked):
            self._listed_in.setdefault(task_id, set()).add(k)
            e = self._entries.get(task_id)
            if (e is None or r > e[0]) and not self._outranked(task_id, r):
                self._entries[task_id] = (r, t, k)
            self._index(task_id)

    def _outranked(self, task_id: str, rank: int) -> bool:
        """Whether the task's own document outranks an entry of ``rank`` (or was deleted:
        a task that ever had a document is never read from a bundle again)."""
        if not self.replica.holds(tc.TASK_TYPE, task_id):
            return False
        doc = self.replica.get(tc.TASK_TYPE, task_id)
        return doc is None or _doc_rank(doc) >= rank

    def _listed_before_end(self, task_id: str) -> bool:
        """Whether a live batch or assignment document lists the task."""
        return any(k[0] != tc.RESULT_TYPE for k in self._listed_in.get(task_id, ()))

    def _superseded(self, task_id: str, rank: int, bundle: tuple[str, str]) -> bool:
        """Whether ``bundle``'s entry of ``rank`` is never read again: its task's own
        document outranks it, or (``bundle`` a batch or assignment) a result's entry does."""
        if self._outranked(task_id, rank):
            return True
        e = self._entries.get(task_id)
        return (bundle[0] != tc.RESULT_TYPE and e is not None and e[2][0] == tc.RESULT_TYPE
                and e[0] > rank)

    def _view(self, t: tc.Task) -> None:
        """Keep the scheduler's pending and placed views of ``t`` (active) current."""
        old = self._drop_views(t.id)
        if t.state in (tc.SCHEDULED, tc.RUNNING):
            p = old[1]
            if p is None or p.node_id != t.node:
                p = Placed(task_id=t.id, owner=t.owner, node_id=t.node, demand=self._demand(t, old))
                self._plan_due = True
            self._placed_views[t.id] = p
        elif t.state == tc.PENDING and not t.cancel:
            v = old[0]
            if v is None:
                v = PendingTask(id=t.id, owner=t.owner, demand=self._demand(t, old), priority=t.spec.priority,
                                submitted_ms=t.submitted_ms, labels=t.spec.labels, min_trust=t.spec.min_trust,
                                avoid=frozenset(a.node for a in t.attempts if a.state in _FAILED_THERE))
                self._plan_due = True
            self._pending_views[t.id] = v
            self._pending_demands[v.demand.key] = self._pending_demands.get(v.demand.key, 0) + 1
            self._pending_by.setdefault((v.owner, v.priority), {})[v.id] = v
        elif old != (None, None):
            self._plan_due = True

    def _set_views(self, leading: bool) -> None:
        """Build the scheduler's views of every active task (this node now coordinates), or
        drop them (it no longer does): only a coordinator keeps them up to date."""
        for views in (self._pending_views, self._placed_views, self._pending_demands, self._pending_by):
            views.clear()
        if leading:
            for t in self._active.values():
                self._view(t)

    def _drop_views(self, task_id: str) -> tuple[PendingTask | None, Placed | None]:
        v, p = self._pending_views.pop(task_id, None), self._placed_views.pop(task_id, None)
        if v is not None:
            n = self._pending_demands.pop(v.demand.key) - 1
            if n:
                self._pending_demands[v.demand.key] = n
            mine = self._pending_by[(v.owner, v.priority)]
            del mine[v.id]
            if not mine:
                del self._pending_by[(v.owner, v.priority)]
        return v, p

    @staticmethod
    def _demand(t: tc.Task, old: tuple) -> Demand:
        for v in old:
            if v is not None:
                return v.demand
        return _demand_of(t.spec.cpu, t.spec.memory_mb, t.spec.gpu)

    def _deactivate(self, task_id: str) -> None:
        self._parsed.pop(task_id, None)
        t = self._active.pop(task_id, None)
        self._mine_ids.pop(task_id, None)
        if self._drop_views(task_id) != (None, None):
            self._plan_due = True
        if t is not None:
            left = self._active_per_owner.pop(t.owner, 0) - 1
            if left > 0:
                self._active_per_owner[t.owner] = left

    def _interest(self, doc: Doc) -> tuple[str, ...] | None:
        """Who must hear this version of a task at once (``DocGossip.interest``): a
        submission or a retry, the coordinator, which schedules it; an assignment, its
        worker.  Anything else (running, progress, an end, a cancel request) goes to anyone:
        the node a user follows the task at may be any."""
        v = doc.value
        try:
            if v["cancel"]:
                return None
            if v["state"] == tc.PENDING:
                return self._to_coordinator()
            if v["state"] == tc.SCHEDULED:
                return (v["node"],)
        except (KeyError, TypeError):
            pass
        return None

    @staticmethod
    def _assign_interest(doc: Doc) -> tuple[str, ...] | None:
        node = doc.value.get("node") if type(doc.value) is dict else None
        return (node,) if type(node) is str else None

    def _to_coordinator(self) -> tuple[str, ...] | None:
        leader = self._coordinator_id()
        return (leader,) if leader else None

    def get(self, task_id: str) -> tc.Task | None:
        doc = self.replica.get(tc.TASK_TYPE, task_id)
        e = self._entries.get(task_id)
        if e is not None:
            if not self._outranked(task_id, e[0]):
                return e[1]
            del self._entries[task_id]                # its own document from now on, for good
        if doc is None:
            return None
        hit = self._parsed.get(task_id)
        if hit is not None and hit[0] is doc:      # versions are immutable: parsed once
            return hit[1]
        spec = None
        if hit is not None and type(doc.value) is dict and hit[0].value["spec"] == doc.value.get("spec"):
            spec = hit[1].spec                     # a new version of the same task: same spec
        try:
            t = tc.Task.from_value(doc.value, spec)
        except (KeyError, TypeError, ValueError) as e:   # a document no transition wrote
            log.warning("ignoring malformed task document %s: %s", task_id, e)
            return None
        if not t.terminal:          # the active ones are read again and again (index, steps)
            self._parsed[task_id] = (doc, t)
        return t

    def knows(self, task_id: str) -> bool:
        """Whether this node lists the task (it has not forgotten it, or never heard of it)."""
        return task_id in self._order

    def counts(self) -> dict[str, int]:
        return {s: self._order.count(s) for s in tc.TASK_STATES}

    def histograms(self) -> dict[str, dict]:
        return {name: h.snapshot() for name, h in self.latency.items()}

    def list(self, *, state: str = "", owner: str = "", node: str = "", limit: int = 100,
             after: str = "") -> list[tc.Task]:
        """Tasks newest first (by submission time, then id), filtered; ``after`` (a task
        this node ``knows``) pages on.  Walks the listing's order only as far as the page
        reaches (``TaskOrder``); only the tasks shown are parsed."""
        found = []
        for task_id in self._order.newest_first(state=state, owner=owner, node=node, after=after, wanted=limit):
            t = self.get(task_id)
            if t is not None:
                found.append(t)
                if len(found) >= limit:
                    break
        return found

    def _own_items(self, doc_type: str, prefix: str, values: list[dict],
                   tasks: Sequence[tc.Task]) -> list[tuple[str, dict]]:
        """New keys for bundle ``values`` (which carry ``tasks``, in order) about to be written
        here, each value's tasks kept until indexed: ``_index_bundle`` takes them as built
        instead of reading this node's own write back."""
        items, i = [], 0
        for value in values:
            key, n = prefix + os.urandom(8).hex(), len(value["tasks"])
            self._own_bundles[(doc_type, key)] = tuple(tasks[i:i + n])
            items.append((key, value))
            i += n
        assert i == len(tasks), (i, len(tasks))        # a bundle carries its tasks in order, each once
        return items

    def _forget_own(self, doc_type: str, items: list[tuple[str, dict]]) -> None:
        for key, _ in items:           # (a write that failed, and so was not indexed)
            self._own_bundles.pop((doc_type, key), None)

    def _put_own(self, doc_type: str, prefix: str, values: list[dict], tasks: Sequence[tc.Task]) -> None:
        items = self._own_items(doc_type, prefix, values, tasks)
        try:
            for key, value in items:
                self._docs.put(doc_type, key, value, durable=False)
        finally:
            self._forget_own(doc_type, items)

    def _write(self, t: tc.Task) -> tc.Task:
        # Committed with the rest of this turn's writes, before any frame carries it
        # (DocsRunner's group commit); what must be durable first awaits put_acked.
        self._docs.put(tc.TASK_TYPE, t.id, t.to_value(), durable=False)
        return t

    def _apply(self, task_id: str, transition: Callable[[tc.Task], tc.Task]) -> tc.Task | None:
        """Apply a transition to the current winner and write it; None if it was refused."""
        t = self.get(task_id)
        if t is None:
            return None
        try:
            return self._write(transition(t))
        except tc.Refused as e:
            log.debug("%s", e)
            return None

    # ------------------------------------------------------------------ user actions
    def _new(self, body: Any, default_owner: str, now_ms: int) -> tc.Task:
        """A validated new task from a submission (not written yet)."""
        spec, owner = tc.parse_spec(body)
        if self.cfg.task_default_timeout_s and (not isinstance(body, dict) or body.get("timeout_s") is None):
            # the cluster's default, only when the submission names no timeout (0 is "none")
            spec = dataclasses.replace(spec, timeout_s=self.cfg.task_default_timeout_s)
        if spec.input and not self.blobs.has(spec.input):
            raise tc.SpecError("input", f"no archive with sha256 {spec.input} was uploaded to this node "
                                        "(POST /v1/blobs first)")
        return tc.new_task("t-" + os.urandom(8).hex(), spec, owner or default_owner, self.node_id, now_ms)

    def _check_open(self) -> None:
        if self._stopping:      # (its HTTP server closes last: a write now might never be acknowledged)
            raise Unavailable(STOPPING)

    def _check_owner_room(self, owner: str, n: int) -> None:
        have = self._active_per_owner.get(owner, 0) + self._joining_per_owner.get(owner, 0)
        if have + n > self.cfg.tasks_per_owner_max:
            raise TooManyTasks(f"owner {owner} already has {have} unfinished tasks "
                               f"and may have {self.cfg.tasks_per_owner_max} (tasks_per_owner_max): "
                               "wait for some to end or cancel them")

    async def submit(self, body: Any, default_owner: str) -> tuple[tc.Task, str | None]:
        """Validate, persist here and on one other live member; returns (task, acking peer).

        Group submission: a task without a price joins the next batch document this node
        writes.  The first one is written at once; those that come while a write awaits its
        acknowledgement are written together when it is done, in one commit and one DocPut
        (a database's group commit).  So concurrent clients share the fsync and the
        acknowledgement, and a lone client waits for nothing more than before.  Each 202 still
        comes only once its own task is on this node's disk and on another live member's."""
        self._check_open()
        t = self._new(body, default_owner, self._clock.wall_ms())
        self._check_owner_room(t.owner, 1)
        if t.spec.price:
            if self.hold is None:
                raise tc.SpecError("price", "this mesh has no ledger to pay a price from")
            await self.hold(t.id, t.owner, t.spec.price)     # raises if it cannot be held now
            _, peer = await self._docs.put_acked(tc.TASK_TYPE, t.id, t.to_value(),
                                                 timeout_ms=self.cfg.task_ack_timeout_ms)
            self._submitted([t])
            return t, peer
        if len(self._joining) >= JOINING_MAX:
            raise Unavailable(f"{len(self._joining)} submissions are already waiting to be written here: "
                              "retry, or submit at another node")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._joining.append((t, fut))
        self._joining_per_owner[t.owner] = self._joining_per_owner.get(t.owner, 0) + 1
        if self._joiner is None:
            self._joiner = asyncio.create_task(self._write_joined(), name="tasks-submit")
        # (a client that goes away cancels its own future, not the others' write)
        return await fut

    async def _write_joined(self) -> None:
        """Write the single submissions that joined, BATCH_MAX at a time, until none is left.
        A group is one submission: one accepting node and one submission time, its write's."""
        group: list[tuple[tc.Task, asyncio.Future]] = []
        try:
            while self._joining:
                group, self._joining = self._joining[:BATCH_MAX], self._joining[BATCH_MAX:]
                now = self._clock.wall_ms()
                tasks = [dataclasses.replace(t, submitted_ms=now, updated_ms=now) for t, _ in group]
                for t in tasks:      # from here on the written tasks count as the owner's (indexed)
                    n = self._joining_per_owner.pop(t.owner) - 1
                    if n:
                        self._joining_per_owner[t.owner] = n
                try:
                    peers = await self._write_batch(tasks)
                except Exception as e:      # NotReplicated, or the store failed: each 202 fails alike
                    for _, fut in group:
                        if not fut.done():
                            fut.set_exception(e)
                else:
                    for t, (_, fut) in zip(tasks, group):
                        if not fut.done():
                            fut.set_result((t, peers[0] if peers else None))
        finally:     # (only when stopped) the group being written is on this disk; the rest is not
            self._joiner = None
            for i, (_, fut) in enumerate((*group, *self._joining)):
                if not fut.done():
                    fut.set_exception(NotReplicated("the node stopped before another member acknowledged")
                                      if i < len(group) else Unavailable(STOPPING))
            self._joining.clear()
            self._joining_per_owner.clear()

    async def submit_many(self, bodies: Any, default_owner: str) -> tuple[list[tc.Task], list[str]]:
        """A batch, all or nothing: every submission is validated before any is written, then
        all are persisted here in one commit and on other live members (one DocPut per
        frame's worth); returns (tasks, acknowledging peers)."""
        self._check_open()
        if not isinstance(bodies, list) or not bodies:
            raise tc.SpecError("tasks", "must be a non-empty list of task submissions")
        if len(bodies) > BATCH_MAX:
            raise tc.SpecError("tasks", f"more than {BATCH_MAX} tasks in one batch")
        now = self._clock.wall_ms()
        tasks = []
        for i, body in enumerate(bodies):
            try:
                t = self._new(body, default_owner, now)
                if t.spec.price:
                    raise tc.SpecError("price", "a batch cannot carry a price: submit priced tasks one at a time")
            except tc.SpecError as e:
                raise tc.SpecError(f"tasks[{i}].{e.field}", e.message) from None
            tasks.append(t)
        per_owner: dict[str, int] = {}
        for t in tasks:
            per_owner[t.owner] = per_owner.get(t.owner, 0) + 1
        for owner, n in per_owner.items():
            self._check_owner_room(owner, n)
        return tasks, await self._write_batch(tasks)

    async def _write_batch(self, tasks: list[tc.Task]) -> list[str]:
        """Persist ``tasks`` here (one commit) and on other live members; the peers that
        acknowledged."""
        items = self._own_items(tc.BATCH_TYPE, "b-", tc.batch_values(tasks, self.replica.value_bytes_max), tasks)
        try:
            _, peers = await self._docs.put_many_acked(tc.BATCH_TYPE, items, timeout_ms=self.cfg.task_ack_timeout_ms)
        finally:
            self._forget_own(tc.BATCH_TYPE, items)
        self._submitted(tasks)
        return peers

    def _submitted(self, tasks: list[tc.Task]) -> None:
        self.stats["submitted"] += len(tasks)
        if len(tasks) > 1:
            _log_tasks(tasks, "submitted by " + ", ".join(sorted({t.owner for t in tasks})), state=tc.PENDING)
            return
        t = tasks[0]
        log.info("task %s submitted by %s: %s", t.id, t.owner, t.spec.command_text()[:80],
                 extra={"event": "task", "task": t.id, "state": tc.PENDING})

    def cancel(self, task_id: str) -> tc.Task:
        """Raises KeyError (no such task) or tc.Refused (already ended)."""
        t = self.get(task_id)
        if t is None:
            raise KeyError(task_id)
        t = self._write(tc.cancel(t, self._clock.wall_ms()))
        log.info("task %s: cancel requested", task_id, extra={"event": "task", "task": task_id, "state": t.state})
        return t

    def drain(self, node_id: str, draining: bool = True) -> None:
        self._docs.put(NODE_TYPE, node_id, {"draining": draining, "at_ms": self._clock.wall_ms()})

    def _node_doc(self, node_id: str) -> dict | None:
        doc = self.replica.get(NODE_TYPE, node_id)
        return doc.value if doc is not None and isinstance(doc.value, dict) else None

    def _members_alive_besides_me(self) -> bool:
        return any(m.state == "alive" and m.id != self.node_id for m in self._members())

    def draining_nodes(self) -> set[str]:
        return {d.key for d in self.replica.items(NODE_TYPE) if isinstance(d.value, dict) and d.value.get("draining")}

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        while not self._stopping:          # a flag as well as cancellation (see DocsRunner._loop)
            self._wake.clear()       # before the steps: what they write wakes the next round at once
            try:
                self._worker_step()
                term = self._lease_term()
                if term is not None:
                    self._coordinator_step(term)
                elif self._led_term:
                    self._led_term = 0
                    self._set_views(False)
                self._drain_step()
                self._retention_step(term is not None)
            except Exception as exc:        # a broken invariant: stop the node
                log.exception("task service failed")
                self._on_fatal(exc)
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), LOOP_INTERVAL_MS / 1000)

    # ------------------------------------------------------------------ worker
    def running_here(self) -> list[tc.Task]:
        return [t for t in self._mine() if t.state == tc.RUNNING]

    def _mine(self) -> list[tc.Task]:
        return [self._active[i] for i in self._mine_ids]

    def _worker_step(self) -> None:
        now = self._clock.wall_ms()
        self._raise_fence(self._known_term())
        ready: list[tc.Task] = []        # assigned here, admitted, not started: this node's queue
        for t in self._mine():
            if t.id in self._ends:
                continue                         # ended here; written with the next result document
            key = (t.id, t.attempt)
            if key in self._watched:             # running here: most of a busy worker's tasks
                if t.cancel:
                    a = self.executor.get(*key)
                    if a is not None and not a.done:
                        a.cancel()
                continue
            a = self.executor.get(*key)
            if a is not None and a.done:         # it ended before a restart, unrecorded
                self._record(key, a.result)
            elif t.state == tc.RUNNING:          # it ran before a restart; its process died with the node
                self._record(key, None)
            elif t.cancel:
                self._apply(t.id, lambda x: tc.finish(x, self.node_id, t.attempt, tc.CANCELLED, None,
                                                      "cancelled while queued on its node", now))
            elif not self._raise_fence(t.term):
                self.stats["fenced_out"] += 1      # the new coordinator re-issues it (refence)
            elif t.state == tc.SCHEDULED and t.id not in self._fetching_for:
                ready.append(t)
        # Just after (re)starting, this node's replica may still show assignments the mesh
        # gave up while it was down (lost, retried elsewhere): it starts nothing until the
        # others' writes have had scheduler_settle_ms to reach it, as a new coordinator waits.
        if ready:
            settling_ms = self._started_ms + self.cfg.scheduler_settle_ms - self._clock.now_ms()
            if settling_ms <= 0:
                self._start_ready(ready)
            else:
                self._wake_after(settling_ms)
        for task_id, attempt in self.executor.running():
            t = self._active.get(task_id)     # kept current by _index; ended tasks leave it
            if t is None or t.attempt != attempt or t.node != self.node_id:
                a = self.executor.get(task_id, attempt)
                if a is not None and not a.done:
                    self.stats["stale_killed"] += 1
                    log.info("task %s attempt %d is no longer current here: killing it", task_id, attempt,
                             extra={"event": "task", "task": task_id, "attempt": attempt})
                    a.cancel()
        self._report_running(now)
        self._flush_progress(now)

    def _raise_fence(self, term: int) -> bool:
        """Admit ``term`` (False if older than the highest seen); a new highest is persisted first."""
        before = self.fence.highest_term
        if not self.fence.admit(term):
            return False
        if self.fence.highest_term > before:
            self._store.put(FENCE_KEY, str(self.fence.highest_term))
        return True

    def _start_ready(self, ready: list[tc.Task]) -> None:
        """Start what this node's queue allows, by ``scheduler.start_order``: priority, then
        age, strictly, and only while what runs here fits what this node offers (so a new
        coordinator that has not yet seen its predecessor's assignments cannot overcommit
        it; and a slot that frees is taken at once by the next assignment already here, with
        no round trip to the coordinator)."""
        me = next((m for m in self._members() if m.id == self.node_id), None)
        if me is None:
            return
        running = []
        for task_id, attempt in self.executor.running():
            a = self.executor.get(task_id, attempt)
            other = self._active.get(task_id)
            if a is not None and not a.done and other is not None:
                running.append(self._demand(other, (None, None)))
        node = NodeView(id=me.id, cpu=me.cpu, memory_mb=me.memory_mb, gpu=me.gpu)
        waiting = [Assigned(t.id, self._demand(t, (None, self._placed_views.get(t.id))), t.spec.priority,
                            t.submitted_ms) for t in ready]
        by_id = {t.id: t for t in ready}
        for task_id in start_order(node, running, waiting):
            self._launch(by_id[task_id])

    def _launch(self, t: tc.Task) -> None:
        s = t.spec
        if s.input and not self.blobs.has(s.input):
            self._fetch_input(t)
            return
        spec = ExecSpec(task_id=t.id, attempt=t.attempt, argv=s.argv, shell=s.shell, env=dict(s.env),
                        timeout_ms=int(s.timeout_s * 1000), memory_mb=s.memory_mb,
                        output_bytes_max=self.cfg.task_output_bytes_max,
                        input_archive=self.blobs.path(s.input) if s.input else "")
        key = (t.id, t.attempt)
        now = self._clock.wall_ms()
        try:
            started = tc.start(t, self.node_id, t.attempt, now)    # may it start? (written below)
        except tc.Refused as e:
            log.debug("%s", e)
            return
        attempt = self.executor.start(spec, on_progress=lambda pct: self._progress(key, pct))
        # "running" is written once the attempt has run RUNNING_REPORT_MS, or with its first
        # progress; one that ends sooner is recorded started and ended in one version.
        self._spawned_ms[key] = now
        self._arm_report(now)
        self.stats["started"] += 1
        if started.attempt == 1:
            self.latency["task_submit_to_running"].observe_ms(started.attempts[-1].started_ms - started.submitted_ms)
        # logged at INFO when "running" is written (below): a short task's one version says it
        log.debug("task %s attempt %d spawned here", t.id, t.attempt)
        self._watched.add(key)
        attempt.on_done(lambda result: self._attempt_ended(key, result))

    def _running(self, x: tc.Task, attempt: int, at: int = 0) -> tc.Task:
        """``x`` with ``attempt`` (spawned here, at ``at`` if given) recorded running, if it
        is not yet."""
        at = at or self._spawned_ms.get((x.id, attempt), 0)
        if not at or x.state != tc.SCHEDULED:
            return x
        return tc.start(x, self.node_id, attempt, at, spawned=True)

    def _report_running(self, now: int) -> None:
        for key, at in list(self._spawned_ms.items()):
            if now - at >= RUNNING_REPORT_MS:
                if self._apply(key[0], lambda x: tc.start(x, self.node_id, key[1], at, spawned=True)) is not None:
                    self._log_running(key)
                del self._spawned_ms[key]
        self._arm_report(now)

    def _arm_report(self, now: int) -> None:
        """One timer wakes the loop when the oldest unreported attempt is due (not one per
        spawn: a busy worker spawns hundreds a second)."""
        if self._report_timer is None and self._spawned_ms:
            due = min(self._spawned_ms.values()) + RUNNING_REPORT_MS
            # (wall clock ms, as the reports' times: a step back is clamped, not waited out)
            delay_ms = min(RUNNING_REPORT_MS, max(0, due - now))
            self._report_timer = asyncio.get_running_loop().call_later(delay_ms / 1000, self._report_due)

    def _report_due(self) -> None:
        self._report_timer = None
        self._wake.set()

    @staticmethod
    def _log_running(key: tuple[str, int]) -> None:
        log.info("task %s attempt %d running here", key[0], key[1],
                 extra={"event": "task", "task": key[0], "attempt": key[1], "state": tc.RUNNING})

    def _fetch_input(self, t: tc.Task) -> None:
        sha = t.spec.input
        self._fetching_for.add(t.id)
        if sha in self._fetching:
            return
        urls = [m.http for m in self._members() if m.state == "alive" and m.id != self.node_id]
        first = [m.http for m in self._members() if m.id == t.accepted_by]

        async def fetch() -> None:
            try:
                await self.blobs.fetch(sha, first + [u for u in urls if u not in first])
            except BlobError as e:
                self._apply(t.id, lambda x: tc.finish(tc.start(x, self.node_id, t.attempt, self._clock.wall_ms()),
                                                      self.node_id, t.attempt, tc.FAILED, None, str(e),
                                                      self._clock.wall_ms()))
            finally:
                self._fetching.pop(sha, None)
                self._fetching_for.clear()     # every waiter looks again (its own input may be here now)
                self._wake.set()
        self._fetching[sha] = asyncio.create_task(fetch())

    def _attempt_ended(self, key: tuple[str, int], result: Any) -> None:
        """Attempt ``key``, started here, ended (its result persisted by the executor)."""
        if key not in self._watched or self._stopping:
            return                     # stopping: the node records it at its next start
        self._watched.discard(key)
        self._progress_sent_ms.pop(key, None)
        try:
            self._flush_progress(self._clock.wall_ms(), force=True)
            self._record(key, result)
            # the freed slot goes to the next task queued here now, not a loop turn later;
            # the loop wakes when the end is written (a result document's write, or the
            # commit of the task's own document), not here: this step had nothing to add
            self._worker_step()
        except Exception as exc:            # as in _loop: a broken invariant stops the node
            log.exception("task service failed")
            self._on_fatal(exc)

    def _record(self, key: tuple[str, int], result: Any) -> None:
        """Write how attempt ``key`` ended (``None``: it died with an earlier run of this node)."""
        task_id, n = key
        if result is None:
            state, code, reason, at = tc.FAILED, None, "the node restarted while the attempt ran", None
        elif result.interrupted:      # this node stopped or restarted under it: not the task's doing
            state, code, reason, at = tc.FAILED, None, result.reason, result.ended_ms
        else:
            state, code, reason, at = result.state, result.exit_code, result.reason, result.ended_ms
        at = at or self._clock.wall_ms()
        done = self._end(task_id, lambda x: tc.finish(self._running(x, n), self.node_id, n, state, code, reason, at))
        self._spawned_ms.pop(key, None)
        self.stats["finished"] += 1
        if task_id not in self._ends:          # (else logged when written, with the others)
            _log_end(task_id, n, state, reason, done.state if done is not None else "ignored: no longer current")

    def _end(self, task_id: str, transition: Callable[[tc.Task], tc.Task]) -> tc.Task | None:
        """``_apply`` for an attempt's end.  A task that has no document of its own yet (the
        usual short task: read from its assignment) and ends is written a little later, with
        the other ends of the next ENDS_FLUSH_MS, in one result document (docs/tasks.md)."""
        t = self.get(task_id)
        if t is None:
            return None
        try:
            done = transition(t)
        except tc.Refused as e:
            log.debug("%s", e)
            return None
        if not done.terminal or self.replica.holds(tc.TASK_TYPE, task_id):
            return self._write(done)
        self._ends[task_id] = (t, done)
        if self._ends_timer is None:
            # at once (next turn) when the last write is ENDS_FLUSH_MS old; the wall clock,
            # as the tasks' times: a step back is clamped, not waited out
            delay_ms = min(ENDS_FLUSH_MS, max(0, self._ends_written_ms + ENDS_FLUSH_MS - self._clock.wall_ms()))
            self._ends_timer = asyncio.get_running_loop().call_later(delay_ms / 1000, self._ends_due)
        return done

    def _ends_due(self) -> None:
        self._ends_timer = None
        try:
            self._write_ends()
        except Exception as exc:            # as in _loop: a broken invariant stops the node
            log.exception("task service failed")
            self._on_fatal(exc)

    def _write_ends(self) -> None:
        """Write the ends ``_end`` kept: each still current (nothing else was written for
        its task since) in a result document, or in the task's own when it is alone."""
        if self._ends_timer is not None:
            self._ends_timer.cancel()
            self._ends_timer = None
        ends, self._ends = self._ends, {}
        if not ends:
            return
        self._ends_written_ms = self._clock.wall_ms()
        bundled, succeeded = [], []
        for task_id, (before, ended) in ends.items():
            now = self.get(task_id)
            # made again if something was written for it meanwhile
            done = ended if now is None or now is before else self._end_again(now, ended)
            a = ended.attempts[-1]
            if now is None or done is None:
                _log_end(task_id, a.attempt, a.state, a.reason, "ignored: no longer current")
                continue
            if self.replica.holds(tc.TASK_TYPE, task_id):
                self._write(done)
            else:
                bundled.append(done)
            if done.state == tc.SUCCEEDED:
                succeeded.append(done)
            else:
                _log_end(task_id, a.attempt, a.state, a.reason, done.state)
        if len(bundled) == 1:
            self._write(bundled[0])
        elif bundled:
            self._put_own(tc.RESULT_TYPE, "r-", tc.result_values(bundled, self.replica.value_bytes_max, self.node_id),
                          bundled)
        if len(succeeded) == 1:
            a = succeeded[0].attempts[-1]
            _log_end(succeeded[0].id, a.attempt, a.state, a.reason, tc.SUCCEEDED)
        elif succeeded:
            _log_tasks(succeeded, "ended here: succeeded", state=tc.SUCCEEDED)
        self._wake.set()

    def _end_again(self, now: tc.Task, done: tc.Task) -> tc.Task | None:
        """The end ``done`` made again from the task's current version ``now``."""
        a = done.attempts[-1]
        try:
            return tc.finish(self._running(now, a.attempt, a.started_ms), self.node_id, a.attempt, a.state,
                             a.exit_code, a.reason, a.ended_ms)
        except (tc.Refused, ValueError) as e:
            log.debug("%s", e)
            return None

    def _progress(self, key: tuple[str, int], pct: int) -> None:
        self._pending_progress[key] = pct
        self._wake.set()

    def _flush_progress(self, now: int, force: bool = False) -> None:
        for key, pct in list(self._pending_progress.items()):
            if not force and now - self._progress_sent_ms.get(key, 0) < self.cfg.task_progress_interval_ms:
                continue
            del self._pending_progress[key]
            self._progress_sent_ms[key] = now
            t = self.get(key[0])
            if t is not None and t.progress != pct:
                done = self._apply(key[0], lambda x: tc.set_progress(self._running(x, key[1]), self.node_id,
                                                                     key[1], pct, now))
                if self._spawned_ms.pop(key, None) is not None and done is not None:
                    self._log_running(key)

    # ------------------------------------------------------------------ coordinator
    def _coordinator_step(self, term: int) -> None:
        now = self._clock.wall_ms()
        if term != self._led_term:
            self._led_term, self._led_since_ms, self._held, self._plan_due = term, now, {}, True
            self._set_views(True)
            log.info("scheduling tasks as coordinator of term %d", term, extra={"event": "scheduler", "term": term})
        if now - self._led_since_ms < self.cfg.scheduler_settle_ms:
            self._wake_after(self._led_since_ms + self.cfg.scheduler_settle_ms - now)
            return
        members = {m.id: m for m in self._members()}
        for task_id in list(self._placed_views):
            t = self._active[task_id]
            m = members.get(t.node)
            gone = (m.state if m is not None else
                    "unknown" if now - self._led_since_ms > UNKNOWN_NODE_GRACE_MS else None)
            if gone in ("dead", "left", "unknown"):
                done = self._apply(t.id, lambda x: tc.lost(x, f"node {t.node} is {gone}", now))
                if done is not None:
                    self.stats["lost"] += 1
                    log.info("task %s attempt %d lost with node %s: now %s", t.id, t.attempt, t.node, done.state,
                             extra={"event": "task", "task": t.id, "attempt": t.attempt, "state": done.state})
            elif t.state == tc.SCHEDULED and t.term < term:
                if self._apply(t.id, lambda x: tc.refence(x, term, now)) is not None:
                    self.stats["refenced"] += 1
        if not self._pending_views:
            self.waiting = {}
            return
        draining = self.draining_nodes()
        depth = self.cfg.worker_queue_depth
        nodes = tuple(NodeView(id=m.id, cpu=m.cpu, memory_mb=m.memory_mb, gpu=m.gpu, labels=m.labels,
                               memory_max_mb=m.memory_max_mb,
                               trust=self.trust_of(m.id), draining=m.id in draining, runs_tasks=m.role != "standby",
                               queue_max=depth if depth >= 0 else self._auto_queue(m))
                      for m in members.values() if m.state == "alive")
        # Plan when the pending or placed set or the nodes changed since the last plan, and
        # some node has room for the smallest pending demand; and every LOOP_INTERVAL_MS in
        # any case (waiting reasons, holds).  Otherwise a plan would place nothing new.
        if now < self._next_plan_ms and (
                (not self._plan_due and nodes == self._plan_nodes)
                or not room_for_any(nodes, list(self._placed_views.values()), list(self._pending_demands))):
            self._plan_due, self._plan_nodes = False, nodes
            return
        # which tasks no node can ever take changes with the nodes, not with their queue depths
        shape = tuple(dataclasses.replace(n, queue_max=0) for n in nodes)
        # Within PLAN_GAP_MS of the last plan, only a task that can start at once (a free
        # slot, not a queue) is placed now; the rest wait for the next pass, with others.
        gap_left = self._planned_at + PLAN_GAP_MS - self._clock.now_ms()
        if gap_left > 0 and not room_for_any(shape, list(self._placed_views.values()), list(self._pending_demands)):
            self._wake_after(gap_left)
            return
        full = (len(self._pending_views) <= TOPUP_PENDING_MIN or now >= self._next_full_plan_ms
                or shape != self._plan_shape)
        self._plan_due, self._plan_nodes, self._next_plan_ms = False, nodes, now + LOOP_INTERVAL_MS
        self._planned_at = self._clock.now_ms()
        self.stats["plans"] += 1
        self._plan_shape = shape
        if full:
            self._next_full_plan_ms = now + LOOP_INTERVAL_MS
            pending = list(self._pending_views.values())
        else:
            pending = self._top_pending(nodes)
        result = plan(nodes, list(self._placed_views.values()), pending, term=term,
                      policy=self.cfg.scheduler_policy, held=self._held)
        self._held = dict(result.held)       # nodes kept free for big tasks, so they do not starve
        # A pass's assignments to one node go out as one assignment document (docs/tasks.md).
        scheduled: dict[str, list[tc.Task]] = {}
        for a in result.assignments:
            t = self.get(a.task_id)
            try:
                done = tc.schedule(t, a.node_id, term, now) if t is not None else None
            except tc.Refused as e:
                log.debug("%s", e)
                done = None
            if done is not None:
                scheduled.setdefault(a.node_id, []).append(done)
                self.stats["scheduled"] += 1
                if done.attempt == 1:
                    self.latency["task_schedule_latency"].observe_ms(now - done.submitted_ms)
        for node_id, tasks in scheduled.items():
            if len(tasks) == 1:
                log.info("task %s attempt %d scheduled on %s", tasks[0].id, tasks[0].attempt, node_id,
                         extra={"event": "task", "task": tasks[0].id, "attempt": tasks[0].attempt,
                                "state": tc.SCHEDULED, "node": node_id})
            else:
                _log_tasks(tasks, f"scheduled on {node_id}", state=tc.SCHEDULED, node=node_id)
            self._put_own(tc.ASSIGN_TYPE, "a-", tc.assign_values(tasks, self.replica.value_bytes_max), tasks)
        if full:
            self.waiting = dict(result.waiting)
            self._blocked = result.blocked
        else:
            for a in result.assignments:
                self.waiting.pop(a.task_id, None)
            self.waiting.update(result.waiting)

    def _wake_after(self, delay_ms: int) -> None:
        """Run the loop again once a wait nothing else announces is over (the plan gap, a
        coordinator's or a restarted worker's ``scheduler_settle_ms``): at the earliest asked."""
        loop = asyncio.get_running_loop()
        at = loop.time() + delay_ms / 1000
        if self._wake_timer is not None:
            if self._wake_timer.when() <= at:
                return
            self._wake_timer.cancel()
        self._wake_timer = loop.call_at(at, self._wake_due)

    def _wake_due(self) -> None:
        self._wake_timer = None
        self._wake.set()

    def _auto_queue(self, m: MemberInfo) -> int:
        """worker_queue_depth -1, from the node's cores and recent run times (scheduler.auto_queue_max)."""
        return auto_queue_max(m.cpu, self._run_ms.get(m.id))

    def _top_pending(self, nodes: tuple[NodeView, ...]) -> list[PendingTask]:
        """The part of a long backlog a plan between full ones sees: each owner's oldest tasks
        of each priority (in arrival order), more than the nodes could take now, and every task
        holding a node.  A plan's cost grows with what it is given, and each freed slot of a
        busy mesh brings one.  Tasks the last full plan found no node could ever take are left
        out; the full plan (every LOOP_INTERVAL_MS, and whenever the nodes changed) still sees
        every task and writes every reason."""
        room = sum(math.ceil(n.cpu) + n.queue_max for n in nodes)
        per = max(TOPUP_PER_OWNER_MIN, 2 * room)
        blocked = self._blocked
        out = [v for views in self._pending_by.values()
               for v in itertools.islice((v for v in views.values() if v.id not in blocked), per)]
        seen = {v.id for v in out}
        out += [self._pending_views[tid] for tid in self._held.values()
                if tid in self._pending_views and tid not in seen]
        return out

    def unsettled(self) -> list[tuple[str, str, str, bool]]:
        """Ended tasks the ledger has yet to settle: (task id, node it ran on, the node's owner, succeeded).

        The ledger's coordinator drops from this what it has settled (``settled``)."""
        owners = paid_owners(self._members(), self.cfg.max_nodes_per_owner)
        return [(task_id, node, owners.get(node, ""), ok) for task_id, (node, ok) in
                list(self._settle_after.items())[:SETTLE_BATCH_MAX]]

    def settled(self, task_id: str) -> None:
        self._settle_after.pop(task_id, None)

    # ------------------------------------------------------------------ retention
    def _retention_step(self, coordinator: bool) -> None:
        """Forget tasks ended longer than ``task_retention_ms`` ago (the coordinator deletes the
        documents), and what the executor keeps of tasks no longer known (every node)."""
        now = self._clock.wall_ms()
        if now < self._next_retention_ms:
            return
        self._next_retention_ms = now + RETENTION_INTERVAL_MS
        if coordinator:
            horizon = now - self.cfg.task_retention_ms
            # A task a live batch or assignment still lists keeps its document until that
            # bundle is gone.  One only a result document ever carried gets a tombstone all
            # the same: it keeps every bundle from being read for it again, as a document's.
            for task_id in [k for k, ended in self._ended.items()
                            if ended < horizon and not self._listed_before_end(k)][:RETENTION_BATCH_MAX]:
                self._docs.delete(tc.TASK_TYPE, task_id, absent=True)
            # A bundle whose every entry was outranked, by the task's own document or (a
            # batch or assignment) by a result's entry, at the last check too: by now every
            # member has heard of those, so none reads the bundle.
            settled = {k for k, (_, ranked) in self._bundles.items()
                       if all(self._superseded(task_id, r, k) for task_id, r in ranked)}
            for doc_type, key in settled & self._settled_bundles:
                self._docs.delete(doc_type, key)
            self._settled_bundles = settled
        gone = [(task_id, attempt) for task_id, attempt in self.executor.kept_attempts()    # not running
                if task_id not in self._order][:RETENTION_BATCH_MAX]
        for task_id, attempt in gone:
            self.executor.remove(task_id, attempt)     # its journal lines, logs and archive
        for task_id in {task_id for task_id, _ in gone}:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(self.executor.root_dir, task_id))

    # ------------------------------------------------------------------ draining
    def _drain_step(self) -> None:
        if not self.draining or self._drained:
            return
        # A restarted node's own copy of its drain flag may be stale (an undo written while
        # it was away): it leaves only once it has caught up with a peer (anti-entropy, at
        # once with a peer it has just met), or when it has found none in scheduler_settle_ms.
        if not self._docs.synced and (self._clock.now_ms() - self._started_ms < self.cfg.scheduler_settle_ms
                                      or self._members_alive_besides_me()):
            return
        if not self._mine() and not self.executor.running():
            self._drained = True
            log.info("drained: no task left here; leaving the mesh (it stays drained, also after a restart, "
                     "until: galaxy drain %s --undo)", self.node_id, extra={"event": "drained"})
            self._on_drained()
