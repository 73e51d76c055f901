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

Invariants (``_check()`` after every apply; a failure raises ``InvariantError``, which
the adapter turns into stopping the node):

1. Each command type belongs to exactly one machine, and every type is in
   ``messages.COMMAND_TYPES`` (so ``wire`` can encode it).
2. Applied indices strictly increase; terms never decrease.
3. Every result is plain data.

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
                if cls not in messages.COMMAND_TYPES:
                    raise TypeError(f"{cls.__name__} is not in messages.COMMAND_TYPES")
                if cls in self._owner:
                    raise TypeError(f"{cls.__name__} belongs to both {type(self._owner[cls]).__name__} "
                                    f"and {type(m).__name__}")
                self._owner[cls] = m
        self.applied_index = 0               # the last log index applied here (0: none yet)
        self.applied_term = 0
        self.applied_total = 0
        self.rejected_total = 0
        self._check()

    def machine(self, cls: type) -> StateMachine:
        """The machine that owns command type ``cls`` (KeyError if none)."""
        return self._owner[cls]

    def apply_bytes(self, index: int, term: int, data: bytes) -> dict:
        try:
            cmd = wire.decode_command(data)
        except wire.DecodeError as e:
            self._advance(index, term)
            self.applied_total += 1
            self.rejected_total += 1
            return rejected(UNDECODABLE, f"log entry {index} is not a command this node understands ({e.reason})")
        return self.apply(index, term, cmd)

    def apply(self, index: int, term: int, cmd: Any) -> dict:
        self._advance(index, term)
        machine = self._owner.get(type(cmd))
        if machine is None:
            result = rejected(UNDECODABLE, f"no state machine applies {type(cmd).__name__}")
        else:
            result = machine.apply(index, term, cmd)
        if not isinstance(result, dict) or not is_plain(result) or not isinstance(result.get("ok"), bool):
            raise InvariantError(f"{type(machine).__name__}.apply returned {result!r}, not a plain result")
        self.applied_total += 1
        if not result["ok"]:
            self.rejected_total += 1
        self._check()
        return result

    def _advance(self, index: int, term: int) -> None:
        if index <= self.applied_index or term < self.applied_term:
            raise InvariantError(f"entry ({index}, term {term}) applied after ({self.applied_index}, "
                                 f"term {self.applied_term}): the log must be applied in order, once")
        self.applied_index, self.applied_term = index, term

    def snapshot(self) -> dict:
        return {"applied_index": self.applied_index, "applied_term": self.applied_term,
                "machines": {type(m).__name__: m.snapshot() for m in self.machines}}

    def _check(self) -> None:
        owners = {id(m) for m in self._owner.values()}
        if not owners <= {id(m) for m in self.machines}:
            raise InvariantError("a command type routes to a machine this dispatcher does not own")
        if self.applied_index < 0 or self.applied_term < 0 or not 0 <= self.rejected_total <= self.applied_total:
            raise InvariantError("applied counters went wrong")
