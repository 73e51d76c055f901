"""Who may call which route: bearer tokens, roles and anonymous reads (docs/security.md).

Theory of operation
-------------------
Every route the API serves has one entry in ``POLICY``, keyed by (method, route pattern):
the least a caller needs, and who may call it in words (docs/security.md shows the
table ``markdown_table()`` renders, and a unit test keeps the two equal).  ``middleware``
checks the entry before the handler runs, so a handler cannot forget to.  The levels:

* ``open``: anyone.  Liveness and readiness probes (orchestrators call them), sign-in,
  join redeem (the one-time join token is the credential) and the dashboard page (static;
  the data it fetches is checked route by route).
* ``signed``: node-to-node routes that verify the caller's ``X-Galaxy-Auth`` signature
  themselves (``internal.py``); no bearer token is involved.
* ``read``: anyone while the cluster setting ``anonymous_read`` is true (read live from
  ``node.cfg`` on every request, so ``galaxy config set anonymous_read false`` needs no
  restart); otherwise any valid token.  While reads are open a token sent along is not
  checked: an expired one kept by the CLI must not break ``galaxy status``.
* ``read_or_node``: ``read``, or a request signed by a member node: input archives, which
  an executor fetches from the node that accepted the task.
* ``user``, ``operator``, ``admin``: a valid token of an account with at least that role
  (roles rank user < operator < admin; ``auth.require_role``).

Handlers refine with the caller (``caller(request)``): a user cancels only its own tasks
and submits only as itself; the ledger's routes let a user read only its own account.

Invariants:

* A route with no entry (in the app's ``POLICY_KEY`` copy) needs an admin token:
  forgetting one fails closed.
* No token: 401 with ``WWW-Authenticate: Bearer realm="galaxy"``; a forged, altered,
  expired or revoked token, or one of an account that no longer exists: 401 with
  ``error="invalid_token"``; a good token without the role: 403.  Errors are the API's
  JSON ``{"error", "message"}``; no message holds a token.
* A node without a ledger keeps no accounts, so it accepts no token: every route above
  ``read`` is refused there.
* The caller is authenticated at most once per request (kept in the request).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from galaxy import auth
from galaxy.api.errors import ApiError

REALM = 'Bearer realm="galaxy"'
OPEN, SIGNED, READ, READ_OR_NODE = "open", "signed", "read", "read_or_node"
USER, OPERATOR, ADMIN = "user", "operator", "admin"
LEVELS = (OPEN, SIGNED, READ, READ_OR_NODE, USER, OPERATOR, ADMIN)
# request key: (account, role) once authenticated (RequestKey from aiohttp 3.12)
_CALLER: Any = web.RequestKey("galaxy_caller", tuple) if hasattr(web, "RequestKey") else "galaxy_caller"

# (method, route pattern) -> (level, who may, in words).  HEAD follows GET.
POLICY: dict[tuple[str, str], tuple[str, str]] = {
    ("GET", "/"): (OPEN, "anyone: the dashboard page (static) or the route index"),
    ("GET", "/healthz"): (OPEN, "anyone (orchestrators' liveness probe)"),
    ("GET", "/readyz"): (OPEN, "anyone (orchestrators' readiness probe)"),
    ("GET", "/metrics"): (READ, "reader"),
    ("GET", "/v1/status"): (READ, "reader"),
    ("GET", "/v1/members"): (READ, "reader"),
    ("GET", "/v1/leader"): (READ, "reader"),
    ("GET", "/v1/kv"): (READ, "reader"),
    ("GET", "/v1/kv/{key}"): (READ, "reader"),
    ("PUT", "/v1/kv/{key}"): (USER, "user"),
    ("DELETE", "/v1/kv/{key}"): (USER, "user"),
    ("POST", "/v1/tasks"): (USER, "user; the task is the caller's (naming another owner: admin)"),
    ("GET", "/v1/tasks"): (READ, "reader"),
    ("GET", "/v1/tasks/{id}"): (READ, "reader"),
    ("GET", "/v1/tasks/{id}/logs"): (READ, "reader"),
    ("POST", "/v1/tasks/{id}/cancel"): (USER, "the task's owner; operator for any task"),
    ("POST", "/v1/blobs"): (USER, "user"),
    ("GET", "/v1/blobs/{sha}"): (READ_OR_NODE, "reader, or a member node (signed)"),
    ("POST", "/v1/nodes/{node}/drain"): (OPERATOR, "operator"),
    ("POST", "/v1/auth/token"): (OPEN, "anyone (rate limited per address and per name)"),
    ("POST", "/v1/auth/revoke"): (USER, "the account itself; admin for any account"),
    ("POST", "/v1/accounts"): (OPERATOR, "operator for a user account; admin for operator/admin"),
    ("GET", "/v1/accounts/{name}"): (USER, "the account itself; operator for any"),
    ("GET", "/v1/accounts/{name}/history"): (USER, "the account itself; operator for any"),
    ("POST", "/v1/transfers"): (USER, "the `from` account itself; admin for any"),
    ("POST", "/v1/transfers/batch"): (USER, "the `from` account of every item itself; admin for any"),
    ("GET", "/v1/transfers/{id}"): (USER, "a party to it; operator for any"),
    ("POST", "/v1/mint"): (ADMIN, "admin"),
    ("POST", "/v1/burn"): (ADMIN, "admin"),
    ("GET", "/v1/config"): (READ, "reader"),
    ("GET", "/v1/config/{key}"): (READ, "reader"),
    ("PUT", "/v1/config/{key}"): (OPERATOR, "operator"),
    ("DELETE", "/v1/config/{key}"): (OPERATOR, "operator"),
    ("PATCH", "/v1/config"): (OPERATOR, "operator"),
    ("POST", "/v1/internal/commands"): (SIGNED, "a member node (X-Galaxy-Auth, cluster key)"),
    ("POST", "/v1/join/tokens"): (OPERATOR, "operator"),
    ("POST", "/v1/join/redeem"): (OPEN, "anyone holding a one-time join token (the token is the credential)"),
    ("GET", "/v1/keyring"): (OPERATOR, "operator"),
    ("GET", "/v1/keyring/local"): (SIGNED, "a member node (X-Galaxy-Auth, cluster key)"),
    ("POST", "/v1/keyring"): (OPERATOR, "operator"),
    ("GET", "/v1/recover"): (OPERATOR, "operator: this node's recovery facts"),
    ("POST", "/v1/recover"): (ADMIN, "admin: re-form the Raft group (galaxy recover)"),
}
assert all(level in LEVELS for level, _ in POLICY.values())

# The app's own copy of the table (``make_app`` sets it): a route added to an app after
# ``make_app`` (tests, extensions) adds its entry here, next to the route.
POLICY_KEY: web.AppKey[dict] = web.AppKey("galaxy_access_policy", dict)


def route_key(request: web.Request) -> tuple[str, str] | None:
    """(method, route pattern) of the route that matched; None when none did (404, 405)."""
    resource = request.match_info.route.resource
    if resource is None:
        return None
    method = "GET" if request.method == "HEAD" else request.method
    return method, resource.canonical


def level_of(request: web.Request) -> str:
    key = route_key(request)
    if key is None:
        return OPEN              # the router answers 404/405 and runs no handler
    return request.app.get(POLICY_KEY, POLICY).get(key, (ADMIN, ""))[0]


def _node(request: web.Request) -> Any:
    from galaxy.api.app import NODE_KEY
    return request.app[NODE_KEY]


def auth_error(e: auth.AuthError) -> ApiError:
    if e.status == 401:
        return ApiError(401, e.message, headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
    return ApiError(e.status, e.message)


def caller(request: web.Request) -> tuple[str, str]:
    """(account, role) of the request's bearer token; ApiError 401 when there is none or it is bad."""
    known = request.get(_CALLER)
    if known is not None:
        return known
    header = request.headers.get("Authorization", "")
    if not header:
        raise ApiError(401, "sign in first: send Authorization: Bearer TOKEN (galaxy login)",
                       headers={"WWW-Authenticate": REALM})
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "Authorization must be: Bearer TOKEN",
                       headers={"WWW-Authenticate": f'{REALM}, error="invalid_request"'})
    ledger = getattr(_node(request), "ledger", None)
    if ledger is None:
        raise ApiError(401, "this node keeps no accounts, so it cannot check a token",
                       headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'})
    try:
        found = ledger.authenticate(token.strip())
    except auth.AuthError as e:
        raise auth_error(e) from None
    request[_CALLER] = found
    return found


def require(role: str, needed: str) -> None:
    try:
        auth.require_role(role, needed)
    except auth.AuthError as e:
        raise auth_error(e) from None


def has_role(role: str, needed: str) -> bool:
    return auth.ROLE_RANK.get(role, -1) >= auth.ROLE_RANK[needed]


def anonymous_read(request: web.Request) -> bool:
    return bool(getattr(_node(request).cfg, "anonymous_read", True))


def _signed_by_member(request: web.Request) -> bool:
    from galaxy.api.internal import AUTH_HEADER
    node = _node(request)
    header = request.headers.get(AUTH_HEADER)
    verifier = getattr(node, "internal_auth", None)
    if not header or verifier is None:
        return False
    try:
        verifier.verify(node.clock.wall_ms(), header, request.method, request.path, b"")
    except Exception as e:                 # internal.AuthError: say only its reason
        raise ApiError(getattr(e, "status", 401), f"node signature: {e}") from None
    return True


@web.middleware
async def middleware(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    level = level_of(request)
    if level in (READ, READ_OR_NODE):
        if not anonymous_read(request) and not (level == READ_OR_NODE and _signed_by_member(request)):
            caller(request)
    elif level not in (OPEN, SIGNED):
        require(caller(request)[1], level)
    return await handler(request)


def markdown_table() -> str:
    """The route table of docs/security.md, from ``POLICY``."""
    rows = ["| method and path | level | who may call it |", "|---|---|---|"]
    for (method, path), (level, who) in POLICY.items():
        rows.append(f"| {method} {path} | {level} | {who} |")
    return "\n".join(rows) + "\n"
