"""Store: the docs table (replicated document versions) survives reopen and kill -9."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from galaxy.gossip.replica import Replica, to_wire
from galaxy.messages import DocWire
from galaxy.store import DB_NAME, DocRow, Store

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
