"""The node's HTTP API (aiohttp).

Theory of operation: handlers are thin — parse the request, call one method of the
node, render its answer as JSON.  They hold no protocol logic and no state; the node
object (``galaxy.node.Node``) owns both.  Every route is served by every node.

Invariants:

* Every response has a JSON body (except HEAD, which has none by definition), with two
  exceptions a client asks for: ``GET /metrics`` answers in Prometheus text format and
  ``GET /`` answers a browser (``Accept`` preferring ``text/html``) with the dashboard
  page (``metrics.py``, ``dashboard.py``).  Errors
  are ``{"error": code, "message": text}`` (see ``errors.py``) with the fitting status:
  unknown route 404, wrong method 405, body larger than ``cfg.http_body_max_bytes`` 413,
  a query parameter a route does not know, or one given twice, 400 naming it.
* Nothing a client sends can crash the node or make it answer 5xx: a 500 only comes
  from a bug on the node's side, is logged with its traceback, and tells the client
  nothing beyond "internal error".
* Request bodies are bounded twice: a declared ``Content-Length`` over the limit is
  refused before any handler runs, and aiohttp's ``client_max_size`` stops a chunked
  body that grows past it while a handler reads it.
* Every route has an access level (``access.POLICY``: open, read, or a role), checked by
  ``access.middleware`` before its handler runs; a route without one needs an admin
  token.  Reads are open while the cluster setting ``anonymous_read`` is true.
* Every request, whatever its outcome, is timed into the app's own Prometheus registry
  (``METRICS_KEY``) by route pattern; ``/metrics`` exports that registry plus the node's
  state, read at scrape time.

Node interface used here: ``status() -> dict``, ``members() -> list[dict]``,
``leader() -> dict``, ``healthy() -> bool``, ``ready() -> (bool, reason)`` and
``cfg.http_body_max_bytes``.  A method may also be a coroutine function.  ``/metrics``
also reads what ``metrics.py`` lists (all optional).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from galaxy.api import access, dashboard, metrics
from galaxy.api.errors import ApiError, check_query, code_for_status, echo, error_response

log = logging.getLogger("galaxy.api")

NODE_KEY: web.AppKey[Any] = web.AppKey("galaxy_node", object)
BODY_MAX_KEY: web.AppKey[int] = web.AppKey("galaxy_body_max_bytes", int)
METRICS_KEY: web.AppKey[metrics.Exporter] = web.AppKey("galaxy_metrics", metrics.Exporter)

# Connections the kernel may hold before the node accepts them (capped by somaxconn).
# aiohttp's 128 overflows when a burst of clients connects at once (dashboards, scrapers,
# a load test): the kernel then drops the handshake's last ACK and the client's first
# request waits about a second for the retransmission.
LISTEN_BACKLOG = 1024

# NaN is not JSON; a node that produces one has a bug, and a 500 says so instead of
# sending a body strict clients cannot parse.
_dumps = functools.partial(json.dumps, allow_nan=False)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


async def _call(fn: Callable[[], Any]) -> Any:
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result


def _body_max_bytes(request: web.Request) -> int:
    # Read from the node's cfg on every request: a cluster-wide setting may change it live.
    cfg = request.app[NODE_KEY].cfg
    if request.path == "/v1/blobs":        # input archives: streamed to disk, with their own limit
        return int(cfg.input_bytes_max)
    return int(getattr(cfg, "http_body_max_bytes", request.app[BODY_MAX_KEY]))


@web.middleware
async def _errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    body_max_bytes = _body_max_bytes(request)
    declared = request.content_length
    if declared is not None and declared > body_max_bytes:
        return error_response(413, "payload_too_large",
                              f"request body of {declared} bytes is over the limit of "
                              f"{body_max_bytes} bytes")
    if request.client_max_size != body_max_bytes and request.path != "/v1/blobs":
        request = request.clone(client_max_size=body_max_bytes)
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:                # redirects and the like pass through
            raise
        return _from_http_exception(request, exc)
    except ConnectionResetError:
        # The client went away mid-request (a body cut short): its problem, not a bug here.
        log.debug("client closed the connection during %s %s", request.method, request.path)
        return error_response(400, "bad_request", "the connection closed before the request was read")
    except Exception:
        log.exception("internal error serving %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; see the node's log")


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    status = exc.status
    headers = {k: v for k, v in exc.headers.items()
               if k.lower() not in ("content-type", "content-length")}
    if isinstance(exc, web.HTTPNotFound):
        message = f"no such route: {request.method} {echo(request.path)}"
    elif isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        message = (f"method {echo(request.method)} is not allowed on "
                   f"{echo(request.path)} (allowed: {allowed})")
    elif isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = _body_max_bytes(request)
        message = f"request body is over the limit of {limit} bytes"
    elif status >= 500:
        log.error("HTTP %d serving %s %s: %s", status, request.method, request.path,
                  exc.reason)
        message = "internal error; see the node's log"
    else:
        message = exc.reason or code_for_status(status)
    return error_response(status, code_for_status(status), message, headers)


def _route(method_name: str, render: Callable[[Any], tuple[Any, int]],
           query: tuple[str, ...] = ()) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        check_query(request, query)
        node = request.app[NODE_KEY]
        body, status = render(await _call(getattr(node, method_name)))
        return _json(body, status)

    handler.__name__ = f"get_{method_name}"
    return handler


def _render_healthy(ok: Any) -> tuple[Any, int]:
    return {"ok": bool(ok)}, 200 if ok else 503


def _render_ready(answer: Any) -> tuple[Any, int]:
    ready, reason = answer
    if ready:
        return {"ready": True}, 200
    return {"ready": False, "reason": str(reason)}, 503


def _render_members(members: Any) -> tuple[Any, int]:
    return {"members": list(members)}, 200


def _render_as_is(body: Any) -> tuple[Any, int]:
    return body, 200


async def _metrics(request: web.Request) -> web.Response:
    check_query(request)
    status = await _call(request.app[NODE_KEY].status)
    return request.app[METRICS_KEY].render(request.headers.get("Accept", ""), status)


# ---- /v1/kv: replicated key-value documents (Consul-style); every node serves every key
KV_KEY_CHARS_MAX = 256
KV_LIST_MAX = 1000


def _kv_key(request: web.Request) -> str:
    key = request.match_info["key"]
    if len(key) > KV_KEY_CHARS_MAX or not key.isprintable():
        raise ApiError(400, f"key: must be 1..{KV_KEY_CHARS_MAX} printable characters")
    return key


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


async def _kv_get(request: web.Request) -> web.Response:
    check_query(request, ())
    key = _kv_key(request)
    doc = request.app[NODE_KEY].kv_get(key)
    if doc is None:
        raise ApiError(404, f"no key {echo(key)}")
    return _json(doc)


async def _kv_list(request: web.Request) -> web.Response:
    check_query(request, ("prefix",))
    prefix = request.query.get("prefix", "")
    if len(prefix) > KV_KEY_CHARS_MAX:
        raise ApiError(400, f"prefix: at most {KV_KEY_CHARS_MAX} characters")
    return _json({"items": request.app[NODE_KEY].kv_list(prefix, KV_LIST_MAX)})


async def _kv_put(request: web.Request) -> web.Response:
    check_query(request, ())
    key = _kv_key(request)
    try:
        value = json.loads(await request.read() or b"null", parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body: must be a JSON value ({e.__class__.__name__})") from None
    try:
        doc = request.app[NODE_KEY].kv_put(key, value)
    except (ValueError, OverflowError, TypeError) as e:     # too large, too deep, too big an int
        raise ApiError(400, f"value: {e}") from None
    return _json(doc)


async def _kv_delete(request: web.Request) -> web.Response:
    check_query(request, ())
    key = _kv_key(request)
    if not request.app[NODE_KEY].kv_delete(key):
        raise ApiError(404, f"no key {echo(key)}")
    return _json({"key": key, "deleted": True})


def make_app(node: Any) -> web.Application:
    """The aiohttp application serving ``node``; more routes may be added before start."""
    body_max_bytes = int(node.cfg.http_body_max_bytes)
    exporter = metrics.Exporter(node)
    # The timing middleware is outermost, so it sees the status the error middleware chose;
    # the access check is innermost, so its refusals are the error middleware's JSON.
    app = web.Application(middlewares=[exporter.http.middleware, _errors_middleware, access.middleware],
                          client_max_size=body_max_bytes)
    app[NODE_KEY] = node
    app[BODY_MAX_KEY] = body_max_bytes
    app[METRICS_KEY] = exporter
    app[access.POLICY_KEY] = dict(access.POLICY)
    app.router.add_get("/", dashboard.index)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _route("healthy", _render_healthy))
    app.router.add_get("/readyz", _route("ready", _render_ready))
    app.router.add_get("/v1/status", _route("status", _render_as_is))
    app.router.add_get("/v1/members", _route("members", _render_members))
    app.router.add_get("/v1/leader", _route("leader", _render_as_is))
    app.router.add_get("/v1/kv", _kv_list)
    app.router.add_get(r"/v1/kv/{key:[\s\S]+}", _kv_get)
    app.router.add_put(r"/v1/kv/{key:[\s\S]+}", _kv_put)
    app.router.add_delete(r"/v1/kv/{key:[\s\S]+}", _kv_delete)
    if getattr(node, "tasks", None) is not None:
        from galaxy.api import tasks
        tasks.add_routes(app)
    if getattr(node, "ledger", None) is not None:
        from galaxy.api import ledger
        ledger.add_routes(app)
    if getattr(node, "settings", None) is not None:
        from galaxy.api import config, internal
        config.add_routes(app)
        internal.add_routes(app)
    if getattr(node, "keyring", None) is not None:
        from galaxy.api import security
        security.add_routes(app)
    if getattr(node, "ledger", None) is not None and getattr(node, "tasks", None) is not None:
        from galaxy.api import recover      # the coordinator is attached after the app is made
        recover.add_routes(app)
    return app


class _BadRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse (garbage, a header over 8 KiB, a bad
    Content-Length) at ERROR with a traceback, though it answered the client 400 and
    nothing on the node failed.  Such records become one DEBUG line without the
    traceback: a port scan or a fuzzer must not fill the log with "errors"."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        record.msg, record.args = "bad HTTP request from %s: %s", (*(record.args or ("?",))[:1], exc.message)
        record.exc_info = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return log.isEnabledFor(logging.DEBUG)


_BAD_REQUEST_FILTER = _BadRequestFilter()


async def serve(app: web.Application, host: str, port: int,
                shutdown_timeout_s: float = 5.0, ssl_context: Any = None) -> tuple[web.AppRunner, int]:
    """Start serving ``app`` on host:port (0 = any free port), over TLS when ``ssl_context``
    is given; returns (runner, bound port).

    Stop with ``await runner.cleanup()``.
    """
    logging.getLogger("aiohttp.server").addFilter(_BAD_REQUEST_FILTER)    # once: a set holds filters
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout_s)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG, ssl_context=ssl_context)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return runner, bound_port
