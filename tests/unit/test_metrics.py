"""/metrics and / against a fake node: exposition parsed by prometheus-client's own parser.

The fake node is the edge mock (the ``galaxy.node.Node`` parts the API reads); servers are
real aiohttp servers on loopback.  The real-mesh checks (values move when the coordinator
is killed) are in tests/proc/test_dashboard.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import math
import re
import types
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from galaxy.api import dashboard, metrics
from galaxy.api.app import METRICS_KEY, make_app
from galaxy.config import Config

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"


class FakeNode:
    def __init__(self) -> None:
        self.cfg = Config(http_body_max_bytes=4096)   # a real one: routes read their settings from it
        self.gossip = types.SimpleNamespace(stats={
            "received": 120, "dropped_decode": 3, "dropped_type": 1, "sent": 130, "encode_errors": 0,
            "send_errors": 2, "dropped_send_buffer": 0})
        self.membership = types.SimpleNamespace(stats={"probes": 40, "probes_failed": 2, "suspicions": 1})
        self.boom = False
        self.tasks = {"pending": 2, "running": 1}
        self.hist: dict[str, Any] = {}
        self.leader_changes = 4

    def status(self) -> dict[str, Any]:
        if self.boom:
            raise RuntimeError("secret detail")
        return {
            "node": {"id": "n-1", "role": "auto", "version": "0.1.0", "http": "http://127.0.0.1:1",
                     "cluster": "galaxy", "uptime_s": 12.5},
            "leader": {"leader": "n-1", "term": 7, "http": "http://127.0.0.1:1"},
            "voters": ["n-1", "n-2", "n-3"],
            "members": {"alive": 2, "suspect": 1, "dead": 0, "left": 0},
            "tasks": dict(self.tasks),
            "ledger": {"applied_seq": 9, "hash": "ab", "total_supply": 1000, "pending": 1},
            "conflicts_resolved": 5,
            "raft": {"running": True, "member": True, "commit_index": 42, "leader_changes": self.leader_changes,
                     "fsyncs": 17},
            "wire": {"ok": 500, "unauthenticated": 6, "replayed": 2, "stale": 0},
            "warnings": ["1 member(s) suspect"],
        }

    def members(self) -> list[dict[str, Any]]:
        return []

    def leader(self) -> dict[str, Any]:
        return self.status()["leader"]

    def histograms(self) -> dict[str, Any]:
        return self.hist


def parse(text: str) -> dict[str, Any]:
    """name -> {labels tuple -> value} for every sample (histogram parts under their sample names)."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def one(samples: dict[str, Any], name: str, **labels: str) -> float:
    return samples[name][tuple(sorted(labels.items()))]


@pytest.fixture
async def served() -> Any:
    node = FakeNode()
    async with TestClient(TestServer(make_app(node))) as client:
        yield node, client


async def scrape(client: TestClient, accept: str = "") -> tuple[str, str]:
    resp = await client.get("/metrics", headers={"Accept": accept} if accept else None)
    assert resp.status == 200
    return resp.headers["Content-Type"], await resp.text()


# ----------------------------------------------------------------------------- /metrics

async def test_every_documented_family_is_exported_and_parses(served: Any) -> None:
    _, client = served
    ctype, text = await scrape(client)
    assert ctype.startswith("text/plain") and "version=" in ctype
    families = {f.name: f for f in text_string_to_metric_families(text)}
    documented = set(re.findall(r"^(\w+?)(?:\{[^}]*\})?\s{2,}(?:gauge|counter|hist\.)", metrics.__doc__, re.M))
    assert len(documented) >= 30
    for short in documented:
        name = "galaxy_" + short.removesuffix("_total")
        assert name in families, f"{name} missing from /metrics"
    for fam in families.values():
        assert fam.documentation, fam.name
    assert families["galaxy_leader_changes"].type == "counter"
    assert families["galaxy_members"].type == "gauge"
    assert families["galaxy_task_schedule_latency_seconds"].type == "histogram"
    assert families["galaxy_http_request_duration_seconds"].type == "histogram"


async def test_values_come_from_the_node(served: Any) -> None:
    node, client = served
    s = parse((await scrape(client))[1])
    assert one(s, "galaxy_node_info", node="n-1", version="0.1.0", cluster="galaxy", role="auto") == 1
    assert one(s, "galaxy_members", state="alive") == 2 and one(s, "galaxy_members", state="suspect") == 1
    assert one(s, "galaxy_members", state="left") == 0
    assert one(s, "galaxy_raft_term") == 7 and one(s, "galaxy_raft_commit_index") == 42
    assert one(s, "galaxy_leader_changes_total") == 4 and one(s, "galaxy_raft_fsyncs_total") == 17
    assert one(s, "galaxy_is_coordinator") == 1 and one(s, "galaxy_coordinator_known") == 1
    assert one(s, "galaxy_raft_voters") == 3 and one(s, "galaxy_raft_voter") == 1
    assert one(s, "galaxy_gossip_messages_received_total") == 120
    assert one(s, "galaxy_gossip_messages_sent_total") == 130
    assert one(s, "galaxy_gossip_dropped_total", reason="decode") == 3
    assert one(s, "galaxy_gossip_errors_total", kind="send") == 2
    assert one(s, "galaxy_wire_frames_accepted_total") == 500
    assert one(s, "galaxy_wire_frames_dropped_total", reason="unauthenticated") == 6
    assert one(s, "galaxy_wire_frames_dropped_total", reason="replayed") == 2
    assert one(s, "galaxy_wire_frames_dropped_total", reason="too_large") == 0     # every reason, always
    assert one(s, "galaxy_vclock_conflicts_resolved_total") == 5
    assert one(s, "galaxy_swim_events_total", event="probes") == 40
    assert one(s, "galaxy_swim_events_total", event="probes_failed") == 2
    assert one(s, "galaxy_tasks", state="pending") == 2 and one(s, "galaxy_tasks", state="cancelled") == 0
    assert one(s, "galaxy_ledger_applied_seq") == 9 and one(s, "galaxy_ledger_total_supply") == 1000
    assert one(s, "galaxy_warnings") == 1 and one(s, "galaxy_uptime_seconds") == 12.5
    # counters the node does not keep yet: zero, under their final names
    assert one(s, "galaxy_gossip_bytes_received_total") == 0
    assert one(s, "galaxy_executor_queued") == 0
    assert one(s, "galaxy_task_submit_to_running_seconds_count") == 0

    node.leader_changes = 5
    node.tasks = {"pending": 0, "running": 3, "exotic": 1}
    s = parse((await scrape(client))[1])
    assert one(s, "galaxy_leader_changes_total") == 5, "read at scrape time, not cached"
    assert one(s, "galaxy_tasks", state="running") == 3
    assert one(s, "galaxy_tasks", state="exotic") == 1, "states the node adds are exported too"


async def test_node_histograms_are_cumulative_and_bad_ones_are_empty(served: Any) -> None:
    node, client = served
    node.hist = {"task_schedule_latency": {"bounds_s": [0.1, 1.0], "counts": [3, 2, 1], "sum_s": 4.5},
                 "task_submit_to_running": {"bounds_s": [1.0, 0.1], "counts": [1, 1, 1], "sum_s": 1.0}}
    s = parse((await scrape(client))[1])
    name = "galaxy_task_schedule_latency_seconds"
    assert one(s, name + "_bucket", le="0.1") == 3 and one(s, name + "_bucket", le="1.0") == 5
    assert one(s, name + "_bucket", le="+Inf") == 6 and one(s, name + "_count") == 6
    assert one(s, name + "_sum") == 4.5
    # unsorted bounds are a node bug: exported empty rather than as a broken histogram
    assert one(s, "galaxy_task_submit_to_running_seconds_count") == 0


async def test_http_latency_by_route_pattern_with_bounded_labels(served: Any) -> None:
    _, client = served
    for _ in range(5):
        assert (await client.get("/v1/status")).status == 200
    for i in range(20):                             # 20 distinct unknown paths ...
        assert (await client.get(f"/no/such/{i}")).status == 404
    assert (await client.get("/v1/status", params={"x": "1"})).status == 400
    s = parse((await scrape(client))[1])
    assert one(s, "galaxy_http_request_duration_seconds_count", route="/v1/status") == 6
    assert one(s, "galaxy_http_requests_total", route="/v1/status", code="200") == 5
    assert one(s, "galaxy_http_requests_total", route="/v1/status", code="400") == 1
    # ... share one label value
    assert one(s, "galaxy_http_request_duration_seconds_count", route="unmatched") == 20
    assert one(s, "galaxy_http_requests_total", route="unmatched", code="404") == 20
    routes = {dict(k)["route"] for k in s["galaxy_http_request_duration_seconds_count"]}
    assert routes == {"/v1/status", "unmatched"}, "the scrape in progress is counted after it answers"
    buckets = s["galaxy_http_request_duration_seconds_bucket"]
    assert any(dict(k)["le"] == "0.0005" for k in buckets)


async def test_each_app_has_its_own_registry() -> None:
    async with TestClient(TestServer(make_app(FakeNode()))) as a, \
            TestClient(TestServer(make_app(FakeNode()))) as b:
        for _ in range(3):
            await a.get("/v1/leader")
        sa = parse((await scrape(a))[1])
        sb = parse((await scrape(b))[1])
        assert one(sa, "galaxy_http_request_duration_seconds_count", route="/v1/leader") == 3
        assert "galaxy_http_request_duration_seconds_count" not in sb or \
            (("route", "/v1/leader"),) not in sb["galaxy_http_request_duration_seconds_count"]


async def test_fast_text_says_what_prometheus_client_says(served: Any) -> None:
    """Our text encoder against prometheus-client's own over the same registry."""
    node, client = served
    node.hist = {"task_schedule_latency": {"bounds_s": [0.1, 1.0], "counts": [3, 2, 1], "sum_s": 4.5}}
    for path in ("/v1/status", "/nope", "/v1/leader"):
        await client.get(path)
    exporter = client.server.app[METRICS_KEY]
    with exporter.node.reading(node.status()):
        theirs = generate_latest(exporter.registry).decode()
    _, ours = await scrape(client)
    ours_parsed, theirs_parsed = parse(ours), parse(theirs)
    theirs_parsed = {k: v for k, v in theirs_parsed.items() if not k.endswith("_created")}
    # the scrape itself is counted between the two readings
    for name in ("galaxy_http_request_duration_seconds_count", "galaxy_http_request_duration_seconds_sum",
                 "galaxy_http_request_duration_seconds_bucket", "galaxy_http_requests_total"):
        ours_parsed.pop(name)
        theirs_parsed.pop(name)
    assert ours_parsed == theirs_parsed
    types_ours = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(ours)}
    types_theirs = {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(theirs)
                    if not f.name.endswith("_created")}
    assert types_ours == types_theirs


def test_text_encoding_edge_cases() -> None:
    fam = metrics.Family("galaxy_x", "gauge", 'help with \\ and\nnewline', [
        ("galaxy_x", (("v", 'quo"te\\back\nline'),), 0.5),
        ("galaxy_x", (("v", "big"),), 1e20),
        ("galaxy_x", (("v", "int"),), 3.0),
        ("galaxy_x", (("v", "inf"),), math.inf),
        ("galaxy_x", (("v", "tiny"),), 1e-9)])
    text = metrics.encode_text([fam]).decode()
    (parsed,) = text_string_to_metric_families(text)
    got = {s.labels["v"]: s.value for s in parsed.samples}
    assert got == {'quo"te\\back\nline': 0.5, "big": 1e20, "int": 3.0, "inf": math.inf, "tiny": 1e-9}
    assert parsed.documentation == 'help with \\ and\nnewline'


def test_http_buckets_are_upper_bound_inclusive() -> None:
    http = metrics.HttpMetrics()
    for seconds in (0.0005, 0.0006, 99.0):
        http.observe("/r", 200, seconds)
    for i in range(metrics.CODES_PER_ROUTE_MAX + 5):
        http.observe("/r", 600 + i, 0.0)
    s = parse(metrics.encode_text(http.families()).decode())
    n = 3 + metrics.CODES_PER_ROUTE_MAX + 5
    assert one(s, "galaxy_http_request_duration_seconds_bucket", route="/r", le="0.0005") == 1 + n - 3
    assert one(s, "galaxy_http_request_duration_seconds_bucket", route="/r", le="0.001") == 2 + n - 3
    assert one(s, "galaxy_http_request_duration_seconds_bucket", route="/r", le="10.0") == n - 1
    assert one(s, "galaxy_http_request_duration_seconds_bucket", route="/r", le="+Inf") == n
    codes = {dict(k)["code"] for k in s["galaxy_http_requests_total"]}
    assert len(codes) == metrics.CODES_PER_ROUTE_MAX + 1 and "other" in codes


async def test_openmetrics_when_asked(served: Any) -> None:
    _, client = served
    ctype, text = await scrape(client, "application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


async def test_metrics_errors_are_json(served: Any) -> None:
    node, client = served
    resp = await client.get("/metrics", params={"name[]": "x"})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    resp = await client.post("/metrics")
    assert resp.status == 405 and (await resp.json())["error"] == "method_not_allowed"
    node.boom = True
    resp = await client.get("/metrics")
    body = await resp.json()
    assert resp.status == 500 and body["error"] == "internal" and "secret" not in json.dumps(body)


async def test_async_status_is_awaited() -> None:
    class AsyncNode(FakeNode):
        async def status(self) -> dict[str, Any]:       # type: ignore[override]
            await asyncio.sleep(0)
            return FakeNode.status(self)

    async with TestClient(TestServer(make_app(AsyncNode()))) as client:
        s = parse((await scrape(client))[1])
        assert one(s, "galaxy_raft_term") == 7


async def test_sparse_status_exports_zeros_not_errors() -> None:
    class Bare(FakeNode):
        def status(self) -> dict[str, Any]:              # type: ignore[override]
            return {"node": {"id": "n-x"}, "leader": {"leader": None, "term": 0},
                    "members": {"alive": float("nan")}, "tasks": None}

    node = Bare()
    del node.gossip
    node.membership = None
    async with TestClient(TestServer(make_app(node))) as client:
        s = parse((await scrape(client))[1])
    assert one(s, "galaxy_coordinator_known") == 0 and one(s, "galaxy_members", state="alive") == 0
    assert one(s, "galaxy_gossip_messages_sent_total") == 0 and one(s, "galaxy_tasks", state="running") == 0


# ----------------------------------------------------------------------------- / (dashboard)

@pytest.mark.parametrize("accept,html", [
    (BROWSER_ACCEPT, True),
    ("text/html", True),
    ("*/*", False),
    ("", False),
    ("application/json", False),
    ("application/json, text/html;q=0.5", False),
    ("text/html;q=0.9, application/json;q=0.9", True),
    ("text/html;q=0", False),
    ("text/html;q=abc", False),
    ("TEXT/HTML", True),
])
def test_wants_html(accept: str, html: bool) -> None:
    assert dashboard.wants_html(accept) is html


async def test_browser_gets_the_page_with_a_strict_csp(served: Any) -> None:
    _, client = served
    resp = await client.get("/", headers={"Accept": BROWSER_ACCEPT})
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    styles = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert len(scripts) == 1 and len(styles) == 1
    for code in scripts + styles:
        digest = base64.b64encode(hashlib.sha256(code.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    # self-contained: nothing loaded from elsewhere, every API URL relative to the page
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|v1/|metrics)""", page)
    assert "http://" not in page and "https://" not in page and "//cdn" not in page
    assert "@import" not in page and "url(" not in page
    for path in ("v1/status", "v1/members", "v1/leader"):
        assert f'"{path}"' in page
    assert 'id="leader-id"' in page and 'id="members"' in page and "viewport" in page


async def test_api_clients_get_a_json_index_at_root(served: Any) -> None:
    _, client = served
    for accept in ("*/*", "application/json"):
        resp = await client.get("/", headers={"Accept": accept})
        assert resp.status == 200 and resp.content_type == "application/json"
        body = await resp.json()
        assert "GET /v1/status" in body["routes"] and "GET /metrics" in body["routes"]
        assert not any(r.startswith("HEAD") for r in body["routes"])
    resp = await client.head("/")
    assert resp.status == 200 and resp.content_type == "application/json"
    resp = await client.get("/", params={"x": "1"}, headers={"Accept": BROWSER_ACCEPT})
    assert resp.status == 400 and (await resp.json())["error"] == "bad_request"


# ------------------------------------------------------------ /metrics over a real task service

async def test_task_metrics_move_with_a_real_task_service(tmp_path) -> None:
    """A real single-node task service (tests/unit/test_tasks_api.py's SoloNode): one task
    submitted and run moves the counters, the state gauges and both latency histograms."""
    from tests.unit.test_tasks_api import SoloNode, finished

    class Node(SoloNode):
        def status(self) -> dict[str, Any]:           # what galaxy.node.Node.status() says of tasks
            return {"tasks": self.tasks.counts(),
                    "scheduler": {**self.tasks.stats, "waiting": len(self.tasks.waiting)}}

    node = Node(str(tmp_path))
    await node.docs.start("127.0.0.1", 0)
    await node.tasks.start()
    try:
        async with node.client() as client:
            before = parse((await scrape(client))[1])
            assert one(before, "galaxy_tasks_submitted_total") == 0
            assert one(before, "galaxy_tasks", state="succeeded") == 0
            assert one(before, "galaxy_task_submit_to_running_seconds_count") == 0

            r = await client.post("/v1/tasks", json={"command": "sleep 0.3; echo done",
                                                     "resources": {"cpu": 0.5, "memory_mb": 64}})
            assert r.status == 202
            task_id = (await r.json())["id"]

            async def running() -> dict | None:
                s = parse((await scrape(client))[1])
                return s if one(s, "galaxy_executor_running") == 1 else None
            async with asyncio.timeout(20):
                while not (during := await running()):
                    await asyncio.sleep(0.02)
            assert one(during, "galaxy_tasks", state="running") == 1
            assert one(during, "galaxy_tasks_started_total") == 1

            assert (await finished(client, task_id))["state"] == "succeeded"
            after = parse((await scrape(client))[1])
    finally:
        await node.tasks.stop()
        await node.docs.stop()
        node.store.close()
    assert one(after, "galaxy_tasks_submitted_total") == 1
    assert one(after, "galaxy_tasks_scheduled_total") == 1 and one(after, "galaxy_tasks_finished_total") == 1
    assert one(after, "galaxy_tasks_lost_total") == 0 and one(after, "galaxy_scheduler_waiting") == 0
    assert one(after, "galaxy_tasks", state="succeeded") == 1 and one(after, "galaxy_tasks", state="running") == 0
    assert one(after, "galaxy_executor_running") == 0 and one(after, "galaxy_executor_queued") == 0
    for name in ("galaxy_task_schedule_latency_seconds", "galaxy_task_submit_to_running_seconds"):
        assert one(after, name + "_count") == 1, name
        assert one(after, name + "_bucket", le="+Inf") == 1
        # placed and started at once on an idle node: well under the 30 s bucket, and not negative
        assert one(after, name + "_bucket", le="30.0") == 1 and 0 <= one(after, name + "_sum") < 30
    assert not node.failures


def test_histogram_buckets_are_upper_bound_inclusive() -> None:
    from galaxy.histogram import Histogram

    h = Histogram((0.1, 1.0))
    for x in (0.0, 0.1, 0.10001, 1.0, 5.0, -3.0):
        h.observe(x)
    assert h.counts == [3, 2, 1] and h.count == 6 and math.isclose(h.sum_s, 6.20001)
    snap = h.snapshot()
    h.observe(0.5)
    assert snap["counts"] == [3, 2, 1], "a snapshot is a copy"
    with pytest.raises(ValueError):
        Histogram((1.0, 1.0))
    with pytest.raises(ValueError):
        Histogram(())
