"""The node's durable local state: one SQLite database in the data dir.

Theory of operation
-------------------
``<data_dir>/galaxy.db`` holds what a node must remember across restarts: its node id,
its incarnation counter, small key/value facts (e.g. the cluster key fingerprint, Raft
term and vote) and a bounded list of recently seen peers to rejoin through.  The ``docs``
table holds the replicated documents (galaxy/gossip/replica.py): one row per version,
so a document with concurrent versions (siblings) has several rows.

The docs table is the store's hot path: every node commits every version of every
document (three or four per task), so its layout is chosen for the commit's cost, which
is mostly the pages it writes to the WAL (and later checkpoints) plus one fsync.  Rows
are kept in write order (an integer primary key the store allocates) and have no index:
the store finds a document's rows through an in-memory map ``(doc_type, key) -> ids``
(~70 bytes a document).  A commit's new documents then share a page or two at the end of
the table, and the documents it updates were mostly written moments before, on pages near
the end too (a version replacing a single one is rewritten in place; a set of siblings is
deleted and appended anew); keyed by the (random) document key instead, every row dirtied
a page of its own (schema 1: 20-25 us of thread CPU per row, about half of it writing
pages; 35-40% less with this layout, see ``benchmarks/store_docs.py``).  The map is
rebuilt from the table when the store first needs it, after a failed write, and whenever
another connection changed the database (``PRAGMA data_version``), so a second ``Store``
on the same dir, or ``sqlite3`` by hand, cannot make it lie.  Vector clocks are stored as
msgpack maps (not part of any key, so no canonical form is needed; JSON cost 1.9 us a row,
msgpack 0.3); rows migrated from schema 1 keep their JSON text and are read as such.

Schema versions: 1 keyed the docs table by ``(doc_type, key, vclock)`` (``WITHOUT ROWID``);
2 is the layout above.  Opening a version-1 database migrates it in one transaction; a
database of a newer version than this code knows is refused.

Durability: the database runs in WAL mode with ``synchronous=FULL``, so every commit
fsyncs the write-ahead log before it returns.  A call that returned (``put``,
``next_incarnation``, ...) therefore survives ``kill -9`` and power loss; callers follow
the "persist before send" rule by calling the store before sending what depends on it.
Newly created files and the data dir are fsynced into their parent directories.

Privacy: the data dir is created 0700 and the database files are 0600 whatever the
umask (the store holds the cluster key fingerprint and peer addresses).  An existing data
dir is left with the permissions its owner chose.

Exclusivity: a running store holds a POSIX lock on ``<data_dir>/galaxy.lock``, so a
second *process* on the same data dir fails fast with ``StoreLocked`` (two nodes sharing
one identity would corrupt the mesh's view).  POSIX locks are per process, so opening a
second ``Store`` on the same dir inside one process works.

Concurrency: one connection (``check_same_thread=False``) guarded by a lock, which is
enough for the asyncio thread plus occasional calls from a helper thread.

Invariants:

* ``next_incarnation()`` returns strictly increasing values across calls and restarts.
* ``node_id()`` stores ``generate()``'s value at most once; later calls return it.
* The peers table holds at most ``peers_max`` rows: the most recently seen.
* ``put_docs(rows)`` replaces, in one transaction (one fsync), every stored version of
  each document it names by the rows given: after it returns, a document's rows are
  exactly the versions of its last ``put_docs``, until ``delete_docs`` removes them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

DB_NAME = "galaxy.db"
LOCK_NAME = "galaxy.lock"
SCHEMA_VERSION = 2
PEERS_MAX = 1024               # enough rejoin hints for any LAN; the table stays tiny
KEY_MAX_CHARS = 256
VALUE_MAX_CHARS = 1_048_576    # small facts only; bulk data belongs elsewhere
BUSY_TIMEOUT_MS = 5000         # another process's checkpoint is short; waiting beats failing

_NODE_ID_KEY = "node_id"
_INCARNATION_KEY = "incarnation"

# Schema 2's docs table (see the module docstring for why it has no key index).
_DOCS_COLUMNS = """(
    id           INTEGER PRIMARY KEY,  -- allocated by the store in write order
    doc_type     TEXT NOT NULL,
    key          TEXT NOT NULL,
    vclock       BLOB NOT NULL,        -- msgpack map; JSON text in rows migrated from schema 1
    value        BLOB NOT NULL,        -- msgpack, exactly as the writer encoded it
    deleted      INTEGER NOT NULL,
    hlc_wall_ms  INTEGER NOT NULL,
    hlc_logical  INTEGER NOT NULL,
    origin       TEXT NOT NULL
)"""
_DOC_FIELDS = "doc_type, key, vclock, value, deleted, hlc_wall_ms, hlc_logical, origin"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS kv (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (
    node_id      TEXT PRIMARY KEY NOT NULL,
    host         TEXT NOT NULL,
    gossip_port  INTEGER NOT NULL,
    seen_wall_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS peers_by_seen ON peers (seen_wall_ms);
CREATE TABLE IF NOT EXISTS docs {_DOCS_COLUMNS};
"""


class StoreError(Exception):
    """The store cannot be opened or used; the message names the path and the reason."""


class StoreLocked(StoreError):
    """Another process has this data dir open."""


@dataclass(frozen=True, slots=True)
class PeerRow:
    node_id: str
    host: str
    gossip_port: int
    seen_wall_ms: int          # wall clock of the last time this peer was heard from


@dataclass(frozen=True, slots=True)
class DocRow:
    """One stored version of a replicated document (the fields of ``messages.DocWire``)."""

    doc_type: str
    key: str
    value: bytes               # msgpack
    deleted: bool
    vclock: dict[str, int]
    hlc_wall_ms: int
    hlc_logical: int
    origin: str


class Store:
    def __init__(self, data_dir: str, *, peers_max: int = PEERS_MAX) -> None:
        if peers_max < 1:
            raise ValueError("peers_max must be >= 1")
        self._data_dir = os.path.abspath(os.path.expanduser(data_dir))
        self._path = os.path.join(self._data_dir, DB_NAME)
        self._peers_max = peers_max
        self._mutex = threading.Lock()
        self._lock_fd: int | None = None
        self._conn: sqlite3.Connection | None = None
        # doc_type -> key -> the ids of the document's rows (an int when one, as is usual);
        # None until needed, and after a failed write (rebuilt from the table then).
        self._doc_ids: dict[str, dict[str, int | tuple[int, ...]]] | None = None
        self._next_doc_id = 1
        self._data_version = -1        # PRAGMA data_version when _doc_ids was last valid
        try:
            self._make_data_dir()
            self._lock_fd = self._take_lock()
            self._create_private(self._path)
            self._conn = self._open()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening

    def _make_data_dir(self) -> None:
        try:
            os.makedirs(os.path.dirname(self._data_dir), exist_ok=True)
            os.mkdir(self._data_dir, 0o700)
        except FileExistsError:
            if not os.path.isdir(self._data_dir):
                raise StoreError(f"data dir {self._data_dir}: exists and is not a directory") from None
            return
        except OSError as e:
            raise StoreError(f"data dir {self._data_dir}: cannot create: {e.strerror or e}") from None
        os.chmod(self._data_dir, 0o700)        # mkdir's mode is filtered by the umask
        _fsync_dir(os.path.dirname(self._data_dir))

    def _take_lock(self) -> int:
        path = os.path.join(self._data_dir, LOCK_NAME)
        try:
            fd = self._create_private(path, keep_open=True)
        except OSError as e:
            raise StoreError(f"{path}: cannot open: {e.strerror or e}") from None
        assert fd is not None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EACCES, errno.EAGAIN):
                raise StoreLocked(
                    f"data dir {self._data_dir} is in use by another process (pid {holder})") from None
            raise StoreError(f"{path}: cannot lock: {e.strerror or e}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd

    def _create_private(self, path: str, keep_open: bool = False) -> int | None:
        """Open (creating if needed) ``path`` as 0600 regardless of the umask."""
        existed = os.path.exists(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise StoreError(f"{path}: cannot open: {e.strerror or e}") from None
        os.fchmod(fd, 0o600)
        if not existed:
            os.fsync(fd)
            _fsync_dir(os.path.dirname(path))
        if keep_open:
            return fd
        os.close(fd)
        return None

    def _open(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False,
                                   timeout=BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error as e:
            raise StoreError(f"{self._path}: cannot open: {e}") from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise StoreError(f"{self._path}: cannot use WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            check = conn.execute("PRAGMA quick_check").fetchone()[0]
            if check != "ok":
                raise StoreError(f"{self._path}: database is damaged: {check}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(f"{self._path}: written by a newer Galaxy (schema {version} > {SCHEMA_VERSION})")
            _migrate_docs_1_to_2(conn)
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except sqlite3.DatabaseError as e:
            conn.close()
            raise StoreError(f"{self._path}: not a usable database: {e}") from None
        except BaseException:
            conn.close()
            raise
        for suffix in ("-wal", "-shm"):        # SQLite copies the db's mode; be sure anyway
            try:
                os.chmod(self._path + suffix, 0o600)
            except FileNotFoundError:
                pass
        return conn

    # ------------------------------------------------------------------ API

    @property
    def path(self) -> str:
        """The database file, ``<data_dir>/galaxy.db``."""
        return self._path

    @property
    def data_dir(self) -> str:
        return self._data_dir

    def get(self, key: str) -> str | None:
        _check_key(key)
        with self._mutex:
            row = self._db().execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, value: str) -> None:
        """Store ``value``; durable (fsynced) when this returns."""
        _check_key(key)
        if not isinstance(value, str) or len(value) > VALUE_MAX_CHARS:
            raise ValueError(f"value must be a str of at most {VALUE_MAX_CHARS} chars")
        with self._mutex:
            self._db().execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                               "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    def delete(self, key: str) -> None:
        _check_key(key)
        with self._mutex:
            self._db().execute("DELETE FROM kv WHERE key = ?", (key,))

    def node_id(self, generate: Callable[[], str]) -> str:
        """The id stored in this data dir; on first use, ``generate()``'s value, stored once."""
        with self._mutex:
            db = self._db()
            row = db.execute("SELECT value FROM kv WHERE key = ?", (_NODE_ID_KEY,)).fetchone()
            if row is not None:
                return row[0]
            new_id = generate()
            if not isinstance(new_id, str) or not new_id:
                raise ValueError("generate() must return a non-empty str")
            db.execute("INSERT INTO kv (key, value) VALUES (?, ?)", (_NODE_ID_KEY, new_id))
            return new_id

    def next_incarnation(self, above: int = 0) -> int:
        """Durably allocate an incarnation greater than any returned before and than ``above``.

        A node calls this at start (so it gossips a higher incarnation than it ever used) and
        when it refutes a suspicion (``above`` = the incarnation it is refuting), before
        sending the new value.  The first value is 1.
        """
        with self._mutex:
            with _transaction(self._db()) as db:
                row = db.execute("SELECT value FROM kv WHERE key = ?", (_INCARNATION_KEY,)).fetchone()
                current = int(row[0]) if row is not None else 0
                value = max(current, above) + 1
                db.execute("INSERT INTO kv (key, value) VALUES (?, ?) "
                           "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                           (_INCARNATION_KEY, str(value)))
            return value

    def remember_peer(self, node_id: str, host: str, gossip_port: int, seen_wall_ms: int) -> None:
        """Record a peer to rejoin through; each call is one fsync, so batch with remember_peers()."""
        self.remember_peers([PeerRow(node_id, host, gossip_port, seen_wall_ms)])

    def remember_peers(self, rows: Iterable[PeerRow]) -> None:
        """Record several peers in one transaction (one fsync); keeps the newest ``peers_max``."""
        batch = [(r.node_id, r.host, int(r.gossip_port), int(r.seen_wall_ms)) for r in rows]
        for node_id, host, port, _ in batch:
            if not isinstance(node_id, str) or not node_id or not isinstance(host, str) or not host:
                raise ValueError("peer node_id and host must be non-empty str")
            if not 0 < port <= 65535:
                raise ValueError(f"peer gossip_port out of range: {port}")
        if not batch:
            return
        with self._mutex:
            with _transaction(self._db()) as db:
                # An older sighting (from a slow thread or a restored snapshot) never overwrites a newer one.
                db.executemany(
                    "INSERT INTO peers (node_id, host, gossip_port, seen_wall_ms) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(node_id) DO UPDATE SET host = excluded.host, "
                    "gossip_port = excluded.gossip_port, seen_wall_ms = excluded.seen_wall_ms "
                    "WHERE excluded.seen_wall_ms >= peers.seen_wall_ms", batch)
                (count,) = db.execute("SELECT COUNT(*) FROM peers").fetchone()
                if count > self._peers_max:
                    db.execute("DELETE FROM peers WHERE node_id NOT IN (SELECT node_id FROM peers "
                               "ORDER BY seen_wall_ms DESC, node_id LIMIT ?)", (self._peers_max,))

    def forget_peer(self, node_id: str) -> None:
        with self._mutex:
            self._db().execute("DELETE FROM peers WHERE node_id = ?", (node_id,))

    def peers(self) -> list[PeerRow]:
        """Remembered peers, most recently seen first (at most ``peers_max``)."""
        with self._mutex:
            rows = self._db().execute(
                "SELECT node_id, host, gossip_port, seen_wall_ms FROM peers "
                "ORDER BY seen_wall_ms DESC, node_id LIMIT ?", (self._peers_max,)).fetchall()
        return [PeerRow(*row) for row in rows]

    def put_docs(self, rows: Iterable[DocRow]) -> None:
        """Store document versions in one transaction (one fsync); durable when this returns.

        ``rows`` are ``DocRow``s or anything with their fields (a ``messages.DocWire``).  For
        every ``(doc_type, key)`` named, the rows given replace all versions stored before,
        so pass a document's full set of versions (what ``Replica.merge``/``put`` return).
        Versions of a document with equal clocks are stored once (the last given).  Every
        row is checked before anything is written: a bad one raises ``ValueError``.
        """
        # (doc_type, key, clock) -> the row's columns after the id; a dict keeps the order of
        # first sight and the last of equal versions, as schema 1's primary key did.
        batch: dict[tuple[str, str, frozenset[tuple[str, int]]], tuple[Any, ...]] = {}
        docs: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        for r in rows:
            vclock = r.vclock
            if not (type(r.doc_type) is str and r.doc_type and type(r.key) is str and r.key
                    and type(r.origin) is str and type(r.value) is bytes and type(r.deleted) is bool
                    and type(vclock) is dict and type(r.hlc_wall_ms) is int
                    and type(r.hlc_logical) is int):
                raise ValueError(f"not a document version: {r!r:.200}")
            vc = _pack_vclock(vclock)
            batch[(r.doc_type, r.key, frozenset(vclock.items()))] = (
                r.doc_type, r.key, vc, r.value, r.deleted, r.hlc_wall_ms, r.hlc_logical, r.origin)
        for (doc_type, key, _), cols in batch.items():
            versions = docs.get((doc_type, key))
            if versions is None:
                docs[(doc_type, key)] = [cols]
            else:
                versions.append(cols)
        if not docs:
            return
        with self._mutex:
            db = self._db()
            try:
                with _transaction(db):
                    ids = self._docs_index(db)
                    next_id = self._next_doc_id
                    new: list[tuple[str, str, list[int]]] = []
                    old: list[tuple[int]] = []
                    insert = []
                    update = []
                    for (doc_type, key), versions in docs.items():
                        stored = ids.get(doc_type, _EMPTY).get(key)
                        if type(stored) is int:
                            if len(versions) == 1:
                                # One version replacing one (the usual case): rewrite the row
                                # in place, one statement instead of a DELETE and an INSERT.
                                update.append((*versions[0][2:], stored))
                                continue
                            old.append((stored,))
                        elif stored is not None:
                            old.extend((i,) for i in stored)
                        key_ids = list(range(next_id, next_id + len(versions)))
                        new.append((doc_type, key, key_ids))
                        insert.extend((i, *cols) for i, cols in zip(key_ids, versions))
                        next_id += len(versions)
                    if update:
                        db.executemany("UPDATE docs SET vclock = ?, value = ?, deleted = ?, hlc_wall_ms = ?, "
                                       "hlc_logical = ?, origin = ? WHERE id = ?", update)
                    if old:                 # nothing to delete for a new document
                        db.executemany("DELETE FROM docs WHERE id = ?", old)
                    if insert:
                        db.executemany(f"INSERT INTO docs (id, {_DOC_FIELDS}) "
                                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", insert)
            except BaseException:
                self._doc_ids = None        # whatever happened, the table says what is stored
                raise
            for doc_type, key, key_ids in new:
                by_key = ids.get(doc_type)
                if by_key is None:
                    ids[doc_type] = by_key = {}
                by_key[key] = key_ids[0] if len(key_ids) == 1 else tuple(key_ids)
            self._next_doc_id = next_id

    def delete_docs(self, keys: Iterable[tuple[str, str]]) -> None:
        """Remove every version of the documents ``(doc_type, key)``, in one transaction."""
        batch = list(dict.fromkeys((t, k) for t, k in keys))
        if not batch:
            return
        with self._mutex:
            db = self._db()
            try:
                with _transaction(db):
                    ids = self._docs_index(db)
                    old: list[tuple[int]] = []
                    for doc_type, key in batch:
                        stored = ids.get(doc_type, _EMPTY).get(key)
                        if type(stored) is int:
                            old.append((stored,))
                        elif stored is not None:
                            old.extend((i,) for i in stored)
                    db.executemany("DELETE FROM docs WHERE id = ?", old)
            except BaseException:
                self._doc_ids = None
                raise
            for doc_type, key in batch:
                ids.get(doc_type, _EMPTY).pop(key, None)

    def load_docs(self) -> list[DocRow]:
        """Every stored version, ordered by (doc_type, key) and, within a document, by write."""
        with self._mutex:
            rows = self._db().execute(
                "SELECT doc_type, key, value, deleted, vclock, hlc_wall_ms, hlc_logical, origin "
                "FROM docs ORDER BY doc_type, key, id").fetchall()
        out = []
        for doc_type, key, value, deleted, vclock, wall_ms, logical, origin in rows:
            out.append(DocRow(doc_type, key, bytes(value), bool(deleted), _unpack_vclock(vclock), wall_ms,
                              logical, origin))
        return out

    def _docs_index(self, db: sqlite3.Connection) -> dict[str, dict[str, int | tuple[int, ...]]]:
        """The map ``doc_type -> key -> ids``, read from the table if it may be stale.

        Call inside a write transaction, so that nobody changes the table before commit.
        ``data_version`` changes only when *another* connection commits: this store's own
        commits keep the map valid, anyone else's (a second ``Store`` on the dir, a repair
        by hand) makes us read the table again.
        """
        (version,) = db.execute("PRAGMA data_version").fetchone()
        if self._doc_ids is None or version != self._data_version:
            ids: dict[str, dict[str, int | tuple[int, ...]]] = {}
            top = 0
            for row_id, doc_type, key in db.execute("SELECT id, doc_type, key FROM docs ORDER BY id"):
                by_key = ids.get(doc_type)
                if by_key is None:
                    ids[doc_type] = by_key = {}
                stored = by_key.get(key)
                by_key[key] = row_id if stored is None else (
                    (stored, row_id) if type(stored) is int else (*stored, row_id))
                top = row_id
            self._doc_ids, self._next_doc_id, self._data_version = ids, top + 1, version
        return self._doc_ids

    def close(self) -> None:
        """Close the database and release the data dir; idempotent."""
        with self._mutex:
            if self._conn is not None:
                self._conn.close()         # the last connection checkpoints the WAL
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)    # releases the POSIX lock
                self._lock_fd = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"{self._path}: store is closed")
        return self._conn


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT (one fsync), rolled back if anything inside fails."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


_EMPTY: dict[str, Any] = {}


def _pack_vclock(vclock: dict[str, int]) -> bytes:
    """A vector clock as stored (msgpack: ~7x cheaper than JSON, and not part of any key)."""
    for node, counter in vclock.items():
        if type(node) is not str or type(counter) is not int:
            raise ValueError(f"vector clock entries must be str -> int: {vclock!r:.200}")
    try:
        return msgpack.packb(vclock)
    except (ValueError, OverflowError) as e:            # a counter beyond 64 bits
        raise ValueError(f"vector clock does not fit: {e}") from None


def _unpack_vclock(stored: bytes | str) -> dict[str, int] | None:
    """A stored vector clock: msgpack, or JSON text in rows from schema 1; None if garbled
    (the replica then refuses the row and counts it, and the rest loads)."""
    try:
        vc = msgpack.unpackb(stored) if isinstance(stored, bytes) else json.loads(stored)
    except (ValueError, msgpack.UnpackException):
        return None
    return vc if isinstance(vc, dict) else None


def _migrate_docs_1_to_2(conn: sqlite3.Connection) -> None:
    """Schema 1 -> 2: move the docs rows into the write-ordered table, in one transaction.

    Schema 1 keyed the table by ``(doc_type, key, vclock)``; the rows keep every column as
    it was (the vector clocks their JSON text, which ``load_docs`` reads as such).  A crash
    part way leaves schema 1 whole, to be migrated at the next open.
    """
    columns = [row[1] for row in conn.execute("PRAGMA table_info(docs)")]
    if not columns or "id" in columns:
        return                          # a new database, or one migrated already
    with _transaction(conn):
        conn.execute(f"CREATE TABLE docs_v2 {_DOCS_COLUMNS}")
        conn.execute(f"INSERT INTO docs_v2 ({_DOC_FIELDS}) SELECT {_DOC_FIELDS} FROM docs "
                     "ORDER BY doc_type, key, vclock")
        conn.execute("DROP TABLE docs")
        conn.execute("ALTER TABLE docs_v2 RENAME TO docs")
        conn.execute("PRAGMA user_version = 2")


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key or len(key) > KEY_MAX_CHARS:
        raise ValueError(f"key must be a non-empty str of at most {KEY_MAX_CHARS} chars")


def _fsync_dir(path: str) -> None:
    """Make a new directory entry durable (a file's fsync does not cover its name)."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
