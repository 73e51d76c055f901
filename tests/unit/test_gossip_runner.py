"""GossipRunner: real UDP on 127.0.0.1, the real wire codec, the real clock.

Three runners form a mesh through one seed; a graceful stop shows ``left`` on the others,
a silent one (a crash) suspect and then dead; garbage, oversized and foreign datagrams
are dropped and counted without harm.  Every wait polls with a deadline, and every
runner is stopped (its socket closed) whatever happens.
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable

import pytest

from galaxy import wire
from galaxy.clock import SystemClock
from galaxy.config import Config
from galaxy.gossip.membership import Membership, detection_bound_ms
from galaxy.gossip.runner import GossipRunner
from galaxy.messages import ALIVE, DEAD, LEFT, SUSPECT, Beacon, MemberRecord, RaftView

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
CFG = Config.local()


def _record(node_id: str) -> MemberRecord:
    return MemberRecord(
        id=node_id, incarnation=1, heartbeat=0, state=ALIVE, host=HOST, gossip_port=0,
        http_port=0, raft_port=0, role="auto", version="0.1.0", cluster=CFG.cluster,
        started_ms=int(time.time() * 1000))


async def _until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class _Mesh:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.clock = SystemClock()
        self.runners: list[GossipRunner] = []
        self.events: dict[str, list[tuple[str, str, str]]] = {}

    async def add(self, node_id: str, seed: GossipRunner | None = None) -> GossipRunner:
        core = Membership(_record(node_id), CFG, random.Random(node_id), self.clock.now_ms())
        codec = wire.Codec(CFG.cluster, [self.key], node_id)
        self.events[node_id] = []
        runner = GossipRunner(core, codec, self.clock, HOST, 0, on_events=self.events[node_id].extend)
        self.runners.append(runner)
        await runner.start()
        runner.update_self(gossip_port=runner.port)
        if seed is not None:
            runner.discovered(HOST, seed.port)
        return runner

    async def close(self) -> None:
        for r in self.runners:
            await r.stop(leave=False)


@pytest.fixture
async def mesh():
    m = _Mesh(wire.parse_key(wire.generate_key()))
    try:
        yield m
    finally:
        await m.close()


def _states(r: GossipRunner) -> dict[str, str]:
    return {v.record.id: v.state for v in r._core.members()}


async def test_three_runners_form_a_mesh_and_a_graceful_stop_shows_left(mesh: _Mesh) -> None:
    a = await mesh.add("n-a")
    b = await mesh.add("n-b", seed=a)
    c = await mesh.add("n-c", seed=a)
    everyone = {"n-a": ALIVE, "n-b": ALIVE, "n-c": ALIVE}
    await _until(lambda: all(_states(r) == everyone for r in (a, b, c)), 5, "a mesh of three")
    # Every member knows every other one's real address.
    assert {v.record.gossip_port for v in a._core.members()} == {a.port, b.port, c.port}
    assert ("n-b", "", ALIVE) in mesh.events["n-a"]

    await c.stop(leave=True)
    await _until(lambda: all(_states(r).get("n-c") == LEFT for r in (a, b)), 5, "left on the others")
    assert c._transport is not None and c._transport.is_closing()
    assert c._timer is not None and c._timer.done()
    assert a.error is None and b.error is None
    assert a.stats["sent"] > 0 and a.stats["dropped_decode"] == 0


async def test_a_crashed_runner_is_suspect_then_dead_and_updates_spread(mesh: _Mesh) -> None:
    a = await mesh.add("n-a")
    b = await mesh.add("n-b", seed=a)
    c = await mesh.add("n-c", seed=a)
    everyone = {"n-a": ALIVE, "n-b": ALIVE, "n-c": ALIVE}
    await _until(lambda: all(_states(r) == everyone for r in (a, b, c)), 5, "a mesh of three")
    # An update of one record reaches the others within a few gossip rounds.
    start = time.monotonic()
    b.update_self(raft=RaftView(term=5, leader="n-b"))
    await _until(lambda: all(r._core.get("n-b").record.raft.term == 5 for r in (a, c)), 2, "the update")
    assert time.monotonic() - start < 1.0
    # A crash: the socket closes without a word.
    await c.stop(leave=False)
    start = time.monotonic()
    await _until(lambda: all(_states(r).get("n-c") == DEAD for r in (a, b)),
                 detection_bound_ms(CFG, 3) / 1000 + 2, "dead on the others")
    took_s = time.monotonic() - start
    assert took_s < 4, took_s          # ~2.5 s with Config.local() (the bound is looser)
    for r in (a, b):
        assert [(old, new) for node, old, new in mesh.events[r._core.me().id] if node == "n-c"][-2:] == [
            (ALIVE, SUSPECT), (SUSPECT, DEAD)]
    assert a.error is None and b.error is None and _states(a)["n-b"] == ALIVE


async def test_garbage_and_foreign_frames_are_dropped(mesh: _Mesh) -> None:
    a = await mesh.add("n-a")
    b = await mesh.add("n-b", seed=a)
    await _until(lambda: len(a._core.alive_peers()) == 1, 5, "a pair")
    other_key = wire.Codec(CFG.cluster, [wire.parse_key(wire.generate_key())], "n-x")
    ours = wire.Codec(CFG.cluster, [mesh.key], "n-x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"not a frame", (HOST, a.port))
        s.sendto(other_key.encode(Beacon(CFG.cluster, "n-x", HOST, 1), mesh.clock.wall_ms()), (HOST, a.port))
        s.sendto(ours.encode(Beacon(CFG.cluster, "n-x", HOST, 1), mesh.clock.wall_ms()), (HOST, a.port))
        s.sendto(b"GX" + bytes(CFG.frame_max_bytes), (HOST, a.port))      # over frame_max_bytes
    await _until(lambda: a.stats["dropped_decode"] == 3 and a.stats["dropped_type"] == 1, 5,
                 "the four datagrams")
    assert a._codec.stats["malformed"] == 1 and a._codec.stats["unknown_key"] == 1
    assert a._codec.stats["too_large"] == 1
    assert a.error is None and _states(a) == {"n-a": ALIVE, "n-b": ALIVE}


async def test_a_broken_core_stops_the_runner(mesh: _Mesh) -> None:
    fatal: list[BaseException] = []
    a = await mesh.add("n-a")
    a._on_fatal = fatal.append

    def broken(now_ms: int):
        raise AssertionError("invariant")

    a._core.tick = broken  # type: ignore[method-assign]
    a._core.next_deadline_ms = lambda: 0  # type: ignore[method-assign]
    a.update_self(http_port=1)            # wakes the timer, which ticks
    await _until(lambda: a.error is not None, 5, "the runner to stop")
    assert fatal == [a.error] and a._transport.is_closing()
