"""DocsRunner's group commit: one transaction per loop turn, and nothing leaves uncommitted."""

from __future__ import annotations

import asyncio
import random
import threading
import time

from galaxy import wire
from galaxy.clock import SystemClock
from galaxy.config import Config
from galaxy.gossip.docs import DocGossip, Peer
from galaxy.gossip.docs_runner import DocsRunner
from galaxy.gossip.replica import Replica, to_wire
from galaxy.messages import DocAck, DocPut, DocUpdate
from galaxy.store import Store


class Recorder:
    """A real store, whose commits are counted, and a send that checks what it carries is on disk."""

    def __init__(self, path: str) -> None:
        self.store = Store(path)
        self.commits = 0
        self.sent: list = []
        real = self.store.put_docs

        def put_docs(rows):
            self.commits += 1
            real(rows)
        self.store.put_docs = put_docs

    def send(self, host: str, port: int, msg) -> None:
        on_disk = {(r.doc_type, r.key) for r in self.store.load_docs()}
        for d in getattr(msg, "docs", ()):
            assert (d.doc_type, d.key) in on_disk, f"{d.key} left the node before it was committed"
        self.sent.append((host, port, msg, len(on_disk)))


def runner(rec: Recorder, peers: list[Peer]) -> DocsRunner:
    cfg = Config.sim()
    key = wire.parse_key(wire.generate_key())
    codec = wire.Codec("galaxy", [key], "me")
    clock = SystemClock()
    return DocsRunner(replica=Replica("me"), core=DocGossip("me", cfg, random.Random(1), clock.now_ms()),
                      store=rec.store, udp_codec=codec, tcp_codec=codec, clock=clock, send_udp=rec.send,
                      live_peers=lambda: peers, cluster="galaxy", frame_max_bytes=cfg.frame_max_bytes)


async def test_writes_of_one_turn_share_one_commit_and_rumours_leave_after_it(tmp_path):
    rec = Recorder(str(tmp_path))
    d = runner(rec, [Peer("a", "127.0.0.1", 9)])
    await d.start("127.0.0.1", 0)
    try:
        before = rec.commits
        for i in range(50):
            d.put("kv", f"k{i}", i, durable=False)
        d.put("kv", "k0", "again", durable=False)          # the newer set of k0 replaces the older
        assert rec.commits == before                          # nothing yet: same turn
        await asyncio.sleep(0.05)
        assert rec.commits == before + 1
        rows = {(r.key): r for r in rec.store.load_docs()}
        assert len(rows) == 50 and Replica("x").merge(0, [rows["k0"]])[0].value == "again"
        d.put("kv", "now", 1)                                 # durable: committed on return
        assert rec.commits == before + 2
    finally:
        await d.stop()
        rec.store.close()


async def test_an_ack_goes_out_only_after_the_commit_of_what_it_acknowledges(tmp_path):
    rec = Recorder(str(tmp_path))
    d = runner(rec, [])
    await d.start("127.0.0.1", 0)
    try:
        other = Replica("peer")
        versions = [to_wire(other.put(1, "task", f"t{i}", {"i": i})) for i in range(5)]
        for i, v in enumerate(versions):
            d.on_put("peer", ("127.0.0.1", 9), DocPut(req_id=i, docs=(v,)))
        assert rec.sent == []                                 # acks wait for the commit
        await asyncio.sleep(0.05)
        acks = [m for _, _, m, _ in rec.sent if isinstance(m, DocAck)]
        assert sorted(a.req_id for a in acks) == list(range(5))
        assert all(n == 5 for _, _, m, n in rec.sent if isinstance(m, DocAck))   # all five on disk first
        assert rec.commits == 1
        d.on_update("peer", DocUpdate(docs=(to_wire(other.put(2, "task", "t9", 9)),)))
        await asyncio.sleep(0.05)
        assert len(rec.store.load_docs()) == 6
    finally:
        await d.stop()
        rec.store.close()


class GatedRecorder(Recorder):
    """Each commit blocks (on the writer thread) until the test lets it through."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = threading.Semaphore(0)
        self.begun = 0
        inner = self.store.put_docs

        def put_docs(rows):
            self.begun += 1
            assert self.gate.acquire(timeout=10), "a commit was never let through"
            inner(rows)
        self.store.put_docs = put_docs
        self.acks_for: dict[int, str] = {}      # req_id -> key it acknowledges

    def send(self, host: str, port: int, msg) -> None:
        if isinstance(msg, DocAck):
            on_disk = {r.key for r in self.store.load_docs()}
            assert self.acks_for[msg.req_id] in on_disk, f"ack {msg.req_id} left before its commit"
        super().send(host, port, msg)


async def until(cond, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.002)


async def test_the_loop_runs_during_a_commit_and_acks_and_rumours_wait_for_the_commit_holding_them(tmp_path):
    rec = GatedRecorder(str(tmp_path))
    d = runner(rec, [Peer("a", "127.0.0.1", 9)])
    await d.start("127.0.0.1", 0)
    try:
        other = Replica("peer")
        d.put("kv", "first", 1, durable=False)
        await until(lambda: rec.begun == 1)            # commit 1 (holding "first") is on the writer thread
        ticks = 0
        for _ in range(5):                              # ... and the loop goes on meanwhile
            await asyncio.sleep(0)
            ticks += 1
        assert ticks == 5 and rec.commits == 0
        # a DocPut arrives while commit 1 is in flight: merged now, committed by commit 2
        rec.acks_for[1] = "second"
        d.on_put("peer", ("127.0.0.1", 9), DocPut(req_id=1, docs=(to_wire(other.put(1, "kv", "second", 2)),)))
        for i in range(20):                             # more writes batch behind the commit in flight
            d.put("kv", f"more{i}", i, durable=False)
        d._send("127.0.0.1", 9, DocUpdate(docs=tuple(to_wire(v) for v in d.replica.versions("kv", "more3"))))
        await asyncio.sleep(0.01)
        assert rec.begun == 1 and not rec.sent         # nothing left: all of it waits for a commit

        def held_by_commit_2() -> list:
            return [m for _, _, m, _ in rec.sent if isinstance(m, DocAck)
                    or any(v.key != "first" for v in getattr(m, "docs", ()))]
        rec.gate.release()                             # commit 1 completes; commit 2 starts at once
        await until(lambda: rec.commits == 1 and rec.begun == 2)
        assert not held_by_commit_2()                  # the ack and the rumours of commit 2's keys wait
        rec.gate.release()
        await until(lambda: rec.commits == 2 and any(isinstance(m, DocAck) for m in held_by_commit_2()))
        assert any(isinstance(m, DocUpdate) and m.docs[0].key == "more3" for m in held_by_commit_2())
        assert len(rec.store.load_docs()) == 22
        # a version already committed leaves at once, even while another commit is in flight
        d.put("kv", "third", 3, durable=False)
        await until(lambda: rec.begun == 3)
        n = len(rec.sent)
        d._send("127.0.0.1", 9, DocUpdate(docs=tuple(to_wire(v) for v in d.replica.versions("kv", "first"))))
        assert len(rec.sent) == n + 1
        # a durable put waits for the commit in flight, then commits itself before returning
        threading.Timer(0.05, rec.gate.release).start()
        threading.Timer(0.1, rec.gate.release).start()
        d.put("kv", "durable", 4)
        assert {"third", "durable"} <= {r.key for r in rec.store.load_docs()} and rec.commits == 4
    finally:
        for _ in range(4):
            rec.gate.release()
        await d.stop()
        rec.store.close()


async def test_a_failed_commit_stops_the_node_and_releases_nothing(tmp_path):
    rec = Recorder(str(tmp_path))
    fatal: list = []
    d = runner(rec, [])
    d._on_fatal = fatal.append

    def broken(rows):
        raise OSError("disk gone")
    rec.store.put_docs = broken
    await d.start("127.0.0.1", 0)
    try:
        other = Replica("peer")
        d.on_put("peer", ("127.0.0.1", 9), DocPut(req_id=1, docs=(to_wire(other.put(1, "kv", "k", 1)),)))
        await until(lambda: fatal)
        await asyncio.sleep(0.02)
        assert isinstance(fatal[0], OSError) and not rec.sent      # the ack never left
    finally:
        rec.store.put_docs = lambda rows: None
        await d.stop()
        rec.store.close()


async def test_a_push_is_answered_with_the_versions_held_and_the_answer_stops_the_resends(tmp_path):
    from galaxy.messages import DocHave
    rec = Recorder(str(tmp_path))
    d = runner(rec, [Peer("a", "127.0.0.1", 9)])
    await d.start("127.0.0.1", 0)
    try:
        other = Replica("a")
        got = [to_wire(other.put(1_000, "kv", f"k{i}", i)) for i in range(3)]
        assert d.on_update("a", DocUpdate(docs=tuple(got)), ("127.0.0.1", 9))
        await until(lambda: any(isinstance(m, DocHave) for _, _, m, _ in rec.sent))     # the answer
        haves = [m for _, _, m, _ in rec.sent if isinstance(m, DocHave)]
        assert len(haves) == 1                                  # one per sender, gathered, after the commit
        assert {haves[0].vids[i:i + 16] for i in range(0, 48, 16)} == \
            {v.vid for k in ("k0", "k1", "k2") for v in d.replica.versions("kv", k)}

        def pushes_of(key: str) -> int:
            return sum(1 for _, _, m, _ in rec.sent if isinstance(m, DocUpdate) and any(w.key == key for w in m.docs))
        # our own write: pushed at once, then by each round until "a" answers
        mine = d.put("kv", "mine", 1)
        await until(lambda: pushes_of("mine") >= 2)           # the eager push and a round
        d.on_have("a", DocHave(vids=mine.vid[:15]))            # malformed: counted, changes nothing
        assert d.stats["updates_bad"] == 1
        d.on_have("a", DocHave(vids=mine.vid))
        n = pushes_of("mine")
        await until(lambda: d.pending == 0)                    # dropped: every peer holds it
        assert pushes_of("mine") == n                          # no round sent it again
    finally:
        await d.stop()
