"""Store: durability across reopen and kill -9, private permissions, counters, bounded peers."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading

import pytest

from galaxy.store import DB_NAME, PeerRow, Store, StoreError, StoreLocked

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "node")


def test_put_get_delete_survive_reopen(data_dir):
    with Store(data_dir) as s:
        assert s.get("a") is None
        s.put("a", "1")
        s.put("b", "2")
        s.put("a", "3")
        s.delete("b")
        s.delete("missing")
        assert s.path == os.path.join(data_dir, DB_NAME)
    with Store(data_dir) as s:
        assert s.get("a") == "3"
        assert s.get("b") is None


def test_wal_and_full_sync(data_dir):
    with Store(data_dir) as s:
        s.put("k", "v")
        conn = sqlite3.connect(s.path)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()
        # synchronous is per connection: ask the store's own connection.
        assert s._db().execute("PRAGMA synchronous").fetchone()[0] == 2   # FULL


def test_value_reported_done_survives_kill_9(data_dir):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        from galaxy.store import Store
        s = Store({data_dir!r})
        for i in range(50):
            s.put("k%d" % i, "v%d" % i)
        s.next_incarnation()
        sys.stdout.write("done\\n")
        sys.stdout.flush()
        sys.stdin.read()          # hold the store open until killed
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        line = proc.stdout.readline()
        assert line == b"done\n", proc.stderr.read() if proc.poll() is not None else line
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            f.close()
    # The WAL was never checkpointed by a clean close; reopening must replay it.
    assert os.path.exists(os.path.join(data_dir, DB_NAME + "-wal"))
    with Store(data_dir) as s:
        assert [s.get(f"k{i}") for i in range(50)] == [f"v{i}" for i in range(50)]
        assert s.next_incarnation() == 2


def test_permissions_private_even_with_umask_0(tmp_path):
    data_dir = str(tmp_path / "deep" / "node")
    old = os.umask(0)
    try:
        with Store(data_dir) as s:
            s.put("k", "v")
            names = [n for n in os.listdir(data_dir)]
            assert DB_NAME in names and DB_NAME + "-wal" in names
            for name in names:
                mode = stat.S_IMODE(os.stat(os.path.join(data_dir, name)).st_mode)
                assert mode == 0o600, (name, oct(mode))
        assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    finally:
        os.umask(old)


def test_existing_loose_db_file_is_tightened(data_dir):
    os.makedirs(data_dir)
    path = os.path.join(data_dir, DB_NAME)
    with open(path, "wb"):
        pass
    os.chmod(path, 0o644)
    with Store(data_dir):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_node_id_generated_once(data_dir):
    calls = []

    def gen() -> str:
        calls.append(1)
        return f"n-{len(calls)}"

    with Store(data_dir) as s:
        assert s.node_id(gen) == "n-1"
        assert s.node_id(gen) == "n-1"
    with Store(data_dir) as s:
        assert s.node_id(gen) == "n-1"
    assert len(calls) == 1


def test_incarnation_strictly_increases_across_reopen(data_dir):
    seen = []
    for _ in range(3):
        with Store(data_dir) as s:
            seen.append(s.next_incarnation())
            seen.append(s.next_incarnation())
    assert seen == sorted(set(seen)) and seen[0] == 1
    with Store(data_dir) as s:
        # Refuting a suspicion at incarnation 100 must go above it, and stay above after restart.
        assert s.next_incarnation(above=100) == 101
        assert s.next_incarnation(above=5) == 102
    with Store(data_dir) as s:
        assert s.next_incarnation() == 103


def test_incarnation_is_unique_across_threads(data_dir):
    got: list[int] = []
    lock = threading.Lock()
    with Store(data_dir) as s:
        def work() -> None:
            for _ in range(20):
                n = s.next_incarnation()
                with lock:
                    got.append(n)
        threads = [threading.Thread(target=work) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert sorted(got) == list(range(1, 61))


def test_peers_bounded_and_most_recent_first(data_dir):
    with Store(data_dir, peers_max=5) as s:
        s.remember_peers(PeerRow(f"n{i}", f"10.77.0.{i}", 7946, 1000 + i) for i in range(8))
        s.remember_peer("n9", "10.77.0.9", 7000, 2000)
        rows = s.peers()
        assert [r.node_id for r in rows] == ["n9", "n7", "n6", "n5", "n4"]
        assert rows[0] == PeerRow("n9", "10.77.0.9", 7000, 2000)
        # An older sighting does not overwrite a newer one; a newer one moves the peer.
        s.remember_peer("n9", "10.77.0.99", 7001, 1500)
        s.remember_peer("n4", "10.77.0.44", 7946, 3000)
        rows = s.peers()
        assert rows[0] == PeerRow("n4", "10.77.0.44", 7946, 3000)
        assert PeerRow("n9", "10.77.0.9", 7000, 2000) in rows
        s.forget_peer("n4")
        assert len(s.peers()) == 4
    with Store(data_dir, peers_max=5) as s:
        assert len(s.peers()) == 4


def test_default_peers_max_is_1024(data_dir):
    with Store(data_dir) as s:
        s.remember_peers(PeerRow(f"n{i}", "127.0.0.1", 1 + i % 60000, i) for i in range(1100))
        rows = s.peers()
        assert len(rows) == 1024
        assert rows[0].seen_wall_ms == 1099 and rows[-1].seen_wall_ms == 1100 - 1024


def test_second_process_is_refused(data_dir):
    with Store(data_dir):
        script = f"import sys; sys.path.insert(0, {REPO!r}); from galaxy.store import Store; Store({data_dir!r})"
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
        assert proc.returncode != 0
        assert StoreLocked.__name__.encode() in proc.stderr and b"in use by another process" in proc.stderr
    # Released on close: another process may now open it.
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_closed_store_and_bad_inputs(data_dir):
    s = Store(data_dir)
    with pytest.raises(ValueError):
        s.put("", "v")
    with pytest.raises(ValueError):
        s.put("k", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        s.remember_peer("n", "h", 0, 1)
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.get("k")


def test_garbage_file_is_a_clear_error(data_dir):
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, DB_NAME), "wb") as f:
        f.write(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="galaxy.db"):
        Store(data_dir)


def test_data_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        Store(str(path))
