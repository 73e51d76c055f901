"""HTTP routes for accounts, sign-in, transfers, mint and burn (DESIGN.md sections 3 and 4).

Theory of operation: thin, like ``app.py`` — authenticate, check the role, validate the
body strictly, call the node's ``LedgerService`` (``node.ledger``), render.  The service
sequences money through the coordinator; these handlers decide nothing about money.

Who may do what (roles rank user < operator < admin; ``access.POLICY`` checks the
least of it before a handler runs, the handlers the rest):

=========================================  ==========================================
POST /v1/auth/token                        anyone (rate limited per address and name)
POST /v1/auth/revoke                       the account itself; admin for any account
POST /v1/accounts                          operator+ for a user; admin for operator/admin
GET  /v1/accounts/{name}[/history]         the account itself; operator+ for any
POST /v1/transfers                         the ``from`` account itself; admin for any
POST /v1/transfers/batch                   the same, for every item's ``from``
GET  /v1/transfers/{id}                    a party to it; operator+ for any
POST /v1/mint, POST /v1/burn               admin
=========================================  ==========================================

Invariants:

* Every route but sign-in needs ``Authorization: Bearer TOKEN``; a missing or bad token is
  401 with ``WWW-Authenticate: Bearer``, a good token without the role is 403.  Permission
  is checked before existence, so a user cannot probe which accounts exist.
* Bodies are JSON objects with exactly the fields a route knows: an unknown field is a 400
  that names it, as is a missing or mistyped one.  Amounts are ints in 1..``AMOUNT_MAX``
  (JSON ``true`` is not 1), names match ``core.ACCOUNT_NAME``, idempotency keys are
  1..``IDEMPOTENCY_KEY_CHARS_MAX`` printable characters.
* No password or token ever appears in a response body other than the token that sign-in
  returns, nor in this module's log lines: messages name the field, never its value.
* ``POST /v1/transfers/batch`` takes 1..``TRANSFER_BATCH_MAX`` items, each validated as a
  single transfer, errors naming ``transfers[i].field``; any bad item or any ``from`` the
  caller may not move refuses the whole request before anything is sent.  Each item counts
  against the rate limit.  The answer lists one result per item, in order.
* Sign-in is rate limited before the password is checked (scrypt costs ~50 ms of CPU):
  one token bucket per client address and one per account name, so neither one address
  guessing many names nor many addresses guessing one name goes fast.  A refusal is 429
  with ``Retry-After``.  Transfers are limited per signed-in account, except an admin's
  (who may mint at will, so limiting it protects nothing).  The rates are read
  from ``node.cfg`` on every request, so a changed setting applies at once.
* The service's errors carry their own status: ``auth.AuthError`` (401/403),
  ``ValueError`` for a rule it checks (400, "field: rule"), and the runner's
  ``LedgerError`` — any exception with an int ``status``, str ``code`` and str
  ``message`` — becomes ``{"error": code, "message": message}`` with that status (and
  ``Retry-After`` when it carries an int ``retry_after_s``: 503 ``overloaded``).  A
  ledger result ``{"ok": false, "error": ...}`` (mint, burn, open) maps by its code.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from aiohttp import web

from galaxy import auth
from galaxy.api import access
from galaxy.api.errors import ApiError, body_fields, check_fields, check_query, echo
from galaxy.api.tasks import _int_param
from galaxy.ledger import core

IDEMPOTENCY_KEY_CHARS_MAX = 128
TRANSFER_ID_CHARS_MAX = 256
HISTORY_LIMIT_DEFAULT = 50

# A rejected ledger result's code -> HTTP status.  Funds and existence are conflicts with
# the ledger's state (409), not malformed requests.
RESULT_STATUS: Mapping[str, int] = {
    "invalid": 400,
    "no_account": 404,
    "exists": 409,
    "insufficient_funds": 409,
    "overflow": 409,
    "key_reused": 409,
}

ACCOUNT_FIELDS = ({"name", "password"}, {"role"})        # (required, optional)
LOGIN_FIELDS = ({"name", "password"}, set())
REVOKE_FIELDS = (set(), {"name"})
TRANSFER_FIELDS = ({"from", "to", "amount", "idempotency_key"}, set())
TRANSFER_BATCH_FIELDS = ({"transfers"}, set())
TRANSFER_BATCH_MAX = 1000               # items per POST /v1/transfers/batch (one payroll run)
BATCH_STATES = ("settled", "rejected", "pending", "refused")
MINT_FIELDS = ({"to", "amount"}, set())
BURN_FIELDS = ({"account", "amount"}, set())


class _Limits:
    """One ``auth.RateLimiter`` per purpose, rebuilt when its configured rate changes."""

    def __init__(self) -> None:
        self._limiters: dict[str, auth.RateLimiter] = {}

    def take(self, purpose: str, key: str, rate_per_s: float, burst: int, what: str, n: int = 1) -> None:
        """Take ``n`` requests' worth (a batch counts each item) from ``key``'s bucket; 429 if
        they are not there (nothing taken)."""
        limiter = self._limiters.get(purpose)
        if limiter is None or (limiter.rate_per_s, limiter.burst) != (rate_per_s, burst):
            limiter = self._limiters[purpose] = auth.RateLimiter(rate_per_s, burst)
        if n > burst:
            raise ApiError(400, f"{n} {what} at once is more than this node's burst of {burst}: send at most "
                                f"{burst} per request")
        wait_s = limiter.take(key, int(time.monotonic() * 1000), cost=n)
        if wait_s > 0:
            retry = auth.retry_after_header(wait_s)
            raise ApiError(429, f"too many {what}; try again in {retry} s",
                           headers={"Retry-After": retry})


LIMITS_KEY: web.AppKey[_Limits] = web.AppKey("galaxy_ledger_limits", _Limits)


def _service(request: web.Request) -> Any:
    from galaxy.api.app import NODE_KEY
    return request.app[NODE_KEY].ledger


def _cfg(request: web.Request) -> Any:
    from galaxy.api.app import NODE_KEY
    return request.app[NODE_KEY].cfg


def _json(body: Any, status: int = 200) -> web.Response:
    from galaxy.api.app import _json as render
    return render(body, status)


# ---------------------------------------------------------------- auth
# One implementation for every route (access.py); these names are what the handlers call.
_auth_error = access.auth_error
_caller = access.caller
_require = access.require


def _self_or(caller: tuple[str, str], name: str, needed: str, what: str) -> None:
    account, role = caller
    if account != name and auth.ROLE_RANK.get(role, -1) < auth.ROLE_RANK[needed]:
        raise ApiError(403, f"{what} of another account needs role {needed} (this account is {role})")


async def _call(result: Awaitable[Any]) -> Any:
    """Await a service call, mapping its errors to JSON ones (see the module docstring)."""
    try:
        return await result
    except Exception as e:
        raise _api_error(e) from None


def _api_error(e: Exception) -> Exception:
    """The JSON error for a service error (see the module docstring); ``e`` itself otherwise."""
    if isinstance(e, auth.AuthError):
        return _auth_error(e)
    if isinstance(e, ValueError):
        return ApiError(400, str(e))
    status, code, message = (getattr(e, a, None) for a in ("status", "code", "message"))
    if isinstance(status, int) and 400 <= status <= 599 and isinstance(code, str) and isinstance(message, str):
        retry = getattr(e, "retry_after_s", None)       # a refusal for overload says when to come back
        return ApiError(status, message, code=code,
                        headers={"Retry-After": str(retry)} if isinstance(retry, int) else None)
    return e


def _admit(request: web.Request) -> None:
    """503 ``overloaded`` with Retry-After at once, before the body is read or decoded, while
    this node's ledger commands fill its queue: a shed request must cost little."""
    try:
        _service(request).admit()
    except Exception as e:
        raise _api_error(e) from None


def _ledger_result(result: dict) -> web.Response:
    if result.get("ok"):
        return _json(result)
    code = str(result.get("error") or "rejected")
    raise ApiError(RESULT_STATUS.get(code, 409), str(result.get("message") or code), code=code)


# ---------------------------------------------------------------- validation

def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not core.ACCOUNT_NAME.match(value):
        raise ApiError(400, f"{field}: an account name: 1-32 characters, a lower-case letter then "
                            "lower-case letters, digits, _ . -")
    return value


def _amount(value: Any, field: str = "amount") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= core.AMOUNT_MAX:
        raise ApiError(400, f"{field}: must be a whole number from 1 to {core.AMOUNT_MAX}")
    return value


def _idempotency_key(value: Any, field: str = "idempotency_key") -> str:
    if not isinstance(value, str) or not 0 < len(value) <= IDEMPOTENCY_KEY_CHARS_MAX or not value.isprintable():
        raise ApiError(400, f"{field}: 1 to {IDEMPOTENCY_KEY_CHARS_MAX} printable characters")
    return value


def _password(value: Any, *, new: bool) -> str:
    """A password's type and size (and, for a new one, its rules); the message never holds it."""
    if new:
        try:
            return auth.check_password_rules(value)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
    if not isinstance(value, str) or not 0 < len(value) <= auth.PASSWORD_CHARS_MAX:
        raise ApiError(400, f"password: a string of 1 to {auth.PASSWORD_CHARS_MAX} characters")
    return value


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "0")
    if raw not in ("0", "1"):
        raise ApiError(400, f"{name}: must be 0 or 1")
    return raw == "1"


def _iso(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- sign-in

async def login(request: web.Request) -> web.Response:
    check_query(request)
    body = await body_fields(request, LOGIN_FIELDS)
    name = _name(body["name"], "name")
    password = _password(body["password"], new=False)
    cfg = _cfg(request)
    limits = request.app[LIMITS_KEY]
    limits.take("login_addr", request.remote or "?", cfg.login_addr_rate_per_min / 60, cfg.login_addr_burst,
                "sign-in attempts from this address")
    limits.take("login", name, cfg.login_rate_per_min / 60, cfg.login_burst, f"sign-in attempts for {name}")
    service = _service(request)
    token, expires_at_ms = await _call(service.login(name, password))
    _, role = service.authenticate(token)
    return _json({"token": token, "expires_at": _iso(expires_at_ms), "expires_at_ms": expires_at_ms,
                  "account": name, "role": role})


async def revoke(request: web.Request) -> web.Response:
    check_query(request)
    caller = _caller(request)
    body = await body_fields(request, REVOKE_FIELDS)
    name = _name(body.get("name", caller[0]), "name")
    _self_or(caller, name, "admin", "revoking the tokens")
    result = await _call(_service(request).revoke(name))
    return _json({"account": name, "revoked": True, **(result or {})})


# ---------------------------------------------------------------- accounts

async def create_account(request: web.Request) -> web.Response:
    check_query(request)
    caller = _caller(request)
    body = await body_fields(request, ACCOUNT_FIELDS)
    name = _name(body["name"], "name")
    role = body.get("role", "user")
    if role not in auth.ROLES:
        raise ApiError(400, f"role: one of {', '.join(auth.ROLES)}")
    _require(caller[1], "operator" if role == "user" else "admin")
    password = _password(body["password"], new=True)
    result = await _call(_service(request).open_account(name, password, role, caller[0]))
    if not result.get("ok"):
        return _ledger_result(result)
    return _json({**result, "name": name, "role": role}, 201)


def _readable_account(request: web.Request) -> tuple[Any, str]:
    caller = _caller(request)
    name = _name(request.match_info["name"], "account")
    _self_or(caller, name, "operator", "reading")
    service = _service(request)
    if service.account(name) is None:
        raise ApiError(404, f"no account {name}", code="no_account")
    return service, name


async def get_account(request: web.Request) -> web.Response:
    check_query(request)
    service, name = _readable_account(request)
    return _json(service.account(name))


async def history(request: web.Request) -> web.Response:
    check_query(request, ("limit",))
    limit = _int_param(request, "limit", HISTORY_LIMIT_DEFAULT, 1, core.HISTORY_MAX)
    service, name = _readable_account(request)
    return _json({"name": name, "history": service.history(name, limit)})


# ---------------------------------------------------------------- money

def _take_transfers(request: web.Request, caller: tuple[str, str], n: int) -> None:
    """Take ``n`` transfers from the caller's address and account buckets; 429 (400 past a burst)."""
    if caller[1] == "admin":          # an admin can mint anyway; its batch jobs and benchmarks go unthrottled
        return
    cfg = _cfg(request)
    limits = request.app[LIMITS_KEY]
    limits.take("transfer_addr", request.remote or "?", cfg.transfer_addr_rate_per_s, cfg.transfer_addr_burst,
                f"transfers from {request.remote}", n=n)
    limits.take("transfer", caller[0], cfg.transfer_rate_per_s, cfg.transfer_burst, f"transfers by {caller[0]}", n=n)


async def transfer(request: web.Request) -> web.Response:
    check_query(request, ("wait",))
    wait = _flag(request, "wait")
    caller = _caller(request)
    _admit(request)
    body = await body_fields(request, TRANSFER_FIELDS)
    src = _name(body["from"], "from")
    dst = _name(body["to"], "to")
    amount = _amount(body["amount"])
    key = _idempotency_key(body["idempotency_key"])
    _self_or(caller, src, "admin", "moving money")
    _take_transfers(request, caller, 1)
    result = await _call(_service(request).transfer(src, dst, amount, key, caller[0], wait))
    return _json(result, 202)


def _transfer_item(i: int, item: Any) -> tuple[str, str, int, str]:
    where = f"transfers[{i}]"
    check_fields(item, TRANSFER_FIELDS, where)
    return (_name(item["from"], f"{where}.from"), _name(item["to"], f"{where}.to"),
            _amount(item["amount"], f"{where}.amount"), _idempotency_key(item["idempotency_key"],
                                                                           f"{where}.idempotency_key"))


async def transfer_batch(request: web.Request) -> web.Response:
    """POST /v1/transfers/batch: 1..TRANSFER_BATCH_MAX independent transfers, proposed together."""
    check_query(request, ("wait",))
    wait = _flag(request, "wait")
    caller = _caller(request)
    _admit(request)
    body = await body_fields(request, TRANSFER_BATCH_FIELDS)
    raw = body["transfers"]
    if not isinstance(raw, list) or not 0 < len(raw) <= TRANSFER_BATCH_MAX:
        raise ApiError(400, f"transfers: a list of 1 to {TRANSFER_BATCH_MAX} transfers")
    items = [_transfer_item(i, t) for i, t in enumerate(raw)]
    for i, src in enumerate(item[0] for item in items):
        if src != caller[0]:
            try:
                _self_or(caller, src, "admin", "moving money")
            except ApiError as e:
                raise ApiError(e.status, f"transfers[{i}].from: {e.message}") from None
    _take_transfers(request, caller, len(items))       # as single transfers: each item counts
    results = await _call(_service(request).transfer_batch(items, caller[0], wait))
    counts = {state: sum(r.get("state") == state for r in results) for state in BATCH_STATES}
    return _json({"transfers": results, **counts}, 202)


async def get_transfer(request: web.Request) -> web.Response:
    check_query(request)
    account, role = _caller(request)
    transfer_id = request.match_info["id"]
    if not 0 < len(transfer_id) <= TRANSFER_ID_CHARS_MAX or not transfer_id.isprintable():
        raise ApiError(400, f"transfer id: 1 to {TRANSFER_ID_CHARS_MAX} printable characters")
    state = _service(request).transfer_state(transfer_id)
    parties = {state.get("from"), state.get("to")} if state else set()
    if auth.ROLE_RANK.get(role, -1) < auth.ROLE_RANK["operator"] and state and parties - {None} \
            and account not in parties:
        state = None      # not a party: answer as if it did not exist, so ids cannot be probed
    if state is None:
        raise ApiError(404, f"no transfer {echo(transfer_id)}", code="no_transfer")
    return _json(state)


def _money_route(fields: tuple[set[str], set[str]], account_field: str, method: str) -> Any:
    """POST /v1/mint or /v1/burn: admin only, {account_field, amount} -> the ledger's result."""
    async def handler(request: web.Request) -> web.Response:
        check_query(request)
        account, role = _caller(request)
        _require(role, "admin")
        body = await body_fields(request, fields)
        name = _name(body[account_field], account_field)
        amount = _amount(body["amount"])
        return _ledger_result(await _call(getattr(_service(request), method)(name, amount, account)))

    handler.__name__ = method
    return handler


def add_routes(app: web.Application) -> None:
    app[LIMITS_KEY] = _Limits()
    app.router.add_post("/v1/auth/token", login)
    app.router.add_post("/v1/auth/revoke", revoke)
    app.router.add_post("/v1/accounts", create_account)
    app.router.add_get("/v1/accounts/{name}", get_account)
    app.router.add_get("/v1/accounts/{name}/history", history)
    app.router.add_post("/v1/transfers", transfer)
    app.router.add_post("/v1/transfers/batch", transfer_batch)
    app.router.add_get(r"/v1/transfers/{id:[\s\S]+}", get_transfer)     # ids hold the key, which may hold a /
    app.router.add_post("/v1/mint", _money_route(MINT_FIELDS, "to", "mint"))
    app.router.add_post("/v1/burn", _money_route(BURN_FIELDS, "account", "burn"))
