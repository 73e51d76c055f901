"""The HTTP API against a fake node: route shapes, the JSON error contract, a fuzz test.

The fake node is the edge mock: it has the ``galaxy.node.Node`` methods the API calls.
Servers are real aiohttp servers on loopback (``aiohttp.test_utils.TestServer``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import types
import urllib.request
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from yarl import URL

from galaxy.api import access
from galaxy.api.app import make_app, serve

BODY_MAX_BYTES = 1024
SECRET = "secret-internal-detail-/etc/galaxy"


class FakeNode:
    def __init__(self) -> None:
        self.node_id = "n-1a2b"
        self.cfg = types.SimpleNamespace(http_body_max_bytes=BODY_MAX_BYTES)
        self.boom = False
        self.is_healthy = True
        self.readiness: tuple[bool, str] = (True, "")
        self.member_list: list[dict[str, Any]] = [
            {"id": "n-1a2b", "state": "alive", "role": "auto", "addr": "127.0.0.1:7946",
             "incarnation": 1,
             "resources": {"cpu": 4.0, "memory_mb": 8192, "gpu": 0,
                           "free": {"cpu": 3.5, "memory_mb": 4096, "gpu": 0}},
             "trust": "low", "last_heard": 0.0},
            {"id": "n-3c4d", "state": "suspect", "role": "worker", "addr": "127.0.0.1:7956",
             "incarnation": 3, "resources": {"cpu": 2.0, "memory_mb": 2048, "gpu": 1},
             "trust": "low", "last_heard": 1.25},
        ]

    def _maybe_boom(self) -> None:
        if self.boom:
            raise RuntimeError(SECRET)

    def status(self) -> dict[str, Any]:
        self._maybe_boom()
        return {"node": {"id": self.node_id, "role": "auto", "version": "0.1.0",
                         "http": "http://127.0.0.1:8000"},
                "leader": self.leader(), "voters": ["n-1a2b"],
                "members": {"alive": 1, "suspect": 1, "dead": 0, "left": 0},
                "tasks": {"pending": 0, "running": 1},
                "ledger": {"applied_seq": 4, "hash": "ab" * 16, "total_supply": 100,
                           "pending": 0},
                "conflicts_resolved": 2}

    def members(self) -> list[dict[str, Any]]:
        self._maybe_boom()
        return self.member_list

    def leader(self) -> dict[str, Any]:
        self._maybe_boom()
        return {"leader": "n-1a2b", "term": 7, "http": "http://127.0.0.1:8000"}

    def healthy(self) -> bool:
        self._maybe_boom()
        return self.is_healthy

    def ready(self) -> tuple[bool, str]:
        self._maybe_boom()
        return self.readiness


@pytest.fixture
async def node_client() -> Any:
    node = FakeNode()
    async with TestClient(TestServer(make_app(node))) as client:
        yield node, client


async def _json_of(resp: Any) -> Any:
    assert resp.content_type == "application/json"
    return json.loads(await resp.read())


# ------------------------------------------------------------------------- routes

async def test_healthz(node_client: Any) -> None:
    node, client = node_client
    resp = await client.get("/healthz")
    assert resp.status == 200 and await _json_of(resp) == {"ok": True}
    node.is_healthy = False
    resp = await client.get("/healthz")
    assert resp.status == 503 and await _json_of(resp) == {"ok": False}


async def test_readyz(node_client: Any) -> None:
    node, client = node_client
    resp = await client.get("/readyz")
    assert resp.status == 200 and await _json_of(resp) == {"ready": True}
    node.readiness = (False, "no coordinator known yet")
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert await _json_of(resp) == {"ready": False, "reason": "no coordinator known yet"}


async def test_status_leader_members_shapes(node_client: Any) -> None:
    node, client = node_client
    resp = await client.get("/v1/status")
    assert resp.status == 200 and await _json_of(resp) == node.status()
    resp = await client.get("/v1/leader")
    assert resp.status == 200
    assert await _json_of(resp) == {"leader": "n-1a2b", "term": 7, "http": "http://127.0.0.1:8000"}
    resp = await client.get("/v1/members")
    assert resp.status == 200 and await _json_of(resp) == {"members": node.member_list}


async def test_async_node_methods_are_awaited() -> None:
    class AsyncNode(FakeNode):
        async def leader(self) -> dict[str, Any]:     # type: ignore[override]
            await asyncio.sleep(0)
            return {"leader": None, "term": 0, "http": None}

    async with TestClient(TestServer(make_app(AsyncNode()))) as client:
        resp = await client.get("/v1/leader")
        assert await _json_of(resp) == {"leader": None, "term": 0, "http": None}


async def test_head_is_allowed_and_bodyless(node_client: Any) -> None:
    _, client = node_client
    resp = await client.head("/v1/status")
    assert resp.status == 200
    assert await resp.read() == b""


# ------------------------------------------------------------------------- errors

async def test_unknown_route_is_json_404(node_client: Any) -> None:
    _, client = node_client
    resp = await client.get("/v1/nope")
    assert resp.status == 404
    body = await _json_of(resp)
    assert body["error"] == "not_found" and "/v1/nope" in body["message"]


async def test_wrong_method_is_json_405_with_allow(node_client: Any) -> None:
    _, client = node_client
    resp = await client.post("/v1/status", json={})
    assert resp.status == 405
    assert set(resp.headers["Allow"].split(",")) == {"GET", "HEAD"}
    body = await _json_of(resp)
    assert body["error"] == "method_not_allowed" and "POST" in body["message"]


async def test_declared_body_over_limit_is_json_413(node_client: Any) -> None:
    _, client = node_client
    resp = await client.post("/v1/status", data=b"x" * (BODY_MAX_BYTES + 1))
    assert resp.status == 413
    body = await _json_of(resp)
    assert body["error"] == "payload_too_large" and str(BODY_MAX_BYTES) in body["message"]
    resp = await client.get("/v1/status", data=b"x" * BODY_MAX_BYTES)   # at the limit: fine
    assert resp.status == 200


async def test_streamed_body_over_limit_is_json_413() -> None:
    """A chunked body has no Content-Length; reading it past the limit is still a 413."""
    app = make_app(FakeNode())

    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"n": len(await request.read())})

    app.router.add_post("/echo", echo)
    app[access.POLICY_KEY][("POST", "/echo")] = (access.OPEN, "this test")

    async def chunks(n: int) -> Any:
        for _ in range(n):
            yield b"y" * 256

    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/echo", data=chunks(2))
        assert resp.status == 200 and await _json_of(resp) == {"n": 512}
        resp = await client.post("/echo", data=chunks(8))
        assert resp.status == 413
        assert (await _json_of(resp))["error"] == "payload_too_large"


async def test_unknown_query_parameter_is_400_naming_it(node_client: Any) -> None:
    _, client = node_client
    for path in ("/healthz", "/readyz", "/v1/status", "/v1/members", "/v1/leader"):
        resp = await client.get(path, params={"verbose": "1"})
        assert resp.status == 400, path
        body = await _json_of(resp)
        assert body["error"] == "bad_request" and "'verbose'" in body["message"]


async def test_long_parameter_name_is_cut_in_the_message(node_client: Any) -> None:
    _, client = node_client
    resp = await client.get("/v1/status", params={"p" * 5000: "1"})
    body = await _json_of(resp)
    assert resp.status == 400 and len(body["message"]) < 300


async def test_node_exception_is_generic_500_and_logged(node_client: Any,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    node, client = node_client
    node.boom = True
    with caplog.at_level(logging.ERROR, logger="galaxy.api"):
        resp = await client.get("/v1/members")
    assert resp.status == 500
    body = await _json_of(resp)
    assert body["error"] == "internal"
    assert SECRET not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    logged = [r for r in caplog.records if r.name == "galaxy.api"]
    assert logged and logged[0].exc_info is not None
    assert SECRET in caplog.text                        # the operator sees the traceback


async def test_unserialisable_answer_is_500_not_bad_json(node_client: Any) -> None:
    node, client = node_client
    node.member_list = [{"id": "x", "cpu": float("nan")}]
    resp = await client.get("/v1/members")
    assert resp.status == 500 and (await _json_of(resp))["error"] == "internal"


async def test_garbage_on_the_socket_does_not_hurt_the_server(node_client: Any) -> None:
    _, client = node_client
    host, port = client.server.host, client.server.port
    for garbage in (b"\x00\xff\x10garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                    b"GET /v1/status HTTP/1.1\r\nContent-Length: -5\r\n\r\n"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(garbage)
        await writer.drain()
        await asyncio.wait_for(reader.read(4096), 5)
        writer.close()
        await writer.wait_closed()
    resp = await client.get("/v1/status")
    assert resp.status == 200


async def test_serve_binds_port_zero_and_stops() -> None:
    runner, port = await serve(make_app(FakeNode()), "127.0.0.1", 0)
    try:
        assert port > 0

        def fetch() -> Any:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(f"http://127.0.0.1:{port}/v1/leader", timeout=5) as r:
                return json.loads(r.read())

        assert (await asyncio.to_thread(fetch))["term"] == 7
    finally:
        await runner.cleanup()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):   # nobody listens now
        s.connect(("127.0.0.1", port))


async def test_serve_reports_a_busy_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(OSError):
            await serve(make_app(FakeNode()), "127.0.0.1", s.getsockname()[1])


# ------------------------------------------------------------------------- fuzz

ROUTES = ["/healthz", "/readyz", "/v1/status", "/v1/members", "/v1/leader"]
# Methods llhttp parses; a method it does not know is a protocol error answered by
# aiohttp's low-level parser before any application code runs.
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
           "PROPFIND", "MKCOL", "PURGE"]

_segment = st.text(min_size=0, max_size=12)
_path = st.one_of(
    st.sampled_from(ROUTES),
    st.sampled_from(ROUTES),
    st.lists(_segment, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts)),
    st.sampled_from(ROUTES).flatmap(lambda r: _segment.map(lambda s: r + "/" + s)),
)
_query = st.one_of(st.just({}), st.dictionaries(st.text(max_size=10), st.text(max_size=10),
                                                max_size=3))
_body = st.one_of(st.just(b""), st.just(b""), st.binary(max_size=64),
                  st.integers(BODY_MAX_BYTES - 2, BODY_MAX_BYTES + 2).map(lambda n: b"z" * n),
                  st.binary(min_size=1, max_size=4 * BODY_MAX_BYTES))


def test_fuzz_every_answer_is_json_and_never_5xx() -> None:
    loop = asyncio.new_event_loop()
    node = FakeNode()
    client = TestClient(TestServer(make_app(node)), loop=loop)
    loop.run_until_complete(client.start_server())

    async def one(method: str, path: str, query: dict[str, str], body: bytes,
                  boom: bool) -> None:
        node.boom = boom
        url = URL.build(path=path, query=query or None)
        resp = await client.request(method, url, data=body or None, allow_redirects=False)
        raw = await resp.read()
        assert resp.content_type == "application/json", (resp.status, raw[:200])
        reaches_handler = (method in ("GET", "HEAD") and resp.url.path in ROUTES
                           and not resp.url.query and len(body) <= BODY_MAX_BYTES)
        if boom and reaches_handler:
            assert resp.status == 500
        else:
            assert resp.status < 500, (method, str(url), resp.status, raw[:200])
        if method == "HEAD":
            assert raw == b""
            return
        answer = json.loads(raw)
        assert isinstance(answer, dict)
        if resp.status >= 400 and answer.keys() != {"ok"} and answer.keys() != {"ready", "reason"}:
            assert set(answer) == {"error", "message"}
            assert isinstance(answer["error"], str) and isinstance(answer["message"], str)
            assert SECRET not in answer["message"]

    @settings(max_examples=300, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(method=st.one_of(st.just("GET"), st.sampled_from(METHODS)), path=_path, query=_query, body=_body,
           boom=st.booleans())
    def check(method: str, path: str, query: dict[str, str], body: bytes, boom: bool) -> None:
        loop.run_until_complete(asyncio.wait_for(one(method, path, query, body, boom), 10))

    try:
        check()
    finally:
        loop.run_until_complete(client.close())
        loop.close()
