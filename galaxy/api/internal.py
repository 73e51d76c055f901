"""Node-to-node HTTP routes: ``POST /v1/internal/commands`` and its authentication.

Theory of operation
-------------------
A node that does not vote (role worker, or a spare not running Raft) cannot put a
command into the Raft log itself; ``consensus/gateway.py`` forwards it to the coordinator
over HTTP.  The body is the command's ``wire.encode_command`` bytes, as is.  Only members
of the cluster may call the route: every request carries

    X-Galaxy-Auth: v1 <sender> <sent_ms> <nonce> <mac>

where ``mac`` is HMAC-SHA256 under ``wire.derive_secret(cluster key, "http-internal")``
of the sender, time, nonce, method, path and body.  ``InternalAuth.verify`` refuses a
request whose MAC does not verify (401), whose ``sent_ms`` is more than ``window_ms``
from the receiver's wall clock (401 stale), or whose nonce was already accepted within
the window (401 replayed).  Accepted nonces are remembered until they leave the window,
in a map of at most ``seen_max`` entries; when it is full the request is refused (503),
never accepted unproven.  The MAC covers the method and path, so a signed request for
one route is no key to another.

The body may also be a ``CommandBatch`` of commands (``gateway.submit_many``): the
answer then lists one outcome per member.  The receiving node submits the command to its
own Raft (``Coordinator.submit``) and never forwards it again, so a stale view of who
leads costs a retry, not a loop.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections import OrderedDict

from aiohttp import web

from galaxy import wire
from galaxy.api.errors import ApiError, check_query
from galaxy.consensus.commands import BATCH_COMMANDS_MAX, CommandError
from galaxy.messages import CommandBatch

AUTH_HEADER = "X-Galaxy-Auth"
AUTH_VERSION = "v1"
COMMANDS_PATH = "/v1/internal/commands"
NONCE_BYTES = 16
SEEN_MAX = 100_000                   # accepted nonces remembered (one per forwarded command)
SENDER_CHARS_MAX = 128

# CommandError code -> HTTP status (the forwarder retries 503 no_coordinator).
COMMAND_STATUS = {"no_coordinator": 503, "busy": 503, "timeout": 504, "invalid": 400}


class AuthError(Exception):
    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _mac(secret: bytes, sender: str, sent_ms: int, nonce: str, method: str, path: str, body: bytes) -> str:
    head = f"{AUTH_VERSION}\n{sender}\n{sent_ms}\n{nonce}\n{method.upper()}\n{path}\n".encode()
    return hmac.new(secret, head + body, hashlib.sha256).hexdigest()


class InternalAuth:
    """Signs and verifies node-to-node requests (pure: the caller passes the clock and nonce)."""

    def __init__(self, secret: bytes, window_ms: int, seen_max: int = SEEN_MAX) -> None:
        if len(secret) < 32 or window_ms <= 0 or seen_max < 1:
            raise ValueError("InternalAuth needs a 32-byte secret, window_ms > 0 and seen_max >= 1")
        self._secret = secret
        self._accepted: tuple[bytes, ...] = (secret,)    # keyring rotation: any installed key verifies
        self.window_ms = window_ms
        self.seen_max = seen_max
        self._seen: OrderedDict[str, int] = OrderedDict()     # nonce -> sent_ms, oldest first
        self.stats = {"ok": 0, "refused": 0}

    def set_secrets(self, secrets: list[bytes]) -> None:
        """Keyring rotation (galaxy/keyring.py): sign with the first, accept any."""
        self._accepted = tuple(secrets)
        self._secret = secrets[0]

    def header(self, sender: str, now_ms: int, method: str, path: str, body: bytes, nonce: str) -> str:
        return " ".join((AUTH_VERSION, sender, str(now_ms), nonce,
                         _mac(self._secret, sender, now_ms, nonce, method, path, body)))

    def verify(self, now_ms: int, header: str | None, method: str, path: str, body: bytes) -> str:
        """The sender's node id, or AuthError."""
        try:
            sender = self._verify(now_ms, header, method, path, body)
        except AuthError:
            self.stats["refused"] += 1
            raise
        self.stats["ok"] += 1
        return sender

    def _verify(self, now_ms: int, header: str | None, method: str, path: str, body: bytes) -> str:
        parts = (header or "").split(" ")
        if len(parts) != 5 or parts[0] != AUTH_VERSION:
            raise AuthError("missing or malformed " + AUTH_HEADER)
        _, sender, sent_text, nonce, mac = parts
        if not sent_text.isdigit() or len(sender) > SENDER_CHARS_MAX or len(nonce) != 2 * NONCE_BYTES:
            raise AuthError("malformed " + AUTH_HEADER)
        sent_ms = int(sent_text)
        if not any(hmac.compare_digest(mac, _mac(secret, sender, sent_ms, nonce, method, path, body))
                   for secret in self._accepted):
            raise AuthError("unauthenticated: not signed with this cluster's key")
        if abs(now_ms - sent_ms) > self.window_ms:
            raise AuthError("stale: the request's time is outside the replay window")
        seen = self._seen
        while seen and next(iter(seen.values())) < now_ms - self.window_ms:
            seen.popitem(last=False)
        if nonce in seen:
            raise AuthError("replayed")
        if len(seen) >= self.seen_max:
            raise AuthError("too many internal requests in the replay window", status=503)
        seen[nonce] = max(sent_ms, next(reversed(seen.values()), sent_ms))   # keeps the map ordered by time
        return sender


def new_nonce() -> str:
    return os.urandom(NONCE_BYTES).hex()


async def post_command(request: web.Request) -> web.Response:
    from galaxy.api.app import NODE_KEY, _json
    check_query(request)
    node = request.app[NODE_KEY]
    body = await request.read()
    try:
        sender = node.internal_auth.verify(node.clock.wall_ms(), request.headers.get(AUTH_HEADER), request.method,
                                           request.path, body)
    except AuthError as e:
        raise ApiError(e.status, f"internal route: {e.reason}") from None
    try:
        cmd = wire.decode_command(body)
    except wire.DecodeError as e:
        raise ApiError(400, f"body: not a command ({e.reason})") from None
    try:
        if isinstance(cmd, CommandBatch):     # a node's batch of commands (gateway.submit_many)
            result = {"results": [{"submit_error": r.code, "message": r.message} if isinstance(r, CommandError)
                                  else r for r in await node.commands.submit_many_here(
                                      _members(cmd), node.cfg.raft_call_timeout_ms)]}
        else:
            result = await node.commands.submit_here(cmd, node.cfg.raft_call_timeout_ms)
    except CommandError as e:
        raise ApiError(COMMAND_STATUS.get(e.code, 503), e.message, code=e.code) from None
    return _json({"result": result, "by": node.node_id, "from": sender})


def _members(batch: CommandBatch) -> list:
    if not 0 < len(batch.commands) <= BATCH_COMMANDS_MAX:
        raise ApiError(400, f"body: a batch of 1..{BATCH_COMMANDS_MAX} commands")
    try:
        cmds = [wire.decode_command(data) for data in batch.commands]
    except wire.DecodeError as e:
        raise ApiError(400, f"body: a batch member is not a command ({e.reason})") from None
    if any(isinstance(c, CommandBatch) for c in cmds):
        raise ApiError(400, "body: a batch member is itself a batch")
    return cmds


def add_routes(app: web.Application) -> None:
    app.router.add_post(COMMANDS_PATH, post_command)
