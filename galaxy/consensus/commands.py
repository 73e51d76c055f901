"""Replicated commands: state machines fed by the Raft log, and the dispatcher between them.

Theory of operation
-------------------
The Raft log (pysyncobj, galaxy/consensus/raft.py) holds, besides its own no-ops and
membership changes, *commands*: frozen dataclasses of ``messages.COMMAND_TYPES``, encoded
by ``wire.encode_command``.  Every voter applies every committed entry, in log order, to
the same state machines, so every voter holds the same state at the same index (the
replicated state machine of the Raft paper).  This module is that apply path, pure:

* ``StateMachine``: an object that names the command types it owns (``commands``) and
  applies one: ``apply(index, term, cmd) -> result``.  ``apply`` must be *deterministic*:
  it reads only its own state, the command and (index, term) — never a clock, a random
  source, the node's config or the disk — because it runs again on every voter and again
  on replay after a restart, and all runs must agree.  A command that breaks a rule is
  not an error: ``apply`` returns a rejection (``rejected(...)``) and leaves the state
  unchanged, the same way everywhere.  ``snapshot()`` is its state as plain data.
* ``Replicated``: owns the machines, routes each command to the one machine that owns
  its type, and decodes raw log bytes (``apply_bytes``; an undecodable entry is
  rejected, deterministically, never raised).
* Results are plain data (dicts of str/int/float/bool/None, lists, dicts), so they cross
  threads and HTTP unchanged: ``{"ok": True, ...}`` or ``{"ok": False, "error": code,
  "message": text, "key": field-or-None}``.
* *Batches* (group commit).  One log entry may hold a ``messages.CommandBatch``: the wire
  bytes of up to ``BATCH_COMMANDS_MAX`` commands.  The dispatcher applies them in order,
  each exactly as if it were its own entry, and the entry's result is
  ``{"ok": True, "results": [one result per command, in order]}``.  A member that does not
  decode, or is itself a batch, is rejected alone (``undecodable``); the others still
  apply.  Replay applies the same bytes, so the same sequence, with the same results.
* *Command index.*  Machines need an index that strictly increases per command (ledger
  sequence, settings versions), but a batch puts many commands at one Raft index.  So a
  machine sees ``command_index(raft_index, position) = raft_index * COMMAND_INDEX_STRIDE
  + position`` (position 0 for a lone command): strictly increasing, the same on every
  voter and on replay, and the Raft entry is ``index // COMMAND_INDEX_STRIDE``.  The stride
  is fixed forever (it is part of what a replay computes).

Invariants (``_check()`` after every apply; a failure raises ``InvariantError``, which
the adapter turns into stopping the node):

1. Each command type belongs to exactly one machine, and every type is in
   ``messages.COMMAND_TYPES`` (so ``wire`` can encode it).
2. Applied indices strictly increase; terms never decrease.  Command indices (what the
   machines see) strictly increase too.
3. Every result is plain data.
4. ``CommandBatch`` belongs to no machine: only the dispatcher unpacks it.

State is rebuilt after a restart by replaying the log, which Galaxy never compacts
(docs/consensus.md); so there is no snapshot install path here, and ``snapshot()`` is
for status pages and tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from galaxy import messages, wire

# Rejection codes every machine may use (machines add their own).
UNDECODABLE = "undecodable"             # the entry's bytes are not a command this build knows
RESULT_DEPTH_MAX = 8                    # plain data nests shallowly; deeper is a bug
# Machines see raft_index * stride + position.  Never change it: replay recomputes every
# index with it, and settings versions / ledger indices already handed out depend on it.
# 1000, not 1024, so that an index reads as "entry 45, command 3" (45003).
COMMAND_INDEX_STRIDE = 1000
BATCH_COMMANDS_MAX = COMMAND_INDEX_STRIDE   # positions 0..999; wire caps tuples at 1024 anyway
# What a sender packs into one entry (the applier takes any size up to the limits above):
# pysyncobj sends an entry of >= appendEntriesBatchSizeBytes (64 KiB) in chunks, one per
# message, so entries stay well below it.
BATCH_PACK_BYTES_MAX = 32 * 1024
_ITEM_OVERHEAD_BYTES = 3                # msgpack bin8/bin16 header per member
_BATCH_OVERHEAD_BYTES = 16              # "GC", version, [tag, [array header]]


class InvariantError(AssertionError):
    """A state machine or the dispatcher broke an invariant: the node must stop."""


class CommandError(Exception):
    """A command could not be committed.  ``code``: ``no_coordinator`` (nothing was
    appended: safe to retry), ``timeout`` (the outcome is unknown: it may still apply),
    ``busy`` (the leader's queue is full), ``invalid`` (it cannot be encoded)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@runtime_checkable
class StateMachine(Protocol):
    commands: tuple[type, ...]

    def apply(self, index: int, term: int, cmd: Any) -> dict:
        """Apply one committed command (deterministic); return a plain-data result."""
        ...

    def snapshot(self) -> dict:
        """The state as plain data."""
        ...


def encode(cmd: Any) -> bytes:
    """``wire.encode_command``, failing as a CommandError (for the submit paths)."""
    try:
        return wire.encode_command(cmd)
    except wire.EncodeError as e:
        raise CommandError("invalid", f"the command cannot be encoded: {e}") from None


def command_index(raft_index: int, position: int) -> int:
    """The index a machine sees for the command at ``position`` of log entry ``raft_index``."""
    return raft_index * COMMAND_INDEX_STRIDE + position


def encode_batch(items: list[bytes]) -> bytes:
    """The log entry for ``items`` (each ``encode``d): the lone command itself, else a batch."""
    if len(items) == 1:
        return items[0]
    if not 1 < len(items) <= BATCH_COMMANDS_MAX:
        raise CommandError("invalid", f"a batch holds 1..{BATCH_COMMANDS_MAX} commands, not {len(items)}")
    return encode(messages.CommandBatch(tuple(items)))


def batch_cut(sizes: Iterable[int], count_max: int = BATCH_COMMANDS_MAX,
              bytes_max: int = BATCH_PACK_BYTES_MAX) -> int:
    """How many of the queued commands (their encoded sizes, oldest first) go into the next
    entry: as many as fit ``count_max`` and ``bytes_max``, and always at least one (a big
    command goes alone, unwrapped)."""
    n, total = 0, _BATCH_OVERHEAD_BYTES
    for size in sizes:
        total += size + _ITEM_OVERHEAD_BYTES
        if n >= count_max or (n and total > bytes_max):
            break
        n += 1
    return n


def ok(**fields: Any) -> dict:
    return {"ok": True, **fields}


def rejected(error: str, message: str, key: str | None = None, **fields: Any) -> dict:
    return {"ok": False, "error": error, "message": message, "key": key, **fields}


def is_plain(value: Any, depth: int = 0) -> bool:
    """JSON-like data only: what may cross threads, HTTP and the replicated documents."""
    if depth > RESULT_DEPTH_MAX:
        return False
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(is_plain(v, depth + 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and is_plain(v, depth + 1) for k, v in value.items())
    return False


class Replicated:
    """Routes committed commands to their state machines, in log order."""

    def __init__(self, machines: Iterable[StateMachine]) -> None:
        self.machines: tuple[StateMachine, ...] = tuple(machines)
        self._owner: dict[type, StateMachine] = {}
        for m in self.machines:
            if not isinstance(m, StateMachine):
                raise TypeError(f"{type(m).__name__} is not a StateMachine")
            for cls in m.commands:
                if cls is messages.CommandBatch:
                    raise TypeError(f"{type(m).__name__} claims CommandBatch, which only the dispatcher applies")
                if cls not in messages.COMMAND_TYPES:
                    raise TypeError(f"{cls.__name__} is not in messages.COMMAND_TYPES")
                if cls in self._owner:
                    raise TypeError(f"{cls.__name__} belongs to both {type(self._owner[cls]).__name__} "
                                    f"and {type(m).__name__}")
                self._owner[cls] = m
        self.applied_index = 0               # the last log index applied here (0: none yet)
        self.applied_term = 0
        self.applied_command_index = 0       # the last command index a machine saw
        # the last log index whose every command is applied: set after the entry, so a reader
        # on another thread never takes half a batch for the whole (ledger/spread.py)
        self.complete_index = 0
        self.applied_total = 0               # commands (batch members each count; a batch does not)
        self.rejected_total = 0
        self.batches_total = 0
        self._check()

    def machine(self, cls: type) -> StateMachine:
        """The machine that owns command type ``cls`` (KeyError if none)."""
        return self._owner[cls]

    def apply_bytes(self, index: int, term: int, data: bytes) -> dict:
        try:
            cmd = wire.decode_command(data)
        except wire.DecodeError as e:
            self._advance(index, term)
            self.complete_index = index
            return self._count(rejected(UNDECODABLE, f"log entry {index} is not a command this node "
                                                     f"understands ({e.reason})"))
        return self.apply(index, term, cmd)

    def apply(self, index: int, term: int, cmd: Any) -> dict:
        """Apply log entry ``index``: one command, or each command of a ``CommandBatch`` in order."""
        self._advance(index, term)
        if type(cmd) is messages.CommandBatch:
            result = self._apply_batch(index, term, cmd.commands)
        else:
            result = self._apply_one(command_index(index, 0), term, cmd)
        self._check()
        self.complete_index = index
        return result

    def _apply_batch(self, index: int, term: int, items: tuple[bytes, ...]) -> dict:
        if len(items) > BATCH_COMMANDS_MAX:
            # Whole entry refused: positions past the stride would collide with the next entry.
            return self._count(rejected(UNDECODABLE, f"log entry {index} batches {len(items)} commands, "
                                                     f"at most {BATCH_COMMANDS_MAX}"))
        self.batches_total += 1
        results = []
        for position, data in enumerate(items):
            at = command_index(index, position)
            try:
                cmd = wire.decode_command(data)
            except wire.DecodeError as e:
                results.append(self._count(rejected(
                    UNDECODABLE, f"command {position} of log entry {index} is not a command this node "
                                 f"understands ({e.reason})")))
                continue
            if type(cmd) is messages.CommandBatch:
                results.append(self._count(rejected(
                    UNDECODABLE, f"command {position} of log entry {index} is a batch inside a batch")))
                continue
            results.append(self._apply_one(at, term, cmd))
        return ok(results=results)

    def _apply_one(self, at: int, term: int, cmd: Any) -> dict:
        if at <= self.applied_command_index:
            raise InvariantError(f"command index {at} after {self.applied_command_index}")
        self.applied_command_index = at
        machine = self._owner.get(type(cmd))
        if machine is None:
            return self._count(rejected(UNDECODABLE, f"no state machine applies {type(cmd).__name__}"))
        result = machine.apply(at, term, cmd)
        if not isinstance(result, dict) or not is_plain(result) or not isinstance(result.get("ok"), bool):
            raise InvariantError(f"{type(machine).__name__}.apply returned {result!r}, not a plain result")
        return self._count(result)

    def _count(self, result: dict) -> dict:
        self.applied_total += 1
        if not result["ok"]:
            self.rejected_total += 1
        return result

    def _advance(self, index: int, term: int) -> None:
        if index <= self.applied_index or term < self.applied_term:
            raise InvariantError(f"entry ({index}, term {term}) applied after ({self.applied_index}, "
                                 f"term {self.applied_term}): the log must be applied in order, once")
        self.applied_index, self.applied_term = index, term

    def snapshot(self) -> dict:
        return {"applied_index": self.applied_index, "applied_term": self.applied_term,
                "applied_command_index": self.applied_command_index, "batches": self.batches_total,
                "machines": {type(m).__name__: m.snapshot() for m in self.machines}}

    def _check(self) -> None:
        owners = {id(m) for m in self._owner.values()}
        if not owners <= {id(m) for m in self.machines}:
            raise InvariantError("a command type routes to a machine this dispatcher does not own")
        if messages.CommandBatch in self._owner:
            raise InvariantError("CommandBatch routes to a machine")
        if self.applied_command_index > command_index(self.applied_index, BATCH_COMMANDS_MAX - 1):
            raise InvariantError("a command index ran past its log entry")
        if self.applied_index < 0 or self.applied_term < 0 or not 0 <= self.rejected_total <= self.applied_total:
            raise InvariantError("applied counters went wrong")
