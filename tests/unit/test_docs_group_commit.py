"""DocsRunner's group commit: one transaction per loop turn, and nothing leaves uncommitted."""

from __future__ import annotations

import asyncio
import random

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
