"""Spreading the ledger: the coordinator's applied entries as range documents, and a view
that applies them in contiguous order (pure).

Theory of operation
-------------------
The coordinator publishes what its ``Ledger`` applied as replicated documents
``ledger/<first_seq:016d>``.  One document holds the ledger entries of one Raft log entry
(group commit puts many commands at one Raft index), in ``seq`` order, cut into pieces of
at most ``RANGE_ENTRIES_MAX`` entries and ``RANGE_BYTES_MAX`` bytes of entry wire.  So
the cut is a pure function of the applied entries: any coordinator, old or new, publishes
exactly the same documents for the same entries, and two coordinators writing the same key
write the same value.  A Raft entry is published only once it is wholly applied
(``complete_index``: the machines run on pysyncobj's thread, the publisher on the event
loop's, and half an entry would cut differently from the whole).

A document's value is ``{"first": seq, "entries": msgpack([[index, term, entry wire bytes,
ok, error], ...])}``: the command index and term the voters applied the entry at, its bytes,
and the coordinator's outcome (``ok`` and the error code of a rejection).  The entries are
one msgpack blob, not a list in the value: every node keeps every range, and a list per
entry was a garbage-collector-tracked object per transfer on every node (full collections
of 100k such objects paused a node 50-85 ms every half second under load, the p99 tail of
settling).  ``range_entries`` reads both this and the list of earlier documents.

A view applies the document whose key is its ``seq + 1``, every entry of it, then the next
one; a missing document (a gap) waits until gossip or anti-entropy brings it.  A voter may
also feed its view from its own Raft machines, cut the same way (``ranges_after``): the
same log, so the same ranges; the published ones that arrive later are checked against what
it applied (``check_applied``).  A document
arriving twice is the same key (the replica keeps one), and one that starts at or below the
view's ``seq`` is never looked up again.  An entry applied with another outcome than the
coordinator's, or a document that is not what this module writes, raises ``Diverged``: the
ledgers would differ, and the node stops rather than run on.

Invariants: ``pack`` covers its input exactly, in order, each piece within both bounds
(an entry too large on its own is a piece by itself); ``apply_published`` leaves the view's
``seq`` at the end of a document (never inside one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import msgpack

from galaxy import wire
from galaxy.consensus.commands import COMMAND_INDEX_STRIDE

RANGE_ENTRIES_MAX = 256          # entries per document; group commit batches are rarely larger
RANGE_BYTES_MAX = 24_000         # entry bytes per document: under the replica's 32 KiB value limit
ENTRY_OVERHEAD_BYTES = 40        # index, term, outcome and msgpack framing, per entry
ERROR_CHARS_MAX = 64


class Diverged(AssertionError):
    """A published entry applied here with another outcome, or a malformed range."""


def entry_key(seq: int) -> str:
    return f"{seq:016d}"


def raft_index(command_index: int) -> int:
    return command_index // COMMAND_INDEX_STRIDE


def range_value(first: int, entries: list[list]) -> dict:
    """A range document's value (see the module docstring)."""
    return {"first": first, "entries": msgpack.packb(entries, use_bin_type=True)}


def range_entries(value: Any, first_seq: int) -> list:
    """The entries of a range document's value, as lists; Diverged if it holds none."""
    entries = value.get("entries") if isinstance(value, dict) else None
    if isinstance(entries, bytes):
        try:
            entries = msgpack.unpackb(entries, raw=False, use_list=True, strict_map_key=True,
                                      max_bin_len=len(entries), max_str_len=len(entries),
                                      max_array_len=len(entries), max_map_len=0, max_ext_len=0)
        except Exception:      # msgpack raises many types on bad input
            raise Diverged(f"ledger/{entry_key(first_seq)} holds entries that do not decode") from None
    if not isinstance(entries, list):
        raise Diverged(f"ledger/{entry_key(first_seq)} is not a range of entries")
    return entries


def pack(applied: Sequence[tuple[int, int, Any, dict]], first_seq: int, complete_index: int,
         entries_max: int = RANGE_ENTRIES_MAX, bytes_max: int = RANGE_BYTES_MAX) -> list[tuple[int, dict]]:
    """``(first seq, value)`` documents for ``applied`` (``(command index, term, entry,
    result)`` from ``first_seq`` on), stopping before the first Raft entry above
    ``complete_index`` (not wholly applied yet)."""
    out: list[tuple[int, dict]] = []
    piece: list[list] = []
    piece_raft = -1
    piece_bytes = 0
    seq = first_seq
    for index, term, entry, result in applied:
        r = raft_index(index)
        if r > complete_index:
            break
        data = wire.encode_command(entry)
        size = len(data) + ENTRY_OVERHEAD_BYTES
        if piece and (r != piece_raft or len(piece) >= entries_max or piece_bytes + size > bytes_max):
            out.append((seq - len(piece), range_value(seq - len(piece), piece)))
            piece, piece_bytes = [], 0
        error = result.get("error")
        piece.append([index, term, data, bool(result.get("ok")),
                      str(error)[:ERROR_CHARS_MAX] if error is not None else None])
        piece_raft = r
        piece_bytes += size
        seq += 1
    # the last piece is published only when its Raft entry is known complete (it is: r <=
    # complete_index), but a later call must not cut it differently: the cut only depends on
    # the entries of one Raft entry, which are all here.
    if piece:
        out.append((seq - len(piece), range_value(seq - len(piece), piece)))
    return out


def ranges_after(applied: Sequence[tuple[int, int, Any, dict]], seq: int, complete_index: int,
                 entries_max: int) -> list[tuple[int, dict]]:
    """The ranges of ``applied`` (a machine's, from seq 1) after ``seq`` (a range's end),
    at most ``entries_max`` entries of them (which must exceed ``BATCH_COMMANDS_MAX``, or
    a Raft entry larger than it would never be taken).  Read ``complete_index`` *before* calling:
    then every entry of a complete Raft entry is in ``applied`` (it only grows)."""
    chunk = applied[seq:seq + entries_max + 1]
    if len(chunk) > entries_max:
        # the Raft entry the cut would split is left for the next call, whole
        complete_index = min(complete_index, raft_index(chunk[-1][0]) - 1)
        chunk = chunk[:entries_max]
    return pack(chunk, seq + 1, complete_index)


def check_applied(view: Any, first_seq: int, value: Any) -> None:
    """A published range whose entries this view applied already (from its own Raft log):
    they must be the same entries (command index, term) with the same outcomes, else Diverged."""
    for i, e in enumerate(range_entries(value, first_seq)):
        seq = first_seq + i
        if seq > view.seq:
            return
        index, term, result = view.applied.position(seq - 1)
        error = result.get("error")
        mine = [index, term, bool(result.get("ok")), str(error)[:ERROR_CHARS_MAX] if error is not None else None]
        if not isinstance(e, list) or len(e) != 5 or [e[0], e[1], e[3], e[4]] != mine:
            raise Diverged(f"ledger entry {seq}: applied here as {mine}, published as {e!r:.200}: the ledgers "
                           "diverged")


def entries_of(value: Any, first_seq: int) -> list[tuple[int, int, Any, bool, str | None]]:
    """The entries of a published range, decoded; Diverged if it is not a range at ``first_seq``."""
    entries = range_entries(value, first_seq)
    if value.get("first") != first_seq or not entries:
        raise Diverged(f"ledger/{entry_key(first_seq)} is not a range of entries starting at {first_seq}")
    out = []
    for e in entries:
        if not (isinstance(e, list) and len(e) == 5 and type(e[0]) is int and type(e[1]) is int
                and isinstance(e[2], bytes) and isinstance(e[3], bool) and (e[4] is None or isinstance(e[4], str))):
            raise Diverged(f"ledger/{entry_key(first_seq)} holds a malformed entry")
        try:
            entry = wire.decode_command(e[2])
        except wire.DecodeError as err:
            raise Diverged(f"ledger/{entry_key(first_seq)}: an entry does not decode ({err.reason})") from None
        out.append((e[0], e[1], entry, e[3], e[4]))
    return out


def apply_published(view: Any, published: Callable[[int], Any]) -> int:
    """Apply ranges ``published(view.seq + 1)``, then the next, ... to ``view`` (a Ledger)
    while they exist; the number of entries applied.  ``published(seq)`` is the value of
    ``ledger/<seq>``, or None."""
    applied = 0
    while True:
        first = view.seq + 1
        value = published(first)
        if value is None:
            return applied
        for index, term, entry, ok, error in entries_of(value, first):
            result = view.apply(index, term, entry)
            if result.get("ok") != ok or (not ok and (result.get("error") or None) != error):
                raise Diverged(f"ledger entry {view.seq} applied here as {result}, at the coordinator as "
                               f"ok={ok} error={error}: the ledgers diverged")
            applied += 1


def apply_local(view: Any, applied: Sequence[tuple[int, int, Any, dict]], complete_index: int,
                entries_max: int) -> int:
    """What ``apply_published(view, dict(ranges_after(applied, view.seq, complete_index,
    entries_max)).get)`` does, without the wire round trip: a voter's view applies its own
    machine's entries (``applied``, from seq 1) after its ``seq``, whole Raft entries only,
    each compared with the machine's outcome (Diverged if they differ).  The number applied."""
    seq = view.seq
    chunk = applied[seq:seq + entries_max + 1]
    if len(chunk) > entries_max:
        complete_index = min(complete_index, raft_index(chunk[-1][0]) - 1)
        chunk = chunk[:entries_max]
    n = 0
    for index, term, entry, result in chunk:
        if raft_index(index) > complete_index:
            break
        mine = view.apply(index, term, entry)
        if bool(mine.get("ok")) != bool(result.get("ok")) or mine.get("error") != result.get("error"):
            raise Diverged(f"ledger entry {view.seq} applied here as {mine}, by this node's Raft machine as "
                           f"{result}: the ledgers diverged")
        n += 1
    return n


def ranges_cover(ranges: Iterable[tuple[int, dict]]) -> list[int]:
    """The seqs a list of ``pack`` documents covers, in order (for tests and checks)."""
    return [first + i for first, value in ranges for i in range(len(range_entries(value, first)))]
