"""Store: the docs table (replicated document versions) survives reopen and kill -9."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap

import msgpack
import pytest

from galaxy.gossip.replica import Replica, to_wire
from galaxy.messages import DocWire
from galaxy.store import DB_NAME, DocRow, Store, StoreError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T0 = 1_700_000_000_000


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "node")


def row(key: str, vclock: dict[str, int], value: bytes = b"\x01", doc_type: str = "t",
        deleted: bool = False) -> DocRow:
    return DocRow(doc_type, key, value, deleted, vclock, T0, 0, next(iter(vclock)))


def test_put_load_replace_delete(data_dir):
    with Store(data_dir) as s:
        assert s.load_docs() == []
        s.put_docs([row("k1", {"a": 1}), row("k2", {"a": 1}), row("k2", {"b": 1}, b"\x02")])
        s.put_docs([])
        got = s.load_docs()
        assert [(r.key, r.vclock) for r in got] == [("k1", {"a": 1}), ("k2", {"a": 1}), ("k2", {"b": 1})]
        # Naming a key replaces all its versions: the siblings of k2 collapse into one.
        s.put_docs([row("k2", {"a": 1, "b": 2}, b"\x03")])
        s.put_docs([row("k1", {"a": 1}, doc_type="other", deleted=True)])
    with Store(data_dir) as s:
        got = s.load_docs()
        assert [(r.doc_type, r.key, r.vclock, r.value, r.deleted) for r in got] == [
            ("other", "k1", {"a": 1}, b"\x01", True),
            ("t", "k1", {"a": 1}, b"\x01", False),
            ("t", "k2", {"a": 1, "b": 2}, b"\x03", False),
        ]
        s.delete_docs([("t", "k2"), ("t", "missing")])
        s.delete_docs([])
        assert [(r.doc_type, r.key) for r in s.load_docs()] == [("other", "k1"), ("t", "k1")]
        # Other tables are untouched.
        s.put("x", "y")
        assert s.get("x") == "y"


def test_put_docs_takes_wire_versions_and_refuses_garbage(data_dir):
    with Store(data_dir) as s:
        s.put_docs([DocWire("t", "k", b"\xc0", True, {"a": 3}, T0, 2, "a")])
        assert s.load_docs() == [DocRow("t", "k", b"\xc0", True, {"a": 3}, T0, 2, "a")]
        for bad in (row("", {"a": 1}), DocRow("t", "k", "str", False, {"a": 1}, T0, 0, "a"),
                    DocRow("t", "k", b"", 1, {"a": 1}, T0, 0, "a"),
                    DocRow("t", "k", b"", False, [("a", 1)], T0, 0, "a")):
            with pytest.raises(ValueError):
                s.put_docs([row("ok", {"a": 1}), bad])
        assert [r.key for r in s.load_docs()] == ["k"]       # the failed batch wrote nothing


def test_a_corrupt_row_is_refused_by_the_replica_not_the_store(data_dir):
    with Store(data_dir) as s:
        r = Replica("a")
        s.put_docs(to_wire(r.put(T0, "t", f"k{i}", i)) for i in range(3))
        conn = sqlite3.connect(s.path)
        try:
            conn.execute("UPDATE docs SET vclock = 'not json' WHERE key = 'k1'")
            conn.execute("UPDATE docs SET value = x'c1' WHERE key = 'k2'")
            conn.commit()
        finally:
            conn.close()
        fresh = Replica("a")
        assert fresh.restore(T0, s.load_docs()) == 2
        assert [d.key for d in fresh.items("t")] == ["k0"]


def test_replica_state_reported_done_survives_kill_9(data_dir):
    """A replica persists what merge/put/gc return before it 'acks'; kill -9; restore."""
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from galaxy.gossip.replica import Replica, to_wire
        from galaxy.store import Store
        T0 = {T0}
        s = Store({data_dir!r})
        a, b = Replica("a"), Replica("b")
        for i in range(200):
            s.put_docs([to_wire(a.put(T0 + i, "task", "t%d" % i, {{"state": "pending", "i": i}}))])
        # Concurrent versions from another node: siblings are stored as several rows.
        other = [b.put(T0 + 1000, "task", "t%d" % i, {{"state": "running"}}) for i in range(5)]
        s.put_docs(to_wire(d) for d in a.merge(T0 + 1000, other))
        s.put_docs([to_wire(a.delete(T0 + 2000, "task", "t199"))])
        gone = a.gc(T0 + 2000, [])
        s.put_docs(to_wire(d) for d in gone.docs)
        s.delete_docs(gone.removed)
        a.put(T0 + 3000, "task", "never-persisted", 1)     # not stored: must not come back
        sys.stdout.write("%d %d\\n" % (a.conflicts_resolved, a.hlc.last.logical))
        sys.stdout.flush()
        sys.stdin.read()          # hold the store open until killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line.endswith(b"\n"), proc.stderr.read() if proc.poll() is not None else line
        assert line.split()[0] == b"5"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    assert os.path.exists(os.path.join(data_dir, DB_NAME + "-wal"))
    with Store(data_dir) as s:
        a = Replica("a")
        assert a.restore(T0 + 4000, s.load_docs()) == 0
    a._check()
    assert a.conflicts_resolved == 0                       # restoring is not conflict
    assert len(a.versions("task", "t0")) == 2 and a.get("task", "t0").value == {"state": "running"}
    assert a.get("task", "t5").value == {"state": "pending", "i": 5}
    assert a.get("task", "t199") is None and a.winner("task", "t199").deleted   # tombstone kept
    assert a.get("task", "never-persisted") is None
    assert len(a.items("task")) == 199
    # The HLC is restored above every own write, even if the wall clock went back.
    assert a.put(T0, "task", "t0", {"state": "succeeded"}).hlc > a.winner("task", "t199").hlc
    assert a.versions("task", "t0")[0].vc.to_dict() == {"a": 2, "b": 1}


# ---------------------------------------------------------------- schema 2: write-ordered rows

# What the schema-1 code (before the write-ordered layout) created, verbatim, and how it
# encoded a vector clock: a store it wrote must still load after the upgrade.
SCHEMA_1 = """
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
CREATE TABLE IF NOT EXISTS docs (
    doc_type     TEXT NOT NULL,
    key          TEXT NOT NULL,
    vclock       TEXT NOT NULL,      -- JSON object, keys sorted: distinguishes siblings
    value        BLOB NOT NULL,      -- msgpack, exactly as the writer encoded it
    deleted      INTEGER NOT NULL,
    hlc_wall_ms  INTEGER NOT NULL,
    hlc_logical  INTEGER NOT NULL,
    origin       TEXT NOT NULL,
    PRIMARY KEY (doc_type, key, vclock)
) WITHOUT ROWID;
"""


def write_schema_1(data_dir: str, rows: list[DocRow], garbled: tuple[str, str] = ("t", "bad")) -> None:
    """A data dir as the schema-1 code left it (WAL, user_version 1), plus one garbled row."""
    os.makedirs(data_dir, mode=0o700)
    conn = sqlite3.connect(os.path.join(data_dir, DB_NAME), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(SCHEMA_1)
        conn.execute("PRAGMA user_version=1")
        conn.execute("INSERT INTO kv VALUES ('node_id', 'n-1')")
        for r in rows:
            conn.execute("INSERT OR REPLACE INTO docs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (r.doc_type, r.key, json.dumps(r.vclock, sort_keys=True, separators=(",", ":")),
                          r.value, int(r.deleted), r.hlc_wall_ms, r.hlc_logical, r.origin))
        conn.execute("INSERT INTO docs VALUES (?, ?, 'not json', x'c0', 0, 1, 0, 'a')", garbled)
    finally:
        conn.close()


def stored_rows(s: Store) -> list[tuple]:
    """The docs table as it is on disk (what load_docs reads), to catch rows left behind."""
    conn = sqlite3.connect(s.path)
    try:
        return conn.execute("SELECT doc_type, key, value FROM docs ORDER BY doc_type, key, id").fetchall()
    finally:
        conn.close()


def test_a_store_written_by_schema_1_loads_and_is_migrated_once(data_dir):
    r = Replica("a")
    b = Replica("b")
    for i in range(5):
        r.put(T0 + i, "task", f"t{i}", {"i": i})
    r.merge(T0 + 10, [b.put(T0 + 10, "task", "t0", {"i": "b"})])      # t0 gets a sibling
    r.delete(T0 + 20, "task", "t4")                                   # t4: a tombstone
    rows = [DocRow(w.doc_type, w.key, w.value, w.deleted, w.vclock, w.hlc_wall_ms, w.hlc_logical, w.origin)
            for i in range(5) for w in map(to_wire, r.versions("task", f"t{i}"))]
    assert len(rows) == 6
    write_schema_1(data_dir, rows)
    with Store(data_dir) as s:
        assert s.get("node_id") == "n-1"
        got = s.load_docs()
        assert got[0] == DocRow("t", "bad", b"\xc0", False, None, 1, 0, "a")   # garbled: None, as before
        want = {(x.key, json.dumps(x.vclock, sort_keys=True)): x for x in rows}
        assert {(x.key, json.dumps(x.vclock, sort_keys=True)): x for x in got[1:]} == want
        fresh = Replica("a")
        assert fresh.restore(T0 + 30, got) == 1
        assert len(fresh.versions("task", "t0")) == 2 and fresh.winner("task", "t4").deleted
        # Migrated rows are replaced like any other: a JSON-clocked row goes, a msgpack one comes.
        s.put_docs([to_wire(fresh.put(T0 + 40, "task", "t0", {"i": "merged"}))])
        assert [v for k, v in [(x.key, x.value) for x in s.load_docs()] if k == "t0"] == [
            msgpack.packb({"i": "merged"})]
    with Store(data_dir) as s:                  # migrated once: reopening changes nothing
        conn = sqlite3.connect(s.path)
        try:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
            columns = [c[1] for c in conn.execute("PRAGMA table_info(docs)")]
            assert columns[0] == "id"
            assert conn.execute("SELECT COUNT(*) FROM docs WHERE typeof(vclock) = 'text'").fetchone()[0] == 5
        finally:
            conn.close()
        assert len(s.load_docs()) == 6


def test_a_store_of_a_newer_schema_is_refused(data_dir):
    with Store(data_dir) as s:
        path = s.path
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=3")
    conn.close()
    with pytest.raises(StoreError, match="newer Galaxy"):
        Store(data_dir)


def test_replacing_versions_leaves_no_row_behind(data_dir):
    """The rows of a document are exactly its last set: siblings growing and shrinking,
    tombstones coming and going, new documents, equal clocks given twice, deletes."""
    with Store(data_dir) as s:
        s.put_docs([row("k", {"a": 1})])                                     # new
        s.put_docs([row("k", {"a": 1}, b"\x02"), row("k", {"b": 1})])       # grows to siblings
        s.put_docs([row("k", {"a": 2, "b": 1}, b"\x03")])                    # shrinks to one
        s.put_docs([row("k", {"a": 3, "b": 1}, b"", deleted=True)])          # a tombstone
        assert s.load_docs() == [DocRow("t", "k", b"", True, {"a": 3, "b": 1}, T0, 0, "a")]
        live = DocRow("t", "k", b"\x0b", False, {"a": 3, "b": 2}, T0 + 5, 7, "b")
        s.put_docs([live])                      # one version replacing one: every column changes
        assert s.load_docs() == [live]
        s.put_docs([row("k", {"a": 3, "b": 3}, b"\x04"), row("j", {"c": 1})])  # a new key alongside
        assert stored_rows(s) == [("t", "j", b"\x01"), ("t", "k", b"\x04")]
        # Equal clocks in one call are one version: the last given (as the old primary key had it).
        s.put_docs([row("k", {"b": 3, "c": 1}, b"\x05"), row("k", {"c": 1, "b": 3}, b"\x06"),
                    row("k", {"c": 1}, b"\x07")])
        assert stored_rows(s) == [("t", "j", b"\x01"), ("t", "k", b"\x06"), ("t", "k", b"\x07")]
        s.delete_docs([("t", "k"), ("t", "k"), ("t", "nothing")])
        s.put_docs([row("k", {"d": 1}, b"\x08")])
        assert stored_rows(s) == [("t", "j", b"\x01"), ("t", "k", b"\x08")]
    with Store(data_dir) as s:
        s.put_docs([row("k", {"d": 2}, b"\x09"), row("k", {"e": 1}, b"\x0a")])
        assert [(r.key, r.vclock, r.value) for r in s.load_docs()] == [
            ("j", {"c": 1}, b"\x01"), ("k", {"d": 2}, b"\x09"), ("k", {"e": 1}, b"\x0a")]


def test_writes_by_another_connection_are_seen(data_dir):
    """The in-memory map of rows is re-read when someone else changed the table."""
    with Store(data_dir) as s:
        s.put_docs([row("k", {"a": 1}), row("j", {"a": 1})])
        with Store(data_dir) as other:          # same process: allowed (POSIX locks are per process)
            other.put_docs([row("k", {"a": 2}, b"\x02"), row("k", {"b": 1}, b"\x03")])
            other.delete_docs([("t", "j")])
        s.put_docs([row("k", {"a": 2, "b": 2}, b"\x04"), row("j", {"a": 2}, b"\x05")])
        assert stored_rows(s) == [("t", "j", b"\x05"), ("t", "k", b"\x04")]
        conn = sqlite3.connect(s.path)
        conn.execute("DELETE FROM docs WHERE key = 'j'")
        conn.commit()
        conn.close()
        s.put_docs([row("j", {"a": 3}, b"\x06")])
        s.delete_docs([("t", "k")])
        assert stored_rows(s) == [("t", "j", b"\x06")]


def test_a_failed_commit_changes_nothing_and_the_store_recovers(data_dir):
    with Store(data_dir) as s:
        s.put_docs([row("k", {"a": 1}), row("j", {"a": 1})])
        conn = sqlite3.connect(s.path)
        conn.execute("CREATE TRIGGER boom BEFORE INSERT ON docs WHEN NEW.key = 'boom' "
                      "BEGIN SELECT RAISE(ABORT, 'refused'); END")
        conn.commit()
        with pytest.raises(sqlite3.DatabaseError, match="refused"):
            s.put_docs([row("k", {"a": 2}, b"\x02"), row("boom", {"a": 1})])
        assert stored_rows(s) == [("t", "j", b"\x01"), ("t", "k", b"\x01")]
        s.put_docs([row("k", {"a": 3}, b"\x03")])
        assert stored_rows(s) == [("t", "j", b"\x01"), ("t", "k", b"\x03")]
        conn.execute("DROP TRIGGER boom")
        conn.commit()
        conn.close()


def test_bad_vector_clocks_are_refused_before_anything_is_written(data_dir):
    with Store(data_dir) as s:
        s.put_docs([row("k", {"a": 1})])
        for vc in ({1: 1}, {"a": "1"}, {"a": 1.0}, {"a": 2 ** 64}, {"a": True}):
            with pytest.raises(ValueError):
                s.put_docs([row("k", {"a": 2}), DocRow("t", "j", b"", False, vc, T0, 0, "a")])
        assert stored_rows(s) == [("t", "k", b"\x01")]


def test_random_writes_match_a_model_across_reopens(data_dir):
    """put_docs/delete_docs against a dict, with reopens and a second writer mixed in."""
    rnd = random.Random(7)
    model: dict[tuple[str, str], dict[str, DocRow]] = {}
    counter = 0
    s = Store(data_dir)
    try:
        for step in range(300):
            op = rnd.random()
            if op < 0.05:
                s.close()
                s = Store(data_dir)
                continue
            keys = [("t" if rnd.random() < 0.8 else "u", f"k{rnd.randrange(12)}")
                    for _ in range(rnd.randrange(1, 5))]
            if op < 0.15:
                s.delete_docs(keys)
                for k in keys:
                    model.pop(k, None)
                continue
            writer = s
            if op < 0.2:
                writer = Store(data_dir)
            rows = []
            for doc_type, key in dict.fromkeys(keys):
                versions = {}
                for _ in range(rnd.choice((1, 1, 1, 2, 3))):
                    counter += 1
                    vc = {rnd.choice("abc"): counter}
                    versions[json.dumps(vc)] = DocRow(doc_type, key, counter.to_bytes(4, "big"),
                                                      rnd.random() < 0.2, vc, T0 + counter, 0, "a")
                rows += versions.values()
                model[(doc_type, key)] = versions
            writer.put_docs(rows)
            if writer is not s:
                writer.close()
            want = sorted((r.doc_type, r.key, r.value) for vs in model.values() for r in vs.values())
            assert sorted((r.doc_type, r.key, r.value) for r in s.load_docs()) == want, step
    finally:
        s.close()
    with Store(data_dir) as s:
        assert sorted((r.doc_type, r.key, r.value, r.deleted, json.dumps(r.vclock)) for r in s.load_docs()) == \
            sorted((r.doc_type, r.key, r.value, r.deleted, json.dumps(r.vclock))
                   for vs in model.values() for r in vs.values())
