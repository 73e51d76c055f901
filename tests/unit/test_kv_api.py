"""/v1/kv: validation and shapes, against a dict-backed node (the HTTP edge only)."""

from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from galaxy.api.app import make_app
from galaxy.config import Config
from tests.unit.ledger_fake import FakeLedger


class KvNode:
    cfg = Config.sim()

    def __init__(self) -> None:
        self.data: dict[str, object] = {}
        self.ledger = FakeLedger()

    def kv_get(self, key):
        return {"key": key, "value": self.data[key]} if key in self.data else None

    def kv_put(self, key, value):
        if len(json.dumps(value)) > 100:
            raise ValueError("value too large")
        self.data[key] = value
        return {"key": key, "value": value}

    def kv_delete(self, key):
        return self.data.pop(key, None) is not None

    def kv_list(self, prefix, limit):
        return [{"key": k, "value": v} for k, v in sorted(self.data.items()) if k.startswith(prefix)][:limit]


@pytest.fixture
async def client():
    node = KvNode()
    async with TestClient(TestServer(make_app(node)), headers=node.ledger.bearer("admin")) as c:
        yield c


async def test_put_get_list_delete(client):
    r = await client.put("/v1/kv/app/db/url", data=json.dumps({"host": "x", "port": 5}))
    assert r.status == 200 and (await r.json())["value"] == {"host": "x", "port": 5}
    assert (await (await client.get("/v1/kv/app/db/url")).json())["value"] == {"host": "x", "port": 5}
    await client.put("/v1/kv/other", data="1")
    items = (await (await client.get("/v1/kv?prefix=app/")).json())["items"]
    assert [i["key"] for i in items] == ["app/db/url"]
    assert (await client.delete("/v1/kv/app/db/url")).status == 200
    r = await client.get("/v1/kv/app/db/url")
    assert r.status == 404 and (await r.json())["error"] == "not_found"


@pytest.mark.parametrize("body,why", [(b"{not json", "JSON"), (b"NaN", "JSON"), (b"[1, Infinity]", "JSON"),
                                      (json.dumps("x" * 200).encode(), "too large")])
async def test_bad_values_are_400_with_a_reason(client, body, why):
    r = await client.put("/v1/kv/k", data=body)
    doc = await r.json()
    assert r.status == 400 and doc["error"] == "bad_request" and why in doc["message"]


async def test_bad_keys_and_params(client):
    r = await client.put("/v1/kv/" + "k" * 300, data="1")
    assert r.status == 400 and "key" in (await r.json())["message"]
    r = await client.get("/v1/kv?limit=3")
    assert r.status == 400 and "limit" in (await r.json())["message"]
    assert (await client.delete("/v1/kv/missing")).status == 404


@pytest.mark.parametrize("quoted", ["%0A", "a%0Db", "%09", "x/%0A/y"])
async def test_a_key_with_a_control_character_is_400_and_needs_a_token_first(client, quoted):
    # the route must match every key (a "." pattern skipped newlines: 404 before the token check)
    r = await client.put("/v1/kv/" + quoted, data="1")
    assert r.status == 400 and "printable" in (await r.json())["message"]
    r = await client.put("/v1/kv/" + quoted, data="1", headers={"Authorization": ""})
    assert r.status == 401
