"""Task placement: which pending task goes to which node, decided by the coordinator.

Theory of operation
-------------------
Pure and stateless: ``plan(nodes, placed, pending, term=...)`` looks at one snapshot (the
alive members the caller offers, the tasks already holding resources on them, the tasks
waiting) and returns a ``Plan``: assignments stamped with the caller's Raft term, and a
human reason for every pending task it did not place.  The same inputs in any order give
the same plan: nodes, owners and tasks are ordered by their ids, and there is no RNG.

*Invariants* (``_Planner._check`` asserts them after every call; tests re-verify them
from scratch with ``check_plan``):

* **No overcommit.**  On every offered node, the demands of the tasks placed there plus the
  new assignments fit its capacity in cpu, memory and gpu.  Cpu is counted in integer
  millicores (demands rounded up, capacities down), so sums are exact and independent of
  order.  Placed tasks on nodes missing from ``nodes`` hold nothing (their node is gone);
  a node already over its capacity (restarted with less) simply gets nothing new.
* **Bounded queues.**  A node given a task that does not fit now (a queued placement) ends
  the call with ``queued_count`` of its tasks at most its ``queue_max``, and that task fits
  its capacity on its own.
* **Constraints.**  A task goes only to a node that runs tasks, is not draining, carries
  every label the task asks for, is trusted at least ``min_trust`` and lets one task have
  the memory it asks for (``memory_max_mb``: a node under a hard ``ulimit -v`` cannot give a
  task a larger limit, so such a task would fail there every time).
* **Bounded.**  At most ``placements_max`` assignments and ``reservations_max`` held
  nodes per call; every per-call table is bounded by the size of the inputs.

*Order.*  Higher ``priority`` first, strictly.  Within one priority, owners take turns by
dominant-resource fairness (Ghodsi et al., NSDI 2011): the owner whose tasks hold the
smallest dominant share of the cluster (max over cpu, memory, gpu of its usage over the
cluster's capacity, counting placed and newly assigned tasks) goes next; ties go to the
older head task, then the smaller task id.

*Choosing a node.*  "spread" puts a task where the node's dominant share *after* placement
is lowest; "binpack" where it is highest (the fullest node that still fits).  Each
constraint signature (labels, min trust, needs a gpu; and where some nodes cap a task's
memory below the demand, which of those caps it exceeds) indexes its eligible nodes in heaps
keyed by the node's current dominant share (lazy entries, invalidated by a per-node
version), one heap per doubling class of free cpu so that a search skips the nodes with
too little.  A search merges those heaps best-first and compares the scores of the first
``LOOKAHEAD`` nodes that fit (spread also stops as soon as no later node can score better,
since placing only raises a node's share): exact among those candidates, near-exact
overall, O(log nodes) per placement instead of a scan.  Free capacity only shrinks within
a call, so a demand at least as large as one that already failed for the same signature
fails at once, and a node that cannot fit the smallest pending demand leaves the heaps.
A retry names the nodes its earlier attempts failed on (``avoid``): it goes to the best
other eligible node that can take it, and to one of those only when no other can, now or
in its queue.  A node that fails everything it is given (a missing program, a full disk)
then does not take the retries too.  That search is a scan of the signature's nodes, at
most ``AVOID_VISITS_MAX`` node visits per call; past it a retry is placed as any task is.

*Worker queues (pipelining).*  A node whose ``queue_max`` is above 0 may also be given
tasks beyond what fits there now, so that its worker starts the next one itself the moment
a slot frees, without a round trip to the coordinator.  The first pass above places only
what fits now; a second pass, in the same order (priority, then DRF), puts each task that
is still waiting for room (not one that never fits, has no eligible node or holds a node)
in the queue of an eligible node that is not held, whose capacity could run it on its own,
and whose *queue* stays within ``queue_max`` after the placement: its queue is the number
of its tasks beyond those that fit at once when taken smallest first (``queued_count``).
The node is chosen as in the first pass (spread: lowest dominant share after placement,
which may now exceed 1; binpack: highest), so fairness and spread still hold over placed
and queued work alike.  A node that runs what fits and queues the rest never *runs* more
than fits: ``start_order`` is the worker's rule (pure too), strict priority-then-age order
that stops at the first task that does not fit, so a large queued task is not overtaken
for ever by small ones behind it.

*No head-of-line blocking, no starvation.*  A task that does not fit now is skipped, and
the tasks behind it may go ahead on other nodes (backfilling).  So that a stream of small
tasks cannot starve a large one, the first ``reservations_max`` skipped tasks (in the order
above, so the most deserving) each hold one node: the eligible node big enough for the
task that is closest to fitting it (smallest dominant shortfall, then id).  A held node
takes nothing new but its own task, so it drains as its tasks end and the task lands there
(or anywhere else it fits first, which frees the hold).  Holds are soft state: ``Plan.held``
lists them and the caller feeds it back (``plan(..., held=previous.held)``); they are taken
before anything else in the next call, ahead even of higher priorities, so a held node's
load only shrinks and the large task runs once enough of it has ended.  A hold lost (a new
coordinator, the list not fed back) costs only time: it is taken afresh.  The price is
idle capacity on at most ``reservations_max`` nodes while they drain (EASY backfilling
without run-time estimates).  A task that fits no eligible node even when empty holds
nothing and says so.
"""

from __future__ import annotations

import bisect
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

TRUST_LEVELS = ("low", "medium", "high")    # ordered: a node of a level serves tasks asking for it or less
POLICIES = ("spread", "binpack")
PLACEMENTS_MAX = 1_000      # default per-call bound: one call stays well under 50 ms
RESERVATIONS_MAX = 4        # nodes held for skipped large tasks per call (idle while they drain)
QUEUE_BUFFER_MS = 50        # auto worker queue: run times of work a node may hold beyond what fits
QUEUE_FACTOR_MAX = 16       # ... at most this many times its cores
LOOKAHEAD = 4               # fitting candidates compared per placement; exact among them
FAILED_SHAPES_MAX = 64      # failed demands remembered per signature (a speed-up only)
AVOID_VISITS_MAX = 20_000   # nodes retries' scans (avoid) may look at per call; then they go anywhere

_TRUST_RANK = {t: i for i, t in enumerate(TRUST_LEVELS)}


def _millicores_up(cpu: float) -> int:
    # 0.1 * 1000 is 100.00000000000001: tolerate float noise before rounding up
    return max(0, math.ceil(cpu * 1000 - 1e-6))


def _millicores_down(cpu: float) -> int:
    return max(0, math.floor(cpu * 1000 + 1e-6))


def _check_number(what: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")


def _check_count(what: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an integer >= 0, got {value!r}")


def _check_trust(what: str, value: str) -> None:
    if value not in _TRUST_RANK:
        raise ValueError(f"{what} must be one of {', '.join(TRUST_LEVELS)}, got {value!r}")


@dataclass(frozen=True, slots=True)
class NodeView:
    """One alive member offered to the scheduler (the caller filters dead, left, suspect)."""
    id: str
    cpu: float              # cores offered
    memory_mb: int
    gpu: int
    labels: Mapping[str, str] = field(default_factory=dict)
    trust: str = "low"
    draining: bool = False
    runs_tasks: bool = True     # False for role "standby"
    queue_max: int = 0          # tasks it may hold beyond what fits at once (0: none; see queued_count)
    memory_max_mb: int = 0      # the largest memory one task may have there (a hard ulimit -v); 0: no cap

    def __post_init__(self) -> None:
        _check_number("node cpu", self.cpu)
        _check_count("node memory_mb", self.memory_mb)
        _check_count("node memory_max_mb", self.memory_max_mb)
        _check_count("node gpu", self.gpu)
        _check_trust("node trust", self.trust)
        _check_count("node queue_max", self.queue_max)


@dataclass(frozen=True, slots=True)
class Demand:
    """A task's needs; also what a placed task holds on its node."""
    cpu: float
    memory_mb: int
    gpu: int
    # (millicores rounded up, memory_mb, gpu): the exact integer form every sum uses
    key: tuple[int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_number("cpu", self.cpu)
        _check_count("memory_mb", self.memory_mb)
        _check_count("gpu", self.gpu)
        object.__setattr__(self, "key", (_millicores_up(self.cpu), self.memory_mb, self.gpu))


@dataclass(frozen=True, slots=True)
class PendingTask:
    id: str
    owner: str
    demand: Demand
    priority: int
    submitted_ms: int
    labels: Mapping[str, str] = field(default_factory=dict)    # node must carry all of them
    min_trust: str = "low"
    # nodes its earlier attempts failed on (a retry): any other eligible node that can take it
    # comes first, as Nomad reschedules; one of these only when no other can
    avoid: frozenset[str] = frozenset()
    # (sorted labels, min_trust, needs a gpu): tasks with the same signature share one node index
    signature: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_trust("min_trust", self.min_trust)
        labels = tuple(sorted(self.labels.items())) if self.labels else ()
        object.__setattr__(self, "signature", (labels, self.min_trust, self.demand.gpu > 0))


@dataclass(frozen=True, slots=True)
class Placed:
    """A task scheduled or running on a node: it holds its demand there."""
    task_id: str
    owner: str
    node_id: str
    demand: Demand


@dataclass(frozen=True, slots=True)
class Assignment:
    task_id: str
    node_id: str
    term: int


@dataclass(frozen=True, slots=True)
class Plan:
    assignments: tuple[Assignment, ...]
    waiting: Mapping[str, str]      # task id -> why it was not placed now
    held: Mapping[str, str] = field(default_factory=dict)   # node id -> task id it is held for
    # waiting tasks no node of this plan could ever take, however idle (ineligible, never fits)
    blocked: frozenset[str] = frozenset()


class Fence:
    """Worker side of fencing: refuse assignments from a term older than the highest seen.

    A deposed coordinator keeps its old term, so once a worker has seen the new leader's
    term nothing the old one decides is taken.  The caller persists ``highest_term``
    (and passes it back in after a restart) before acting on an admitted assignment.
    """

    __slots__ = ("highest_term",)

    def __init__(self, highest_term: int = 0) -> None:
        self.highest_term = highest_term

    def admit(self, term: int) -> bool:
        if term < self.highest_term:
            return False
        self.highest_term = term
        return True


def _fit_count(cap: tuple[int, int, int], keys: Sequence[tuple[int, int, int]]) -> int:
    """How many of ``keys`` (``Demand.key``s) fit ``cap`` at once, taken smallest first and
    skipping any that does not fit what is left."""
    c, m, g = cap
    n = 0
    for kc, km, kg in sorted(keys):
        if kc <= c and km <= m and kg <= g:
            c, m, g = c - kc, m - km, g - kg
            n += 1
    return n


def queued_count(node: NodeView, demands: Sequence[Demand]) -> int:
    """A node's queue: of the tasks placed on it (``demands``), how many do not fit at once
    beside the others, taken smallest first.  0 whenever they all fit."""
    return len(demands) - _fit_count((_millicores_down(node.cpu), node.memory_mb, node.gpu),
                                     [d.key for d in demands])


@dataclass(frozen=True, slots=True)
class Assigned:
    """A task assigned to this worker and not started yet (its queue, as the worker sees it)."""
    id: str
    demand: Demand
    priority: int
    submitted_ms: int


def start_order(node: NodeView, running: Sequence[Demand], waiting: Sequence[Assigned]) -> list[str]:
    """Which of ``waiting`` the worker starts now, in order: higher priority first, then the
    older, then the smaller id; strictly, stopping at the first that does not fit beside
    ``running`` and those started before it (so small tasks never overtake a large one for
    ever).  What runs afterwards always fits the node."""
    free = [_millicores_down(node.cpu), node.memory_mb, node.gpu]
    for d in running:
        for k in range(3):
            free[k] -= d.key[k]
    out = []
    for a in sorted(waiting, key=lambda a: (-a.priority, a.submitted_ms, a.id)):
        c, m, g = a.demand.key
        if c > free[0] or m > free[1] or g > free[2]:
            break
        free[0] -= c
        free[1] -= m
        free[2] -= g
        out.append(a.id)
    return out


def plan(nodes: Sequence[NodeView], placed: Sequence[Placed], pending: Sequence[PendingTask], *,
         term: int, policy: str = "spread", placements_max: int = PLACEMENTS_MAX,
         reservations_max: int = RESERVATIONS_MAX, held: Mapping[str, str] | None = None) -> Plan:
    """Place as many of ``pending`` as fit now (at most ``placements_max``), each stamped ``term``.

    ``held`` is the previous plan's ``held`` (node id -> task id), fed back by the caller so
    that a node held for a large task stays held across calls until the task lands.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if placements_max < 0 or reservations_max < 0:
        raise ValueError("placements_max and reservations_max must be >= 0")
    p = _Planner(nodes, placed, pending, term, policy == "spread", placements_max, reservations_max, held or {})
    p.run()
    p._check()
    return p.result()


def auto_queue_max(cpu: float, run_ms: float | None) -> int:
    """A node's worker queue when ``worker_queue_depth`` is -1 (auto): its cores (at least 1)
    times how many of its recent attempts, by their moving average run time ``run_ms``, fit
    in QUEUE_BUFFER_MS, between 1 and QUEUE_FACTOR_MAX (1 until an attempt has ended there).
    Short tasks run back to back while the coordinator's next assignments travel; long ones
    queue one per core, so the tail of a burst stays spread over the nodes."""
    factor = 1 if run_ms is None else min(QUEUE_FACTOR_MAX, max(1, int(QUEUE_BUFFER_MS // max(run_ms, 1.0))))
    return max(1, math.ceil(cpu)) * factor


def room_for_any(nodes: Sequence[NodeView], placed: Sequence[Placed],
                 demands: Sequence[tuple[int, int, int]]) -> bool:
    """False when ``plan`` would assign nothing because no node that takes tasks has room for
    even the smallest pending demand in every dimension (``demands``: the pending tasks'
    ``Demand.key``s), now or in its queue.  A cheap test, O(nodes + placed + demands), for a caller that would
    otherwise plan again after each change of a full cluster."""
    if not demands:
        return False
    min_c, min_m, min_g = (min(k[i] for k in demands) for i in range(3))
    by_id = {x.id: i for i, x in enumerate(nodes)}
    used = [[0, 0, 0] for _ in nodes]
    for p in placed:
        i = by_id.get(p.node_id)
        if i is not None:
            u, (c, m, g) = used[i], p.demand.key
            u[0] += c
            u[1] += m
            u[2] += g
    if any(x.runs_tasks and not x.draining and _millicores_down(x.cpu) - u[0] >= min_c
           and x.memory_mb - u[1] >= min_m and x.gpu - u[2] >= min_g for x, u in zip(nodes, used)):
        return True
    # a queue with room on a node big enough for the smallest demand
    queues = {x.id: [] for x in nodes if x.queue_max and x.runs_tasks and not x.draining
              and _millicores_down(x.cpu) >= min_c and x.memory_mb >= min_m and x.gpu >= min_g}
    if not queues:
        return False
    for p in placed:
        q = queues.get(p.node_id)
        if q is not None:
            q.append(p.demand.key)
    return any(len(queues[x.id]) - _fit_count((_millicores_down(x.cpu), x.memory_mb, x.gpu), queues[x.id])
               < x.queue_max for x in nodes if x.id in queues)


# ------------------------------------------------------------------------------ internals

def _fmt_cpu(millicores: int) -> str:
    return f"{millicores / 1000:g}"


def _describe(key: tuple[int, int, int]) -> str:
    c, m, g = key
    parts = [f"{_fmt_cpu(c)} cpu", f"{m} MB memory"]
    if g:
        parts.append(f"{g} gpu")
    return ", ".join(parts)


_DIMS = ("cpu", "MB memory", "gpu")


def _amount(dim: int, v: int) -> str:
    return f"{_fmt_cpu(v)} cpu" if dim == 0 else f"{v} {_DIMS[dim]}"


def _cpu_class(free_mc: int) -> int:
    """Nodes are indexed by free cpu in doubling classes from 250 millicores up, so that a
    search for c millicores skips every class below c's: with round demands (0.25, 0.5, 1,
    2, ... cores) the class of c holds only nodes with room for it."""
    return (free_mc // 250).bit_length() if free_mc > 0 else 0


class _Sig:
    """The nodes one constraint signature may use, and what the search learned about them."""
    __slots__ = ("eligible", "reason", "heaps", "failed", "frontier", "never", "top_free", "qheap")

    def __init__(self, eligible: list[int], reason: str) -> None:
        self.eligible = eligible        # node indices in id order; empty -> ``reason`` says why
        self.reason = reason
        self.heaps: dict[int, list] | None = None    # free-cpu class -> heap; built on first search
        self.failed: list[tuple[int, int, int]] = []
        self.frontier: list[tuple[int, int, int]] | None = None    # Pareto-maximal capacities
        self.never: dict[tuple[int, int, int], bool] = {}    # demand -> fits no eligible node even empty
        self.top_free: list[int] | None = None      # per dimension, the node with most free (for words)
        self.qheap: list | None = None      # (share key, node, version): eligible nodes with a queue


class _Planner:
    early_stop = True       # False only in the test that checks stopping early changes nothing

    def __init__(self, nodes: Sequence[NodeView], placed: Sequence[Placed], pending: Sequence[PendingTask],
                 term: int, spread: bool, placements_max: int, reservations_max: int,
                 prior_held: Mapping[str, str]) -> None:
        self.term = term
        self.spread = spread
        self.placements_max = placements_max
        self.reservations_max = reservations_max
        self.nodes = sorted(nodes, key=lambda n: n.id)
        self.index = {n.id: i for i, n in enumerate(self.nodes)}
        if len(self.index) != len(self.nodes):
            raise ValueError("duplicate node id in nodes")
        n = len(self.nodes)
        self.cap_c = [_millicores_down(x.cpu) for x in self.nodes]
        self.cap_m = [x.memory_mb for x in self.nodes]
        self.cap_g = [x.gpu for x in self.nodes]
        self.inv_c = [1 / c if c else 0.0 for c in self.cap_c]
        self.inv_m = [1 / c if c else 0.0 for c in self.cap_m]
        self.inv_g = [1 / c if c else 0.0 for c in self.cap_g]
        self.used_c = [0] * n
        self.used_m = [0] * n
        self.used_g = [0] * n
        self.accepts = [x.runs_tasks and not x.draining for x in self.nodes]
        self.held_for: dict[int, str] = {}      # node index -> task id
        self.hold_of: dict[str, int] = {}       # task id -> node index
        self.prior_held = prior_held
        self.open = list(self.accepts)          # may still take a task in this call
        self.open_count = sum(self.open)        # kept by _set_open: 0 = no node takes more this pass
        self.accepting = self.open_count
        self.ver = [0] * n
        self.sigs_of: list[list[_Sig]] = [[] for _ in range(n)]    # the indexed signatures holding a node
        self.touched: set[int] = set()
        self.sigs: dict[tuple, _Sig] = {}
        # the distinct per-task memory caps of the nodes, ascending (see _sig_of)
        self.mem_caps = sorted({x.memory_max_mb for x in self.nodes if x.memory_max_mb})
        self.labels_idx: dict[tuple[str, str], set[int]] = {}
        for i, x in enumerate(self.nodes):
            for kv in x.labels.items():
                self.labels_idx.setdefault(kv, set()).add(i)

        # worker queues: the demands placed on each node that has one (for queued_count)
        self.queue_max = [x.queue_max if self.accepts[i] else 0 for i, x in enumerate(self.nodes)]
        self.queues = any(self.queue_max)
        self.avoid_visits = AVOID_VISITS_MAX     # what retries' scans (_best_avoiding) may still look at
        self.node_keys: list[list[tuple[int, int, int]]] = [[] for _ in range(n)]
        self.queued_on: set[int] = set()        # nodes given a task beyond what fits now
        self.queue_room: set[int] = set()       # (queue pass) nodes whose queue has room
        self._stopped = False                   # the last _turns stopped early, saturated
        self.already: set[str] = set()          # pending tasks the caller also gave as placed
        self._holder_key: dict[str, tuple[int, int, int]] = {}    # task id -> demand key, for holders
        self.qsigs_of: list[list[_Sig]] = [[] for _ in range(n)]   # signatures whose queue heap holds a node

        # what already runs: node usage (for capacity) and owner usage (for fairness)
        self.owner_use: dict[str, list[int]] = {}
        self.placed_ids: dict[str, str] = {}
        for t in placed:
            self.placed_ids[t.task_id] = t.node_id
            i = self.index.get(t.node_id)
            if i is None:
                continue    # its node is gone: it holds nothing; the caller reschedules it
            c, m, g = t.demand.key
            if self.queue_max[i]:
                self.node_keys[i].append(t.demand.key)
            self.used_c[i] += c
            self.used_m[i] += m
            self.used_g[i] += g
            u = self.owner_use.get(t.owner)
            if u is None:
                self.owner_use[t.owner] = [c, m, g]
            else:
                u[0] += c
                u[1] += m
                u[2] += g
        tc = sum(self.cap_c[i] for i in range(n) if self.nodes[i].runs_tasks)
        tm = sum(self.cap_m[i] for i in range(n) if self.nodes[i].runs_tasks)
        tg = sum(self.cap_g[i] for i in range(n) if self.nodes[i].runs_tasks)
        self.tot_inv = (1 / tc if tc else 0.0, 1 / tm if tm else 0.0, 1 / tg if tg else 0.0)

        self.pending = pending
        self.min_c = self.min_m = self.min_g = 0    # set by run()
        self.assignments: list[Assignment] = []
        # task id -> a reason, or a tuple resolved into words once the plan is final
        self.waiting: dict[str, object] = {}

    # -- shares and keys ------------------------------------------------------------

    def _node_share(self, i: int) -> float:
        return max(self.used_c[i] * self.inv_c[i], self.used_m[i] * self.inv_m[i], self.used_g[i] * self.inv_g[i])

    def _heap_key(self, i: int) -> float:
        s = self._node_share(i)
        return s if self.spread else -s

    def _owner_share(self, owner: str) -> float:
        u = self.owner_use.get(owner)
        if u is None:
            return 0.0
        a, b, c = self.tot_inv
        return max(u[0] * a, u[1] * b, u[2] * c)

    def _set_open(self, i: int, value: bool) -> None:
        if self.open[i] != value:
            self.open[i] = value
            self.open_count += 1 if value else -1

    def _maybe_close(self, i: int) -> None:
        if (self.cap_c[i] - self.used_c[i] < self.min_c or self.cap_m[i] - self.used_m[i] < self.min_m
                or self.cap_g[i] - self.used_g[i] < self.min_g):
            self._set_open(i, False)

    # -- signatures -----------------------------------------------------------------

    def _sig_key(self, task: PendingTask) -> tuple:
        """The task's constraint signature, and when some nodes cap a task's memory below
        its demand, how many of the distinct caps it is over (those nodes are not eligible):
        the tasks of one signature still share an index per class of memory demand."""
        if self.mem_caps and task.demand.memory_mb > self.mem_caps[0]:
            return (*task.signature, bisect.bisect_left(self.mem_caps, task.demand.memory_mb))
        return task.signature

    def _sig_of(self, task: PendingTask) -> _Sig:
        key = self._sig_key(task)
        s = self.sigs.get(key)
        if s is None:
            s = self.sigs[key] = self._build_sig(key)
        return s

    def _build_sig(self, signature: tuple) -> _Sig:
        labels, min_trust, needs_gpu = signature[:3]
        n = len(self.nodes)
        cand: set[int] | range = range(n)
        if labels:
            missing = [f"{k}={v}" for k, v in labels if (k, v) not in self.labels_idx]
            if missing:
                return _Sig([], f"no node has label {', '.join(missing)}")
            sets = sorted((self.labels_idx[kv] for kv in labels), key=len)
            cand = set(sets[0]).intersection(*sets[1:])
            if not cand:
                return _Sig([], "no node has all of the labels "
                                + ", ".join(f"{k}={v}" for k, v in labels))
        rank = _TRUST_RANK[min_trust]
        trusted = [i for i in cand if _TRUST_RANK[self.nodes[i].trust] >= rank]
        where = " with those labels" if labels else ""
        if not trusted:
            return _Sig([], f"needs trust {min_trust}: no node{where} is trusted that much")
        eligible = sorted(i for i in trusted if self.accepts[i])
        if not eligible:
            return _Sig([], f"every node{where} that is trusted enough is draining or standby")
        if needs_gpu:
            # kept apart so that gpu tasks never search the (usually many) nodes without one
            eligible = [i for i in eligible if self.cap_g[i] > 0]
            if not eligible:
                return _Sig([], f"needs a gpu: no node{where} that takes tasks has one")
        if len(signature) > 3:
            over = self.mem_caps[signature[3] - 1]     # the largest cap below the demand
            capped = [i for i in eligible if 0 < self.nodes[i].memory_max_mb <= over]
            eligible = [i for i in eligible if not 0 < self.nodes[i].memory_max_mb <= over]
            if not eligible:
                top = max(self.nodes[i].memory_max_mb for i in capped)
                return _Sig([], f"needs more memory than any node{where} lets one task have: at most "
                                f"{top} MB there (a hard ulimit -v on the node)")
        return _Sig(eligible, "")

    def _heaps(self, s: _Sig) -> dict[int, list]:
        hs = s.heaps
        if hs is None:
            hs = s.heaps = {}
            for i in s.eligible:
                self.sigs_of[i].append(s)
                if self.open[i]:
                    hs.setdefault(_cpu_class(self.cap_c[i] - self.used_c[i]), []).append(
                        (self._heap_key(i), i, self.ver[i]))
            for h in hs.values():
                heapq.heapify(h)
        return hs

    def _never_fits(self, s: _Sig, key: tuple[int, int, int]) -> bool:
        got = s.never.get(key)
        if got is None:
            got = s.never[key] = self._never_fits_now(s, key)
        return got

    def _never_fits_now(self, s: _Sig, key: tuple[int, int, int]) -> bool:
        if s.frontier is None:
            caps = sorted({(self.cap_c[i], self.cap_m[i], self.cap_g[i]) for i in s.eligible}, reverse=True)
            front: list[tuple[int, int, int]] = []
            for cap in caps:    # a capacity dominated by one already kept adds nothing
                if not any(f[0] >= cap[0] and f[1] >= cap[1] and f[2] >= cap[2] for f in front):
                    front.append(cap)
            s.frontier = front
        c, m, g = key
        return not any(f[0] >= c and f[1] >= m and f[2] >= g for f in s.frontier)

    # -- the pass -------------------------------------------------------------------

    def run(self) -> None:
        levels: dict[int, dict[str, list]] = {}
        seen: set[str] = set()
        min_c = min_m = min_g = None
        holders = set(self.prior_held.values())
        holding: dict[str, PendingTask] = {}
        for t in self.pending:
            if t.id in seen:
                raise ValueError(f"duplicate pending task id {t.id!r}")
            seen.add(t.id)
            if t.id in self.placed_ids:
                self.waiting[t.id] = f"already placed on {self.placed_ids[t.id]}"
                self.already.add(t.id)
                continue
            if t.id in holders:
                holding[t.id] = t
            c, m, g = t.demand.key
            if min_c is None:
                min_c, min_m, min_g = c, m, g
            else:
                if c < min_c:
                    min_c = c
                if m < min_m:
                    min_m = m
                if g < min_g:
                    min_g = g
            owners = levels.get(t.priority)
            if owners is None:
                owners = levels[t.priority] = {}
            q = owners.get(t.owner)
            if q is None:
                owners[t.owner] = [(t.submitted_ms, t.id, t)]
            else:
                q.append((t.submitted_ms, t.id, t))
        # a node that cannot fit the smallest pending demand in some dimension is done for this call
        self.min_c, self.min_m, self.min_g = min_c or 0, min_m or 0, min_g or 0
        for i in range(len(self.nodes)):
            if self.open[i]:
                self._maybe_close(i)
        # holds from the previous call come first: a held node takes nothing new but its task
        for node_id, tid in sorted(self.prior_held.items()):
            i, t = self.index.get(node_id), holding.get(tid)
            if (i is None or t is None or not self.accepts[i] or i in self.held_for or tid in self.hold_of
                    or len(self.held_for) >= self.reservations_max):
                continue
            c, m, g = t.demand.key
            if i in self._sig_of(t).eligible and self.cap_c[i] >= c and self.cap_m[i] >= m \
                    and self.cap_g[i] >= g:
                self._take_hold(i, t)
        full = self._turns(levels, self._try, self._saturated)
        if self._stopped:
            self._after_saturation()
        if self.queues and not full:
            # second pass: what waits for room now goes to a worker queue, in the same order
            later: dict[int, dict[str, list]] = {}
            for t in self.pending:
                why = self.waiting.get(t.id)
                if isinstance(why, tuple) and why[0] in ("now", "held"):
                    later.setdefault(t.priority, {}).setdefault(t.owner, []).append((t.submitted_ms, t.id, t))
            self.queue_room = {i for i, q in enumerate(self.queue_max) if q and self._queued(i) < q}
            self._turns(later, self._try_queue, lambda: self.early_stop and not self.queue_room)
            # what the pass did not reach keeps its reason: every queue was full
        if full:
            assigned = {a.task_id for a in self.assignments}
            for t in self.pending:
                if t.id not in self.waiting and t.id not in assigned:
                    i = self.hold_of.get(t.id)
                    self.waiting[t.id] = ("limit", t) if i is None else ("held", i, t.demand.key)

    def _turns(self, levels: dict[int, dict[str, list]], attempt, saturated) -> bool:
        """Offer each task of ``levels`` (priority -> owner -> [(submitted, id, task)]) to
        ``attempt`` in order: priority, then DRF among owners; True once placements_max is hit.
        Stops early (``self._stopped``) once ``saturated()``: ``attempt`` could change nothing
        more, so the tasks not offered keep (or get) the reason they would have got."""
        full = len(self.assignments) >= self.placements_max
        self._stopped = False
        for prio in sorted(levels, reverse=True):
            if full:
                break
            owners = levels[prio]
            turns = []
            for owner, q in owners.items():
                q.sort()
                turns.append((self._owner_share(owner), q[0][0], q[0][1], owner, 0))
            heapq.heapify(turns)
            while turns and not full:
                if saturated():
                    self._stopped = True
                    return False
                _, _, _, owner, pos = turns[0]
                q = owners[owner]
                attempt(q[pos][2])
                full = len(self.assignments) >= self.placements_max
                pos += 1
                if pos < len(q):
                    heapq.heapreplace(turns, (self._owner_share(owner), q[pos][0], q[pos][1], owner, pos))
                else:
                    heapq.heappop(turns)
        return full

    def _saturated(self) -> bool:
        """``_try`` can change nothing more this pass: no node is open, no hold is left to
        take, and no task holding a node fits there yet (one that fits would land and end
        its hold, and a later task could take it).  A full cluster with 10,000 pending
        tasks then costs a plan some dictionary work per task, not a search."""
        if not (self.early_stop and self.open_count == 0
                and len(self.held_for) >= min(self.reservations_max, self.accepting)):
            return False
        return not any(self._fits(i, *self._holder_key[tid]) for i, tid in self.held_for.items())

    def _after_saturation(self) -> None:
        """The first pass stopped saturated: every task it did not offer gets the reason
        ``_try`` would give it."""
        assigned = {a.task_id for a in self.assignments}
        for t in self.pending:
            if t.id not in self.waiting and t.id not in assigned:
                key = t.demand.key
                mine = self.hold_of.get(t.id)
                if mine is not None:
                    self.waiting[t.id] = ("held", mine, key)
                    continue
                s = self._sig_of(t)
                self.waiting[t.id] = (s.reason if not s.eligible else
                                      ("never", s, key) if self._never_fits(s, key) else ("now", s, key))

    def _queued(self, i: int, extra: tuple[int, int, int] | None = None) -> int:
        keys = self.node_keys[i] if extra is None else [*self.node_keys[i], extra]
        return len(keys) - _fit_count(self._caps(i), keys)

    def _queue_fits(self, i: int, key: tuple[int, int, int]) -> bool:
        return (key[0] <= self.cap_c[i] and key[1] <= self.cap_m[i] and key[2] <= self.cap_g[i]
                and self._queued(i) < self.queue_max[i] and self._queued(i, key) <= self.queue_max[i])

    def _queue_takes(self, i: int, key: tuple[int, int, int]) -> bool:
        return bool(self.queue_max[i]) and i not in self.held_for and self._queue_fits(i, key)

    def _try_queue(self, task: PendingTask) -> None:
        """Put ``task`` (waiting for room now) in the queue of the best eligible node; a task
        holding a node goes only into that node's queue (ahead of every younger task there,
        by ``start_order``), which ends the hold."""
        c, m, g = key = task.demand.key
        mine = self.hold_of.get(task.id)
        if mine is not None:
            if self.queue_max[mine] and self._queue_fits(mine, key):
                del self.waiting[task.id]
                self._release(mine)
                self._queue_at(mine, task, c, m, g)
            return
        s = self._sig_of(task)
        if task.avoid:
            i = self._best_avoiding(s, task.avoid, c, m, g, lambda i: self._queue_takes(i, key))
            if i >= 0:
                del self.waiting[task.id]
                self._queue_at(i, task, c, m, g)
                return
        hp = s.qheap
        if hp is None:
            hp = s.qheap = []
            for i in s.eligible:
                if self.queue_max[i]:
                    self.qsigs_of[i].append(s)
                    hp.append((self._heap_key(i), i, self.ver[i]))
            heapq.heapify(hp)
        popped, best, best_score, fits = [], -1, 0.0, 0
        while hp and fits < LOOKAHEAD:
            e = heapq.heappop(hp)
            i = e[1]
            if e[2] != self.ver[i]:
                continue        # stale: a fresh entry was pushed when the node changed
            if self._queued(i) >= self.queue_max[i]:
                continue        # a full queue: dropped for this call (it only grows)
            popped.append(e)
            if i in self.held_for:
                continue        # kept for its own task; back in the heap if released
            if self.spread and best >= 0 and (e[0] > best_score or (e[0] == best_score and i > best)):
                break
            if c > self.cap_c[i] or m > self.cap_m[i] or g > self.cap_g[i] \
                    or self._queued(i, key) > self.queue_max[i]:
                continue
            score = self._share_after(i, c, m, g)
            if self._beats(i, score, best, best_score):
                best, best_score = i, score
            fits += 1
        for e in popped:
            if e[1] != best:
                heapq.heappush(hp, e)
        if best >= 0:
            del self.waiting[task.id]
            self._queue_at(best, task, c, m, g)

    def _queue_at(self, i: int, task: PendingTask, c: int, m: int, g: int) -> None:
        self._place(i, task, c, m, g)
        self.queued_on.add(i)
        if self._queued(i) >= self.queue_max[i]:
            self.queue_room.discard(i)
        e = (self._heap_key(i), i, self.ver[i])
        for sig in self.qsigs_of[i]:
            heapq.heappush(sig.qheap, e)

    def _try(self, task: PendingTask) -> None:
        s = self._sig_of(task)
        if not s.eligible:
            self.waiting[task.id] = s.reason
            return
        key = task.demand.key
        if self._never_fits(s, key):
            self.waiting[task.id] = ("never", s, key)
            return
        c, m, g = key
        mine = self.hold_of.get(task.id)
        if mine is not None and self._fits(mine, c, m, g):
            self._release(mine)
            self._place(mine, task, c, m, g)
            return
        for f in s.failed:
            if f[0] <= c and f[1] <= m and f[2] <= g:
                break   # capacity only shrinks within a call: a larger demand fails too
        else:
            i = -1
            if task.avoid:
                i = self._best_avoiding(s, task.avoid, c, m, g, lambda i: self.open[i] and self._fits(i, c, m, g))
                if i < 0 and mine is None and self.queues and self._best_avoiding(
                        s, task.avoid, c, m, g, lambda i: self._queue_takes(i, key)) >= 0:
                    self.waiting[task.id] = ("now", s, key)     # the queue pass puts it there
                    return
            if i < 0:
                i = self._search(s, c, m, g)
            if i >= 0:
                if mine is not None:
                    self._release(mine)
                self._place(i, task, c, m, g)
                return
            if len(s.failed) < FAILED_SHAPES_MAX:
                s.failed.append(key)
        if mine is not None:
            self.waiting[task.id] = ("held", mine, key)
        elif not (len(self.held_for) < self.reservations_max and self._hold(s, task, c, m, g)):
            self.waiting[task.id] = ("now", s, key)

    def _search(self, s: _Sig, c: int, m: int, g: int) -> int:
        """The best open node for (c, m, g) among the first LOOKAHEAD that fit, or -1."""
        hs = self._heaps(s)
        lowest = _cpu_class(c)
        # best-first over the heaps of the classes that can hold c cpu (a k-way merge)
        front = [(h[0][0], h[0][1], k) for k, h in hs.items() if k >= lowest and h]
        heapq.heapify(front)
        ver, is_open = self.ver, self.open
        used_c, used_m, used_g = self.used_c, self.used_m, self.used_g
        cap_c, cap_m, cap_g = self.cap_c, self.cap_m, self.cap_g
        inv_c, inv_m, inv_g = self.inv_c, self.inv_m, self.inv_g
        spread = self.spread
        pop, replace = heapq.heappop, heapq.heapreplace
        popped = []
        best = -1
        best_score = 0.0
        fits = 0
        while front:
            k = front[0][2]
            h = hs[k]
            e = pop(h)
            if h:
                replace(front, (h[0][0], h[0][1], k))
            else:
                pop(front)
            i = e[1]
            if e[2] != ver[i] or not is_open[i]:
                continue    # stale entry, or a node closed for this call: dropped for good
            popped.append((k, e))
            if spread and best >= 0 and (e[0] > best_score or (e[0] == best_score and i > best)):
                break   # a node's share only grows by placing: no later node can score better
            uc, um, ug = used_c[i] + c, used_m[i] + m, used_g[i] + g
            if uc <= cap_c[i] and um <= cap_m[i] and ug <= cap_g[i]:
                score = max(uc * inv_c[i], um * inv_m[i], ug * inv_g[i])
                if best < 0 or (score < best_score if spread else score > best_score) or (
                        score == best_score and i < best):
                    best, best_score = i, score
                fits += 1
                if fits >= LOOKAHEAD:
                    break
        push = heapq.heappush
        for k, e in popped:
            if e[1] != best:
                push(hs[k], e)
        return best

    def _best_avoiding(self, s: _Sig, avoid: frozenset[str], c: int, m: int, g: int, takes) -> int:
        """The best eligible node outside ``avoid`` that ``takes(i)``, by the policy's score
        after placing (c, m, g), or -1: a scan, not a heap search (only a retry of an attempt
        that failed comes here), bounded per call (AVOID_VISITS_MAX: a node that fails
        everything on a big busy mesh makes many retries; past the bound they go anywhere)."""
        best, best_score = -1, 0.0
        if self.avoid_visits <= 0:
            return best
        self.avoid_visits -= len(s.eligible)
        for i in s.eligible:
            if self.nodes[i].id in avoid or not takes(i):
                continue
            score = self._share_after(i, c, m, g)
            if self._beats(i, score, best, best_score):
                best, best_score = i, score
        return best

    def _share_after(self, i: int, c: int, m: int, g: int) -> float:
        """Node i's dominant share once (c, m, g) is placed there: what a choice compares."""
        return max((self.used_c[i] + c) * self.inv_c[i], (self.used_m[i] + m) * self.inv_m[i],
                   (self.used_g[i] + g) * self.inv_g[i])

    def _beats(self, i: int, score: float, best: int, best_score: float) -> bool:
        """Node i (at ``score``) is a better choice than ``best`` (-1: none yet): spread the
        lowest share, binpack the highest, ties to the smaller index (the smaller id)."""
        return best < 0 or (score < best_score if self.spread else score > best_score) or (
            score == best_score and i < best)

    def _place(self, i: int, task: PendingTask, c: int, m: int, g: int) -> None:
        self.used_c[i] += c
        self.used_m[i] += m
        self.used_g[i] += g
        self.ver[i] += 1
        self.touched.add(i)
        u = self.owner_use.get(task.owner)
        if u is None:
            self.owner_use[task.owner] = [c, m, g]
        else:
            u[0] += c
            u[1] += m
            u[2] += g
        self.assignments.append(Assignment(task.id, self.nodes[i].id, self.term))
        if self.queue_max[i]:
            self.node_keys[i].append((c, m, g))
        self._maybe_close(i)
        self._index(i)

    def _index(self, i: int) -> None:
        """Enter node i, as it is now, in the heaps of every indexed signature it belongs to."""
        if self.open[i]:
            e = (self._heap_key(i), i, self.ver[i])
            k = _cpu_class(self.cap_c[i] - self.used_c[i])
            for sig in self.sigs_of[i]:
                h = sig.heaps.get(k)
                if h is None:
                    sig.heaps[k] = [e]
                else:
                    heapq.heappush(h, e)

    def _shortfall(self, i: int, c: int, m: int, g: int) -> float:
        return max(max(0, self.used_c[i] + c - self.cap_c[i]) * self.inv_c[i],
                   max(0, self.used_m[i] + m - self.cap_m[i]) * self.inv_m[i],
                   max(0, self.used_g[i] + g - self.cap_g[i]) * self.inv_g[i])

    def _hold(self, s: _Sig, task: PendingTask, c: int, m: int, g: int) -> bool:
        best, best_short = -1, 0.0
        for i in s.eligible:
            if i in self.held_for or self.cap_c[i] < c or self.cap_m[i] < m or self.cap_g[i] < g:
                continue
            short = self._shortfall(i, c, m, g)
            if best < 0 or short < best_short:
                best, best_short = i, short
        if best < 0:
            return False
        self._take_hold(best, task)
        self.waiting[task.id] = ("held", best, (c, m, g))
        return True

    def _take_hold(self, i: int, task: PendingTask) -> None:
        self._holder_key[task.id] = task.demand.key
        self.held_for[i] = task.id
        self.hold_of[task.id] = i
        self._set_open(i, False)     # its heap entries are skipped from now on

    def _release(self, i: int) -> None:
        del self.hold_of[self.held_for.pop(i)]
        self._set_open(i, self.accepts[i])
        self._maybe_close(i)
        self.ver[i] += 1    # entries dropped while it was held are replaced by a fresh one
        self._index(i)

    def _fits(self, i: int, c: int, m: int, g: int) -> bool:
        return (self.used_c[i] + c <= self.cap_c[i] and self.used_m[i] + m <= self.cap_m[i]
                and self.used_g[i] + g <= self.cap_g[i])

    # -- result ---------------------------------------------------------------------

    def _check(self) -> None:
        assert len(self.assignments) <= self.placements_max, "more assignments than placements_max"
        assert len(self.held_for) <= self.reservations_max, "more held nodes than reservations_max"
        for i in self.touched:
            if i in self.queued_on:
                assert self._queued(i) <= self.queue_max[i], f"queue of {self.nodes[i].id} over its bound"
            else:
                assert self.used_c[i] <= self.cap_c[i] and self.used_m[i] <= self.cap_m[i] \
                    and self.used_g[i] <= self.cap_g[i], f"overcommitted node {self.nodes[i].id}"
            assert self.accepts[i], f"assigned to a node that takes no tasks: {self.nodes[i].id}"

    def result(self) -> Plan:
        words: dict[tuple, str] = {}
        limit_words: dict[tuple, str] = {}
        waiting: dict[str, str] = {}
        blocked: set[str] = set()
        for tid, why in self.waiting.items():
            if isinstance(why, str):      # not eligible anywhere, or already placed
                waiting[tid] = why
                if tid not in self.already:
                    blocked.add(tid)
                continue
            kind = why[0]
            if kind == "never":
                blocked.add(tid)
            if kind == "held":
                waiting[tid] = self._held_words(why[1], why[2])
                continue
            if kind == "limit":
                task = why[1]
                memo = (self._sig_key(task), task.demand.key)
                w = limit_words.get(memo)
                if w is None:
                    s = self._sig_of(task)
                    if not s.eligible:
                        w = s.reason
                    elif self._never_fits(s, task.demand.key):
                        w = self._never_words(s, task.demand.key)
                    else:
                        w = f"not considered: the limit of {self.placements_max} placements per round was reached"
                    limit_words[memo] = w
                waiting[tid] = w
                continue
            memo = (why[0], id(why[1]), why[2])
            w = words.get(memo)
            if w is None:
                w = words[memo] = (self._never_words(why[1], why[2]) if why[0] == "never"
                                   else self._now_words(why[1], why[2]))
            waiting[tid] = w
        held = {self.nodes[i].id: tid for i, tid in sorted(self.held_for.items())}
        return Plan(tuple(self.assignments), waiting, held, frozenset(blocked))

    def _caps(self, i: int) -> tuple[int, int, int]:
        return self.cap_c[i], self.cap_m[i], self.cap_g[i]

    def _free(self, i: int) -> tuple[int, int, int]:
        return self.cap_c[i] - self.used_c[i], self.cap_m[i] - self.used_m[i], self.cap_g[i] - self.used_g[i]

    def _never_words(self, s: _Sig, key: tuple[int, int, int]) -> str:
        for dim in range(3):
            top = max(s.eligible, key=lambda i: (self._caps(i)[dim], -i))
            if key[dim] > self._caps(top)[dim]:
                return (f"never fits: needs {_amount(dim, key[dim])} but the largest eligible node "
                        f"({self.nodes[top].id}) has {_amount(dim, self._caps(top)[dim])}")
        return f"never fits: no eligible node has {_describe(key)} in all"

    def _now_words(self, s: _Sig, key: tuple[int, int, int]) -> str:
        parts = []
        if s.top_free is None:
            usable = [i for i in s.eligible if i not in self.held_for]
            s.top_free = [max(usable, key=lambda i: (self._free(i)[dim], -i)) for dim in range(3)] if usable else []
        for dim, top in enumerate(s.top_free):
            most = self._free(top)[dim]
            if key[dim] > most:
                parts.append(f"no node has {_amount(dim, key[dim])} free "
                             f"(most: {_amount(dim, max(0, most))} on {self.nodes[top].id})")
        if s.top_free and not parts:
            parts.append(f"no node has {_describe(key)} free at once")
        held = [i for i in s.eligible if i in self.held_for
                and all(k <= f for k, f in zip(key, self._free(i)))]
        if held:
            parts.append("room on " + ", ".join(f"{self.nodes[i].id} (held for {self.held_for[i]})" for i in held[:3])
                         + (" ..." if len(held) > 3 else ""))
        elif not s.top_free:
            parts.append("every eligible node is held for a task waiting longer")
        return "; ".join(parts)

    def _held_words(self, i: int, key: tuple[int, int, int]) -> str:
        free = self._free(i)
        lack = [_amount(d, key[d] - max(0, free[d])) for d in range(3) if key[d] > free[d]]
        return (f"holding {self.nodes[i].id} for this task (nothing new goes there) "
                f"until {', '.join(lack) or 'its share'} more is free there")


def check_plan(nodes: Sequence[NodeView], placed: Sequence[Placed], pending: Sequence[PendingTask],
               result: Plan, *, term: int, placements_max: int = PLACEMENTS_MAX) -> None:
    """Re-derive the invariants from scratch (floats, no shared code): raise AssertionError."""
    by_id = {n.id: n for n in nodes}
    tasks = {t.id: t for t in pending}
    placed_ids = {t.task_id for t in placed}
    use = {n.id: [0.0, 0, 0] for n in nodes}
    for t in placed:
        if t.node_id in use:
            u = use[t.node_id]
            u[0] += t.demand.cpu
            u[1] += t.demand.memory_mb
            u[2] += t.demand.gpu
    before = {k: list(v) for k, v in use.items()}
    assert len(result.assignments) <= placements_max, "too many assignments"
    seen = set()
    for a in result.assignments:
        assert a.term == term, f"{a.task_id}: term {a.term} != {term}"
        assert a.task_id in tasks and a.task_id not in placed_ids, f"{a.task_id} was not pending"
        assert a.task_id not in seen, f"{a.task_id} assigned twice"
        assert a.task_id not in result.waiting, f"{a.task_id} both assigned and waiting"
        seen.add(a.task_id)
        n, t = by_id[a.node_id], tasks[a.task_id]
        assert n.runs_tasks and not n.draining, f"{a.task_id} on {n.id}, which takes no tasks"
        assert all(n.labels.get(k) == v for k, v in t.labels.items()), f"{a.task_id} labels on {n.id}"
        assert TRUST_LEVELS.index(n.trust) >= TRUST_LEVELS.index(t.min_trust), f"{a.task_id} trust on {n.id}"
        assert not n.memory_max_mb or t.demand.memory_mb <= n.memory_max_mb, f"{a.task_id} over the cap of {n.id}"
        u = use[n.id]
        u[0] += t.demand.cpu
        u[1] += t.demand.memory_mb
        u[2] += t.demand.gpu
    for nid, u in use.items():
        if u != before[nid]:
            n = by_id[nid]
            if u[0] <= n.cpu + 1e-6 and u[1] <= n.memory_mb and u[2] <= n.gpu:
                continue
            # beyond what fits: only into a bounded worker queue, each task able to run there alone
            mine = [tasks[a.task_id].demand for a in result.assignments if a.node_id == nid]
            assert n.queue_max > 0, f"overcommit on {nid}: {u} > ({n.cpu}, {n.memory_mb}, {n.gpu})"
            for d in mine:
                assert d.cpu <= n.cpu + 1e-6 and d.memory_mb <= n.memory_mb and d.gpu <= n.gpu, \
                    f"queued on {nid}, which could never run it: {d}"
            every = [t.demand for t in placed if t.node_id == nid] + mine
            assert queued_count(n, every) <= n.queue_max, f"queue of {nid} over {n.queue_max}"
    for tid in tasks:
        assert tid in seen or tid in result.waiting, f"{tid} neither assigned nor given a reason"
