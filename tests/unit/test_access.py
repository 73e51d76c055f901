"""Who may call which route (galaxy/api/access.py), against a real app and a real task service.

The node is tests/unit/test_tasks_api.py's SoloNode (a real TaskService) with the stand-in
ledger's real tokens, plus the attributes that make ``make_app`` add every other route.
Refusals happen before a handler runs, so those routes' services are never called here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from galaxy import auth
from galaxy.api import access
from galaxy.api.app import make_app
from galaxy.api.internal import AUTH_HEADER, InternalAuth, new_nonce
from galaxy.clock import SystemClock
from tests.unit.ledger_fake import SECRET
from tests.unit.test_tasks_api import ME, SoloNode, finished, tar_of

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TASK = {"command": ["sleep", "30"], "resources": {"cpu": 0.1, "memory_mb": 16}, "max_retries": 0}
PATH_VALUES = {"{key}": "k", "{id}": "t-0123456789abcdef", "{sha}": "0" * 64, "{node}": ME, "{name}": "admin"}


class FullNode(SoloNode):
    """SoloNode plus what makes ``make_app`` serve every route, and what /v1/status needs."""

    def __init__(self, data_dir: str) -> None:
        super().__init__(data_dir)
        self.settings = object()          # config routes (never reached: refused before)
        self.keyring = object()           # join and keyring routes (idem)
        self.clock = SystemClock()
        self.internal_auth = InternalAuth(b"i" * 32, 30_000)
        for name, role in (("alice", "user"), ("bob", "user"), ("olga", "operator")):
            self.ledger.add_account(name, role)

    def leader(self) -> dict:
        return {"leader": ME, "term": 1, "http": None}

    def healthy(self) -> bool:
        return True

    def ready(self) -> tuple[bool, str]:
        return True, ""

    def kv_list(self, prefix: str, limit: int) -> list:
        return []


@pytest.fixture
async def full(tmp_path) -> Any:
    node = FullNode(str(tmp_path))
    await node.docs.start("127.0.0.1", 0)
    await node.tasks.start()
    async with TestClient(TestServer(make_app(node))) as client:     # no default token
        yield node, client
    await node.tasks.stop()
    await node.docs.stop()
    node.store.close()
    assert not node.failures


MUTATING = {("PUT", "/v1/kv/{key}"), ("DELETE", "/v1/kv/{key}"), ("POST", "/v1/tasks"),
            ("POST", "/v1/tasks/{id}/cancel"), ("POST", "/v1/blobs"), ("POST", "/v1/nodes/{node}/drain"),
            ("POST", "/v1/auth/revoke"), ("POST", "/v1/accounts"), ("POST", "/v1/transfers"), ("POST", "/v1/transfers/batch"),
            ("POST", "/v1/mint"),
            ("POST", "/v1/burn"), ("PUT", "/v1/config/{key}"), ("DELETE", "/v1/config/{key}"),
            ("PATCH", "/v1/config"), ("POST", "/v1/join/tokens"), ("POST", "/v1/keyring"), ("POST", "/v1/recover")}


def _routes(app: Any) -> list[tuple[str, str]]:
    return sorted({(r.method, r.resource.canonical) for r in app.router.routes()
                   if r.method != "HEAD" and r.resource is not None})


def _url(pattern: str) -> str:
    for name, value in PATH_VALUES.items():
        pattern = pattern.replace(name, value)
    return pattern


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_every_route_has_exactly_one_policy_entry(full):
    node, client = full
    served = _routes(client.app)
    assert [r for r in served if r not in access.POLICY] == [], "a route without an access level"
    assert [r for r in access.POLICY if r not in served] == [], "an access level for no route"


async def test_a_route_without_an_entry_needs_an_admin(full):
    node, client = full
    from aiohttp import web

    async def extra(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = make_app(node)
    app.router.add_get("/v1/extra", extra)
    async with TestClient(TestServer(app)) as c:
        assert (await c.get("/v1/extra")).status == 401
        assert (await c.get("/v1/extra", headers=node.ledger.bearer("olga"))).status == 403
        assert (await c.get("/v1/extra", headers=node.ledger.bearer("admin"))).status == 200


def _bad_tokens(node: FullNode) -> dict[str, dict[str, str]]:
    now = int(time.time() * 1000)
    forged, _ = auth.issue_token(b"x" * 32, "admin", now, b"n")                 # another cluster's key
    expired, _ = auth.issue_token(SECRET, "admin", now - 2 * auth.TOKEN_TTL_MS, b"n")
    ghost, _ = auth.issue_token(SECRET, "ghost", now, b"n")                     # no such account
    good = node.ledger.token("admin")
    head, payload, mac = good.split(".")
    altered = f"{head}.{payload[:-2]}{'A' if payload[-2] != 'A' else 'B'}{payload[-1]}.{mac}"
    return {"none": {}, "forged": _bearer(forged), "expired": _bearer(expired), "ghost": _bearer(ghost),
            "altered": _bearer(altered), "basic": {"Authorization": "Basic YWRtaW46eA=="},
            "empty": {"Authorization": "Bearer "}, "garbage": _bearer("gt1.%%%.???")}


async def test_every_route_above_read_refuses_a_missing_or_bad_token_with_401(full):
    node, client = full
    checked = []
    for (method, pattern), (level, _) in access.POLICY.items():
        if level in (access.OPEN, access.SIGNED, access.READ, access.READ_OR_NODE):
            continue
        for why, headers in _bad_tokens(node).items():
            resp = await client.request(method, _url(pattern), data=b'{"draining": true}', headers=headers)
            body = await resp.json()
            assert resp.status == 401, (method, pattern, why, resp.status, body)
            assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="galaxy"'), (method, pattern, why)
            assert set(body) == {"error", "message"} and body["error"] == "unauthorized"
            assert "gt1." not in body["message"]
        checked.append((method, pattern))
    # every route that changes something, named by hand: none may drift to open
    assert MUTATING <= set(checked)
    assert {(m, p) for m, p in access.POLICY if m != "GET"} - MUTATING == {
        ("POST", "/v1/auth/token"), ("POST", "/v1/join/redeem"), ("POST", "/v1/internal/commands")}
    assert node.tasks.counts().get("pending", 0) == 0, "nothing was submitted"


async def test_a_revoked_token_is_refused(full):
    node, client = full
    token = node.ledger.token("alice")
    assert (await client.post("/v1/tasks", json=TASK, headers=_bearer(token))).status == 202
    await node.ledger.revoke("alice")
    resp = await client.post("/v1/tasks", json=TASK, headers=_bearer(token))
    assert resp.status == 401 and "revoked" in (await resp.json())["message"]
    resp = await client.put("/v1/kv/x", data=b"1", headers=_bearer(token))
    assert resp.status == 401


@pytest.mark.parametrize("method,path,body", [
    ("POST", f"/v1/nodes/{ME}/drain", {"draining": True}),
    ("PUT", "/v1/config/scheduler_policy", {"value": "binpack"}),
    ("PATCH", "/v1/config", {"set": {"anonymous_read": False}}),
    ("DELETE", "/v1/config/scheduler_policy", None),
    ("POST", "/v1/join/tokens", {}),
    ("POST", "/v1/keyring", {"op": "use", "key": "gk1-x"}),
    ("GET", "/v1/keyring", None),
    ("POST", "/v1/mint", {"to": "alice", "amount": 5}),
])
async def test_a_user_is_refused_operator_routes_with_403(full, method, path, body):
    node, client = full
    resp = await client.request(method, path, json=body, headers=node.ledger.bearer("alice"))
    doc = await resp.json()
    assert resp.status == 403 and doc["error"] == "forbidden" and "needs role" in doc["message"], doc
    assert node.tasks.draining_nodes() == set()


async def test_an_operator_drains(full):
    node, client = full
    resp = await client.post(f"/v1/nodes/{ME}/drain", json={"draining": True}, headers=node.ledger.bearer("olga"))
    assert resp.status == 202 and node.tasks.draining_nodes() == {ME}


async def test_tasks_belong_to_the_caller_who_alone_may_cancel_them(full):
    node, client = full
    alice, bob, olga = (node.ledger.bearer(n) for n in ("alice", "bob", "olga"))
    mine = await (await client.post("/v1/tasks", json=TASK, headers=alice)).json()
    assert mine["owner"] == "alice"
    theirs = await (await client.post("/v1/tasks", json=TASK, headers=bob)).json()
    assert theirs["owner"] == "bob"
    # naming yourself is fine; naming another account needs an admin
    resp = await client.post("/v1/tasks", json={**TASK, "owner": "alice"}, headers=alice)
    assert resp.status == 202
    named = await resp.json()
    resp = await client.post("/v1/tasks", json={**TASK, "owner": "bob"}, headers=alice)
    assert resp.status == 403 and "needs role admin" in (await resp.json())["message"]
    resp = await client.post("/v1/tasks", json={**TASK, "owner": "bob"}, headers=node.ledger.bearer("admin"))
    assert resp.status == 202 and (await resp.json())["owner"] == "bob"
    on_behalf = (await resp.json())["id"]
    # ... for an account that exists: a typo is refused, not run under a name no one signs in as
    resp = await client.post("/v1/tasks", json={**TASK, "owner": "bobb"}, headers=node.ledger.bearer("admin"))
    assert resp.status == 400 and (await resp.json())["message"].startswith("owner: no account 'bobb'")
    # the owner filter sees what each caller submitted
    listed = await (await client.get("/v1/tasks?owner=alice")).json()
    assert {t["id"] for t in listed["tasks"]} == {mine["id"], named["id"]}
    # bob may not cancel alice's task; alice may; an operator may cancel anyone's
    resp = await client.post(f"/v1/tasks/{mine['id']}/cancel", headers=bob)
    assert resp.status == 403 and "belongs to another account" in (await resp.json())["message"]
    assert (await client.get(f"/v1/tasks/{mine['id']}")).status == 200
    assert not (await (await client.get(f"/v1/tasks/{mine['id']}")).json()).get("cancel_requested")
    assert (await client.post(f"/v1/tasks/{mine['id']}/cancel", headers=alice)).status == 202
    assert (await client.post(f"/v1/tasks/{theirs['id']}/cancel", headers=olga)).status == 202
    assert (await client.post(f"/v1/tasks/{on_behalf}/cancel", headers=bob)).status == 202
    assert (await client.post(f"/v1/tasks/{named['id']}/cancel", headers=alice)).status == 202
    resp = await client.post("/v1/tasks/t-00000000000000ff/cancel", headers=alice)
    assert resp.status == 404
    for task_id in (mine["id"], theirs["id"], on_behalf, named["id"]):
        assert (await finished(client, task_id))["state"] == "cancelled"


READS = ["/v1/status", "/v1/members", "/v1/leader", "/v1/tasks", "/v1/kv", "/metrics", "/v1/tasks/t-0123456789abcdef"]


async def test_anonymous_read_false_closes_reads_but_not_probes_and_applies_live(full):
    node, client = full
    for path in READS:
        assert (await client.get(path)).status in (200, 404), path        # open by default
    node.cfg = dataclasses.replace(node.cfg, anonymous_read=False)    # what a cluster setting does
    for path in READS:
        resp = await client.get(path)
        assert resp.status == 401, (path, resp.status)
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await client.get(path, headers=_bad_tokens(node)["expired"])).status == 401
        assert (await client.get(path, headers=node.ledger.bearer("alice"))).status in (200, 404), path
    assert (await client.get("/healthz")).status == 200
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/", headers={"Accept": "text/html"})).status == 200, "the page, to sign in on"
    node.cfg = dataclasses.replace(node.cfg, anonymous_read=True)
    assert (await client.get("/v1/status")).status == 200
    # while reads are open, a stale token sent along is not held against the reader
    assert (await client.get("/v1/status", headers=_bad_tokens(node)["expired"])).status == 200


async def test_input_archives_are_fetched_by_members_when_reads_are_closed(full):
    node, client = full
    archive = tar_of("data.txt", b"abc")
    resp = await client.post("/v1/blobs", data=archive, headers=node.ledger.bearer("alice"))
    assert resp.status == 201
    path = f"/v1/blobs/{(await resp.json())['sha256']}"
    node.cfg = dataclasses.replace(node.cfg, anonymous_read=False)
    assert (await client.get(path)).status == 401

    def signed(auth_: InternalAuth) -> dict[str, str]:
        return {AUTH_HEADER: auth_.header("n-peer", node.clock.wall_ms(), "GET", path, b"", new_nonce())}

    resp = await client.get(path, headers=signed(node.internal_auth))
    assert resp.status == 200 and await resp.read() == archive
    stranger = InternalAuth(b"o" * 32, 30_000)
    resp = await client.get(path, headers=signed(stranger))
    assert resp.status == 401 and "node signature" in (await resp.json())["message"]
    replay = signed(node.internal_auth)
    assert (await client.get(path, headers=replay)).status == 200
    assert (await client.get(path, headers=replay)).status == 401, "a signature is good for one request"
    # a peer's fetcher signs with the cluster's key (galaxy.node.Node sets Blobs.sign)
    from galaxy.tasks.blobs import BlobError, Blobs
    peer = Blobs(node.tasks.blobs.root + "-peer", 1024)
    base = str(client.make_url("")).rstrip("/")
    with pytest.raises(BlobError, match="HTTP 401"):
        await peer.fetch(path.rsplit("/", 1)[1], [base])
    peer.sign = lambda p: signed(node.internal_auth)
    with open(await peer.fetch(path.rsplit("/", 1)[1], [base]), "rb") as f:
        assert f.read() == archive


def test_docs_security_md_shows_the_route_table():
    with open(os.path.join(REPO, "docs", "security.md"), encoding="utf-8") as f:
        text = f.read()
    assert access.markdown_table() in text, "docs/security.md: paste access.markdown_table() (see its docstring)"


def test_the_cluster_setting_parses_and_replicates():
    from galaxy import settings
    assert "anonymous_read" in settings.CLUSTER_KEYS
    assert settings.proposed({}, {"anonymous_read": "false"}) == {"anonymous_read": False}
    state = settings.from_value({"version": 3, "settings": {"anonymous_read": False}})
    assert state is not None and state.settings == {"anonymous_read": False}
    with pytest.raises(settings.SettingError):
        settings.proposed({}, {"anonymous_read": "sometimes"})
    assert json.loads(json.dumps(settings.SettingsState(1, {"anonymous_read": False}).as_value()))
