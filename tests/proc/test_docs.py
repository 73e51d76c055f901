"""Replicated documents through /v1/kv on real processes: spread, survive kill -9, catch up."""

from __future__ import annotations

import json
import time

import pytest

from tests.cluster import Cluster


def put(p, key: str, value) -> dict:
    status, doc = p.call("PUT", "/v1/kv/" + key, value, timeout_s=5)
    assert status == 200, (status, doc)
    return doc


def value_on(p, key: str):
    doc = p.try_get("/v1/kv/" + key)
    return doc["value"] if doc else None


@pytest.fixture
def mesh():
    with Cluster() as c:
        a = c.add("a")
        for n in "bcd":
            c.add(n, join=[a.gossip_addr])
        for n in "abcd":
            c.start(n)
        c.wait_leader(timeout_s=30)
        c.wait(lambda: all(len(c.members_view(p)) == 4 for p in c.running()) or None, 20, "4 members everywhere")
        yield c


def test_a_document_written_anywhere_reaches_every_node_and_survives_kill9(mesh):
    a, b, c, d = (mesh.procs[n] for n in "abcd")
    t0 = time.monotonic()
    written = put(b, "cfg/alpha", {"x": 1, "tags": ["a", "b"]})
    assert written["value"] == {"x": 1, "tags": ["a", "b"]} and written["origin"] == "b"
    mesh.wait(lambda: all(value_on(p, "cfg/alpha") == {"x": 1, "tags": ["a", "b"]} for p in (a, c, d)) or None,
              10, "the document on every node")
    assert time.monotonic() - t0 < 10
    listed = a.get("/v1/kv?prefix=cfg/")["items"]
    assert [i["key"] for i in listed] == ["cfg/alpha"]

    # kill -9 a node, write while it is down, restart it: it serves what it had plus what it missed
    mesh.kill9("d")
    put(a, "cfg/beta", 2)
    mesh.start("d")
    mesh.wait(lambda: value_on(d, "cfg/alpha") == {"x": 1, "tags": ["a", "b"]} and value_on(d, "cfg/beta") == 2
              or None, 20, "the restarted node has both documents")


def test_concurrent_writes_resolve_the_same_everywhere_and_deletes_spread(mesh):
    procs = [mesh.procs[n] for n in "abcd"]
    for i, p in enumerate(procs):
        put(p, "race", i)          # four writers, concurrently as far as the clocks know
    mesh.wait(lambda: len({json.dumps(value_on(p, "race")) for p in procs}) == 1 and value_on(procs[0], "race")
              is not None or None, 15, "one value everywhere")
    assert procs[1].call("DELETE", "/v1/kv/race", timeout_s=5)[0] == 200
    mesh.wait(lambda: all(p.try_get("/v1/kv/race") is None for p in procs) or None, 15, "deleted everywhere")
