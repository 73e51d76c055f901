"""Sign-in: password hashes, bearer tokens, roles and rate limits (pure; clock passed in).

Theory of operation
-------------------
*Passwords* are hashed with scrypt (N=2^14, r=8, p=1, 16-byte random salt) into
``scrypt$N$r$p$salt$hash``; the ledger stores only that string.  Checking one costs
~50 ms of CPU by design, so callers run it in a thread, never on the event loop.

*Tokens* are ``gt1.<payload>.<mac>``: the payload is base64url JSON ``{"sub", "iat_ms",
"exp_ms", "n"}`` and the mac an HMAC-SHA256 of it under a key derived from the cluster
key (``wire.derive_secret(key, "tokens")``), so any node can check any token without a
lookup, and no one without the cluster key can forge one.  A token is valid while
``now < exp_ms`` and ``iat_ms >= account.tokens_valid_after_ms`` (revoking an account's
tokens is one ledger entry that raises that time), and it grants the account's *current*
role, so demoting an account takes effect at once.

*Rate limits* are token buckets per (action, client): ``burst`` requests at once, then
``rate_per_s``; a refused request is told how long to wait (HTTP 429 Retry-After).  The
table of buckets is bounded (``BUCKETS_MAX``): the least recently used go first.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from collections import OrderedDict
from dataclasses import dataclass

ROLES = ("admin", "operator", "user")
ROLE_RANK = {"user": 0, "operator": 1, "admin": 2}
TOKEN_PREFIX = "gt1"
TOKEN_TTL_MS = 60 * 60_000          # the seeds' 60 minutes
TOKEN_CHARS_MAX = 1024
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 14, 8, 1
PASSWORD_CHARS_MIN, PASSWORD_CHARS_MAX = 8, 1024
BUCKETS_MAX = 10_000


class AuthError(Exception):
    """Refused: ``status`` 401 (who are you?) or 403 (not allowed), with a reason for humans."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def check_password_rules(password: object) -> str:
    if not isinstance(password, str):
        raise ValueError("password: must be a string")
    if not PASSWORD_CHARS_MIN <= len(password) <= PASSWORD_CHARS_MAX:
        raise ValueError(f"password: {PASSWORD_CHARS_MIN} to {PASSWORD_CHARS_MAX} characters")
    if not password.isascii():
        try:
            password.encode()
        except UnicodeEncodeError:       # (the message never holds the password)
            raise ValueError("password: is not valid Unicode text (a lone surrogate): pass UTF-8") from None
    return password


def hash_password(password: str, salt: bytes) -> str:
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=_unb64(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(_unb64(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, _unb64(digest))


@dataclass(frozen=True, slots=True)
class Claims:
    sub: str                 # account name
    iat_ms: int
    exp_ms: int


def issue_token(secret: bytes, account: str, now_ms: int, nonce: bytes, ttl_ms: int = TOKEN_TTL_MS) -> tuple[str, int]:
    """A signed bearer token for ``account``; returns (token, expires_at_ms)."""
    exp_ms = now_ms + ttl_ms
    payload = _b64(json.dumps({"sub": account, "iat_ms": now_ms, "exp_ms": exp_ms, "n": _b64(nonce)},
                              separators=(",", ":"), sort_keys=True).encode())
    mac = _b64(hmac.new(secret, f"{TOKEN_PREFIX}.{payload}".encode(), hashlib.sha256).digest())
    return f"{TOKEN_PREFIX}.{payload}.{mac}", exp_ms


def read_token(secret: bytes, token: str, now_ms: int) -> Claims:
    """The claims of a genuine, unexpired token; AuthError(401) otherwise (revocation is the caller's)."""
    if not isinstance(token, str) or len(token) > TOKEN_CHARS_MAX:
        raise AuthError(401, "not a Galaxy token")
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
        raise AuthError(401, "not a Galaxy token")
    want = hmac.new(secret, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    try:
        got = _unb64(parts[2])
        if not hmac.compare_digest(want, got):
            raise AuthError(401, "token signature is not valid (forged, altered, or from another cluster)")
        data = json.loads(_unb64(parts[1]))
        claims = Claims(sub=str(data["sub"]), iat_ms=int(data["iat_ms"]), exp_ms=int(data["exp_ms"]))
    except AuthError:
        raise
    except (ValueError, KeyError, TypeError):
        raise AuthError(401, "not a Galaxy token") from None
    if now_ms >= claims.exp_ms:
        raise AuthError(401, "token expired: sign in again (galaxy login)")
    return claims


def require_role(role: str, needed: str) -> None:
    if ROLE_RANK.get(role, -1) < ROLE_RANK[needed]:
        raise AuthError(403, f"needs role {needed} (this account is {role})")


class RateLimiter:
    """Token buckets per key: ``burst`` at once, then ``rate_per_s``."""

    def __init__(self, rate_per_s: float, burst: int, buckets_max: int = BUCKETS_MAX) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("rate_per_s must be > 0 and burst >= 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.buckets_max = buckets_max
        self._buckets: OrderedDict[str, tuple[float, int]] = OrderedDict()   # key -> (tokens, at_ms)
        self.refused = 0

    def take(self, key: str, now_ms: int, cost: float = 1.0) -> float:
        """0.0 if allowed (``cost`` tokens taken, at most ``burst``), else the seconds to wait
        before that many are available."""
        cost = max(0.0, min(float(self.burst), cost))
        tokens, at_ms = self._buckets.pop(key, (float(self.burst), now_ms))
        tokens = min(float(self.burst), tokens + max(0, now_ms - at_ms) / 1000 * self.rate_per_s)
        wait_s = 0.0
        if tokens >= cost:
            tokens -= cost
        else:
            wait_s = (cost - tokens) / self.rate_per_s
            self.refused += 1
        self._buckets[key] = (tokens, now_ms)
        while len(self._buckets) > self.buckets_max:
            self._buckets.popitem(last=False)
        return wait_s


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
