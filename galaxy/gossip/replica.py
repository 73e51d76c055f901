"""Replicated documents: a key -> value store every node holds a copy of, merged by gossip.

Theory of operation
-------------------
*Documents and versions.*  A document is identified by ``(doc_type, key)``.  Every write
makes a *version* (``Doc``): the value (plain msgpack-able data, at most
``VALUE_BYTES_MAX`` bytes encoded), a ``deleted`` flag (a tombstone has value None), a
vector clock, an HLC timestamp and its writer (``origin == hlc.node``).  The value travels
and is stored as the writer's msgpack bytes (``raw``), so every replica hashes the same
bytes; ``vid``, a 16-byte hash of all fields, is the version's identity.

*Order and merge.*  Versions of one document are ordered by their vector clocks: a newer
clock wins.  Versions with concurrent clocks are *siblings*, and a replica keeps all of
them: a document's state is the set of its maximal versions (Dynamo's and Riak's
multi-value register).  Reading a document resolves the siblings with the resolver of
its type: the sibling with the greatest ``(resolver.rank(doc), hlc, vid)`` is the value
(default: last writer wins by HLC, then node id; ``Lattice(rank)`` ranks first, e.g. a
terminal task state above a running one).  Keeping siblings, rather than storing only the
winner, is what makes the merge exact: a version is discarded only when a *causally
newer* version is present, never because a resolver once preferred a version that was
later overwritten, so the state after any set of deliveries is the set of maximal
versions of everything delivered, whatever the order and however often each arrived
(``merge`` is a join).  A local write (``put``/``delete``) takes the join of all
siblings' clocks plus one at this node, so it supersedes every sibling it saw: writing
is how a conflict is settled for good.

Two distinct versions with *equal* clocks cannot come from correct writers, but can after
pruning (below) or a node that lost its disk and kept its id.  They are ordered by the
resolver too, and only the greater is kept, so the order stays total and replicas still
converge.  ``conflicts_resolved`` counts the merges that made the resolver decide: a
received version kept as a new sibling, or one that replaced an equal-clock version.

*Clock pruning.*  ``gc(now, live)`` drops from every clock the ids of nodes that have not
been live for ``prune_after_ms`` (``clock.Departures``; clock.py explains why this is
safe and what it costs).  Incoming clocks are stripped of the same ids, so replicas that
prune a little apart do not hand entries back and forth.  Stripping can make versions
compare differently, so a stripped set of siblings is merged afresh.

*Tombstones.*  ``delete`` writes a tombstone version.  A document whose versions are all
tombstones is *dead*: invisible to ``get``/``items`` but kept, so that an older live
version arriving late cannot resurrect it.  ``gc`` removes a dead document once every
live member is known to hold it (it was *acknowledged* by each) and it has been dead here
for ``tombstone_grace_ms``.  A replica learns that member m holds its state of a document
from exact evidence only: (a) m sent this replica its versions of the document and they
equal this replica's (a DocUpdate or DocSync carries a sender's full set of versions of
each key it names), or (b) in anti-entropy, a digest node or leaf entry of m's equals
this replica's for the part of the tree holding the document.  Acknowledgements are soft
state (lost on restart: collection only waits longer) and are reset when the document
changes.  The grace is the time a member may be away (not in the live set) and still
get the tombstone when it returns; it also covers members that joined recently and are
not in the caller's live set yet.

Members collect a tombstone at different times, and one that still holds it would hand
it back to one that collected it (which would then need everyone's acknowledgement
again, and so on).  So a collected document becomes a *ghost* for another
``tombstone_grace_ms``: gone from the store and from every read, but its tombstones stay
in memory and in the digest tree, so it still stops older versions and still counts as
"held" in anti-entropy, letting the laggards collect too, and a member that was away
and sends an older version of it in anti-entropy gets the ghost's tombstones back (so a
member away for up to twice the grace still learns of the delete).  Only then is it
forgotten.  As with Cassandra's gc_grace, a member away for longer than that which
returns with an old version of a forgotten document brings it back; the default grace of a day makes
that rare, and a node that has been away longer may choose to start with an empty
replica.

*Anti-entropy digests.*  Documents sit in a tree over the 64-bit hash of
``(doc_type, key)``: 16 children per level (4 bits), at most ``DEPTH_MAX`` levels.  A
tree node's hash is the XOR of the 8-byte ``vid`` prefixes of all versions below it,
maintained incrementally down to ``TRACK_DEPTH`` (computed from a bucket below that).
``sync(peer)`` returns a ``SyncSession``: the initiator sends the hashes of one full level
(``start()``); each side answers every differing node with its children's hashes, or, when
it holds at most ``LEAF_KEYS_MAX`` keys there, with a leaf listing (key hash, version
hash) per key; a leaf listing is compared key by key, and each side sends the versions
the other lacks or differs in and asks for the ones it lacks.  Two replicas of 100k
documents that differ in ten exchange ~8 KB of digests in three round trips (~1.5 ms of
CPU); equal ones, one 2.8 KB message and an empty answer.  Messages are bounded in bytes
(``frame_max_bytes``) and items; work that does not fit waits in the session for the
next step (``DocSync.more``), so a new node catches up in one session.

*Driving it* (the node's runner; every call returns data, nothing calls back):

* start: ``replica.restore(now, store.load_docs())``.
* local write: ``doc = replica.put(...)`` (or ``delete``), ``store.put_docs([to_wire(doc)])``,
  then gossip ``pack_updates([doc], ...)`` (persist before send).
* ``DocUpdate`` from member m: ``changed = replica.merge(now, msg.docs, src=m)``;
  ``store.put_docs(map(to_wire, changed))``; re-gossip ``changed`` a few rounds.
* every few seconds: ``c = replica.gc(now, live_member_ids)``;
  ``store.put_docs(map(to_wire, c.docs))``; ``store.delete_docs(c.removed)``.
* anti-entropy with a random peer over TCP: ``replica.sync(peer)`` (see ``SyncSession``).
* ``replica.conflicts_resolved`` for /v1/status; ``replica.stats``, ``replica.hlc.stats``.

Invariants (``_check_key()`` per touched key after every step; ``_check()`` in full,
O(documents), in tests and after ``restore``: ~0.8 s for 100k documents)
---------------------------------------------------------------------------
1. Every document has 1..SIBLINGS_MAX versions with distinct ``vid``s, sorted by vid,
   of its type and key, whose clocks are pairwise concurrent, with ``hlc.node == origin``.
2. At most ``docs_max`` documents; clocks hold at most ``VC_ENTRIES_MAX`` entries and
   never an id that ``gc`` pruned.
3. Each tree hash is the XOR of the vids below it and each count the number of keys;
   the bucket index holds every key once, under its key hash.
4. ``_dead`` holds exactly the documents whose versions are all tombstones and that are
   not ghosts; ghosts hold only tombstones.
5. ``_vc_refs`` counts, per node id, the versions whose clock mentions it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack

from galaxy.clock import HLC_MAX_DRIFT_MS, Departures, Hlc, HlcClock, Order, VectorClock
from galaxy.messages import DigestNode, DocSync, DocUpdate, DocWire

# ---- bounds --------------------------------------------------------------------------------
TYPE_CHARS_MAX = 64          # "task", "member", "ledger": short names
KEY_CHARS_MAX = 256          # task ids, node ids, idempotency keys
NODE_ID_CHARS_MAX = 128      # config allows 63; a little slack for ids from elsewhere
# A DocUpdate must fit a 65 KB UDP frame with room for the clock and names: 32 KiB leaves
# half a frame for everything else.  Task specs (command, env, resources) fit easily;
# bulk output belongs in logs, not in replicated state.
VALUE_BYTES_MAX = 32_768
VALUE_DEPTH_MAX = 32         # nesting of lists/maps in a value
VC_ENTRIES_MAX = 256         # = wire.DICT_LEN_MAX; pruning keeps clocks to a doc's live writers
# Siblings are pairwise concurrent, and one writer's versions of a document are ordered,
# so a document has at most one sibling per writer; this caps a broken or hostile peer.
SIBLINGS_MAX = 64
DOCS_MAX = 500_000           # documents (tombstones included); ~1.6 KB each in RAM: 0.8 GB

# ---- digest tree ---------------------------------------------------------------------------
FANOUT_BITS = 4
FANOUT = 1 << FANOUT_BITS    # 16 children: a differing node costs 16 * 8 = 128 bytes
DEPTH_MAX = 15               # 60 bits of prefix: fits a wire int64
TRACK_DEPTH = 4              # hashes kept up to here (65 536 leaves: ~1.5 keys each at 100k)
LEAF_KEYS_MAX = 16           # a node with at most this many keys is listed, not split
HASH_BYTES = 8
ENTRY_BYTES = 16             # key hash + version hash
START_SPLIT_KEYS = 4096      # more keys than this: the first message sends level 2, not 1

# ---- sync messages -------------------------------------------------------------------------
SYNC_FRAME_BYTES_MAX = 1_048_576  # DocSync rides TCP: 1 MiB frames, ~3 000 small docs each
SYNC_NODES_MAX = 512         # digest nodes per DocSync (wire allows 1024 items per tuple)
SYNC_DOCS_MAX = 1024         # = wire.TUPLE_LEN_MAX
SYNC_WANT_MAX = 4096         # key hashes asked for per DocSync (32 KB)
SYNC_PENDING_MAX = 65_536    # digest nodes a session may queue for later steps

# Encoded-size bounds (upper bounds; tests check them against wire.py).  A frame adds a
# fixed header/AEAD/envelope, the sender and cluster names, and the message's own keys.
VID_BYTES = 16               # a version id: blake2b of its canonical fields
FRAME_FIXED_BYTES = 120     # (DocUpdate's also: its key and header; its ids are counted apart)
DOC_FIXED_BYTES = 112        # DocWire's field names and headers, ints at their widest
VC_ENTRY_FIXED_BYTES = 12    # str header + int64
NODE_FIXED_BYTES = 64        # DigestNode's field names, headers and two int64s

RANK_ERROR = -(2**63)        # a resolver that raises ranks the version lowest (deterministically)

_TOMBSTONE_RAW = msgpack.packb(None)
_SUPERSEDED = b"superseded"       # stands in for the vid of a received version a held one supersedes


class InvalidDoc(ValueError):
    """A version or value breaks a rule (type, size, bounds); the message says which."""


class SyncError(ValueError):
    """A DocSync message that no correct peer sends; the session should be dropped."""


# ---- versions ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True, eq=False)
class Doc:
    """One version of a document.  Equal iff the same ``vid``; build with ``make_doc``."""

    doc_type: str
    key: str
    value: Any               # decoded ``raw``; None for a tombstone
    raw: bytes               # msgpack of the value, as its writer encoded it
    deleted: bool
    vc: VectorClock
    hlc: Hlc                 # hlc.node is the writer
    vid: bytes               # 16-byte hash of all fields above: the version's identity

    @property
    def origin(self) -> str:
        return self.hlc.node

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Doc) and self.vid == other.vid

    def __hash__(self) -> int:
        return hash(self.vid)


def _version_id(doc_type: str, key: str, raw: bytes, deleted: bool, vc: VectorClock, hlc: Hlc) -> bytes:
    canon = msgpack.packb([doc_type, key, raw, deleted, vc.items(), hlc.wall_ms, hlc.logical, hlc.node],
                          use_bin_type=True)
    return hashlib.blake2b(canon, digest_size=VID_BYTES).digest()


def make_doc(doc_type: str, key: str, raw: bytes, deleted: bool, vc: VectorClock, hlc: Hlc,
             value: Any = ..., *, value_bytes_max: int = VALUE_BYTES_MAX) -> Doc:
    """A validated version; ``value`` is decoded from ``raw`` unless given.  Raises InvalidDoc."""
    if len(vc) > VC_ENTRIES_MAX:
        raise InvalidDoc(f"vector clock has {len(vc)} entries, at most {VC_ENTRIES_MAX}")
    for node in vc:
        _check_name("vector clock id", node, NODE_ID_CHARS_MAX)
    return _make_doc(doc_type, key, raw, deleted, vc, hlc, value, value_bytes_max)


def _make_doc(doc_type: str, key: str, raw: bytes, deleted: bool, vc: VectorClock, hlc: Hlc,
              value: Any, value_bytes_max: int) -> Doc:
    """``make_doc`` for a clock already checked (size and ids)."""
    _check_name("doc_type", doc_type, TYPE_CHARS_MAX)
    _check_name("key", key, KEY_CHARS_MAX)
    _check_name("origin", hlc.node, NODE_ID_CHARS_MAX)
    if type(raw) is not bytes or len(raw) > value_bytes_max:
        raise InvalidDoc(f"value must be at most {value_bytes_max} bytes of msgpack")
    if type(deleted) is not bool:
        raise InvalidDoc("deleted must be a bool")
    wall, logical = hlc.wall_ms, hlc.logical
    if not (type(wall) is int and type(logical) is int and 0 <= wall < 2**63 and 0 <= logical < 2**63):
        raise InvalidDoc("hlc fields must be int64 >= 0")
    if value is ...:
        value = unpack_value(raw, value_bytes_max)
    if deleted and value is not None:
        raise InvalidDoc("a tombstone's value must be None")
    return Doc(doc_type, key, value, raw, deleted, vc, hlc,
               _version_id(doc_type, key, raw, deleted, vc, hlc))


def _check_name(what: str, s: object, chars_max: int) -> None:
    if type(s) is not str or not 0 < len(s) <= chars_max:
        raise InvalidDoc(f"{what} must be a non-empty str of at most {chars_max} chars")
    if not s.isprintable():
        raise InvalidDoc(f"{what} must be printable")


def pack_value(value: Any, value_bytes_max: int = VALUE_BYTES_MAX) -> bytes:
    """msgpack of a plain value (None, bool, int64, finite float, str, bytes, list, str-keyed
    dict; tuples become lists), at most ``value_bytes_max`` bytes.  Raises InvalidDoc."""
    _check_plain(value)
    try:
        raw = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError, UnicodeEncodeError) as e:
        raise InvalidDoc(f"value is not msgpack-able: {e}") from None
    if len(raw) > value_bytes_max:
        raise InvalidDoc(f"value is {len(raw)} bytes encoded, at most {value_bytes_max}")
    return raw


def unpack_value(raw: bytes, value_bytes_max: int = VALUE_BYTES_MAX) -> Any:
    if len(raw) > value_bytes_max:
        raise InvalidDoc(f"value is {len(raw)} bytes encoded, at most {value_bytes_max}")
    try:
        value = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                                max_str_len=value_bytes_max, max_bin_len=value_bytes_max,
                                max_array_len=value_bytes_max, max_map_len=value_bytes_max,
                                max_ext_len=0)
    except Exception as e:        # msgpack raises many types on bad input
        raise InvalidDoc(f"value is not valid msgpack: {type(e).__name__}") from None
    _check_plain(value)
    return value


def _check_plain(value: Any, depth: int = 0) -> None:
    """Raise InvalidDoc unless ``value`` is plain data (see ``pack_value``), at most
    ``VALUE_DEPTH_MAX`` deep.  Scalars in a container are checked in line: this runs on
    every version a node writes or receives."""
    t = type(value)
    if t is dict:
        for k in value:
            if type(k) is not str:
                raise InvalidDoc("value has a map key that is not a str")
        items: Any = value.values()
    elif t is list or t is tuple:
        items = value
    else:
        _check_scalar(value, t)
        return
    if depth >= VALUE_DEPTH_MAX:
        if items:
            raise InvalidDoc(f"value nests deeper than {VALUE_DEPTH_MAX}")
        return
    for x in items:
        tx = type(x)
        if tx is str or x is None or tx is bool:
            continue
        if tx is int:
            if not -(2**63) <= x < 2**63:
                raise InvalidDoc("value has an int outside int64")
        elif tx is dict or tx is list or tx is tuple:
            _check_plain(x, depth + 1)
        else:
            _check_scalar(x, tx)


def _check_scalar(v: Any, t: type) -> None:
    if v is None or t is bool or t is str or t is bytes:
        return
    if t is int:
        if not -(2**63) <= v < 2**63:
            raise InvalidDoc("value has an int outside int64")
    elif t is float:
        if not math.isfinite(v):
            raise InvalidDoc("value has a float that is not finite")
    else:
        raise InvalidDoc(f"value has a {t.__name__}; only plain data is replicated")


def to_wire(doc: Doc) -> DocWire:
    return DocWire(doc_type=doc.doc_type, key=doc.key, value=doc.raw, deleted=doc.deleted,
                   vclock=doc.vc.to_dict(), hlc_wall_ms=doc.hlc.wall_ms,
                   hlc_logical=doc.hlc.logical, origin=doc.hlc.node)


def from_wire(w: Any, *, value_bytes_max: int = VALUE_BYTES_MAX) -> Doc:
    """A ``Doc`` from a ``DocWire`` (or any object with its fields, e.g. a ``store.DocRow``).

    Every version a node receives comes through here, so the clock is checked and
    normalised in one pass (the rules of ``VectorClock`` and ``make_doc``)."""
    try:
        vclock = w.vclock
        if type(vclock) is not dict or len(vclock) > VC_ENTRIES_MAX:
            raise InvalidDoc(f"vclock must be a map of at most {VC_ENTRIES_MAX} entries")
        d: dict[str, int] = {}
        for node, n in vclock.items():
            if type(n) is not int or not 0 <= n < 2**63:
                raise InvalidDoc(f"vector clock counter for {node!r:.40} must be an int64 >= 0")
            _check_name("vector clock id", node, NODE_ID_CHARS_MAX)
            if n:
                d[node] = n
        return _make_doc(w.doc_type, w.key, w.value, w.deleted, VectorClock._of(d),
                         Hlc(w.hlc_wall_ms, w.hlc_logical, w.origin), ..., value_bytes_max)
    except InvalidDoc:
        raise
    except (ValueError, TypeError, AttributeError) as e:
        raise InvalidDoc(str(e)) from None


def _str_bytes(s: str) -> int:
    n = len(s) if s.isascii() else len(s.encode("utf-8", "surrogatepass"))
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65_536 else 5)


def doc_bytes_max(doc: Doc) -> int:
    """An upper bound of the encoded size of ``to_wire(doc)`` inside a message."""
    n = DOC_FIXED_BYTES + _str_bytes(doc.doc_type) + _str_bytes(doc.key) + _str_bytes(doc.hlc.node)
    n += len(doc.raw)
    for node in doc.vc:
        n += _str_bytes(node) + VC_ENTRY_FIXED_BYTES
    return n


def frame_budget_bytes(frame_max_bytes: int, sender: str, cluster: str) -> int:
    """Bytes left for a message's items in a frame of ``frame_max_bytes``."""
    return frame_max_bytes - FRAME_FIXED_BYTES - _str_bytes(sender) - _str_bytes(cluster)


def pack_updates(docs: Iterable[Doc], frame_max_bytes: int, sender: str, cluster: str,
                 also: tuple[str, ...] = ()) -> list[DocUpdate]:
    """Split ``docs`` into DocUpdates that each fit one frame (for gossip over UDP), each
    naming ``also`` (the other members they are pushed to).

    A key's versions stay in one message when they fit (a receiver acknowledges a
    tombstone only from a sender's full set).  A version too large for any frame is a
    bug upstream (``VALUE_BYTES_MAX`` keeps versions well under a UDP frame): ValueError.
    """
    budget = frame_budget_bytes(frame_max_bytes, sender, cluster) - sum(_str_bytes(a) for a in also)
    groups: dict[tuple[str, str], list[Doc]] = {}
    for doc in docs:
        groups.setdefault((doc.doc_type, doc.key), []).append(doc)
    out: list[DocUpdate] = []
    batch: list[DocWire] = []
    used = 0
    for group in groups.values():
        sizes = [doc_bytes_max(d) for d in group]
        if batch and (used + sum(sizes) > budget or len(batch) + len(group) > SYNC_DOCS_MAX):
            out.append(DocUpdate(tuple(batch), also))
            batch, used = [], 0
        for doc, n in zip(group, sizes):
            if n > budget:
                raise ValueError(f"a version of {doc.doc_type}/{doc.key} needs {n} bytes, "
                                 f"more than a {frame_max_bytes}-byte frame holds")
            if batch and (used + n > budget or len(batch) >= SYNC_DOCS_MAX):
                out.append(DocUpdate(tuple(batch), also))     # a set too large for one frame: split
                batch, used = [], 0
            batch.append(to_wire(doc))
            used += n
    if batch:
        out.append(DocUpdate(tuple(batch), also))
    return out


# ---- resolvers -----------------------------------------------------------------------------

class Resolver(Protocol):
    def rank(self, doc: Doc) -> int:
        """Higher wins among concurrent versions; ties go to the greater (hlc, vid).

        Must depend only on the version's content (every node must rank alike).
        """
        ...


class LastWriterWins:
    """Every version ranks alike, so the greatest HLC (then node id) wins."""

    def rank(self, doc: Doc) -> int:
        return 0

    def __repr__(self) -> str:
        return "LastWriterWins()"


class Lattice:
    """Rank by a function of the version (e.g. a state lattice: done > running > pending),
    then HLC.  ``rank_fn(doc) -> int`` sees ``doc.value`` and ``doc.deleted``; it should rise
    along every path a document's versions take, so that a version that loses an order to
    pruning (clock.py) is still ranked below its successors."""

    def __init__(self, rank_fn: Callable[[Doc], int]) -> None:
        self._rank_fn = rank_fn

    def rank(self, doc: Doc) -> int:
        return self._rank_fn(doc)

    def __repr__(self) -> str:
        return f"Lattice({getattr(self._rank_fn, '__name__', self._rank_fn)!r})"


DEFAULT_RESOLVER = LastWriterWins()


# ---- results -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Collected:
    """What ``gc`` changed: persist ``docs`` (full version sets) and delete ``removed`` keys."""

    docs: tuple[Doc, ...] = ()
    removed: tuple[tuple[str, str], ...] = ()
    pruned_ids: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class SyncStep:
    """One ``SyncSession.step``: persist ``changed`` (full version sets), then send ``reply``.

    ``reply`` is None when this side has nothing more to say and the peer said it has
    nothing more either (``more`` unset): a responder then sends an empty ``DocSync()``,
    and an initiator ends the session.
    """

    reply: DocSync | None
    changed: tuple[Doc, ...] = ()


# ---- the replica ---------------------------------------------------------------------------

class _Entry:
    """A document: its versions (sorted by vid), key hash and version hash."""

    __slots__ = ("versions", "kh", "vh")

    def __init__(self, versions: tuple[Doc, ...], kh: int, vh: int) -> None:
        self.versions = versions
        self.kh = kh
        self.vh = vh


class _Dead:
    __slots__ = ("since_ms", "kh", "acks")

    def __init__(self, since_ms: int, kh: int) -> None:
        self.since_ms = since_ms
        self.kh = kh
        self.acks: set[str] = set()


def key_hash(doc_type: str, key: str) -> int:
    """Position of a document in the digest tree (64 bits)."""
    data = doc_type.encode("utf-8", "surrogatepass") + b"\0" + key.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def _vid64(doc: Doc) -> int:
    return int.from_bytes(doc.vid[:8], "big")


def _prefix(kh: int, depth: int) -> int:
    return kh >> (64 - FANOUT_BITS * depth)


PRUNE_AFTER_MS = 3_600_000        # an hour: far beyond anti-entropy's convergence time
TOMBSTONE_GRACE_MS = 86_400_000   # a day: a member down for less gets the delete on return


class Replica:
    """One node's copy of the replicated documents (pure: no I/O, no time, no randomness).

    ``resolvers`` maps a doc_type to its resolver (default ``LastWriterWins``).  ``now_wall_ms``
    arguments are the wall clock (the HLC needs it); the grace and horizon timers use it too,
    so a wall clock that jumps ahead hastens them (a jump of an hour is a broken clock).
    """

    def __init__(self, node_id: str, resolvers: Mapping[str, Resolver] | None = None, *,
                 docs_max: int = DOCS_MAX, value_bytes_max: int = VALUE_BYTES_MAX,
                 prune_after_ms: int = PRUNE_AFTER_MS, tombstone_grace_ms: int = TOMBSTONE_GRACE_MS,
                 max_drift_ms: int = HLC_MAX_DRIFT_MS) -> None:
        _check_name("node_id", node_id, NODE_ID_CHARS_MAX)
        if docs_max < 1 or not 0 < value_bytes_max <= VALUE_BYTES_MAX * 32:
            raise ValueError("docs_max must be >= 1 and value_bytes_max in 1..1 MiB")
        if tombstone_grace_ms < 0:
            raise ValueError("tombstone_grace_ms must be >= 0")
        self.node_id = node_id
        self.resolvers: dict[str, Resolver] = dict(resolvers or {})
        self.docs_max = docs_max
        self.value_bytes_max = value_bytes_max
        self.tombstone_grace_ms = tombstone_grace_ms
        self.hlc = HlcClock(node_id, max_drift_ms=max_drift_ms)
        self._departures = Departures(prune_after_ms)
        self._pruned: frozenset[str] = frozenset()
        self._types: dict[str, dict[str, _Entry]] = {}
        self._n = 0
        self._agg: list[dict[int, int]] = [{} for _ in range(TRACK_DEPTH + 1)]
        self._cnt: list[dict[int, int]] = [{} for _ in range(TRACK_DEPTH + 1)]
        self._buckets: dict[int, dict[tuple[str, str], int]] = {}
        self._vc_refs: dict[str, int] = {}
        self._dead: dict[tuple[str, str], _Dead] = {}
        self._ghosts: dict[tuple[str, str], int] = {}    # collected; forgotten at this wall ms
        self.stats: dict[str, int] = {
            "conflicts_resolved": 0, "invalid": 0, "dropped_full": 0, "siblings_dropped": 0,
            "rank_errors": 0, "stripped": 0, "tombstones_collected": 0, "ghosts_forgotten": 0,
            "ids_pruned": 0,
        }

    # ---------------------------------------------------------------- reading

    @property
    def conflicts_resolved(self) -> int:
        return self.stats["conflicts_resolved"]

    def __len__(self) -> int:
        """Documents held, tombstones included (ghosts not)."""
        return self._n - len(self._ghosts)

    def resolver(self, doc_type: str) -> Resolver:
        return self.resolvers.get(doc_type, DEFAULT_RESOLVER)

    def versions(self, doc_type: str, key: str) -> tuple[Doc, ...]:
        """All current versions (siblings) of a document, tombstones included."""
        e = self._types.get(doc_type, {}).get(key)
        return () if e is None or (doc_type, key) in self._ghosts else e.versions

    def _held(self, k: tuple[str, str]) -> tuple[Doc, ...]:
        """A document's versions, a ghost's tombstones included."""
        e = self._types.get(k[0], {}).get(k[1])
        return () if e is None else e.versions

    def holds(self, doc_type: str, key: str) -> bool:
        """Whether any version of a document is held: live, deleted, or a collected ghost."""
        entries = self._types.get(doc_type)
        return entries is not None and key in entries

    def winner(self, doc_type: str, key: str) -> Doc | None:
        """The resolved version, which may be a tombstone; None if unknown."""
        vs = self.versions(doc_type, key)
        return self._winner(doc_type, vs) if vs else None

    def get(self, doc_type: str, key: str) -> Doc | None:
        """The resolved version, or None if unknown or deleted."""
        d = self.winner(doc_type, key)
        return None if d is None or d.deleted else d

    def items(self, doc_type: str) -> list[Doc]:
        """The resolved, not deleted, documents of a type (a snapshot list)."""
        out = []
        for e in self._types.get(doc_type, {}).values():
            d = e.versions[0] if len(e.versions) == 1 else self._winner(doc_type, e.versions)
            if not d.deleted:
                out.append(d)
        return out

    def doc_types(self) -> list[str]:
        return list(self._types)

    def all_versions(self) -> Iterator[Doc]:
        """Every version held (for a full dump or a store rewrite); ghosts excluded."""
        for doc_type, entries in self._types.items():
            for key, e in entries.items():
                if not self._ghosts or (doc_type, key) not in self._ghosts:
                    yield from e.versions

    def _order_key(self, doc: Doc) -> tuple[int, Hlc, bytes]:
        try:
            r = self.resolver(doc.doc_type).rank(doc)
            if type(r) is not int:
                raise TypeError("rank must return an int")
        except Exception:      # a resolver bug must not split replicas: rank lowest, everywhere
            self.stats["rank_errors"] += 1
            r = RANK_ERROR
        return (r, doc.hlc, doc.vid)

    def _winner(self, doc_type: str, versions: tuple[Doc, ...]) -> Doc:
        if len(versions) == 1:
            return versions[0]
        return max(versions, key=self._order_key)

    # ---------------------------------------------------------------- local writes

    def put(self, now_wall_ms: int, doc_type: str, key: str, value: Any) -> Doc:
        """Write a value; returns the new version (the document's only one).  Raises InvalidDoc.

        The caller persists the version before gossiping it (persist before send).
        """
        raw = pack_value(value, self.value_bytes_max)
        # the stored value is what peers will decode (tuples become lists); plain already
        return self._write(now_wall_ms, doc_type, key, raw, False, msgpack.unpackb(raw, raw=False))

    def delete(self, now_wall_ms: int, doc_type: str, key: str, *, absent: bool = False) -> Doc | None:
        """Write a tombstone; None (nothing written) if the document is deleted, or unknown
        (unless ``absent``: a key other documents stand in for, which must read deleted)."""
        e = self._types.get(doc_type, {}).get(key)
        if (e is None and not absent) or (e is not None and all(v.deleted for v in e.versions)):
            return None
        return self._write(now_wall_ms, doc_type, key, _TOMBSTONE_RAW, True, None)

    def _write(self, now: int, doc_type: str, key: str, raw: bytes, deleted: bool, value: Any) -> Doc:
        _check_name("doc_type", doc_type, TYPE_CHARS_MAX)
        _check_name("key", key, KEY_CHARS_MAX)
        entries = self._types.get(doc_type, {})
        e = entries.get(key)
        if e is None and self._n >= self.docs_max:
            raise InvalidDoc(f"the replica holds docs_max={self.docs_max} documents")
        vc = VectorClock()
        if e is not None:
            for v in e.versions:
                vc = vc.merge(v.vc)
        vc = vc.increment(self.node_id)
        doc = make_doc(doc_type, key, raw, deleted, vc, self.hlc.send(now), value,
                       value_bytes_max=self.value_bytes_max)
        self._ghosts.pop((doc_type, key), None)      # a write over a ghost: a document again
        self._set(now, doc_type, key, (doc,))
        self._check_key(doc_type, key)
        return doc

    # ---------------------------------------------------------------- merging

    def merge(self, now_wall_ms: int, docs: Iterable[Doc | DocWire], *, src: str | None = None,
              held: list[bytes] | None = None) -> list[Doc]:
        """Merge received versions; returns the full version sets of the documents that changed
        (persist them, then re-gossip them).  DocWires are validated here; invalid ones are
        counted in ``stats["invalid"]`` and skipped.  ``src``: the sending member, whose
        message held its full version set of each key named (see Tombstones).  ``held``:
        gets the id of each received version that is valid and not superseded."""
        sent: dict[tuple[str, str], set[bytes]] = {}
        touched: dict[tuple[str, str], None] = {}
        for d in docs:
            if not isinstance(d, Doc):
                known = self._known(d)
                if known is not None:        # a rumour heard before: no decoding, no hashing
                    vid, hlc = known
                    if src is not None:
                        sent.setdefault((d.doc_type, d.key), set()).add(vid)
                    if held is not None and vid is not _SUPERSEDED:
                        held.append(vid)
                    self.hlc.recv(now_wall_ms, hlc)
                    continue
                try:
                    d = from_wire(d, value_bytes_max=self.value_bytes_max)
                except InvalidDoc:
                    self.stats["invalid"] += 1
                    continue
            if held is not None:
                held.append(d.vid)            # the sender's id of it (stripping makes a new one)
            d = self._strip(d)
            k = (d.doc_type, d.key)
            if src is not None:
                sent.setdefault(k, set()).add(d.vid)
            if self._merge_one(now_wall_ms, d, count=True):
                touched[k] = None
            self.hlc.recv(now_wall_ms, d.hlc)
        changed: list[Doc] = []
        for doc_type, key in touched:
            self._check_key(doc_type, key)
            changed.extend(self.versions(doc_type, key))
        if src is not None:
            for k, vids in sent.items():
                dead = self._dead.get(k)
                if dead is not None and vids == {v.vid for v in self.versions(*k)}:
                    dead.acks.add(src)
        return changed

    def _known(self, w: Any) -> tuple[bytes, Hlc] | None:
        """``(vid, hlc)`` when a received DocWire needs no merge, else None (merge it).

        Rumours repeat: most versions a node receives it already holds, or holds a newer
        version of.  Such a version is recognised from its fields, without decoding its
        value or hashing it: either every field equals a held version's (then so does its
        vid), or its clock is below a held version's (it is superseded; it would be dropped
        by ``_merge_one``, and its sender's set differs from ours: ``_SUPERSEDED`` stands
        in for its vid).  A superseded version is not validated, so it is not counted in
        ``stats["invalid"]`` either; everything else takes the exact path."""
        try:
            entries = self._types.get(w.doc_type)
            e = entries.get(w.key) if entries is not None else None
            if e is None:
                return None
            vclock, wall, logical, origin = w.vclock, w.hlc_wall_ms, w.hlc_logical, w.origin
            if (type(vclock) is not dict or type(wall) is not int or type(logical) is not int
                    or type(origin) is not str or not 0 <= wall < 2**63 or not 0 <= logical < 2**63):
                return None
            for s in e.versions:
                held = s.vc._d
                if held == vclock:
                    h = s.hlc
                    if (h.wall_ms == wall and h.logical == logical and h.node == origin
                            and s.deleted is w.deleted and s.raw == w.value):
                        return s.vid, h
                    return None          # equal clocks, another version: the resolver decides
                if len(vclock) <= len(held) and all(type(n) is int and 0 < n <= held.get(node, 0)
                                                    for node, n in vclock.items()):
                    return _SUPERSEDED, Hlc(wall, logical, origin)
        except (AttributeError, TypeError):
            return None
        return None

    def restore(self, now_wall_ms: int, rows: Iterable[Any]) -> int:
        """Load versions from the store at start (``store.load_docs()``); returns how many
        were skipped as invalid.  Counts no conflicts; keeps the HLC above every own write.
        About 4 s for 100k versions (validation, hashing and the full ``_check``)."""
        bad = 0
        for row in rows:
            try:
                d = self._strip(from_wire(row, value_bytes_max=self.value_bytes_max))
            except InvalidDoc:
                bad += 1
                continue
            self._merge_one(now_wall_ms, d, count=False)
            if d.hlc.node == self.node_id:
                self.hlc.restore(d.hlc)
        self._check()
        return bad

    def _strip(self, d: Doc) -> Doc:
        if self._pruned and any(n in self._pruned for n in d.vc):
            self.stats["stripped"] += 1
            return make_doc(d.doc_type, d.key, d.raw, d.deleted, d.vc.without(self._pruned), d.hlc,
                            d.value, value_bytes_max=self.value_bytes_max)
        return d

    def _merge_one(self, now: int, v: Doc, *, count: bool) -> bool:
        """Add version ``v``; keep the maximal versions.  True if the document changed."""
        entries = self._types.get(v.doc_type)
        e = entries.get(v.key) if entries is not None else None
        if e is None:
            if self._n >= self.docs_max:
                self.stats["dropped_full"] += 1
                return False
            self._set(now, v.doc_type, v.key, (v,))
            return True
        keep: list[Doc] = []
        conflict = False
        for s in e.versions:
            if s.vid == v.vid:
                return False                     # a duplicate
            c = v.vc.compare(s.vc)
            if c is Order.BEFORE:
                return False                     # superseded (the set is an antichain, so by s alone)
            if c is Order.EQUAL:
                # Distinct versions with one clock (pruning, a writer that lost its disk):
                # the resolver's order decides, so every replica keeps the same one.
                if self._order_key(s) > self._order_key(v):
                    return False
                conflict = True
                continue
            if c is Order.CONCURRENT:
                keep.append(s)
                conflict = True
            # AFTER: v supersedes s
        keep.append(v)
        if len(keep) > SIBLINGS_MAX:
            keep.sort(key=self._order_key, reverse=True)
            self.stats["siblings_dropped"] += len(keep) - SIBLINGS_MAX
            del keep[SIBLINGS_MAX:]
        if conflict and count:
            self.stats["conflicts_resolved"] += 1
        if self._ghosts:
            self._ghosts.pop((v.doc_type, v.key), None)   # a newer version: a document again
        self._set(now, v.doc_type, v.key, tuple(sorted(keep, key=_vid_of)))
        return True

    # ---------------------------------------------------------------- indexes

    def _set(self, now: int, doc_type: str, key: str, versions: tuple[Doc, ...]) -> None:
        """Replace a document's versions (``()`` removes it) and keep every index in step."""
        entries = self._types.get(doc_type)
        old = entries.get(key) if entries is not None else None
        k = (doc_type, key)
        if old is None:
            if not versions:
                return
            if entries is None:
                entries = self._types[doc_type] = {}
            kh = key_hash(doc_type, key)
            old_vh = 0
        else:
            kh, old_vh = old.kh, old.vh
            for v in old.versions:
                for node in v.vc:
                    n = self._vc_refs[node] - 1
                    if n:
                        self._vc_refs[node] = n
                    else:
                        del self._vc_refs[node]
        vh = 0
        for v in versions:
            vh ^= _vid64(v)
            for node in v.vc:
                self._vc_refs[node] = self._vc_refs.get(node, 0) + 1
        delta = old_vh ^ vh
        added = 1 if old is None else -1 if not versions else 0
        for depth in range(TRACK_DEPTH + 1):
            p = _prefix(kh, depth)
            agg, cnt = self._agg[depth], self._cnt[depth]
            if delta:
                h = agg.get(p, 0) ^ delta
                if h:
                    agg[p] = h
                else:
                    agg.pop(p, None)
            if added:
                c = cnt.get(p, 0) + added
                if c:
                    cnt[p] = c
                else:
                    del cnt[p]
        leaf = _prefix(kh, TRACK_DEPTH)
        if versions:
            if old is None:
                entries[key] = _Entry(versions, kh, vh)
                self._buckets.setdefault(leaf, {})[k] = kh
                self._n += 1
            else:
                old.versions, old.vh = versions, vh
            if all(v.deleted for v in versions) and k not in self._ghosts:
                self._dead[k] = _Dead(now, kh)     # new or changed: acknowledgements start over
            else:
                self._dead.pop(k, None)
        else:
            assert entries is not None
            del entries[key]
            if not entries:
                del self._types[doc_type]
            bucket = self._buckets[leaf]
            del bucket[k]
            if not bucket:
                del self._buckets[leaf]
            self._n -= 1
            self._dead.pop(k, None)
            self._ghosts.pop(k, None)

    def _tree_hash(self, depth: int, prefix: int) -> int:
        if depth <= TRACK_DEPTH:
            return self._agg[depth].get(prefix, 0)
        h = 0
        for (doc_type, key), kh in self._keys_in(depth, prefix):
            h ^= self._types[doc_type][key].vh
        return h

    def _tree_count(self, depth: int, prefix: int) -> int:
        if depth <= TRACK_DEPTH:
            return self._cnt[depth].get(prefix, 0)
        return sum(1 for _ in self._keys_in(depth, prefix))

    def _keys_in(self, depth: int, prefix: int) -> Iterator[tuple[tuple[str, str], int]]:
        """(key, key hash) of every document under a tree node."""
        if depth >= TRACK_DEPTH:
            shift = 64 - FANOUT_BITS * depth
            bucket = self._buckets.get(prefix >> (FANOUT_BITS * (depth - TRACK_DEPTH)), {})
            for k, kh in list(bucket.items()):
                if kh >> shift == prefix:
                    yield k, kh
            return
        below = FANOUT_BITS * (TRACK_DEPTH - depth)
        if self._n <= (1 << below):             # scanning everything is cheaper
            shift = 64 - FANOUT_BITS * depth
            for bucket in list(self._buckets.values()):
                for k, kh in list(bucket.items()):
                    if kh >> shift == prefix:
                        yield k, kh
            return
        first = prefix << below
        for leaf in range(first, first + (1 << below)):
            bucket = self._buckets.get(leaf)
            if bucket:
                yield from list(bucket.items())

    def _keys_with_hash(self, kh: int) -> list[tuple[str, str]]:
        bucket = self._buckets.get(_prefix(kh, TRACK_DEPTH), {})
        return [k for k, h in bucket.items() if h == kh]

    # ---------------------------------------------------------------- gc: pruning and tombstones

    def gc(self, now_wall_ms: int, live: Collection[str]) -> Collected:
        """Prune clock entries of nodes gone for ``prune_after_ms`` and collect tombstones
        acknowledged by every member in ``live`` (this node's alive/suspect peers; this node
        is implied).  Call it every few seconds; returns what to persist and delete."""
        live_set = set(live)
        live_set.add(self.node_id)
        prunable = self._departures.update(now_wall_ms, live_set, self._vc_refs)
        self._pruned = prunable
        rewritten: list[Doc] = []
        newly = [n for n in prunable if n in self._vc_refs]
        if newly:
            self.stats["ids_pruned"] += len(newly)
            for doc_type in list(self._types):
                for key, e in list(self._types[doc_type].items()):
                    if any(n in v.vc for v in e.versions for n in newly):
                        k = (doc_type, key)
                        ghost_until_ms = self._ghosts.get(k)
                        dead = self._dead.get(k)
                        stripped = [self._strip(v) for v in e.versions]
                        self._set(now_wall_ms, doc_type, key, ())
                        for v in stripped:
                            self._merge_one(now_wall_ms, v, count=True)
                        if ghost_until_ms is not None:
                            self._ghosts[k] = ghost_until_ms
                            self._dead.pop(k, None)
                        elif dead is not None and k in self._dead:
                            # Same deletes, fewer clock entries: the grace runs on (peers
                            # must acknowledge the new versions, though).
                            self._dead[k].since_ms = dead.since_ms
                        self._check_key(doc_type, key)
                        rewritten.extend(self.versions(doc_type, key))
        for k, until_ms in list(self._ghosts.items()):
            if now_wall_ms >= until_ms:
                self._set(now_wall_ms, k[0], k[1], ())
                self.stats["ghosts_forgotten"] += 1
        removed: list[tuple[str, str]] = []
        peers = live_set - {self.node_id}
        for k, dead in list(self._dead.items()):
            if now_wall_ms - dead.since_ms >= self.tombstone_grace_ms and peers <= dead.acks:
                del self._dead[k]
                self._ghosts[k] = now_wall_ms + self.tombstone_grace_ms
                removed.append(k)
        self.stats["tombstones_collected"] += len(removed)
        gone = set(removed)
        return Collected(tuple(d for d in rewritten if (d.doc_type, d.key) not in gone),
                         tuple(removed), prunable)

    def acked_by(self, doc_type: str, key: str) -> frozenset[str]:
        """Members known to hold this dead document's versions (empty if not dead)."""
        dead = self._dead.get((doc_type, key))
        return frozenset() if dead is None else frozenset(dead.acks)

    def _ack_under(self, src: str, matched: Mapping[int, set[int]]) -> None:
        """``src`` holds what we hold under the tree nodes ``matched`` (depth -> prefixes)."""
        if not self._dead or not matched:
            return
        for dead in self._dead.values():
            for depth, prefixes in matched.items():
                if _prefix(dead.kh, depth) in prefixes:
                    dead.acks.add(src)
                    break

    def _ack_hashes(self, src: str, khs: Collection[int]) -> None:
        if not self._dead or not khs:
            return
        for kh in khs:
            for k in self._keys_with_hash(kh):
                dead = self._dead.get(k)
                if dead is not None:
                    dead.acks.add(src)

    # ---------------------------------------------------------------- anti-entropy

    def sync(self, peer: str, *, frame_max_bytes: int = SYNC_FRAME_BYTES_MAX, cluster: str = "galaxy") -> SyncSession:
        """A push-pull anti-entropy session with ``peer`` (either side of it)."""
        return SyncSession(self, peer, frame_budget_bytes(frame_max_bytes, self.node_id, cluster))

    def digest_node(self, depth: int, prefix: int) -> DigestNode:
        """This replica's view of a tree node: its children's hashes, or a leaf listing."""
        if depth >= DEPTH_MAX or self._tree_count(depth, prefix) <= LEAF_KEYS_MAX:
            return DigestNode(depth, prefix, b"", self._leaf_entries(depth, prefix))
        base = prefix << FANOUT_BITS
        return DigestNode(depth, prefix, b"".join(
            self._tree_hash(depth + 1, base + c).to_bytes(HASH_BYTES, "big") for c in range(FANOUT)))

    def _leaf_entries(self, depth: int, prefix: int) -> bytes:
        by_kh: dict[int, int] = {}
        for (doc_type, key), kh in self._keys_in(depth, prefix):
            by_kh[kh] = by_kh.get(kh, 0) ^ self._types[doc_type][key].vh
        return b"".join(kh.to_bytes(8, "big") + vh.to_bytes(8, "big") for kh, vh in sorted(by_kh.items()))

    def root_hash(self) -> int:
        return self._agg[0].get(0, 0)

    # ---------------------------------------------------------------- invariants

    def _check_key(self, doc_type: str, key: str) -> None:
        e = self._types.get(doc_type, {}).get(key)
        if e is None:
            assert (doc_type, key) not in self._dead
            return
        vs = e.versions
        assert 1 <= len(vs) <= SIBLINGS_MAX, (doc_type, key, len(vs))
        assert [v.vid for v in vs] == sorted({v.vid for v in vs}), "versions sorted by vid, distinct"
        vh = 0
        for i, v in enumerate(vs):
            assert v.doc_type == doc_type and v.key == key
            assert len(v.vc) <= VC_ENTRIES_MAX and not any(n in self._pruned for n in v.vc)
            assert (v.value is None) if v.deleted else True
            vh ^= _vid64(v)
            for w in vs[i + 1:]:
                assert v.vc.compare(w.vc) is Order.CONCURRENT, (doc_type, key, v.vc, w.vc)
        assert vh == e.vh
        ghost = (doc_type, key) in self._ghosts
        assert ((doc_type, key) in self._dead) == (all(v.deleted for v in vs) and not ghost)
        assert all(v.deleted for v in vs) if ghost else True
        assert self._buckets[_prefix(e.kh, TRACK_DEPTH)][(doc_type, key)] == e.kh

    def _check(self) -> None:
        """Every invariant, in full (O(documents)): tests and the simulator call it."""
        n = 0
        agg: list[dict[int, int]] = [{} for _ in range(TRACK_DEPTH + 1)]
        cnt: list[dict[int, int]] = [{} for _ in range(TRACK_DEPTH + 1)]
        refs: dict[str, int] = {}
        for doc_type, entries in self._types.items():
            assert entries, "no empty type maps"
            for key, e in entries.items():
                self._check_key(doc_type, key)
                assert e.kh == key_hash(doc_type, key)
                n += 1
                for depth in range(TRACK_DEPTH + 1):
                    p = _prefix(e.kh, depth)
                    agg[depth][p] = agg[depth].get(p, 0) ^ e.vh
                    cnt[depth][p] = cnt[depth].get(p, 0) + 1
                for v in e.versions:
                    for node in v.vc:
                        refs[node] = refs.get(node, 0) + 1
        assert n == self._n <= self.docs_max
        assert [{p: h for p, h in a.items() if h} for a in agg] == self._agg, "tree hashes"
        assert cnt == self._cnt, "tree counts"
        assert refs == self._vc_refs, "clock id references"
        assert sum(len(b) for b in self._buckets.values()) == n and all(self._buckets.values())
        assert all(k[1] in self._types.get(k[0], {}) for k in self._dead)
        assert all(k[1] in self._types.get(k[0], {}) for k in self._ghosts)


def _vid_of(doc: Doc) -> bytes:
    return doc.vid


# ---- anti-entropy sessions ---------------------------------------------------------------

class SyncSession:
    """One push-pull anti-entropy exchange with one peer.  Pure; the runner moves messages.

    Initiator::

        s = replica.sync(peer)
        msg = s.start()
        while msg is not None:                      # bound the rounds and time in the runner
            reply = exchange(msg)                   # send over TCP, receive the peer's DocSync
            step = s.step(now_wall_ms, reply)
            persist(step.changed)
            msg = step.reply

    Responder, for each DocSync received on the connection::

        step = s.step(now_wall_ms, msg)
        persist(step.changed)
        send(step.reply or DocSync())               # empty: "nothing more from me"

    The session holds the work that did not fit one message (digest nodes to send,
    documents owed) and sends it in later steps, so a large difference (a new node
    catching up) completes in one session, one frame at a time.
    """

    def __init__(self, replica: Replica, peer: str, budget_bytes: int) -> None:
        if budget_bytes < 4096:
            raise ValueError("frame too small for anti-entropy")
        self._r = replica
        self.peer = peer
        self._budget = budget_bytes
        self._nodes_out: list[DigestNode] = []
        # Documents to send, in order; True: a ghost's tombstones go too (see step()).
        self._owed: dict[tuple[str, str], bool] = {}
        self._want: dict[int, None] = {}                  # key hashes to ask for
        self.stats = {"steps": 0, "digest_bytes_out": 0, "docs_out": 0, "docs_in": 0, "oversize": 0}

    def start(self) -> DocSync:
        """The initiator's first message: the root (16 hashes, or a leaf listing when small),
        or for a large replica the 16 nodes of level 1 (256 hashes, ~3 KB), saving a round."""
        r = self._r
        if r._n <= START_SPLIT_KEYS:
            self._nodes_out.append(r.digest_node(0, 0))
        else:
            self._nodes_out.extend(r.digest_node(1, p) for p in range(FANOUT))
        reply = self._reply()
        assert reply is not None
        return reply

    def step(self, now_wall_ms: int, msg: DocSync) -> SyncStep:
        """Take the peer's message: merge its documents, answer its digest nodes and wants."""
        self.stats["steps"] += 1
        r = self._r
        changed: list[Doc] = []
        if msg.docs:
            self.stats["docs_in"] += len(msg.docs)
            changed = r.merge(now_wall_ms, msg.docs, src=self.peer)
            if r._ghosts:
                # The peer holds a version of a document we collected: it was away while
                # the delete spread.  Send it the tombstones (which supersede what it has),
                # else it keeps serving the value and, once our ghost is forgotten, hands
                # it back to everyone.  A peer that lacks the key gets no ghost (that is
                # one that collected and forgot it; sending would start the delete over).
                for d in msg.docs:
                    k = (d.doc_type, d.key)
                    if k in r._ghosts:
                        self._owe(k, ghost=True)
        if len(msg.want) % HASH_BYTES or len(msg.nodes) > SYNC_NODES_MAX * 2:
            raise SyncError("malformed want or too many nodes")
        for i in range(0, len(msg.want), HASH_BYTES):
            kh = int.from_bytes(msg.want[i:i + HASH_BYTES], "big")
            for k in r._keys_with_hash(kh):
                self._owe(k)
        matched: dict[int, set[int]] = {}
        for node in msg.nodes:
            self._take_node(node, matched)
        r._ack_under(self.peer, matched)
        reply = self._reply()
        if reply is None and msg.more:
            reply = DocSync()                 # "go on": the peer has more for us
        return SyncStep(reply, tuple(changed))

    def _owe(self, k: tuple[str, str], ghost: bool = False) -> None:
        if len(self._owed) < DOCS_MAX:
            self._owed[k] = ghost or self._owed.get(k, False)

    def _take_node(self, node: DigestNode, matched: dict[int, set[int]]) -> None:
        r = self._r
        d, p = node.depth, node.prefix
        if type(d) is not int or not 0 <= d <= DEPTH_MAX or type(p) is not int \
                or not 0 <= p < (1 << (FANOUT_BITS * d)):
            raise SyncError(f"digest node out of range: depth {d} prefix {p}")
        if node.hashes:
            if len(node.hashes) != FANOUT * HASH_BYTES or node.entries or d >= DEPTH_MAX:
                raise SyncError("malformed inner digest node")
            base = p << FANOUT_BITS
            for c in range(FANOUT):
                child = base + c
                theirs = int.from_bytes(node.hashes[c * HASH_BYTES:(c + 1) * HASH_BYTES], "big")
                if theirs == r._tree_hash(d + 1, child):
                    matched.setdefault(d + 1, set()).add(child)
                elif len(self._nodes_out) < SYNC_PENDING_MAX:
                    self._nodes_out.append(r.digest_node(d + 1, child))
            return
        if len(node.entries) % ENTRY_BYTES:
            raise SyncError("malformed leaf digest node")
        theirs_by_kh: dict[int, int] = {}
        for i in range(0, len(node.entries), ENTRY_BYTES):
            kh = int.from_bytes(node.entries[i:i + 8], "big")
            if _prefix(kh, d) != p:
                raise SyncError("leaf entry outside its node")
            theirs_by_kh[kh] = int.from_bytes(node.entries[i + 8:i + ENTRY_BYTES], "big")
        mine_by_kh: dict[int, int] = {}
        keys_by_kh: dict[int, list[tuple[str, str]]] = {}
        for k, kh in r._keys_in(d, p):
            mine_by_kh[kh] = mine_by_kh.get(kh, 0) ^ r._types[k[0]][k[1]].vh
            keys_by_kh.setdefault(kh, []).append(k)
        same = []
        for kh, vh in mine_by_kh.items():
            if theirs_by_kh.get(kh) == vh:
                same.append(kh)
            else:
                for k in keys_by_kh[kh]:
                    self._owe(k)
        for kh, vh in theirs_by_kh.items():
            if mine_by_kh.get(kh) != vh and len(self._want) < SYNC_PENDING_MAX:
                self._want[kh] = None
        r._ack_hashes(self.peer, same)

    def _reply(self) -> DocSync | None:
        budget = self._budget
        nodes: list[DigestNode] = []
        while self._nodes_out and len(nodes) < SYNC_NODES_MAX:
            n = self._nodes_out[-1]
            size = NODE_FIXED_BYTES + len(n.hashes) + len(n.entries)
            if size > budget and nodes:
                break
            nodes.append(self._nodes_out.pop())
            budget -= size
        want_n = min(len(self._want), SYNC_WANT_MAX, max(0, budget // HASH_BYTES - 8))
        want = list(self._want)[:want_n]
        for kh in want:
            del self._want[kh]
        budget -= HASH_BYTES * len(want)
        docs: list[DocWire] = []
        r = self._r
        while self._owed and len(docs) < SYNC_DOCS_MAX:
            k = next(iter(self._owed))
            vs = r._held(k) if self._owed[k] else r.versions(*k)
            size = sum(doc_bytes_max(v) for v in vs)
            if docs and (size > budget or len(docs) + len(vs) > SYNC_DOCS_MAX):
                break
            del self._owed[k]
            for v in vs:
                n = doc_bytes_max(v)
                if n > budget:           # siblings too large for one frame together: the rest
                    self.stats["oversize"] += 1     # must wait for a later session
                    break
                docs.append(to_wire(v))
                budget -= n
        if not nodes and not want and not docs:
            return None
        self.stats["digest_bytes_out"] += sum(NODE_FIXED_BYTES + len(n.hashes) + len(n.entries)
                                              for n in nodes) + HASH_BYTES * len(want)
        self.stats["docs_out"] += len(docs)
        return DocSync(tuple(nodes), tuple(docs), b"".join(kh.to_bytes(8, "big") for kh in want),
                       more=self.pending)

    @property
    def pending(self) -> bool:
        """Work left for later steps (the runner keeps stepping while the peer answers)."""
        return bool(self._nodes_out or self._owed or self._want)
