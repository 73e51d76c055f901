"""HTTP API errors: one JSON shape for every failure.

Theory of operation: every response that is not a success carries the body
``{"error": code, "message": text}`` with the status code that fits.  ``code`` is a
stable machine-readable token (clients branch on it); ``message`` is for humans and
never contains internals (tracebacks, exception reprs, file paths) — those go to the
node's log.  Handlers raise ``ApiError`` for expected failures (bad input, not found);
the middleware in ``app.py`` turns ``ApiError``, aiohttp's own ``HTTPException``s and
anything unexpected into this shape.

Everything a client sends that is echoed back (a path, a parameter name) is cut to
``ECHO_LEN_MAX`` characters so an error body stays small whatever the request was.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web

ECHO_LEN_MAX = 80          # characters of client input echoed in a message

# Status -> stable error code.  Append only: clients match on these strings.
CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "too_many_requests",
    431: "headers_too_large",
    500: "internal",
    501: "not_implemented",
    502: "bad_gateway",
    503: "unavailable",
    504: "gateway_timeout",
}


def code_for_status(status: int) -> str:
    if status in CODES:
        return CODES[status]
    return "internal" if status >= 500 else "bad_request" if status >= 400 else "error"


def echo(text: str) -> str:
    """Client input made safe to quote in a message: bounded and repr-quoted."""
    if len(text) > ECHO_LEN_MAX:
        text = text[:ECHO_LEN_MAX] + "…"
    return repr(text)


class ApiError(Exception):
    """An expected failure a handler reports to the client as-is."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or code_for_status(status)
        self.message = message
        self.headers = dict(headers or {})


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def error_response(status: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status,
                             headers=headers)


def check_query(request: web.Request, allowed: Iterable[str] = ()) -> None:
    """Reject query parameters a route does not know, naming the first one, and one given
    more than once (which of them would count is anybody's guess: say so instead)."""
    allowed_set = set(allowed)
    for name in request.query:
        if name not in allowed_set:
            known = ", ".join(sorted(allowed_set)) or "none"
            raise bad_request(f"unknown query parameter {echo(name)} (allowed: {known})")
    if len(request.query) > len(set(request.query)):
        name = next(n for n in request.query if len(request.query.getall(n)) > 1)
        raise bad_request(f"{echo(name)}: given {len(request.query.getall(name))} times; give it once")


async def body_fields(request: web.Request, fields: tuple[set[str], set[str]], *,
                      empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """The request's body: a JSON object with every required field of ``fields`` (required,
    optional) and no unknown one.  An empty body reads as ``empty`` when one is given."""
    raw = await request.read()
    if not raw and empty is not None:
        return check_fields(dict(empty), fields, "body")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ApiError(400, f"body: must be a JSON object ({e.__class__.__name__})") from None
    return check_fields(body, fields, "body")


def check_fields(obj: Any, fields: tuple[set[str], set[str]], where: str) -> dict[str, Any]:
    """``obj`` is a JSON object with every required field and no unknown one; errors name ``where``."""
    required, optional = fields
    if not isinstance(obj, dict):
        raise ApiError(400, f"{where}: must be a JSON object")
    prefix = "" if where == "body" else f"{where}: "
    unknown = sorted(set(obj) - required - optional)
    if unknown:
        names = ", ".join(echo(k) for k in unknown[:5]) + (", …" if len(unknown) > 5 else "")
        allowed = ", ".join(sorted(required | optional)) or "none"
        raise ApiError(400, f"{prefix}unknown field(s) {names} (allowed: {allowed})")
    missing = sorted(required - set(obj))
    if missing:
        raise ApiError(400, f"{prefix}missing field(s): {', '.join(missing)}")
    return obj
