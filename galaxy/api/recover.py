"""HTTP routes for ``galaxy recover`` (docs/recover.md).

Theory of operation: thin, like ``app.py`` — authenticate, parse, call
``consensus.recover_runner``, render.

    GET  /v1/recover     this node's recovery facts (recover.Facts)                 operator
    POST /v1/recover     {"order": recover.Order, "force"?, "dry_run"?}             admin

Sign-in works without a coordinator: passwords are checked against the node's own ledger
view and tokens are HMAC-signed with a key derived from the cluster key, so an admin can
sign in on any survivor (``galaxy login``) while no coordinator exists.  A refused order
is 409 ``refused`` with the reason; a malformed one is 400.
"""

from __future__ import annotations

import json

from aiohttp import web

from galaxy.api.errors import ApiError, check_query
from galaxy.api.tasks import _json, _node
from galaxy.consensus import recover as recovery
from galaxy.consensus import recover_runner

POST_FIELDS = {"order", "force", "dry_run"}


async def get_facts(request: web.Request) -> web.Response:
    check_query(request)                 # operator: galaxy/api/access.py
    return _json(recover_runner.facts(_node(request)).to_json())


async def post_order(request: web.Request) -> web.Response:
    check_query(request)                 # admin: galaxy/api/access.py
    try:
        body = json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body: must be a JSON object ({e.__class__.__name__})") from None
    if not isinstance(body, dict) or "order" not in body or not set(body) <= POST_FIELDS:
        raise ApiError(400, f"body: a JSON object with order and optionally force, dry_run "
                            f"(got {sorted(body) if isinstance(body, dict) else type(body).__name__})")
    flags = {k: body.get(k, False) for k in ("force", "dry_run")}
    if not all(type(v) is bool for v in flags.values()):
        raise ApiError(400, "force, dry_run: true or false")
    try:
        order = recovery.Order.from_json(body["order"])
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    try:
        answer = await recover_runner.apply(_node(request), order, **flags)
    except recovery.Refused as e:
        raise ApiError(409, str(e), code="refused") from None
    return _json(answer)


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/recover", get_facts)
    app.router.add_post("/v1/recover", post_order)
