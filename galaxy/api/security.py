"""HTTP routes for join tokens and the cluster keyring (docs/security.md).

Theory of operation: thin, like ``app.py`` — parse, call the node's ``JoinService``
(``node.join``) or ``KeyringRunner`` (``node.keyring``), render.  Every node serves every
route; changes commit through the coordinator (forwarded by non-voters).

    POST /v1/join/tokens      {"ttl_ms"?, "role"?} -> {"token", "expires_ms", "role", "seeds"}   operator
    POST /v1/join/redeem      {"body", "pub", "proof"} -> {"pub", "sealed"}      the token is the credential
    GET  /v1/keyring          this node's ring and every alive member's (fingerprints only)      operator
    GET  /v1/keyring/local    this node's ring (fingerprints only)              internal (node-signed)
    POST /v1/keyring          {"op": install|use|remove, "key": "gk1-..."}                        operator

Who may: an account of role operator or admin (``Authorization: Bearer TOKEN``, the
ledger's sign-in tokens).  Every mesh has an admin account from its first minute (the
ledger opens it), so these routes are never open.  A redeem refusal is 403 with the
reason as ``error`` (malformed, unknown_key, altered, foreign_cluster, expired, used).
No response and no error message contains a key, a token's mac, or the sealed keyring's
plaintext.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web

from galaxy import join
from galaxy.api.errors import ApiError, check_query
from galaxy.api.internal import AUTH_HEADER, COMMAND_STATUS, new_nonce
from galaxy.api.access import caller, require
from galaxy.api.tasks import _json, _node
from galaxy.consensus.commands import CommandError
from galaxy.keyring import FULL, NOT_INSTALLED, OPS, KeyringError

KEYRING_STATUS = {NOT_INSTALLED: 404, FULL: 409}
MEMBER_QUERY_TIMEOUT_S = 2.0


async def _body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body: must be JSON ({e.__class__.__name__})") from None


def _operator(request: web.Request) -> str:
    """The caller's account when it is an operator or admin; ApiError 401/403 otherwise."""
    account, role = caller(request)
    require(role, "operator")
    return account


async def create_token(request: web.Request) -> web.Response:
    check_query(request)
    account = _operator(request)
    body = await _body(request) or {}
    if not isinstance(body, dict) or not set(body) <= {"ttl_ms", "role"}:
        raise ApiError(400, 'body: must be {"ttl_ms": MS, "role": "worker"|"coordinator"} (both optional)')
    ttl_ms = body.get("ttl_ms", join.TTL_MS_DEFAULT)
    role = body.get("role", "coordinator")
    if type(ttl_ms) is not int or not join.TTL_MS_MIN <= ttl_ms <= join.TTL_MS_MAX:
        raise ApiError(400, f"ttl_ms: an integer from {join.TTL_MS_MIN} to {join.TTL_MS_MAX}")
    if role not in join.ROLES:
        raise ApiError(400, f"role: one of {', '.join(join.ROLES)}")
    return _json(_node(request).join.create(ttl_ms, role, by=account))


async def redeem(request: web.Request) -> web.Response:
    check_query(request)
    body = await _body(request)
    try:
        answer = await _node(request).join.redeem(body, peer=request.remote or "?")
    except join.TokenError as e:
        raise ApiError(403, str(e), code=e.reason) from None
    except CommandError as e:
        raise ApiError(COMMAND_STATUS.get(e.code, 503), e.message, code=e.code) from None
    return _json(answer)


async def keyring_local(request: web.Request) -> web.Response:
    check_query(request)
    node = _node(request)
    try:
        node.internal_auth.verify(node.clock.wall_ms(), request.headers.get(AUTH_HEADER), request.method,
                                  request.path, b"")
    except Exception as e:             # AuthError: 401; never say more than its reason
        raise ApiError(getattr(e, "status", 401), str(e)) from None
    return _json(node.keyring.view())


async def keyring_list(request: web.Request) -> web.Response:
    check_query(request)
    _operator(request)
    node = _node(request)
    return _json({**node.keyring.view(), "members": await _member_views(node)})


async def _member_views(node: Any) -> dict[str, dict]:
    """Every alive member's ring as it reports it (this node's included), by node id."""
    peers = [m for m in node.members() if m["id"] != node.node_id and m["state"] == "alive"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=MEMBER_QUERY_TIMEOUT_S)) as session:
        views = await asyncio.gather(*(_member_view(node, session, m) for m in peers))
    return {node.node_id: node.keyring.view(), **{m["id"]: v for m, v in zip(peers, views)}}


async def _member_view(node: Any, session: aiohttp.ClientSession, member: dict) -> dict:
    path = "/v1/keyring/local"
    header = node.internal_auth.header(node.node_id, node.clock.wall_ms(), "GET", path, b"", new_nonce())
    try:
        async with session.get(member["http"] + path, headers={AUTH_HEADER: header},
                               ssl=node.peers.ssl_for(member["http"])) as resp:
            if resp.status != 200:
                return {"error": f"HTTP {resp.status}"}
            return await resp.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        return {"error": type(e).__name__}


async def keyring_change(request: web.Request) -> web.Response:
    check_query(request)
    _operator(request)
    body = await _body(request)
    if not isinstance(body, dict) or set(body) - {"force"} != {"op", "key"} or body["op"] not in OPS \
            or not isinstance(body["key"], str):
        raise ApiError(400, 'body: must be {"op": "install"|"use"|"remove", "key": "gk1-..."}')
    node = _node(request)
    if body["op"] == "use" and not body.get("force"):
        missing = await _members_without(node, body["key"])
        if missing:
            raise ApiError(409, f"not every member has installed this key yet ({', '.join(sorted(missing))}); "
                                "they would drop what is sent with it. Wait, or pass force",
                           code="not_everywhere")
    try:
        result = await node.keyring.change(body["op"], body["key"], timeout_ms=node.cfg.raft_call_timeout_ms * 2)
    except KeyringError as e:
        raise ApiError(KEYRING_STATUS.get(e.code, 400), str(e), code=e.code) from None
    except CommandError as e:
        raise ApiError(COMMAND_STATUS.get(e.code, 503), e.message, code=e.code) from None
    return _json(result)


async def _members_without(node: Any, key: str) -> list[str]:
    """Alive members that do not (yet) run a ring holding ``key``."""
    from galaxy.keyring import fingerprint
    try:
        fp = fingerprint(key)
    except ValueError as e:
        raise ApiError(400, f"key: {e}", code="invalid_key") from None
    return [node_id for node_id, v in (await _member_views(node)).items() if fp not in (v.get("installed") or [])]


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/join/tokens", create_token)
    app.router.add_post("/v1/join/redeem", redeem)
    app.router.add_get("/v1/keyring", keyring_list)
    app.router.add_get("/v1/keyring/local", keyring_local)
    app.router.add_post("/v1/keyring", keyring_change)
