"""The task routes over a real single-node task service (real replica, store, executor), in process.

A one-member mesh: this node is the coordinator (term 1) and the only worker, so a
submission is placed and run here, with real subprocesses, in milliseconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import hashlib
import io
import json
import random
import tarfile
import time
import types
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from galaxy import wire
from galaxy.api.app import make_app
from galaxy.clock import SystemClock
from galaxy.config import Config
from galaxy.executor import Executor
from galaxy.gossip.docs import DocGossip
from galaxy.gossip.docs_runner import DocsRunner, NotReplicated
from galaxy.gossip.replica import Replica, to_wire
from galaxy.messages import DocUpdate
from galaxy.store import Store
from galaxy.tasks.blobs import Blobs
from galaxy.tasks import core as tc
from galaxy.tasks.core import TASK_STATES, TASK_TYPE
from galaxy.tasks import runner
from galaxy.tasks.runner import TASK_RESOLVER, MemberInfo, TaskService
from tests.unit.ledger_fake import FakeLedger

ME = "n-solo"


class SoloNode:
    """Just what the HTTP layer reads of a node, around a real TaskService."""

    def __init__(self, data_dir: str) -> None:
        self.cfg = Config(data_dir=data_dir, cpu=2.0, memory_mb=1024, scheduler_settle_ms=1)
        self.node_id = ME
        clock = SystemClock()
        key = wire.parse_key(wire.generate_key())
        codec = wire.Codec("galaxy", [key], ME)
        self.store = Store(data_dir)
        replica = Replica(ME, {TASK_TYPE: TASK_RESOLVER})
        self.gossip = DocGossip(ME, self.cfg, random.Random(1), clock.now_ms())
        docs = DocsRunner(replica=replica, core=self.gossip,
                          store=self.store, udp_codec=codec, tcp_codec=codec, clock=clock,
                          send_udp=lambda *a: None, live_peers=lambda: [], cluster="galaxy",
                          frame_max_bytes=self.cfg.frame_max_bytes)
        self.docs = docs
        self.failures: list[BaseException] = []
        self.tasks = TaskService(
            cfg=self.cfg, node_id=ME, clock=clock, docs=docs, executor=Executor(f"{data_dir}/tasks", clock=clock),
            blobs=Blobs(f"{data_dir}/blobs", 1 << 20), store=self.store, members=self._members,
            lease_term=lambda: self.lease, known_term=lambda: self.known, on_fatal=self.failures.append,
            on_drained=lambda: None, coordinator_id=lambda: self.coordinator)
        self.coordinator: str | None = ME
        self.lease: int | None = 1        # this node holds the coordinator's lease in term 1
        self.known = 1
        self.ledger = FakeLedger()        # accounts and tokens: every change needs a bearer token

    def client(self, **kw: Any) -> TestClient:
        """A test client that signs every request as the admin (unless a test sends its own header)."""
        return TestClient(TestServer(make_app(self)), headers=self.ledger.bearer("admin"), **kw)

    def _members(self) -> list[MemberInfo]:
        return [MemberInfo(id=ME, state="alive", role="auto", http="http://127.0.0.1:1", cpu=2.0, memory_mb=1024,
                           gpu=0)]

    def members(self) -> list[dict]:
        return [{"id": ME, "state": "alive", "http": "http://127.0.0.1:1"}]

    def leader(self) -> dict:
        return {"leader": self.coordinator, "term": self.known, "http": "http://127.0.0.1:1"}

    def status(self) -> dict:
        return {"tasks": self.tasks.counts()}


@pytest.fixture
async def solo(tmp_path) -> Any:
    node = SoloNode(str(tmp_path))
    await node.docs.start("127.0.0.1", 0)
    await node.tasks.start()
    async with node.client() as client:
        yield node, client
    await node.tasks.stop()
    await node.docs.stop()
    node.store.close()
    assert not node.failures


async def until(cond, timeout_s: float = 20.0) -> Any:
    async with asyncio.timeout(timeout_s):
        while not (got := await cond()):
            await asyncio.sleep(0.02)
        return got


async def finished(client, task_id: str) -> dict:
    async def done():
        t = await (await client.get(f"/v1/tasks/{task_id}")).json()
        return t if t["state"] in ("succeeded", "failed", "timed_out", "cancelled") else None
    return await until(done)


async def test_submit_runs_here_and_reports_result_logs_and_progress(solo):
    node, client = solo
    cmd = "echo GALAXY_PROGRESS 40; echo hello; echo oops >&2; exit 0"
    r = await client.post("/v1/tasks", json={"command": cmd, "resources": {"cpu": 1, "memory_mb": 64}})
    assert r.status == 202
    body = await r.json()
    assert body["state"] == "pending" and body["acknowledged_by"] is None    # alone: nobody to ack
    t = await finished(client, body["id"])
    assert t["state"] == "succeeded" and t["exit_code"] == 0 and t["progress"] == 100 and t["node"] == ME
    assert t["attempts"][0]["node"] == ME and t["attempts"][0]["term"] == 1
    logs = await client.get(f"/v1/tasks/{body['id']}/logs")
    assert await logs.text() == "GALAXY_PROGRESS 40\nhello\n"
    assert await (await client.get(f"/v1/tasks/{body['id']}/logs?stream=stderr")).text() == "oops\n"
    listed = await (await client.get("/v1/tasks?state=succeeded")).json()
    assert [x["id"] for x in listed["tasks"]] == [body["id"]] and listed["counts"]["succeeded"] == 1


async def test_paging_and_filters(solo):
    node, client = solo
    node.ledger.add_account("alice")
    node.ledger.add_account("bob")
    ids = []
    for i in range(5):
        r = await client.post("/v1/tasks", json={"command": ["true"], "owner": "alice" if i % 2 else "bob",
                                                 "resources": {"cpu": 0.1, "memory_mb": 64}})
        ids.append((await r.json())["id"])
    for task_id in ids:
        await finished(client, task_id)
    page = await (await client.get("/v1/tasks?limit=2")).json()
    assert len(page["tasks"]) == 2 and page["next"] == page["tasks"][-1]["id"]
    rest = await (await client.get(f"/v1/tasks?limit=10&after={page['next']}")).json()
    assert len(rest["tasks"]) == 3 and rest["next"] is None
    assert {t["id"] for t in page["tasks"] + rest["tasks"]} == set(ids)
    alice = await (await client.get("/v1/tasks?owner=alice")).json()
    assert {t["owner"] for t in alice["tasks"]} == {"alice"} and len(alice["tasks"]) == 2
    assert (await client.get("/v1/tasks?state=bogus")).status == 400
    assert (await client.get("/v1/tasks?limit=0")).status == 400
    assert (await client.get("/v1/tasks?colour=red")).status == 400


async def test_follow_streams_until_the_task_ends_and_cancel_stops_it(solo):
    node, client = solo
    r = await client.post("/v1/tasks", json={"command": "for i in 1 2 3; do echo line $i; sleep 0.2; done",
                                             "resources": {"cpu": 0.1, "memory_mb": 64}})
    task_id = (await r.json())["id"]
    followed = await client.get(f"/v1/tasks/{task_id}/logs?follow=1")
    assert await followed.text() == "line 1\nline 2\nline 3\n"
    r = await client.post("/v1/tasks", json={"command": ["sleep", "30"], "resources": {"cpu": 0.1, "memory_mb": 64}})
    long_id = (await r.json())["id"]
    await until(lambda: _state_is(client, long_id, "running"))
    assert (await client.post(f"/v1/tasks/{long_id}/cancel")).status == 202
    t = await finished(client, long_id)
    assert t["state"] == "cancelled"
    again = await client.post(f"/v1/tasks/{long_id}/cancel")
    assert again.status == 409 and (await again.json())["error"] == "conflict"


async def _state_is(client, task_id: str, state: str) -> bool:
    return (await (await client.get(f"/v1/tasks/{task_id}")).json())["state"] == state


async def test_the_logs_of_an_attempt_whose_output_went_past_the_cap_say_so(solo):
    node, client = solo
    node.tasks.cfg = dataclasses.replace(node.tasks.cfg, task_output_bytes_max=1024)
    ids = []
    for n in (5000, 10):
        r = await client.post("/v1/tasks", json={"command": f"head -c {n} /dev/zero | tr '\\0' x",
                                                 "resources": {"cpu": 0.1, "memory_mb": 64}})
        ids.append((await r.json())["id"])
    for task_id in ids:
        assert (await finished(client, task_id))["state"] == "succeeded"
    big = await client.get(f"/v1/tasks/{ids[0]}/logs")      # the first 1024 bytes, and the last 256
    marker = b"\n[galaxy: %d bytes of output dropped here]\n" % (5000 - 1024 - 256)
    assert await big.read() == b"x" * 1024 + marker + b"x" * 256
    assert big.headers[tc.TRUNCATED_HEADER] == str(1024 + len(marker) + 256)
    small = await client.get(f"/v1/tasks/{ids[1]}/logs")
    assert await small.read() == b"x" * 10 and tc.TRUNCATED_HEADER not in small.headers
    other = await client.get(f"/v1/tasks/{ids[0]}/logs?stream=stderr")     # not the stream that was cut
    assert await other.read() == b"" and tc.TRUNCATED_HEADER not in other.headers
    # both streams cut, by different amounts: each says so; a stream past the cap by less than
    # the end it keeps lost nothing
    r = await client.post("/v1/tasks", json={"command": "head -c 5000 /dev/zero; head -c 3000 /dev/zero >&2",
                                             "resources": {"cpu": 0.1, "memory_mb": 64}})
    both = (await r.json())["id"]
    r = await client.post("/v1/tasks", json={"command": "head -c 1200 /dev/zero",
                                             "resources": {"cpu": 0.1, "memory_mb": 64}})
    whole = (await r.json())["id"]
    for task_id in (both, whole):
        assert (await finished(client, task_id))["state"] == "succeeded"
    for stream in ("stdout", "stderr"):
        got = await client.get(f"/v1/tasks/{both}/logs?stream={stream}")
        assert b"bytes of output dropped here" in await got.read() and tc.TRUNCATED_HEADER in got.headers
    got = await client.get(f"/v1/tasks/{whole}/logs")
    assert await got.read() == b"\0" * 1200 and tc.TRUNCATED_HEADER not in got.headers


def tar_of(name: str, data: bytes) -> bytes:
    """A .tar.gz holding one file: an input archive to upload."""
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return archive.getvalue()


async def test_blobs_are_content_addressed(solo):
    node, client = solo
    data = tar_of("data.txt", b"abc")
    r = await client.post("/v1/blobs", data=data)
    assert r.status == 201
    sha = (await r.json())["sha256"]
    assert sha == hashlib.sha256(data).hexdigest()
    assert await (await client.get(f"/v1/blobs/{sha}")).read() == data
    for junk in (b"", b"abc"):                  # refused at once, and not kept
        r = await client.post("/v1/blobs", data=junk)
        assert r.status == 400 and "not a .tar" in (await r.json())["message"]
        assert not node.tasks.blobs.has(hashlib.sha256(junk).hexdigest())
    for name, words in (("../escape.txt", "member '../escape.txt' escapes the work dir"),
                        ("/etc/x", "member '/etc/x' escapes the work dir")):
        evil = tar_of(name, b"x")        # refused at upload, not by every attempt of every task naming it
        r = await client.post("/v1/blobs", data=evil)
        assert r.status == 400 and (await r.json())["message"] == f"input archive: {words} (absolute or '..')"
        assert not node.tasks.blobs.has(hashlib.sha256(evil).hexdigest())
    assert (await client.get("/v1/blobs/" + "0" * 64)).status == 404
    assert (await client.get("/v1/blobs/xyz")).status == 400
    big = await client.post("/v1/blobs", data=b"x" * ((1 << 20) + 1))
    assert big.status == 413


# text as JSON can carry it: lone surrogates too ("\ud800"; what a non-UTF-8 argument becomes)
texts = st.text(max_size=20) | st.sampled_from(["\ud800", "caf\udce9", "a\udfffb"])
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=12)
spec_like = st.fixed_dictionaries({"command": st.one_of(st.lists(texts, max_size=3), texts, json_values)},
                                  optional={k: json_values for k in ("env", "resources", "timeout_s", "max_retries",
                                                                     "priority", "constraints", "price", "input",
                                                                     "name", "owner", "extra")})


def test_fuzz_task_routes_answer_json_and_never_5xx(tmp_path):
    loop = asyncio.new_event_loop()
    node = SoloNode(str(tmp_path))
    client = node.client(loop=loop)
    loop.run_until_complete(node.docs.start("127.0.0.1", 0))
    loop.run_until_complete(client.start_server())

    async def one(method: str, path: str, body: bytes) -> None:
        resp = await client.request(method, path, data=body or None)
        raw = await resp.read()
        assert resp.status < 500, (method, path, body[:200], resp.status, raw[:300])
        if resp.content_type == "application/json":
            answer = json.loads(raw)
            if resp.status >= 400:
                assert set(answer) == {"error", "message"}

    paths = st.sampled_from(["/v1/tasks", "/v1/tasks/t-0123456789abcdef", "/v1/tasks/x/logs",
                             "/v1/tasks/t-0123456789abcdef/cancel", "/v1/tasks/t-0123456789abcdef/logs?follow=2",
                             "/v1/blobs", "/v1/nodes/n-solo/drain", "/v1/nodes/zzz/drain",
                             "/v1/tasks?limit=abc", "/v1/tasks?after=t-1"])
    bodies = st.one_of(spec_like.map(lambda d: json.dumps(d).encode()), st.binary(max_size=64),
                       json_values.map(lambda v: json.dumps(v).encode()))

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=st.sampled_from(["GET", "POST"]), path=paths, body=bodies)
    def check(method: str, path: str, body: bytes) -> None:
        loop.run_until_complete(asyncio.wait_for(one(method, path, body), 10))

    try:
        check()
    finally:
        loop.run_until_complete(client.close())
        loop.run_until_complete(node.docs.stop())
        node.store.close()
        loop.close()


async def test_an_assignment_of_an_older_term_is_refused_until_the_new_coordinator_reissues_it(solo):
    from galaxy.tasks import core as tc
    node, client = solo
    node.lease, node.known = None, 3              # not coordinator; term 3 is known here
    spec, _ = tc.parse_spec({"command": ["true"], "resources": {"cpu": 0.1, "memory_mb": 64}})
    t = tc.schedule(tc.new_task("t-00000000000000aa", spec, "u", ME, 1), ME, 2, 2)   # a deposed term-2 leader
    node.docs.put(TASK_TYPE, t.id, t.to_value())
    await until(lambda: _fenced(node))
    assert node.tasks.get(t.id).state == "scheduled" and node.store.get("tasks.fence_term") == "3"
    node.lease = 3                                # now the term-3 coordinator: it re-issues the assignment
    node.tasks.wake()
    done = await finished(client, t.id)
    assert done["state"] == "succeeded" and done["attempts"][0]["term"] == 3


async def _fenced(node) -> bool:
    return node.tasks.stats["fenced_out"] > 0


async def test_ended_tasks_are_forgotten_after_the_retention(solo):
    node, client = solo
    # It prints, so it keeps a directory (logs); one that keeps nothing has none to remove.
    r = await client.post("/v1/tasks", json={"command": ["echo", "hi"], "resources": {"cpu": 0.1, "memory_mb": 64}})
    task_id = (await r.json())["id"]
    await finished(client, task_id)
    assert (node.tasks.executor.root_dir / task_id).exists()
    assert node.tasks.executor.get(task_id, 1) is not None
    node.tasks.cfg = dataclasses.replace(node.tasks.cfg, task_retention_ms=1)
    # Past the 1 ms retention before the step runs (it reschedules itself a minute later).
    ended_ms = node.tasks._ended[task_id]
    await until(lambda: _true(node.tasks._clock.wall_ms() > ended_ms + 1))
    async def checked_and_gone() -> bool:
        # the assignment document that carried it goes first (two checks), then the task
        node.tasks._next_retention_ms = 0
        node.tasks.wake()
        return await _gone(client, task_id)
    await until(checked_and_gone)
    node.tasks._next_retention_ms = 0
    node.tasks.wake()
    await until(lambda: _no_dir(node, task_id))
    assert node.tasks.executor.get(task_id, 1) is None       # forgotten by the journal too


async def _true(x: bool) -> bool:
    return x


async def _gone(client, task_id: str) -> bool:
    return (await client.get(f"/v1/tasks/{task_id}")).status == 404


async def _no_dir(node, task_id: str) -> bool:
    return not (node.tasks.executor.root_dir / task_id).exists()


def test_an_owner_is_paid_for_at_most_max_nodes_per_owner_nodes():
    from galaxy.tasks.runner import paid_owners
    ms = [MemberInfo(id=f"n-{i}", state=s, role="auto", http="", cpu=1, memory_mb=1, gpu=0, owner=o)
          for i, (s, o) in enumerate([("alive", "alice"), ("dead", "alice"), ("alive", "alice"), ("alive", "alice"),
                                      ("alive", "bob"), ("alive", "")])]
    assert paid_owners(ms, 2) == {"n-0": "alice", "n-2": "alice", "n-4": "bob"}


async def test_submissions_are_limited_per_account_as_well_as_per_address(tmp_path):
    # one address (the test client's), two accounts: the account's bucket runs dry first and
    # the other account still submits; then the shared address's bucket runs dry for both
    node = SoloNode(str(tmp_path))
    node.cfg = dataclasses.replace(node.cfg, submit_account_rate_per_s=0.01, submit_account_burst=2,
                                   submit_rate_per_s=0.01, submit_burst=4)
    node.ledger.add_account("alice")
    await node.docs.start("127.0.0.1", 0)
    await node.tasks.start()
    spec = {"command": ["true"], "constraints": {"labels": {"never": "here"}}}
    try:
        async with node.client() as client:
            got = [await client.post("/v1/tasks", json=spec) for _ in range(3)]
            assert [r.status for r in got] == [202, 202, 429]
            refused = await got[2].json()
            assert "by admin" in refused["message"] and "submit_account_rate_per_s" in refused["message"]
            assert int(got[2].headers["Retry-After"]) >= 1
            alice = node.ledger.bearer("alice")
            assert (await client.post("/v1/tasks", json=spec, headers=alice)).status == 202
            r = await client.post("/v1/tasks", json=spec, headers=alice)
            assert r.status == 429 and "from 127.0.0.1" in (await r.json())["message"]
    finally:
        await node.tasks.stop()
        await node.docs.stop()
        node.store.close()


async def test_a_batch_is_all_or_nothing_and_its_tasks_run(solo):
    node, client = solo
    one = {"command": ["true"], "resources": {"cpu": 0.5, "memory_mb": 64}}
    bad = {"command": ["true"], "resources": {"cpu": -1}}
    r = await client.post("/v1/tasks", json={"tasks": [one, one, bad]})
    assert r.status == 400 and "tasks[2].resources.cpu" in (await r.json())["message"]
    assert node.tasks.counts()["pending"] == 0 and not node.tasks.list()      # nothing was written
    for body, field in (({"tasks": []}, "tasks"), ({"tasks": "x"}, "tasks"),
                        ({"tasks": [{**one, "price": 5}]}, "tasks[0].price")):
        r = await client.post("/v1/tasks", json=body)
        assert r.status == 400 and (await r.json())["message"].startswith(field), body
    r = await client.post("/v1/tasks", json={"tasks": [one, {**one, "owner": "alcie"}]})
    assert r.status == 400 and (await r.json())["message"].startswith("tasks[1].owner: no account 'alcie'")
    assert node.tasks.counts()["pending"] == 0 and not node.tasks.list()
    node.ledger.add_account("alice")
    commits = node.docs.stats["commits"]
    r = await client.post("/v1/tasks", json={"tasks": [one] * 30 + [{**one, "owner": "alice"}]})
    assert r.status == 202
    body = await r.json()
    assert body["acknowledged_by"] == [] and len(body["tasks"]) == 31 and body["tasks"][-1]["owner"] == "alice"
    assert node.docs.stats["commits"] - commits <= 2        # one commit for the batch (plus a racing plan)
    for t in body["tasks"]:
        assert (await finished(client, t["id"]))["state"] == "succeeded"


async def test_a_batch_is_one_document_its_tasks_pending_until_something_happens_to_each(solo, monkeypatch):
    """A batch is stored as one batch document (not a document per task); each of its tasks
    reads, lists and counts as pending until it is scheduled or cancelled, which writes the
    task's own document; the batch is deleted once every task has one, at the second check.
    The node that writes it indexes the tasks as it built them, without reading them back."""
    node, client = solo
    nowhere = {"command": ["true"], "constraints": {"labels": {"zone": "nowhere"}}}
    node.ledger.add_account("alice")
    read_back = []
    monkeypatch.setitem(runner.BUNDLE_READERS, tc.BATCH_TYPE, lambda v: read_back.append(v) or tc.batch_tasks(v))
    r = await client.post("/v1/tasks", json={"tasks": [nowhere] * 4 + [{**nowhere, "owner": "alice"}]})
    assert r.status == 202 and read_back == [] and not node.tasks._own_bundles
    ids = [t["id"] for t in (await r.json())["tasks"]]
    replica = node.tasks.replica
    assert len(replica.items(tc.BATCH_TYPE)) == 1 and not replica.items(TASK_TYPE)
    for task_id in ids:
        t = await (await client.get(f"/v1/tasks/{task_id}")).json()
        assert t["state"] == "pending" and t["command"] == ["true"] and t["node"] is None, t
    listed = await (await client.get("/v1/tasks?state=pending")).json()
    assert sorted(t["id"] for t in listed["tasks"]) == sorted(ids)
    assert [t["id"] for t in (await (await client.get("/v1/tasks?owner=alice")).json())["tasks"]] == ids[-1:]
    assert (await (await client.get(f"/v1/tasks?node={ME}")).json())["tasks"] == []
    assert node.tasks.counts()["pending"] == 5

    async def check_retention() -> None:
        node.tasks._next_retention_ms = 0
        node.tasks._retention_step(coordinator=True)

    first = ids[0]
    assert (await client.post(f"/v1/tasks/{first}/cancel")).status == 202
    assert replica.get(TASK_TYPE, first).value["state"] == "cancelled"     # its own document now
    assert first not in node.tasks._entries and len(node.tasks._entries) == 4     # kept no more
    assert (await (await client.get(f"/v1/tasks/{first}")).json())["state"] == "cancelled"
    assert node.tasks.counts()["pending"] == 4
    await check_retention()
    await check_retention()
    assert len(replica.items(tc.BATCH_TYPE)) == 1                           # the others still pending there
    for task_id in ids[1:]:
        assert (await client.post(f"/v1/tasks/{task_id}/cancel")).status == 202
    await check_retention()
    assert len(replica.items(tc.BATCH_TYPE)) == 1                           # settled once: not yet
    await check_retention()
    assert not replica.items(tc.BATCH_TYPE)                                 # settled twice: deleted
    for task_id in ids:
        assert (await (await client.get(f"/v1/tasks/{task_id}")).json())["state"] == "cancelled"
    assert node.tasks.counts()["cancelled"] == 5


async def test_a_task_of_a_batch_runs_once_and_a_deleted_document_is_never_pending_again(solo):
    node, client = solo
    r = await client.post("/v1/tasks", json={"tasks": [{"command": ["true"], "resources": {"cpu": 0.1}}] * 3})
    ids = [t["id"] for t in (await r.json())["tasks"]]
    for task_id in ids:
        done = await finished(client, task_id)
        assert done["state"] == "succeeded" and len(done["attempts"]) == 1
    replica = node.tasks.replica
    (batch,) = replica.items(tc.BATCH_TYPE)
    # Retention forgets no task a live batch still lists (it would read pending again) ...
    node.tasks.cfg = dataclasses.replace(node.tasks.cfg, task_retention_ms=1)
    ended_ms = max(node.tasks._ended[task_id] for task_id in ids)
    await until(lambda: _true(node.tasks._clock.wall_ms() > ended_ms + 1))
    node.tasks._next_retention_ms = 0
    node.tasks._retention_step(coordinator=True)
    assert all(node.tasks.get(task_id).state == "succeeded" for task_id in ids)
    # ... and once a task's document is deleted (a tombstone, even for a task whose end
    # only a result document carries), a batch that still lists it is not read.
    node.tasks._docs.delete(TASK_TYPE, ids[0], absent=True)
    node.tasks._index(ids[0])
    assert replica.get(tc.BATCH_TYPE, batch.key) is not None
    assert (await client.get(f"/v1/tasks/{ids[0]}")).status == 404 and node.tasks.counts()["pending"] == 0
    node.tasks._next_retention_ms = 0
    node.tasks._retention_step(coordinator=True)       # the batch is gone at the second check
    assert replica.get(tc.BATCH_TYPE, batch.key) is None and not replica.items(tc.ASSIGN_TYPE)
    node.tasks._next_retention_ms = 0
    node.tasks._retention_step(coordinator=True)       # now the others are forgotten
    assert all(node.tasks.get(task_id) is None for task_id in ids)
    assert all(replica.holds(TASK_TYPE, task_id) for task_id in ids)     # as tombstones
    for _ in range(2):                                 # and result documents go two checks later
        node.tasks._next_retention_ms = 0
        node.tasks._retention_step(coordinator=True)
    assert not replica.items(tc.RESULT_TYPE) and node.tasks.counts()["succeeded"] == 0


async def test_a_busy_worker_writes_its_ends_together_in_a_result_document(solo, monkeypatch, caplog):
    """The first end is written at once; the ends of the next ENDS_FLUSH_MS go out in one
    result document, and those tasks read ended everywhere without a document of their own.
    The node logs each step many tasks took at once in one line naming them all."""
    from galaxy.tasks import runner
    monkeypatch.setattr(runner, "ENDS_FLUSH_MS", 2_000)
    caplog.set_level(logging.INFO, logger="galaxy.tasks")
    node, client = solo
    r = await client.post("/v1/tasks", json={"tasks": [{"command": ["true"], "resources": {"cpu": 0.1},
                                                        "max_retries": 0}] * 6})
    ids = [t["id"] for t in (await r.json())["tasks"]]
    for task_id in ids:
        done = await finished(client, task_id)
        assert done["state"] == "succeeded" and done["exit_code"] == 0 and len(done["attempts"]) == 1, done
    replica = node.tasks.replica
    carried = [t.id for doc in replica.items(tc.RESULT_TYPE) for t in tc.ended_tasks(doc.value)]
    own = [i for i in ids if replica.get(TASK_TYPE, i) is not None]
    assert len(carried) >= 2 and sorted(carried + own) == sorted(ids), (carried, own)
    assert node.tasks.counts()["succeeded"] == 6 and node.tasks.counts()["running"] == 0
    listed = await (await client.get("/v1/tasks?state=succeeded")).json()
    assert sorted(t["id"] for t in listed["tasks"]) == sorted(ids)
    # cancelling an ended task is refused, whichever document says it ended
    assert (await client.post(f"/v1/tasks/{carried[0]}/cancel")).status == 409
    lines = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "task"]
    assert f"6 tasks submitted by admin: {' '.join(ids)}" in lines
    for step in ("scheduled on", "ended"):
        named = " ".join(line for line in lines if step in line)
        assert all(i in named for i in ids), (step, lines)
    together = [i for r in caplog.records if "tasks ended here: succeeded" in r.getMessage() for i in r.tasks]
    assert sorted(together) == sorted(carried), lines


async def test_an_end_kept_for_the_next_result_document_is_made_again_if_its_task_changed_meanwhile(solo, monkeypatch):
    from galaxy.tasks import runner
    monkeypatch.setattr(runner, "ENDS_FLUSH_MS", 60_000)
    node, client = solo
    node.tasks._ends_written_ms = node.tasks._clock.wall_ms()     # as if an end had just gone out
    r = await client.post("/v1/tasks", json={"tasks": [{"command": ["true"], "resources": {"cpu": 1}}]})
    (task_id,) = [t["id"] for t in (await r.json())["tasks"]]          # (a batch: no document of its own)
    await until(lambda: _true(task_id in node.tasks._ends))
    assert (await (await client.get(f"/v1/tasks/{task_id}")).json())["state"] in ("scheduled", "running")
    assert (await client.post(f"/v1/tasks/{task_id}/cancel")).status == 202     # too late: it ended
    node.tasks._write_ends()
    got = await (await client.get(f"/v1/tasks/{task_id}")).json()
    assert got["state"] == "succeeded" and got["exit_code"] == 0 and got["cancel_requested"], got    # (too late)
    assert got["attempts"][0]["started_at"] > 0 and got["attempts"][0]["ended_at"] >= got["attempts"][0]["started_at"]
    assert node.tasks.replica.get(TASK_TYPE, task_id).value["state"] == "succeeded"   # in its own document
    assert not node.tasks.replica.items(tc.RESULT_TYPE)


async def test_within_the_plan_gap_only_a_task_that_can_start_at_once_is_placed(solo, monkeypatch):
    from galaxy.tasks import runner
    monkeypatch.setattr(runner, "PLAN_GAP_MS", 60_000)
    node, client = solo
    node.tasks.cfg = dataclasses.replace(node.tasks.cfg, worker_queue_depth=4)
    spec = {"command": ["sleep", "30"], "resources": {"cpu": 1}}

    async def submit() -> str:
        return (await (await client.post("/v1/tasks", json=spec)).json())["id"]

    async def state(task_id: str) -> str:
        return (await (await client.get(f"/v1/tasks/{task_id}?here=1")).json())["state"]

    first = await submit()                         # no plan for long: placed at once
    await until(lambda: _true(node.tasks.get(first).state != "pending"))
    second = await submit()                        # within the gap, but a slot is free: at once
    await until(lambda: _true(node.tasks.get(second).state != "pending"))
    third = await submit()                         # both cores taken: only a queue has room
    for _ in range(20):
        await asyncio.sleep(0.01)
        assert await state(third) == "pending"
    node.tasks._planned_at -= 60_000               # the gap is over: the next pass queues it
    node.tasks.wake()
    await until(lambda: _true(node.tasks.get(third).state == "scheduled"))
    for task_id in (first, second, third):
        assert (await client.post(f"/v1/tasks/{task_id}/cancel")).status == 202


async def test_a_pass_assigns_in_one_document_per_node_and_a_newer_attempt_outranks_the_tasks_document(solo):
    node, client = solo
    r = await client.post("/v1/tasks", json={"tasks": [{"command": ["sleep", "5"], "resources": {"cpu": 1}}] * 2})
    ids = [t["id"] for t in (await r.json())["tasks"]]
    replica = node.tasks.replica
    await until(lambda: _true(all((node.tasks.get(i) or tc.Task).state == "running" for i in ids)))
    (assign,) = replica.items(tc.ASSIGN_TYPE)             # one pass, one node: one document
    assert sorted(t.id for t in tc.assigned_tasks(assign.value)) == sorted(ids) and assign.value["node"] == ME
    assert len(assign.value["specs"]) == 1
    # A task's own document at attempt 1 (lost, waiting for a retry) and an assignment of
    # attempt 2 elsewhere: the assignment is newer, whatever order they arrive in.
    t = node.tasks.get(ids[0])
    lost = tc.lost(t, "node went away", t.updated_ms + 1)
    retry = tc.schedule(lost, "n-other", 1, t.updated_ms + 2)
    node.tasks._docs.put(tc.ASSIGN_TYPE, "a-" + "1" * 16, tc.assign_values([retry], 30_000)[0])
    node.tasks._docs.put(TASK_TYPE, t.id, lost.to_value())
    got = await (await client.get(f"/v1/tasks/{t.id}")).json()
    assert got["state"] == "scheduled" and got["node"] == "n-other" and len(got["attempts"]) == 2, got
    listed = await (await client.get("/v1/tasks?node=n-other")).json()
    assert [x["id"] for x in listed["tasks"]] == [t.id]
    assert (await client.post(f"/v1/tasks/{t.id}/cancel")).status == 202
    asked = replica.get(TASK_TYPE, t.id).value          # its own document outranks the entry again
    assert asked["cancel"] and asked["attempt"] == 2 and node.tasks.get(t.id).cancel
    assert t.id not in node.tasks._entries
    assert (await client.post(f"/v1/tasks/{ids[1]}/cancel")).status == 202
    assert (await finished(client, ids[1]))["state"] == "cancelled"


async def test_the_auto_queue_deepens_for_short_tasks_and_stays_one_per_core_for_long_ones(solo):
    """worker_queue_depth -1: cores x (how many recent attempts fit in QUEUE_BUFFER_MS)."""
    from galaxy.tasks import runner
    node, client = solo
    me = node.tasks._members()[0]
    assert node.tasks._auto_queue(me) == 2                     # no attempt ended here yet: one per core
    r = await client.post("/v1/tasks", json={"tasks": [{"command": ["true"]}] * 5})
    for t in (await r.json())["tasks"]:
        assert (await finished(client, t["id"]))["state"] == "succeeded"
    run_ms = node.tasks._run_ms[ME]
    assert 0 <= run_ms < runner.QUEUE_BUFFER_MS
    assert node.tasks._auto_queue(me) == 2 * min(runner.QUEUE_FACTOR_MAX,
                                                 max(1, int(runner.QUEUE_BUFFER_MS // max(run_ms, 1.0))))
    node.tasks._run_ms[ME] = 10 * runner.QUEUE_BUFFER_MS      # long tasks: back to one per core
    assert node.tasks._auto_queue(me) == 2
    node.tasks._run_ms[ME] = 0.2                               # very short: bounded
    assert node.tasks._auto_queue(me) == 2 * runner.QUEUE_FACTOR_MAX


async def test_a_task_document_in_a_state_this_build_does_not_know_is_listed_not_counted(solo):
    # A newer writer's state (or a hostile member's) reaches every node by gossip: indexing
    # it must not stop the node, and the status counts keep to the states they document.
    node, client = solo
    r = await client.post("/v1/tasks", json={"command": ["true"], "resources": {"cpu": 0.1, "memory_mb": 64}})
    done = await finished(client, (await r.json())["id"])
    value = dict(node.docs.replica.get(TASK_TYPE, done["id"]).value, state="hibernating", updated_ms=1)
    other = Replica("n-newer", {TASK_TYPE: TASK_RESOLVER})
    for v in node.docs.replica.versions(TASK_TYPE, done["id"]):
        other.merge(1, [to_wire(v)])
    newer = other.put(10**13, TASK_TYPE, done["id"], value)
    assert node.docs.on_update("n-newer", DocUpdate(docs=(to_wire(newer),)))
    assert node.tasks.get(done["id"]).state == "hibernating"
    counts = node.tasks.counts()
    assert set(counts) == set(TASK_STATES) and sum(counts.values()) == 0
    listed = await (await client.get("/v1/tasks")).json()
    assert [t["state"] for t in listed["tasks"]] == ["hibernating"]


async def test_a_long_attempt_is_recorded_running_soon_after_its_spawn(solo):
    # One timer wakes the loop when the oldest unreported attempt is due: "running" is
    # written ~RUNNING_REPORT_MS after the spawn, not at the loop's next periodic turn.
    from galaxy.tasks.runner import LOOP_INTERVAL_MS, RUNNING_REPORT_MS
    node, client = solo
    r = await client.post("/v1/tasks", json={"command": ["sleep", "5"], "resources": {"cpu": 1, "memory_mb": 64}})
    task_id = (await r.json())["id"]

    async def running():
        t = node.tasks.get(task_id)
        return t if t is not None and t.state == "running" else None
    t = await until(running, 10)
    seen_ms = time.time() * 1000
    late_ms = seen_ms - t.attempts[-1].started_ms
    assert RUNNING_REPORT_MS <= late_ms < LOOP_INTERVAL_MS - 200, late_ms
    assert (await client.post(f"/v1/tasks/{task_id}/cancel")).status == 202
    assert (await finished(client, task_id))["state"] == "cancelled"


def test_a_submission_is_for_the_coordinator_first_an_assignment_for_its_worker_the_rest_for_anyone(tmp_path):
    """Who the tasks name as needing a version at once (DocGossip.interest, docs/gossip.md)."""
    node = SoloNode(str(tmp_path))
    want = node.gossip.interest[TASK_TYPE]
    r = Replica("n-a", {TASK_TYPE: TASK_RESOLVER})
    spec, _ = tc.parse_spec({"command": ["true"]})
    t = tc.new_task("t-" + "0" * 16, spec, "alice", "n-a", 1)
    node.coordinator = "n-c"
    assert want(r.put(1, TASK_TYPE, t.id, t.to_value())) == ("n-c",)
    node.coordinator = None                   # none known: anyone, at once
    assert want(r.put(2, TASK_TYPE, t.id, t.to_value())) is None
    t = tc.schedule(t, "n-b", 3, 3)
    assert want(r.put(3, TASK_TYPE, t.id, t.to_value())) == ("n-b",)
    for later in (tc.start(t, "n-b", 1, 4), tc.cancel(t, 4), tc.finish(t, "n-b", 1, tc.SUCCEEDED, 0, "", 5)):
        assert want(r.put(4, TASK_TYPE, t.id, later.to_value())) is None
    node.store.close()


async def test_every_rejection_of_a_submission_or_drain_body_names_its_field(solo):
    node, client = solo
    one = {"command": ["true"], "resources": {"cpu": 0.5, "memory_mb": 64}}
    for body, start in (([one], "body: must be a JSON object"), (None, "body: must be a JSON object"),
                        ("x", "body: must be a JSON object"),
                        ({"tasks": [one, 7]}, "tasks[1]: must be a JSON object (a task), got a number"),
                        ({"tasks": [one], "priority": 5}, "'priority': unknown field beside \"tasks\"")):
        r = await client.post("/v1/tasks", data=json.dumps(body))
        assert r.status == 400, body
        assert (await r.json())["message"].startswith(start), (body, await r.json())
    assert not node.tasks.list()
    for body, start in (([True], "body: must be a JSON object"), ({"draining": "yes"}, "draining: must be true or false"),
                        ({"draining": True, "why": "x"}, "unknown field(s) 'why' (allowed: draining)"),
                        ({}, "missing field(s): draining"), (None, "missing field(s): draining")):
        r = await client.post(f"/v1/nodes/{ME}/drain", data=b"" if body is None else json.dumps(body))
        assert r.status == 400 and (await r.json())["message"].startswith(start), (body, await r.json())
    assert not node.tasks.draining_nodes()
    r = await client.post("/v1/tasks", json={"command": ["true"], "constraints": {"labels": {"zone": "nowhere"}}})
    task_id = (await r.json())["id"]
    for body, start in (({"bogus": 1}, "unknown field(s) 'bogus' (allowed: none)"), ([1], "body: must be a JSON object")):
        r = await client.post(f"/v1/tasks/{task_id}/cancel", data=json.dumps(body))
        assert r.status == 400 and (await r.json())["message"].startswith(start), (body, await r.json())
    assert node.tasks.get(task_id).state == "pending"
    for query, start in (("state=failed&state=running", "'state': given 2 times"),
                         ("after=t-0000000000000000", "after: no task t-0000000000000000")):
        r = await client.get(f"/v1/tasks?{query}")
        assert r.status == 400 and (await r.json())["message"].startswith(start), (query, await r.json())


async def test_text_that_is_not_valid_unicode_is_refused_by_field_and_fails_no_one_elses_submission(solo):
    """A lone surrogate (JSON "\udce9": what a non-UTF-8 argument becomes) cannot be stored:
    a 400 naming the field, before the submission joins the others written with it."""
    node, client = solo
    bad = "caf\udce9"
    for body, field in (({"command": ["echo", bad]}, "command[1]"), ({"command": f"echo {bad}"}, "command"),
                        ({"command": ["true"], "name": bad}, "name"), ({"command": ["true"], "env": {"X": bad}}, "env.X"),
                        ({"command": ["true"], "constraints": {"labels": {"zone": bad}}},
                         "constraints.labels.zone: no node can have this value"),
                        ({"tasks": [{"command": ["true"]}, {"command": ["echo", bad]}]}, "tasks[1].command[1]")):
        r = await client.post("/v1/tasks", data=json.dumps(body))
        answer = await r.json()
        want = field if ":" in field else f"{field}: is not valid Unicode"
        assert r.status == 400 and answer["message"].startswith(want), (body, answer)
    good = {"command": ["true"], "constraints": {"labels": {"zone": "nowhere"}}}
    answers = await asyncio.gather(*(client.post("/v1/tasks", data=json.dumps(b))
                                     for b in [good] * 4 + [{"command": ["echo", bad]}] + [good] * 4))
    assert [a.status for a in answers] == [202] * 4 + [400] + [202] * 4
    assert node.tasks.counts()["pending"] == 8


async def test_logs_of_a_task_cancelled_before_it_ran_say_it_never_ran(solo):
    node, client = solo
    r = await client.post("/v1/tasks", json={"command": ["true"], "constraints": {"labels": {"zone": "nowhere"}}})
    task_id = (await r.json())["id"]
    logs = await client.get(f"/v1/tasks/{task_id}/logs")
    assert logs.status == 404 and "has not run yet (pending)" in (await logs.json())["message"]
    assert (await client.post(f"/v1/tasks/{task_id}/cancel")).status == 202
    logs = await client.get(f"/v1/tasks/{task_id}/logs")
    body = await logs.json()
    assert logs.status == 404 and body["error"] == "not_started"
    assert body["message"] == f"task {task_id} never ran (cancelled while pending)"


async def test_logs_of_an_attempt_on_a_node_that_left_or_died_say_so_plainly(solo, monkeypatch):
    node, client = solo
    r = await client.post("/v1/tasks", json={"command": ["true"], "resources": {"cpu": 0.5, "memory_mb": 64}})
    task_id = (await r.json())["id"]
    await finished(client, task_id)
    monkeypatch.setattr(node, "node_id", "n-other")        # as if this node were another than the worker
    for state, words in (("left", "which has left the mesh"), ("dead", "which is dead"),
                         (None, "which is no longer a member")):
        members = [{"id": ME, "state": state, "http": "http://127.0.0.1:1"}] if state else []
        monkeypatch.setattr(node, "members", lambda members=members: members)
        logs = await client.get(f"/v1/tasks/{task_id}/logs")
        body = await logs.json()
        assert logs.status == 502 and body["error"] == "node_unreachable"
        assert body["message"] == f"the attempt ran on {ME}, {words}: its logs are not reachable", body


async def test_a_pending_task_says_when_there_is_no_coordinator_to_place_it(solo, monkeypatch):
    node, client = solo
    node.lease = None                       # not the coordinator: nothing is planned here
    node.peers = type("Peers", (), {"ssl_for": staticmethod(lambda url: None)})()
    r = await client.post("/v1/tasks", json={"command": ["true"], "resources": {"cpu": 0.5, "memory_mb": 64}})
    task_id = (await r.json())["id"]

    async def waiting() -> Any:
        return (await (await client.get(f"/v1/tasks/{task_id}")).json()).get("waiting")

    for leader, members, words in (
            (None, [], "no coordinator: nothing is placed until the voters elect one (galaxy status)"),
            ("n-gone", [{"id": "n-gone", "state": "left", "http": "http://127.0.0.1:1"}],
             "the coordinator n-gone has left the mesh: nothing is placed until the voters elect another (galaxy status)"),
            ("n-mute", [{"id": "n-mute", "state": "alive", "http": "http://127.0.0.1:1"}],
             "the coordinator n-mute does not answer (galaxy status)")):
        monkeypatch.setattr(node, "leader", lambda leader=leader: {"leader": leader, "term": 2,
                                                                   "http": "http://127.0.0.1:1" if leader else None},
                            raising=False)
        monkeypatch.setattr(node, "members", lambda members=members: members)
        assert await waiting() == words
    assert (await (await client.get(f"/v1/tasks/{task_id}")).json())["state"] == "pending"


async def test_single_submissions_that_come_while_one_is_written_are_written_together(solo, monkeypatch):
    """Group submission: the first task is written at once; those that come while its write
    awaits the acknowledgement are written together, in one batch document, when it is done.
    Each 202 comes only after its own write; joined tasks count against the owner's limit;
    a write that is not acknowledged answers 503 to each of its submissions, not to later ones."""
    node, client = solo
    node.tasks.cfg = dataclasses.replace(node.cfg, tasks_per_owner_max=6)
    nowhere = {"command": ["true"], "constraints": {"labels": {"zone": "nowhere"}}}    # stays pending
    real = node.docs.put_many_acked
    gate = asyncio.Event()
    writes: list[int] = []           # tasks per write
    fail_next = [False]

    async def put_many_acked(doc_type, items, **kw):
        writes.append(sum(len(v["tasks"]) for _, v in items))
        got = await real(doc_type, items, **kw)        # on this node's disk
        await gate.wait()                             # ... and then waits for its DocAck
        if fail_next[0]:
            fail_next[0] = False
            raise NotReplicated("no other member acknowledged within 2000 ms")
        return got

    monkeypatch.setattr(node.docs, "put_many_acked", put_many_acked)
    first = asyncio.create_task(client.post("/v1/tasks", json=nowhere))
    await until(lambda: asyncio.sleep(0, len(writes) == 1))
    joined = [asyncio.create_task(client.post("/v1/tasks", json=nowhere)) for _ in range(7)]
    await until(lambda: asyncio.sleep(0, len(node.tasks._joining) == 5 and sum(r.done() for r in joined) == 2))
    assert not first.done() and writes == [1]          # no 202 before the acknowledgement
    gate.set()
    answers = [await first, *await asyncio.gather(*joined)]
    codes = [a.status for a in answers]
    assert sorted(codes) == [202] * 6 + [429] * 2 and writes == [1, 5]      # one write for the five that joined
    bodies = [await a.json() for a in answers]
    assert "tasks_per_owner_max" in next(b["message"] for a, b in zip(answers, bodies) if a.status == 429)
    ids = {b["id"] for a, b in zip(answers, bodies) if a.status == 202}
    assert {t.id for t in node.tasks.list(state="pending")} == ids and len(ids) == 6
    assert len(node.tasks.replica.items(tc.BATCH_TYPE)) == 2 and not node.tasks.replica.items(TASK_TYPE)
    # what every other node reads back is what each 202 said (one time per group: its write's)
    read_back = {t.id: t.submitted_ms for d in node.tasks.replica.items(tc.BATCH_TYPE) for t in tc.batch_tasks(d.value)}
    assert {b["id"]: b["submitted_ms"] for a, b in zip(answers, bodies) if a.status == 202} == read_back

    node.tasks.cfg = node.cfg
    gate.clear()
    fail_next[0] = True
    lone = asyncio.create_task(client.post("/v1/tasks", json=nowhere))
    await until(lambda: asyncio.sleep(0, len(writes) == 3))
    unlucky = [asyncio.create_task(client.post("/v1/tasks", json=nowhere)) for _ in range(3)]
    await until(lambda: asyncio.sleep(0, len(node.tasks._joining) == 3))
    gate.set()                       # the lone write fails; the three after it are acknowledged
    lone_answer = await lone
    assert lone_answer.status == 503 and (await lone_answer.json())["error"] == "not_replicated"
    assert [r.status for r in await asyncio.gather(*unlucky)] == [202] * 3 and writes[3:] == [3]
    # the unacknowledged task is on this node's disk all the same, and will run
    assert node.tasks.counts()["pending"] == 6 + 1 + 3
    node.tasks._stopping = True          # (stop() sets it; its HTTP server closes after it)
    for body in (nowhere, {"tasks": [nowhere]}):
        r = await client.post("/v1/tasks", json=body)
        assert r.status == 503 and (await r.json())["message"] == "this node is stopping: submit at another node"
    node.tasks._stopping = False


async def test_a_new_coordinator_places_tasks_as_soon_as_it_has_settled(solo, monkeypatch):
    """A coordinator waits scheduler_settle_ms after it gains the lease, then places at once:
    the end of that wait wakes the task loop, not its periodic tick (here an hour away)."""
    node, client = solo
    monkeypatch.setattr(runner, "LOOP_INTERVAL_MS", 3_600_000)
    node.tasks.cfg = dataclasses.replace(node.cfg, scheduler_settle_ms=300)
    node.lease = None                 # deposed: nobody places anything
    node.tasks.wake()
    r = await client.post("/v1/tasks", json={"command": ["true"], "resources": {"cpu": 1}})
    task_id = (await r.json())["id"]
    await until(lambda: asyncio.sleep(0, node.tasks._led_term == 0))
    assert node.tasks.get(task_id).state == "pending"
    node.lease = node.known = 2       # elected: the node wakes the loop when the lease changes
    node.tasks.wake()
    assert (await finished(client, task_id))["attempts"][0]["term"] == 2


def test_the_node_wakes_the_task_loop_on_membership_events_and_lease_changes(tmp_path):
    from galaxy.node import Node

    class Loop:
        wakes = 0

        def wake(self) -> None:
            self.wakes += 1

    node = Node(Config(data_dir=str(tmp_path)))
    node._on_member_events([("n-b", "alive", "suspect")])          # before the task service: nothing to wake
    node.tasks = Loop()
    node._on_member_events([("n-b", "suspect", "dead")])
    assert node.tasks.wakes == 1
    node.coordinator = types.SimpleNamespace(term=3, is_coordinator=lambda: True)
    node._track_lease()
    node._track_lease()
    assert node.tasks.wakes == 2                                    # elected: once
    node.coordinator.is_coordinator = lambda: False
    node._track_lease()
    assert node.tasks.wakes == 3                                    # deposed
