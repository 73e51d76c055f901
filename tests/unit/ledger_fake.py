"""A stand-in ``LedgerService`` for the HTTP and CLI tests: the real pure ``Ledger`` and the real
``galaxy.auth`` tokens and password hashes, with the coordinator replaced by applying each
entry at once (or, with ``coordinator = False``, keeping transfers pending as the runner does
when no coordinator is reachable).  It follows the contract in galaxy/ledger/runner.py.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from typing import Any

from galaxy import auth
from galaxy.config import Config
from galaxy.ledger.core import Ledger
from galaxy.messages import Burn, Mint, OpenAccount, SetAccount, Transfer

ADMIN_PASSWORD = "initial-admin-pw"
SECRET = b"s" * 32
SALT = b"0123456789abcdef"


class LedgerError(Exception):
    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s


class FakeLedger:
    def __init__(self) -> None:
        self.core = Ledger()
        self._index = itertools.count(1)
        self._keys = itertools.count(1)
        self.coordinator = True
        self.overloaded = False             # as the runner past SUBMITS_IN_FLIGHT_MAX
        self.transfers: dict[str, dict] = {}
        self.calls: list[tuple] = []       # (method, args) of every mutating call, passwords excluded
        self._last_ms = 0
        self._apply(OpenAccount(key="open-admin", name="admin", role="admin",
                                password_hash=auth.hash_password(ADMIN_PASSWORD, SALT), at_ms=self.now_ms()))

    def now_ms(self) -> int:
        # strictly increasing, so a token issued after a revocation is never in the same ms
        self._last_ms = max(self._last_ms + 1, int(time.time() * 1000))
        return self._last_ms

    def _apply(self, entry: Any) -> dict:
        return self.core.apply(next(self._index), 1, entry)

    def _key(self) -> str:
        return f"fake-{next(self._keys)}"

    def authenticate(self, token: str) -> tuple[str, str]:
        claims = auth.read_token(SECRET, token, self.now_ms())
        a = self.core.account(claims.sub)
        if a is None:
            raise auth.AuthError(401, "the token's account does not exist")
        if claims.iat_ms < a.tokens_valid_after_ms:
            raise auth.AuthError(401, "token revoked: sign in again (galaxy login)")
        return a.name, a.role

    def token(self, name: str = "admin") -> str:
        """A token for an existing account, as sign-in would issue it (no password needed here)."""
        assert self.core.account(name) is not None, name
        return auth.issue_token(SECRET, name, self.now_ms(), b"nonce")[0]

    def bearer(self, name: str = "admin") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(name)}"}

    def add_account(self, name: str, role: str = "user") -> None:
        """Open an account directly (the tests of other routes need callers of each role)."""
        self._apply(OpenAccount(key=self._key(), name=name, role=role,
                                password_hash=auth.hash_password("password-" + name, SALT), at_ms=self.now_ms()))

    async def login(self, name: str, password: str) -> tuple[str, int]:
        a = self.core.account(name)
        if a is None or not auth.verify_password(password, a.password_hash):
            raise auth.AuthError(401, "wrong name or password")
        return auth.issue_token(SECRET, name, self.now_ms(), b"nonce")

    async def revoke(self, name: str) -> dict:
        self.calls.append(("revoke", name))
        return self._apply(SetAccount(key=self._key(), name=name, tokens_valid_after_ms=self.now_ms() + 1))

    async def open_account(self, name: str, password: str, role: str, by: str) -> dict:
        auth.check_password_rules(password)
        self.calls.append(("open_account", name, role, by))
        salt = hashlib.sha256(name.encode()).digest()[:16]
        return self._apply(OpenAccount(key=self._key(), name=name, role=role,
                                       password_hash=auth.hash_password(password, salt), at_ms=self.now_ms()))

    def admit(self, n: int = 1) -> None:
        """As the runner: refuse at once while overloaded (the API asks before reading a body)."""
        self.calls.append(("admit", n))
        if self.overloaded:
            raise LedgerError(503, "overloaded", "too many ledger requests wait here; try again", retry_after_s=1)

    async def transfer(self, src: str, dst: str, amount: int, idempotency_key: str, by: str, wait: bool) -> dict:
        self.calls.append(("transfer", src, dst, amount, idempotency_key, by, wait))
        transfer_id = "x-" + hashlib.sha256(idempotency_key.encode()).hexdigest()[:16]
        if transfer_id in self.transfers:        # a resend: the entry's at_ms would differ, so answer here
            return self.transfers[transfer_id]
        if self.overloaded:
            raise LedgerError(503, "overloaded", "too many ledger requests wait here; try again", retry_after_s=1)
        if not self.coordinator and wait:
            raise LedgerError(503, "no_coordinator", "no coordinator is reachable; the transfer is pending")
        return self._transfer(transfer_id, src, dst, amount, idempotency_key, by)

    async def transfer_batch(self, items: list[tuple[str, str, int, str]], by: str, wait: bool) -> list[dict]:
        """As the runner: one answer per item, a key asking another thing is ``refused``."""
        self.calls.append(("transfer_batch", tuple(items), by, wait))
        if self.overloaded:
            raise LedgerError(503, "overloaded", "too many ledger requests wait here; try again", retry_after_s=1)
        out = []
        for src, dst, amount, key in items:
            transfer_id = "x-" + hashlib.sha256(key.encode()).hexdigest()[:16]
            known = self.transfers.get(transfer_id)
            if known is not None and (known["to"], known["amount"]) != (dst, amount):
                out.append({"id": transfer_id, "state": "refused", "from": src, "to": dst, "amount": amount,
                            "error": "key_reused", "reason": f"idempotency key {key!r} was used for another transfer"})
            else:
                out.append(known or self._transfer(transfer_id, src, dst, amount, key, by))
        return out

    def _transfer(self, transfer_id: str, src: str, dst: str, amount: int, idempotency_key: str, by: str) -> dict:
        if not self.coordinator:
            state = {"id": transfer_id, "state": "pending", "from": src, "to": dst, "amount": amount}
        else:
            r = self._apply(Transfer(key=idempotency_key, src=src, dst=dst, amount=amount, by=by,
                                     at_ms=self.now_ms()))
            state = {"id": transfer_id, "state": "settled" if r["ok"] else "rejected", "seq": r.get("seq"),
                     "from": src, "to": dst, "amount": amount}
            if not r["ok"]:
                state["reason"] = r["message"]
        self.transfers[transfer_id] = state
        return state

    def transfer_state(self, transfer_id: str) -> dict | None:
        return self.transfers.get(transfer_id)

    async def mint(self, to: str, amount: int, by: str) -> dict:
        self.calls.append(("mint", to, amount, by))
        return self._apply(Mint(key=self._key(), to=to, amount=amount, by=by, at_ms=self.now_ms()))

    async def burn(self, account: str, amount: int, by: str) -> dict:
        self.calls.append(("burn", account, amount, by))
        return self._apply(Burn(key=self._key(), account=account, amount=amount, by=by, at_ms=self.now_ms()))

    def account(self, name: str) -> dict | None:
        a = self.core.account(name)
        return None if a is None else a.view()

    def history(self, name: str, limit: int) -> list[dict]:
        a = self.core.account(name)
        return [] if a is None else list(reversed(a.history))[:limit]

    def summary(self) -> dict:
        snap = self.core.snapshot()
        return {k: snap[k] for k in ("applied_seq", "hash", "total_supply")} | {"pending": 0}


class LedgerNode:
    """What the HTTP layer reads of a node, around the stand-in ledger service."""

    def __init__(self, **cfg: Any) -> None:
        self.cfg = Config(**cfg)
        self.node_id = "n-ledger"
        self.ledger = FakeLedger()

    def status(self) -> dict:
        return {"ledger": self.ledger.summary()}
