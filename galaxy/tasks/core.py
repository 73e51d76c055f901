"""Tasks: what a user submits, the task document every node holds, and its state lattice.

Theory of operation
-------------------
*The spec.*  ``parse_spec`` turns a submission (the JSON body of ``POST /v1/tasks``) into
a frozen ``TaskSpec`` or raises ``SpecError(field, reason)`` naming the first bad field.
Every size and count is bounded (``*_MAX`` below) so that a task document, spec included,
always fits one replicated document (``replica.VALUE_BYTES_MAX``).

*The document.*  A task is one replicated document of type ``task`` keyed by its id; the
value is ``Task.to_value()``.  Several nodes write it: the node that accepted it (new,
pending), the coordinator (scheduled, lost), the worker that runs the attempt (running,
progress, finished) and any node a user asks to cancel.  Each writer reads the current
winner, applies one *transition* below and writes the result; a transition that does not
apply to the state it finds raises ``Refused`` and nothing is written.  That is what keeps
a causally later write from undoing a newer one: e.g. a worker whose attempt 1 was
superseded by attempt 2 finds ``attempt == 2`` and may not record attempt 1's result.

*Concurrent writes* (siblings in the replica) are resolved by ``rank``, a state lattice:

    terminal  >  cancel requested  >  attempt  >  Raft term  >  state

* a terminal state (succeeded, failed, timed out, cancelled) beats any live one: what has
  ended stays ended, whatever was written concurrently;
* a user's cancel request beats a concurrent update of the same task, so it is never lost;
* a later attempt beats an earlier one: results of stale attempts are ignored;
* at the same attempt, an assignment of a later Raft term beats one of an older term: a
  deposed coordinator's concurrent decision loses (fencing, DESIGN.md section 4);
* then state order: pending < scheduled < running < retry-pending (the attempt failed or
  its node was lost and it waits to be scheduled again) — so a retry decision beats a
  stale progress report from the attempt it gave up on.

Ties go to the replica's HLC then version id, as for every document.  Because every
writer applies a transition to the winner it sees, and the rank never favours a state a
transition could not reach, all replicas converge to one task state.

*Batches.*  A batch submission (``POST /v1/tasks`` with ``{"tasks": [...]}``) is not written
as one pending document per task: its tasks are listed in *batch documents* (type
``task_batch``, ``batch_values``), one per ``VALUE_BYTES_MAX`` of them, each spec stored
once however many tasks share it.  A listed task is pending until a task document of its
own appears: the coordinator writes it when it schedules the task, a node when a user
cancels it, and from then on it lives as above.  So a batch costs each node one document
to merge, store and index instead of one per task, and a task document exists exactly
for the tasks something happened to.  ``batch_tasks`` reads the pending tasks back.

Invariants (``Task.check()``, run on every transition in tests and in production):
1. ``attempt == len(attempts)``; attempts are numbered 1..attempt; at most
   ``max_retries + 1`` of them.
2. scheduled/running tasks name a node and their last attempt is on that node; pending
   and terminal tasks name none.
3. A terminal state never changes (``Refused`` by every transition).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import msgpack

from galaxy.config import LABEL_KEY, LABEL_RULE, LABEL_VALUE
from galaxy.executor.core import RESERVED_ENV

TASK_TYPE = "task"
# GET /v1/tasks/ID/logs of an ended attempt whose output went past task_output_bytes_max
# (the header's value): the rest was dropped
TRUNCATED_HEADER = "X-Galaxy-Output-Truncated"
BATCH_TYPE = "task_batch"
ASSIGN_TYPE = "task_assign"
RESULT_TYPE = "task_result"

PENDING, SCHEDULED, RUNNING = "pending", "scheduled", "running"
SUCCEEDED, FAILED, TIMED_OUT, CANCELLED = "succeeded", "failed", "timed_out", "cancelled"
TASK_STATES = (PENDING, SCHEDULED, RUNNING, SUCCEEDED, FAILED, TIMED_OUT, CANCELLED)
TERMINAL = frozenset((SUCCEEDED, FAILED, TIMED_OUT, CANCELLED))
LOST = "lost"                              # an attempt's state when its node was declared dead
TRUST_LEVELS = ("low", "medium", "high")

# ---- bounds (a task document, spec included, stays well under replica.VALUE_BYTES_MAX) ----
ARGV_ITEMS_MAX = 256
ARGV_CHARS_MAX = 8_192          # all argv items together; also a shell command's length
ENV_VARS_MAX = 64
ENV_CHARS_MAX = 8_192           # all names and values together
LABELS_MAX = 32
NAME_CHARS_MAX = 128
REASON_CHARS_MAX = 512
CPU_MIN = 0.01                  # a task reserves some of a core: nothing places unbounded work on a node
CPU_MAX = 1024.0
MEMORY_MB_MIN = 1               # and some memory, which is also its limit (0 would be none)
MEMORY_MB_MAX = 1 << 24         # 16 TiB
GPU_MAX = 64
TIMEOUT_S_MAX = 7 * 24 * 3600
RETRIES_MAX = 10
PRIORITY_MIN, PRIORITY_MAX = -100, 100
PRICE_MAX = 1 << 53

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_OWNER = re.compile(r"[a-z][a-z0-9_.-]{0,62}\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
TASK_ID = re.compile(r"t-[0-9a-f]{16}\Z")
BATCH_ENTRY_BYTES = 8           # msgpack framing of one [id, owner, spec index] entry, at most
SPEC_INDEX_BYTES = 2            # an assignment entry's spec index beyond the 0 it was measured with
BUNDLE_FIXED_BYTES = 256        # a bundle value's keys and head (accepted_by, submitted_ms, node), at most

SPEC_FIELDS = frozenset(("command", "env", "resources", "timeout_s", "max_retries", "priority",
                         "constraints", "price", "input", "name", "owner"))
RESOURCE_FIELDS = frozenset(("cpu", "memory_mb", "gpu"))
CONSTRAINT_FIELDS = frozenset(("labels", "min_trust"))


class SpecError(ValueError):
    """A submission is invalid: ``field`` (dotted path) and a human reason."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message


class Refused(Exception):
    """A transition does not apply to the task's current state (nothing is written)."""


@dataclass(frozen=True, slots=True)
class TaskSpec:
    argv: tuple[str, ...] = ()
    shell: str = ""
    env: Mapping[str, str] = field(default_factory=dict)
    cpu: float = 1.0
    memory_mb: int = 256
    gpu: int = 0
    timeout_s: float = 0.0           # 0: no timeout
    max_retries: int = 2
    priority: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)
    min_trust: str = "low"
    price: int = 0
    input: str = ""                  # sha256 of an input archive held by some node
    name: str = ""

    def to_value(self) -> dict:
        return {"argv": list(self.argv), "shell": self.shell, "env": dict(self.env), "cpu": self.cpu,
                "memory_mb": self.memory_mb, "gpu": self.gpu, "timeout_s": self.timeout_s,
                "max_retries": self.max_retries, "priority": self.priority, "labels": dict(self.labels),
                "min_trust": self.min_trust, "price": self.price, "input": self.input, "name": self.name}

    @classmethod
    def from_value(cls, v: Mapping[str, Any]) -> TaskSpec:
        """The spec of a document's value; TypeError if a field has the wrong type (a peer's
        document no writer here made: the scheduler and executor compare and add these)."""
        s = cls(argv=tuple(v["argv"]), shell=v["shell"], env=dict(v["env"]), cpu=float(v["cpu"]),
                memory_mb=v["memory_mb"], gpu=v["gpu"], timeout_s=float(v["timeout_s"]),
                max_retries=v["max_retries"], priority=v["priority"], labels=dict(v["labels"]),
                min_trust=v["min_trust"], price=v["price"], input=v["input"], name=v["name"])
        if not (type(s.shell) is str and type(s.memory_mb) is int and type(s.gpu) is int
                and type(s.max_retries) is int and type(s.priority) is int and type(s.price) is int
                and type(s.min_trust) is str and type(s.input) is str and type(s.name) is str
                and math.isfinite(s.cpu) and math.isfinite(s.timeout_s)
                and all(type(a) is str for a in s.argv)
                and all(type(k) is str and type(x) is str for m in (s.env, s.labels) for k, x in m.items())):
            raise TypeError("a task's spec has a field of the wrong type")
        return s

    def command_text(self) -> str:
        return self.shell or " ".join(self.argv)


# ---- parsing a submission -------------------------------------------------------------------

def _object(value: Any, name: str, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise SpecError(name, "must be a JSON object")
    for k in value:
        if k not in allowed:
            where = f"{name}.{k}" if name else str(k)
            raise SpecError(where, f"unknown field (allowed: {', '.join(sorted(allowed))})")
    return value


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not value.is_integer()):
        raise SpecError(name, f"must be a whole number, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(name, f"must be between {lo} and {hi}, got {int(value)}")
    return int(value)


def _number(value: Any, name: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(name, f"must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(name, f"must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def _str(value: Any, name: str, chars_max: int) -> str:
    if not isinstance(value, str):
        raise SpecError(name, f"must be a string, got {type(value).__name__}")
    if len(value) > chars_max:
        raise SpecError(name, f"longer than {chars_max} characters")
    if "\x00" in value:
        raise SpecError(name, "contains a NUL character")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:    # a lone surrogate: JSON "\udce9", or bytes that were not UTF-8
            raise SpecError(name, f"is not valid Unicode text (a lone surrogate at character {e.start}: "
                                  "pass UTF-8)") from None
    return value


def _labels(value: Any, name: str) -> dict[str, str]:
    labels = _object(value, name, frozenset(value) if isinstance(value, Mapping) else frozenset())
    if len(labels) > LABELS_MAX:
        raise SpecError(name, f"more than {LABELS_MAX} labels")
    out = {}
    for k, v in labels.items():      # what a node's labels may be (galaxy.config): anything else matches none
        if not isinstance(k, str) or not LABEL_KEY.fullmatch(k):
            raise SpecError(name, f"bad label name {k!r} ({LABEL_RULE})")
        if not isinstance(v, str) or not LABEL_VALUE.fullmatch(v):
            raise SpecError(f"{name}.{k}", f"no node can have this value ({LABEL_RULE}), got {v!r:.140}")
        out[k] = v
    return out


def parse_command(value: Any) -> tuple[tuple[str, ...], str]:
    """``(argv, shell)``: a list is an argv run as is, a string a /bin/sh -c command."""
    if isinstance(value, str):
        shell = _str(value, "command", ARGV_CHARS_MAX)
        if not shell.strip():
            raise SpecError("command", "is empty")
        return (), shell
    if not isinstance(value, list | tuple):
        raise SpecError("command", "must be a list of strings (argv) or a string (shell command)")
    if not value:
        raise SpecError("command", "is empty")
    if len(value) > ARGV_ITEMS_MAX:
        raise SpecError("command", f"more than {ARGV_ITEMS_MAX} arguments")
    argv = tuple(_str(a, f"command[{i}]", ARGV_CHARS_MAX) for i, a in enumerate(value))
    if sum(map(len, argv)) > ARGV_CHARS_MAX:
        raise SpecError("command", f"longer than {ARGV_CHARS_MAX} characters in all")
    if not argv[0]:
        raise SpecError("command[0]", "the program name is empty")
    return argv, ""


def parse_env(value: Any) -> dict[str, str]:
    env = _object(value, "env", frozenset(value) if isinstance(value, Mapping) else frozenset())
    if len(env) > ENV_VARS_MAX:
        raise SpecError("env", f"more than {ENV_VARS_MAX} variables")
    out, chars = {}, 0
    for k, v in env.items():
        if not isinstance(k, str) or not _ENV_NAME.match(k):
            raise SpecError("env", f"bad variable name {k!r}")
        if k in RESERVED_ENV:
            raise SpecError(f"env.{k}", f"is set by Galaxy for every attempt ({', '.join(RESERVED_ENV)}): "
                                        "choose another name")
        out[k] = _str(v, f"env.{k}", ENV_CHARS_MAX)
        chars += len(k) + len(v)
    if chars > ENV_CHARS_MAX:
        raise SpecError("env", f"longer than {ENV_CHARS_MAX} characters in all")
    return out


def parse_owner(value: Any) -> str:
    owner = _str(value, "owner", 63)
    if not _OWNER.match(owner):
        raise SpecError("owner", "must start with a letter: lower-case letters, digits, '_', '.', '-'")
    return owner


def parse_spec(body: Any) -> tuple[TaskSpec, str]:
    """``(spec, owner)`` from a submission; the owner is ``""`` when the body names none."""
    body = _object(body, "", SPEC_FIELDS)
    if "command" not in body:
        raise SpecError("command", "is required")
    argv, shell = parse_command(body["command"])
    kw: dict[str, Any] = {"argv": argv, "shell": shell}
    if "env" in body:
        kw["env"] = parse_env(body["env"])
    if "resources" in body:
        res = _object(body["resources"], "resources", RESOURCE_FIELDS)
        if "cpu" in res:
            kw["cpu"] = _number(res["cpu"], "resources.cpu", CPU_MIN, CPU_MAX)
        if "memory_mb" in res:
            kw["memory_mb"] = _int(res["memory_mb"], "resources.memory_mb", MEMORY_MB_MIN, MEMORY_MB_MAX)
        if "gpu" in res:
            kw["gpu"] = _int(res["gpu"], "resources.gpu", 0, GPU_MAX)
    if "timeout_s" in body and body["timeout_s"] is not None:
        kw["timeout_s"] = _number(body["timeout_s"], "timeout_s", 0.0, TIMEOUT_S_MAX)
    if "max_retries" in body:
        kw["max_retries"] = _int(body["max_retries"], "max_retries", 0, RETRIES_MAX)
    if "priority" in body:
        kw["priority"] = _int(body["priority"], "priority", PRIORITY_MIN, PRIORITY_MAX)
    if "constraints" in body:
        c = _object(body["constraints"], "constraints", CONSTRAINT_FIELDS)
        if "labels" in c:
            kw["labels"] = _labels(c["labels"], "constraints.labels")
        if "min_trust" in c:
            if c["min_trust"] not in TRUST_LEVELS:
                raise SpecError("constraints.min_trust", f"must be one of {', '.join(TRUST_LEVELS)}")
            kw["min_trust"] = c["min_trust"]
    if "price" in body:
        kw["price"] = _int(body["price"], "price", 0, PRICE_MAX)
    if "input" in body and body["input"]:
        sha = _str(body["input"], "input", 64)
        if not _SHA256.match(sha):
            raise SpecError("input", "must be the sha256 (64 lower-case hex digits) of an uploaded archive")
        kw["input"] = sha
    if "name" in body:
        kw["name"] = _str(body["name"], "name", NAME_CHARS_MAX)
    owner = parse_owner(body["owner"]) if body.get("owner") else ""
    return TaskSpec(**kw), owner


# ---- the task document ------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Attempt:
    attempt: int
    node: str
    term: int
    state: str                       # scheduled | running | a terminal state | lost
    scheduled_ms: int
    started_ms: int = 0
    ended_ms: int = 0
    exit_code: int | None = None
    reason: str = ""

    def to_value(self) -> dict:
        return {"attempt": self.attempt, "node": self.node, "term": self.term, "state": self.state,
                "scheduled_ms": self.scheduled_ms, "started_ms": self.started_ms, "ended_ms": self.ended_ms,
                "exit_code": self.exit_code, "reason": self.reason}


@dataclass(frozen=True, slots=True)
class Task:
    id: str
    spec: TaskSpec
    owner: str
    accepted_by: str
    submitted_ms: int
    state: str = PENDING
    attempt: int = 0                 # the current (last) attempt; 0 = never scheduled
    node: str = ""                   # where the current attempt is scheduled or running
    term: int = 0                    # Raft term of the current assignment
    cancel: bool = False             # a user asked to cancel; the worker (or coordinator) ends it
    progress: int | None = None
    exit_code: int | None = None
    reason: str = ""
    updated_ms: int = 0
    attempts: tuple[Attempt, ...] = ()

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_value(self) -> dict:
        return {"id": self.id, "spec": self.spec.to_value(), "owner": self.owner, "accepted_by": self.accepted_by,
                "submitted_ms": self.submitted_ms, "state": self.state, "attempt": self.attempt,
                "node": self.node, "term": self.term, "cancel": self.cancel, "progress": self.progress,
                "exit_code": self.exit_code, "reason": self.reason, "updated_ms": self.updated_ms,
                "attempts": [a.to_value() for a in self.attempts]}

    @classmethod
    def from_value(cls, v: Mapping[str, Any], spec: TaskSpec | None = None) -> Task:
        """``spec``: the task's spec already parsed from an equal ``v["spec"]`` (a spec never
        changes: every version of a task carries the same)."""
        return _well_typed(cls(id=v["id"], spec=spec or TaskSpec.from_value(v["spec"]), owner=v["owner"],
                               accepted_by=v["accepted_by"],
                               submitted_ms=v["submitted_ms"], state=v["state"], attempt=v["attempt"],
                               node=v["node"], term=v["term"], cancel=v["cancel"], progress=v["progress"],
                               exit_code=v["exit_code"], reason=v["reason"], updated_ms=v["updated_ms"],
                               attempts=tuple(Attempt(**a) for a in v["attempts"])))

    def check(self) -> None:
        assert self.state in TASK_STATES, self.state
        assert self.attempt == len(self.attempts), (self.attempt, len(self.attempts))
        assert [a.attempt for a in self.attempts] == list(range(1, self.attempt + 1))
        assert self.attempt <= self.spec.max_retries + 1, (self.attempt, self.spec.max_retries)
        if self.state in (SCHEDULED, RUNNING):
            assert self.node and self.attempts[-1].node == self.node, (self.node, self.attempts[-1:])
        else:
            assert not self.node, (self.state, self.node)


def _well_typed(t: Task) -> Task:
    """``t``, read from a peer's document, if each field has its type (what every transition
    and the rank compare and add); else TypeError, which readers take for a malformed
    document.  (``check`` says whether the fields agree; this, whether they are numbers.)"""
    if not (type(t.id) is str and type(t.owner) is str and type(t.accepted_by) is str and type(t.state) is str
            and type(t.submitted_ms) is int and type(t.attempt) is int and type(t.node) is str
            and type(t.term) is int and type(t.cancel) is bool and type(t.reason) is str
            and type(t.updated_ms) is int and (t.progress is None or type(t.progress) is int)
            and (t.exit_code is None or type(t.exit_code) is int)):
        raise TypeError(f"task {t.id!r:.40} has a field of the wrong type")
    for a in t.attempts:
        if not (type(a.attempt) is int and type(a.node) is str and type(a.term) is int and type(a.state) is str
                and type(a.scheduled_ms) is int and type(a.started_ms) is int and type(a.ended_ms) is int
                and (a.exit_code is None or type(a.exit_code) is int) and type(a.reason) is str):
            raise TypeError(f"task {t.id!r:.40}: attempt {a.attempt!r:.20} has a field of the wrong type")
    return t


def rank(value: Any) -> int:
    """The lattice rank of a task document's value (see the module docstring)."""
    if not isinstance(value, Mapping):
        return 0                     # a tombstone
    return _rank(value["state"], value["attempt"], value["cancel"], value["term"])


def rank_of(t: Task) -> int:
    """``rank`` of a task's value, from the task itself (every entry of every bundle read)."""
    return _rank(t.state, t.attempt, t.cancel, t.term)


def _rank(state: str, attempt: int, cancel: bool, term: int) -> int:
    if state in TERMINAL:
        order = 5 if state == SUCCEEDED else 4
    elif state == PENDING:
        order = 3 if attempt else 0          # retry-pending beats the attempt it gave up on
    else:
        order = 1 if state == SCHEDULED else 2
    return ((state in TERMINAL) << 62 | bool(cancel) << 61 | min(attempt, (1 << 20) - 1) << 40
            | min(term, (1 << 32) - 1) << 8 | order)


def _checked(t: Task) -> Task:
    t.check()
    return t


def _reason(text: str) -> str:
    return text if len(text) <= REASON_CHARS_MAX else text[:REASON_CHARS_MAX - 1] + "…"


def batch_values(tasks: Sequence[Task], bytes_max: int) -> list[dict]:
    """The values of the batch documents listing ``tasks`` (new, pending, of one submission:
    one ``accepted_by`` and ``submitted_ms``), each at most ``bytes_max`` bytes of msgpack.
    A value: ``{"accepted_by", "submitted_ms", "specs": [spec, ...], "tasks": [[id, owner,
    index into specs], ...]}``."""
    head = {"accepted_by": tasks[0].accepted_by, "submitted_ms": tasks[0].submitted_ms} if tasks else {}
    if any(t.accepted_by != head["accepted_by"] or t.submitted_ms != head["submitted_ms"] for t in tasks):
        raise ValueError("the tasks of one batch share their accepting node and submission time")
    return _bundles(tasks, bytes_max, head,
                    lambda t: (BATCH_ENTRY_BYTES + len(t.id) + len(t.owner.encode()),
                               lambda i: [t.id, t.owner, i]))


def assign_values(tasks: Sequence[Task], bytes_max: int) -> list[dict]:
    """The values of the assignment documents carrying ``tasks`` (just scheduled, all on one
    node by one coordinator's pass), each at most ``bytes_max`` bytes of msgpack.  A value:
    ``{"node", "specs": [spec, ...], "tasks": [entry, ...]}``, an entry a task's fields as
    a list (``_entry``)."""
    return _carrying(tasks, bytes_max)


def result_values(tasks: Sequence[Task], bytes_max: int, node: str) -> list[dict]:
    """The values of the result documents carrying ``tasks`` (just ended, each by its last
    attempt on ``node``, which writes them), as ``assign_values`` lays them out."""
    return _carrying(tasks, bytes_max, node)


def _carrying(tasks: Sequence[Task], bytes_max: int, node: str = "") -> list[dict]:
    """Bundle values carrying whole tasks, each spec once: ``{"node", "specs", "tasks"}``."""
    def entry(t: Task) -> tuple[int, Callable[[int], list]]:
        e = _entry(t, 0)

        def with_spec(i: int) -> list:
            e[ENTRY_SPEC_AT] = i
            return e
        return len(msgpack.packb(e)) + SPEC_INDEX_BYTES, with_spec
    return _bundles(tasks, bytes_max, {"node": node or tasks[0].node} if tasks else {}, entry)


# An assignment's or a result's entry: a task's fields in this order (the spec an index into
# the bundle's specs), its attempts likewise.  A list, not a map: each node reads every entry,
# and without the names an entry is ~40 % of the bytes and read in ~70 % of the time.  Entries
# are only ever read by position; a field is only ever appended.
ENTRY_SPEC_AT = 13


def _entry(t: Task, spec_index: int) -> list:
    return [t.id, t.owner, t.accepted_by, t.submitted_ms, t.state, t.attempt, t.node, t.term, t.cancel,
            t.progress, t.exit_code, t.reason, t.updated_ms, spec_index,
            [[a.attempt, a.node, a.term, a.state, a.scheduled_ms, a.started_ms, a.ended_ms, a.exit_code, a.reason]
             for a in t.attempts]]


def _from_entry(e: Any, specs: list[TaskSpec], kind: str) -> Task:
    """The task of an entry ``_entry`` made, or (a map) of the layout earlier releases wrote:
    the task's value with "spec" an index into ``specs``."""
    if type(e) is dict:
        i = e["spec"]
    elif type(e) is list and len(e) >= ENTRY_SPEC_AT + 2:
        i = e[ENTRY_SPEC_AT]
    else:
        raise ValueError(f"a {kind}'s entry must be a list of a task's fields, got {type(e).__name__}")
    if type(i) is not int or not 0 <= i < len(specs):
        raise ValueError(f"task {e['id'] if type(e) is dict else e[0]!r:.40} names no spec of the {kind}")
    if type(e) is dict:
        return Task.from_value(e, specs[i])
    return _well_typed(Task(id=e[0], spec=specs[i], owner=e[1], accepted_by=e[2], submitted_ms=e[3], state=e[4],
                            attempt=e[5], node=e[6], term=e[7], cancel=e[8], progress=e[9], exit_code=e[10],
                            reason=e[11], updated_ms=e[12],
                            attempts=tuple(Attempt(*a[:9]) for a in e[ENTRY_SPEC_AT + 1])))


def _bundles(tasks: Sequence[Task], bytes_max: int, head: dict,
             entry: Callable[[Task], tuple[int, Callable[[int], Any]]]) -> list[dict]:
    """Split ``tasks`` into values ``{**head, "specs": [...], "tasks": [...]}`` of at most
    ``bytes_max`` bytes of msgpack, each distinct spec stored once per value; ``entry(t)``
    gives an entry's size (at most) and the entry for a spec index."""
    out: list[dict] = []
    specs: list[dict] = []
    index: dict[bytes, int] = {}
    entries: list[Any] = []
    size = BUNDLE_FIXED_BYTES
    for t in tasks:
        spec = t.spec.to_value()
        raw = msgpack.packb(spec)          # the spec's identity, and its size
        entry_bytes, make = entry(t)
        grow = entry_bytes + (len(raw) if raw not in index else 0)
        if entries and size + grow > bytes_max:
            out.append({**head, "specs": specs, "tasks": entries})
            specs, index, entries, size = [], {}, [], BUNDLE_FIXED_BYTES
            grow = entry_bytes + len(raw)
        if raw not in index:
            index[raw] = len(specs)
            specs.append(spec)
        entries.append(make(index[raw]))
        size += grow
    if entries:
        out.append({**head, "specs": specs, "tasks": entries})
    return out


def batch_tasks(v: Mapping[str, Any]) -> tuple[Task, ...]:
    """The pending tasks a batch document lists.  Raises KeyError, TypeError or ValueError
    for a value ``batch_values`` did not make."""
    specs = [TaskSpec.from_value(s) for s in v["specs"]]
    accepted_by, submitted_ms = v["accepted_by"], v["submitted_ms"]
    if type(accepted_by) is not str or type(submitted_ms) is not int:
        raise TypeError("accepted_by must be a str, submitted_ms an int")
    out = []
    for task_id, owner, i in v["tasks"]:
        if type(task_id) is not str or not TASK_ID.match(task_id) or type(owner) is not str:
            raise ValueError(f"bad task entry {task_id!r:.40}")
        if type(i) is not int or not 0 <= i < len(specs):
            raise ValueError(f"task {task_id} names no spec of the batch")
        out.append(new_task(task_id, specs[i], owner, accepted_by, submitted_ms))
    return tuple(out)


def assigned_tasks(v: Mapping[str, Any]) -> tuple[Task, ...]:
    """The scheduled tasks an assignment document carries.  Raises KeyError, TypeError,
    ValueError or AssertionError for a value ``assign_values`` did not make."""
    def check(t: Task, node: str) -> None:
        if t.state != SCHEDULED or t.node != node:
            raise ValueError(f"task {t.id} is {t.state} on {t.node!r:.40}, not scheduled on {node!r:.40}")
    return _carried(v, "assignment", check)


def ended_tasks(v: Mapping[str, Any]) -> tuple[Task, ...]:
    """The ended tasks a result document carries.  Raises KeyError, TypeError, ValueError or
    AssertionError for a value ``result_values`` did not make."""
    def check(t: Task, node: str) -> None:
        if not t.terminal or not t.attempts or t.attempts[-1].node != node:
            raise ValueError(f"task {t.id} is {t.state}, not ended by its last attempt on {node!r:.40}")
    return _carried(v, "result", check)


def _carried(v: Mapping[str, Any], kind: str, check: Callable[[Task, str], None]) -> tuple[Task, ...]:
    specs = [TaskSpec.from_value(s) for s in v["specs"]]
    node = v["node"]
    out = []
    for e in v["tasks"]:
        t = _from_entry(e, specs, kind)          # (well typed: its id is a str)
        if not TASK_ID.match(t.id):
            raise ValueError(f"bad task id {t.id!r:.40}")
        check(t, node)
        t.check()
        out.append(t)
    return tuple(out)


def new_task(task_id: str, spec: TaskSpec, owner: str, accepted_by: str, now_ms: int) -> Task:
    return _checked(Task(id=task_id, spec=spec, owner=owner, accepted_by=accepted_by, submitted_ms=now_ms,
                         updated_ms=now_ms))


def schedule(t: Task, node: str, term: int, now_ms: int) -> Task:
    """The coordinator places a pending task: attempt + 1 on ``node``, fenced by ``term``."""
    if t.state != PENDING or t.cancel:
        raise Refused(f"task {t.id} is {t.state}, not pending")
    if t.attempt > t.spec.max_retries:
        raise Refused(f"task {t.id} has used all {t.attempt} attempts")
    a = Attempt(attempt=t.attempt + 1, node=node, term=term, state=SCHEDULED, scheduled_ms=now_ms)
    # exit code, reason and progress are the new attempt's from here (each attempt keeps its own)
    return _checked(replace(t, state=SCHEDULED, attempt=a.attempt, node=node, term=term, progress=None,
                            exit_code=None, reason="", updated_ms=now_ms, attempts=(*t.attempts, a)))


def refence(t: Task, term: int, now_ms: int) -> Task:
    """A new coordinator re-issues an assignment that workers may refuse as of an older term."""
    if t.state != SCHEDULED or t.term >= term:
        raise Refused(f"task {t.id} needs no new term")
    return _checked(replace(t, term=term, updated_ms=now_ms,
                            attempts=(*t.attempts[:-1], replace(t.attempts[-1], term=term))))


def _current(t: Task, node: str, attempt: int, states: tuple[str, ...]) -> None:
    if t.state not in states or t.attempt != attempt or t.node != node:
        raise Refused(f"task {t.id} is {t.state} at attempt {t.attempt} on {t.node or 'no node'}, "
                      f"not attempt {attempt} on {node}")


def start(t: Task, node: str, attempt: int, now_ms: int, *, spawned: bool = False) -> Task:
    """The worker starts the attempt; ``spawned``: it already runs (recorded even when a
    cancel was asked meanwhile, which the worker then carries out)."""
    _current(t, node, attempt, (SCHEDULED,))
    if t.cancel and not spawned:
        raise Refused(f"task {t.id} is being cancelled")
    a = replace(t.attempts[-1], state=RUNNING, started_ms=now_ms)
    return _checked(replace(t, state=RUNNING, updated_ms=now_ms, attempts=(*t.attempts[:-1], a)))


def set_progress(t: Task, node: str, attempt: int, progress: int, now_ms: int) -> Task:
    _current(t, node, attempt, (RUNNING,))
    return _checked(replace(t, progress=max(0, min(100, progress)), updated_ms=now_ms))


def _end_attempt(t: Task, attempt_state: str, exit_code: int | None, reason: str, now_ms: int,
                 task_state: str) -> Task:
    """Close the current attempt; a failure with attempts left sends the task back to pending."""
    reason = _reason(reason)
    a = replace(t.attempts[-1], state=attempt_state, ended_ms=now_ms, exit_code=exit_code, reason=reason)
    retry = (task_state in (FAILED, TIMED_OUT) and not t.cancel and t.attempt <= t.spec.max_retries)
    if t.cancel and task_state != SUCCEEDED:
        task_state = CANCELLED
    return _checked(replace(t, state=PENDING if retry else task_state, node="", exit_code=exit_code,
                            reason=reason, updated_ms=now_ms, attempts=(*t.attempts[:-1], a)))


def finish(t: Task, node: str, attempt: int, outcome: str, exit_code: int | None, reason: str,
           now_ms: int) -> Task:
    """The worker reports how its attempt ended (``outcome`` is a terminal state)."""
    if outcome not in TERMINAL:
        raise ValueError(f"not an outcome: {outcome}")
    _current(t, node, attempt, (SCHEDULED, RUNNING))
    progress = 100 if outcome == SUCCEEDED else t.progress
    return replace(_end_attempt(t, outcome, exit_code, reason, now_ms, outcome), progress=progress)


def lost(t: Task, reason: str, now_ms: int) -> Task:
    """The coordinator gives up on the current attempt: its node was declared dead or left."""
    if t.state not in (SCHEDULED, RUNNING):
        raise Refused(f"task {t.id} is {t.state}")
    return _end_attempt(t, LOST, None, reason, now_ms, FAILED)


def cancel(t: Task, now_ms: int) -> Task:
    """A user's cancel: at once when nothing runs yet, else a request the worker carries out."""
    if t.terminal:
        raise Refused(f"task {t.id} already {t.state}")
    if t.state == PENDING:
        return _checked(replace(t, state=CANCELLED, cancel=True, reason="cancelled while pending",
                                updated_ms=now_ms))
    if t.cancel:
        raise Refused(f"task {t.id} is already being cancelled")
    return _checked(replace(t, cancel=True, updated_ms=now_ms))


def view(t: Task) -> dict:
    """The task as the HTTP API shows it (DESIGN.md section 3)."""
    s = t.spec
    return {
        "id": t.id, "state": t.state, "exit_code": t.exit_code, "progress": t.progress,
        # where it runs; once ended, where it last ran
        "node": t.node or (t.attempts[-1].node if t.terminal and t.attempts else None),
        "attempt": t.attempt, "owner": t.owner, "accepted_by": t.accepted_by, "submitted_ms": t.submitted_ms,
        "updated_ms": t.updated_ms, "cancel_requested": t.cancel, "reason": t.reason,
        "command": list(s.argv) if s.argv else s.shell, "name": s.name,
        "resources": {"cpu": s.cpu, "memory_mb": s.memory_mb, "gpu": s.gpu},
        "timeout_s": s.timeout_s, "max_retries": s.max_retries, "priority": s.priority,
        "constraints": {"labels": dict(s.labels), "min_trust": s.min_trust}, "price": s.price,
        "input": s.input or None, "env": sorted(s.env),
        "attempts": [{"attempt": a.attempt, "node": a.node, "term": a.term, "state": a.state,
                      "scheduled_at": a.scheduled_ms / 1000, "started_at": a.started_ms / 1000 or None,
                      "ended_at": a.ended_ms / 1000 or None, "exit_code": a.exit_code, "reason": a.reason}
                     for a in t.attempts],
    }
