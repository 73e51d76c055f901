"""HTTP routes for cluster-wide settings (docs/config.md).

Theory of operation: thin, like ``app.py`` — parse, call the node's ``SettingsRunner``
(``node.settings``), render.  Every node serves every route; a change made at a node
that does not vote is forwarded to the coordinator (consensus/gateway.py).

    GET    /v1/config           version, cluster settings, and every cluster key as run here
    GET    /v1/config/{key}     one key: the value run here, its source, cluster and node values
    PUT    /v1/config/{key}     body {"value": V}: set it cluster-wide
    DELETE /v1/config/{key}     unset it: every node runs its own value again
    PATCH  /v1/config           body {"set": {K: V, ...}, "unset": [K, ...]}: several at once

Errors: 400 ``invalid_setting`` (the message names the field and the rule), 400
``node_local`` (a node-local key such as http_port), 404 ``unknown_setting``, 503
``no_coordinator`` (nothing was changed; retry), 504 ``timeout`` (the change may still
apply: check the version).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from galaxy.api.errors import ApiError, check_query, echo
from galaxy.api.internal import COMMAND_STATUS
from galaxy.api.tasks import _json, _node
from galaxy.consensus.commands import CommandError
from galaxy.settings import UNKNOWN_SETTING, SettingError

SETTING_STATUS = {UNKNOWN_SETTING: 404}


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if len(key) > 64 or not key.isprintable():
        raise ApiError(404, f"no setting {echo(key)}", code=UNKNOWN_SETTING)
    return key


async def _body(request: web.Request) -> Any:
    try:
        return json.loads(await request.read() or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body: must be JSON ({e.__class__.__name__})") from None


async def _change(request: web.Request, values: dict, unset: tuple[str, ...]) -> web.Response:
    node = _node(request)
    try:
        result = await node.settings.change(values, unset, timeout_ms=node.cfg.raft_call_timeout_ms * 2)
    except SettingError as e:
        raise ApiError(SETTING_STATUS.get(e.code, 400), str(e), code=e.code) from None
    except CommandError as e:
        raise ApiError(COMMAND_STATUS.get(e.code, 503), e.message, code=e.code) from None
    return _json(result)


async def get_all(request: web.Request) -> web.Response:
    check_query(request)
    return _json(_node(request).settings.view())


async def get_one(request: web.Request) -> web.Response:
    check_query(request)
    try:
        return _json(_node(request).settings.value(_key(request)))
    except SettingError as e:
        raise ApiError(SETTING_STATUS.get(e.code, 400), str(e), code=e.code) from None


async def put_one(request: web.Request) -> web.Response:
    check_query(request)
    key = _key(request)
    body = await _body(request)
    if not isinstance(body, dict) or set(body) != {"value"}:
        raise ApiError(400, 'body: must be {"value": V}')
    return await _change(request, {key: body["value"]}, ())


async def delete_one(request: web.Request) -> web.Response:
    check_query(request)
    return await _change(request, {}, (_key(request),))


async def patch(request: web.Request) -> web.Response:
    check_query(request)
    body = await _body(request)
    if not isinstance(body, dict) or not set(body) <= {"set", "unset"}:
        raise ApiError(400, 'body: must be {"set": {KEY: VALUE, ...}, "unset": [KEY, ...]}')
    values, unset = body.get("set") or {}, body.get("unset") or []
    if not isinstance(values, dict) or not isinstance(unset, list) or not all(isinstance(k, str) for k in unset):
        raise ApiError(400, 'body: "set" must be an object and "unset" a list of keys')
    if not values and not unset:
        raise ApiError(400, "body: nothing to change")
    return await _change(request, values, tuple(unset))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/config", get_all)
    app.router.add_patch("/v1/config", patch)
    app.router.add_get("/v1/config/{key}", get_one)
    app.router.add_put("/v1/config/{key}", put_one)
    app.router.add_delete("/v1/config/{key}", delete_one)
