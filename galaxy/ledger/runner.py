"""The node's ledger service: sequence entries through Raft, spread them, serve balances and sign-in.

Theory of operation: thin, over two pure parts.

* *Sequencing.*  Every money movement is a ledger entry (``messages.LEDGER_TYPES``)
  committed through the Raft log (``CommandGateway.submit``: here on a voter, forwarded
  over authenticated HTTP otherwise).  The voters' ``Ledger`` state machines apply it in
  log order, so the coordinator's answer is the settled outcome.
* *Spreading.*  The coordinator, once caught up, publishes what it applied as range
  documents ``ledger/<first seq>``, one per Raft log entry (ledger/spread.py: each
  entry's command index and term, wire bytes and outcome).  Every node — voter or not —
  applies those ranges, in contiguous ``seq`` order, to its own ``Ledger`` (the *view*),
  so every node shows the same balances and the same ``(applied_seq, hash)``.  A gap
  waits for gossip or anti-entropy to fill it.  The publisher wakes when Raft applied
  something (``Coordinator.applied_listeners``, from pysyncobj's thread), and publishes
  at most every ``PUBLISH_INTERVAL_MS`` from a cursor over the ranges already published.
  A voter's view also applies its own Raft machines' entries, cut the same way, so its
  requests read their writes without waiting for gossip; the published ranges that arrive
  later are compared with what it applied (``spread.check_applied``).
* *Transfers.*  A transfer is proposed at once.  When the coordinator answers, the entry
  is in the Raft log of a quorum (fsynced) and the outcome is the answer: no document is
  written, the view answers ``GET /v1/transfers/ID`` from the entry.  When it cannot
  (no coordinator reachable, or the outcome is unknown after a timeout), the transfer is
  written as the document ``transfer/<id>`` (state ``pending``, committed to disk)
  before the client gets 202 ``pending``; the coordinator's sweep proposes every pending
  transfer it sees, and whoever learns the outcome writes it back (``settled`` or
  ``rejected`` with the reason).  So a 202 always means "stored durably": in the log, or
  in the pending document.  The id is ``tx:<from>:<idempotency key>`` and the ledger
  applies a key at most once, so a transfer sent to several nodes, or retried, moves
  money once.  A batch (``transfer_batch``, POST /v1/transfers/batch) is many such
  transfers from one request, each with its own key and outcome (not atomic), handed to
  the gateway together (``submit_many``) so they share one or few Raft entries.
* *Admission.*  At most ``SUBMITS_IN_FLIGHT_MAX`` ledger commands of this node wait for
  the coordinator at once; beyond that a request is refused at once with 503
  ``overloaded`` and ``Retry-After`` (nothing stored), so an overload is shed here instead
  of queueing into timeouts and starving the Raft thread of the GIL into elections.  The
  count is of commands, so a batch counts all its items: it is admitted whole when they fit
  (or nothing waits), or refused whole.  The API asks ``admit()`` before it reads a body,
  so a refusal costs no decoding.
* *Tasks.*  A task with a price is held from its owner's balance before it is accepted
  (``hold``); when a task ends the coordinator settles it (``TaskSettle``: pay the node's
  owner on success, else refund) and moves the node's and its owner's credit.
* *Sign-in.*  Passwords are scrypt hashes inside the ledger (so every node can check
  them); tokens are HMAC-signed with a key derived from the cluster key (galaxy/auth.py).
  The first coordinator of a new mesh opens the ``admin`` account, with the password from
  ``GALAXY_ADMIN_PASSWORD`` or a random one it prints once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import deque
import logging
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

from galaxy import auth, wire
from galaxy.clock import Clock
from galaxy.consensus.commands import BATCH_COMMANDS_MAX, CommandError
from galaxy.gossip.replica import Doc, Lattice
from galaxy.ledger import spread
from galaxy.ledger.core import ACCOUNT_NAME, AMOUNT_MAX, Ledger
from galaxy.messages import Burn, Hold, Mint, OpenAccount, SetAccount, TaskOutcome, TaskSettleBatch, Transfer

log = logging.getLogger("galaxy.ledger")

ENTRY_TYPE = "ledger"            # ledger/<first seq:016d>: a range of applied entries (spread.py)
TRANSFER_TYPE = "transfer"       # transfer/<id>: a transfer that waited for the coordinator, and its outcome
PUBLISH_ENTRIES_MAX = 5000       # entries published per step (> a Raft entry's BATCH_COMMANDS_MAX)
assert PUBLISH_ENTRIES_MAX > BATCH_COMMANDS_MAX
# After publishing, the next ranges wait this long (at once when idle): several ranges per
# commit and per rumour frame on every node.  Voters do not wait for them (their views also
# apply their own Raft log), so only a non-voter's view lags by up to this much more.
PUBLISH_INTERVAL_MS = 20
CHECKS_MAX = 10_000              # published ranges waiting to be compared with what the view applied
# Ledger commands (a batch counts each item) this node waits on at once.  Two clients
# sending batches of 100 to each of 3 nodes, or 64 single-transfer clients on each, settle
# at the coordinator's pace well within it; more only queues (latency = in flight /
# throughput: 3 nodes x 1,000 at ~6,000/s is half a second).  One batch of up to
# TRANSFER_BATCH_MAX is admitted whenever nothing waits.
SUBMITS_IN_FLIGHT_MAX = 1000
RETRY_AFTER_S = 1                # Retry-After of a refusal for overload (HTTP counts whole seconds)
CAUGHT_UP_WAIT_MS = 2000         # read-your-writes: how long a request waits for the view
SEQ_WAITERS_MAX = 10_000         # requests waiting for the view at once (more answer without waiting)
SWEEP_BATCH_MAX = 200            # pending transfers / task settlements proposed per step
SWEEP_INTERVAL_MS = 200          # the coordinator's sweep: at most this often, unless a transfer doc changed
SUBMIT_TIMEOUT_MS = 3000
WAIT_SETTLED_MS = 10_000         # ?wait=1 waits this long for a pending transfer
LOOP_INTERVAL_MS = 200
ADMIN = "admin"
SETTLE_KEY = "settle"               # marks the one settlement batch in flight
VERIFY_MAX = 100_000             # outcomes waiting to be checked against the coordinator's ledger

_TRANSFER_RANK = {"pending": 0, "rejected": 1, "settled": 1}
TRANSFER_RESOLVER = Lattice(lambda d: _TRANSFER_RANK.get((d.value or {}).get("state"), 0)
                            if isinstance(d.value, dict) else 0)


class LedgerError(Exception):
    """A request the ledger cannot take now; ``status`` and ``code`` for the HTTP answer."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


_ERROR_STATUS = {"no_account": 404, "exists": 409, "insufficient_funds": 409, "invalid": 400,
                 "key_reused": 409, "overflow": 409}


def _raise_rejected(result: dict) -> dict:
    if result.get("ok"):
        return result
    raise LedgerError(_ERROR_STATUS.get(result.get("error", ""), 400), result.get("error", "rejected"),
                      result.get("message", "rejected"))


entry_key = spread.entry_key
_NOT_APPENDED = ("no_coordinator", "busy", "overloaded")    # codes after which nothing was appended


class LedgerService:
    def __init__(self, *, node_id: str, clock: Clock, docs: Any, gateway: Any, coordinator: Callable[[], Any],
                 token_secret: bytes, admin_password: str | None, on_fatal: Callable[[BaseException], Any],
                 pending_per_account_max: int = 100) -> None:
        self.node_id = node_id
        self._clock = clock
        self._docs = docs
        self.replica = docs.replica
        self._gateway = gateway
        self._coordinator = coordinator      # the node's Coordinator (None until it exists)
        self._secret = token_secret
        self.accepted_secrets: tuple[bytes, ...] = ()    # set by the keyring; the first one signs
        self._admin_password = admin_password
        self._on_fatal = on_fatal
        self.view = Ledger()                 # what this node shows: the ledger's entries, in seq order
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._inflight: set[str] = set()
        self._pending: set[str] = set()      # transfer ids whose outcome is not known yet
        self._verify: set[str] = set()       # outcomes to check against the coordinator's ledger
        self.pending_per_account_max = pending_per_account_max   # cfg.transfers_pending_per_account_max
        self.settled_tasks: Callable[[], list[tuple[str, str, str, bool]]] = list   # set by the node
        self.forget_task: Callable[[str], None] = lambda task_id: None
        self._submitting = 0                 # ledger commands of this node waiting for the coordinator
        self._seq_waiters: list[tuple[int, int, asyncio.Future]] = []     # heap: (seq, n, future)
        self._waiter_n = 0
        self._applied_posted = False
        self._loop_obj: asyncio.AbstractEventLoop | None = None
        self._sweep_due = True
        self._next_sweep_ms = 0
        self._published_seq = 0              # published ranges end here (the coordinator's cursor)
        self._to_check: deque[tuple[int, Any]] = deque()     # published ranges this view applied already
        self.stats = {"published": 0, "ranges_published": 0, "applied_from_gossip": 0, "applied_from_raft": 0,
                      "swept": 0,
                      "settlements": 0, "shed": 0, "stored_pending": 0}
        docs.listeners.append(self._on_docs)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop_obj = asyncio.get_running_loop()
        for d in self.replica.items(TRANSFER_TYPE):
            self._track(d.key)
        self._advance()
        coordinator = self._coordinator()
        if coordinator is not None and hasattr(coordinator, "applied_listeners"):
            coordinator.applied_listeners.append(self._on_applied)
        self._task = asyncio.create_task(self._loop(), name="ledger")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass

    def _on_docs(self, docs: list[Doc]) -> None:
        wake = False
        for d in docs:
            if d.doc_type == TRANSFER_TYPE:
                self._track(d.key)
                self._sweep_due = wake = True
            elif d.doc_type == ENTRY_TYPE:
                wake = True
                first = int(d.key) if d.key.isdigit() else 0
                if 0 < first <= self.view.seq and d.value is not None and len(self._to_check) < CHECKS_MAX:
                    self._to_check.append((first, d.value))      # applied from our own log: compare
        if wake:
            self._wake.set()

    def _on_applied(self) -> None:
        """pysyncobj's tick thread: Raft applied commands; wake the publisher (once until it runs)."""
        if self._applied_posted or self._loop_obj is None:
            return
        self._applied_posted = True
        with contextlib.suppress(RuntimeError):          # the loop closed: the node is stopping
            self._loop_obj.call_soon_threadsafe(self._applied_wake)

    def _applied_wake(self) -> None:
        self._applied_posted = False
        self._wake.set()

    def _track(self, tx_id: str) -> None:
        state = self._doc_state(tx_id)
        if state is not None and state.get("state") == "pending":
            self._pending.add(tx_id)
        else:
            self._pending.discard(tx_id)
            if state is not None and len(self._verify) < VERIFY_MAX:
                self._verify.add(tx_id)

    def wake(self) -> None:
        self._sweep_due = True
        self._wake.set()

    # ------------------------------------------------------------------ reading
    def account(self, name: str) -> dict | None:
        a = self.view.account(name)
        return None if a is None else a.view()

    def history(self, name: str, limit: int = 100) -> list[dict]:
        a = self.view.account(name)
        return [] if a is None else list(reversed(a.history))[:limit]

    def summary(self) -> dict:
        snap = self.view.snapshot()
        pending = len(self._pending)
        return {"applied_seq": snap["applied_seq"], "hash": snap["hash"], "total_supply": snap["total_supply"],
                "pending": pending, "accounts": snap["accounts"], "held": snap["held"]}

    def credit_of_node(self, node_id: str) -> int:
        return self.view.credit_of_node(node_id)

    def transfer_state(self, transfer_id: str) -> dict | None:
        """A transfer as this node knows it: the view's entry and outcome (the truth, once
        here), else its ``transfer/<id>`` document (pending, or an outcome not applied here yet)."""
        doc = self._doc_state(transfer_id)
        seen = self._view_state(transfer_id)
        if seen is None:
            return doc
        return {**doc, **seen} if doc is not None else seen

    def _doc_state(self, transfer_id: str) -> dict | None:
        doc = self.replica.get(TRANSFER_TYPE, transfer_id)
        return dict(doc.value) if doc is not None and isinstance(doc.value, dict) else None

    def _view_state(self, transfer_id: str) -> dict | None:
        result = self.view.result_of(transfer_id)
        seq = result.get("seq") if result is not None else None
        if not isinstance(seq, int) or not 0 < seq <= len(self.view.applied):
            return None
        entry = self.view.applied[seq - 1][2]
        if not isinstance(entry, Transfer) or entry.key != transfer_id:
            return None
        return _outcome(entry, result)

    # ------------------------------------------------------------------ sign-in
    def authenticate(self, token: str) -> tuple[str, str]:
        *older, last = self.accepted_secrets or (self._secret,)    # keyring rotation: any installed key
        for secret in older:
            with contextlib.suppress(auth.AuthError):
                claims = auth.read_token(secret, token, self._clock.wall_ms())
                break
        else:
            claims = auth.read_token(last, token, self._clock.wall_ms())
        a = self.view.account(claims.sub)
        if a is None:
            raise auth.AuthError(401, "the token's account does not exist (any more)")
        if claims.iat_ms < a.tokens_valid_after_ms:
            raise auth.AuthError(401, "token revoked: sign in again (galaxy login)")
        return a.name, a.role

    async def login(self, name: str, password: str) -> tuple[str, int]:
        a = self.view.account(name) if isinstance(name, str) else None
        stored = a.password_hash if a is not None else auth.hash_password("x" * 8, b"\0" * 16)
        ok = await asyncio.to_thread(auth.verify_password, password if isinstance(password, str) else "", stored)
        if a is None or not ok:
            raise auth.AuthError(401, "wrong name or password")
        return auth.issue_token(self._secret, a.name, self._clock.wall_ms(), os.urandom(8))

    async def revoke(self, name: str) -> dict:
        if self.view.account(name) is None:
            raise LedgerError(404, "no_account", f"no account {name!r}")
        now = self._clock.wall_ms()
        result = await self._submit(SetAccount(f"revoke:{name}:{now}", name, tokens_valid_after_ms=now, at_ms=now))
        await self._caught_up_to(result)
        return _raise_rejected(result)

    async def open_account(self, name: str, password: str, role: str, by: str) -> dict:
        auth.check_password_rules(password)
        if not isinstance(name, str) or not ACCOUNT_NAME.match(name):
            raise ValueError("name: 1-32 characters, a lower-case letter then letters, digits, _ . -")
        hashed = await asyncio.to_thread(auth.hash_password, password, os.urandom(16))
        now = self._clock.wall_ms()
        result = await self._submit(OpenAccount(f"open:{name}:{secrets.token_hex(8)}", name, role, hashed, now))
        await self._caught_up_to(result)
        return _raise_rejected(result)

    # ------------------------------------------------------------------ money
    async def mint(self, to: str, amount: int, by: str) -> dict:
        now = self._clock.wall_ms()
        result = await self._submit(Mint(f"mint:{secrets.token_hex(12)}", to, amount, by, now))
        await self._caught_up_to(result)
        return _raise_rejected(result)

    async def burn(self, account: str, amount: int, by: str) -> dict:
        now = self._clock.wall_ms()
        result = await self._submit(Burn(f"burn:{secrets.token_hex(12)}", account, amount, by, now))
        await self._caught_up_to(result)
        return _raise_rejected(result)

    async def transfer(self, src: str, dst: str, amount: int, idempotency_key: str, by: str,
                       wait: bool = False) -> dict:
        """Proposed at once; stored as a pending document only if the coordinator does not
        answer (module docstring: a 202 always means stored durably)."""
        tx_id = f"tx:{src}:{idempotency_key}"
        known = self.transfer_state(tx_id)
        if known is not None and (known.get("to"), known.get("amount")) != (dst, amount):
            raise LedgerError(409, "key_reused", f"idempotency key {idempotency_key!r} was used for another "
                                                 "transfer")
        if known is None:
            now = self._clock.wall_ms()
            try:
                result = await self._submit(Transfer(tx_id, src, dst, amount, by, now))
            except LedgerError as e:
                if e.code == "overloaded":
                    raise                       # nothing stored, nothing appended: the client tries again
                # No coordinator (nothing appended), or no answer in time (maybe appended): keep
                # it durably as pending; the coordinator's sweep sequences it (at most once, by key).
                self._store_pending(tx_id, src, dst, amount, by, now, capped=e.code in _NOT_APPENDED)
                state = self.transfer_state(tx_id)
            else:
                if result.get("error") == "key_reused":
                    raise LedgerError(409, "key_reused", f"idempotency key {idempotency_key!r} was used for "
                                                         "another transfer")
                state = self.transfer_state(tx_id) or _outcome(
                    Transfer(tx_id, src, dst, amount, by, now), result)
        else:
            if known["state"] == "pending":
                await self._propose(tx_id)
            state = self.transfer_state(tx_id)
        if wait and state["state"] == "pending":
            deadline = asyncio.get_running_loop().time() + WAIT_SETTLED_MS / 1000
            while state["state"] == "pending" and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                state = self.transfer_state(tx_id)
        if state.get("seq"):
            await self._caught_up_to(state)     # read your writes: this node's balances show it
        return _transfer_view(self.transfer_state(tx_id) or state)

    async def transfer_batch(self, items: list[tuple[str, str, int, str]], by: str, wait: bool = False) -> list[dict]:
        """Many independent transfers ``(from, to, amount, idempotency key)`` proposed together
        (one or few Raft entries); one answer per item, in order, each as ``transfer`` would
        give it, or ``state: refused`` with ``error`` and ``reason`` for an item not taken
        (``key_reused``, ``too_many_pending``).  Not atomic: each item settles or is rejected
        on its own.  The whole batch is refused (LedgerError 503 ``overloaded``, nothing
        stored) when it cannot be admitted; an item the coordinator did not answer is stored
        pending before the answer, as a lone transfer is."""
        out: list[dict | None] = [None] * len(items)
        first: dict[str, int] = {}                 # tx id -> the index of its first item here
        copies: list[tuple[int, int]] = []         # (index, the earlier index it repeats)
        propose: list[tuple[int, Transfer]] = []
        now = self._clock.wall_ms()
        for i, (src, dst, amount, key) in enumerate(items):
            tx_id = f"tx:{src}:{key}"
            j = first.get(tx_id)
            if j is not None:                      # the same key twice in one batch
                if items[j][1:3] == (dst, amount):
                    copies.append((i, j))
                else:
                    out[i] = _refused(tx_id, src, dst, amount, "key_reused",
                                      f"idempotency key {key!r} is used by item {j} for another transfer")
                continue
            first[tx_id] = i
            known = self.transfer_state(tx_id)
            if known is None:
                propose.append((i, Transfer(tx_id, src, dst, amount, by, now)))
            elif (known.get("to"), known.get("amount")) != (dst, amount):
                out[i] = _refused(tx_id, src, dst, amount, "key_reused",
                                  f"idempotency key {key!r} was used for another transfer")
            elif known["state"] == "pending" and tx_id not in self._inflight:
                # stored pending earlier: propose it as stored (its own time and author)
                propose.append((i, Transfer(tx_id, known["from"], known["to"], known["amount"], known["by"],
                                            known["at_ms"])))
            else:
                out[i] = _transfer_view(known)
        if propose:
            ids = {t.key for _, t in propose} - self._inflight
            self._inflight |= ids                  # the sweep leaves them alone meanwhile
            try:
                results = await self._submit_many([t for _, t in propose])
            finally:
                self._inflight -= ids
            for (i, t), result in zip(propose, results):
                out[i] = self._batch_outcome(t, result)
        for i, j in copies:
            out[i] = out[j]
        answers: list[dict] = [a for a in out if a is not None]
        assert len(answers) == len(items)
        if wait:
            deadline = asyncio.get_running_loop().time() + WAIT_SETTLED_MS / 1000
            while any(a["state"] == "pending" for a in answers) and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
                answers = [self._current(a) for a in answers]
        top = max((a.get("seq") or 0 for a in answers), default=0)
        if top:
            await self._caught_up_to({"seq": top})      # read your writes: this node's balances show them
        return answers

    def _current(self, answer: dict) -> dict:
        if answer["state"] == "refused":
            return answer
        state = self.transfer_state(answer["id"])
        return _transfer_view(state) if state is not None else answer

    def _batch_outcome(self, t: Transfer, result: dict | LedgerError) -> dict:
        """One proposed item's answer from the coordinator's result, or after its error (stored
        pending first, as ``transfer`` does)."""
        if isinstance(result, LedgerError):
            if self._doc_state(t.key) is None:
                try:
                    self._store_pending(t.key, t.src, t.dst, t.amount, t.by, t.at_ms,
                                        capped=result.code in _NOT_APPENDED)
                except LedgerError as e:           # too many pending for this account: not taken
                    return _refused(t.key, t.src, t.dst, t.amount, e.code, e.message)
            else:
                self._track(t.key)                 # pending already: the sweep proposes it again
            state = self.transfer_state(t.key)
            return _transfer_view(state) if state is not None else _refused(
                t.key, t.src, t.dst, t.amount, result.code, result.message)
        if result.get("error") == "key_reused":
            return _refused(t.key, t.src, t.dst, t.amount, "key_reused",
                            f"idempotency key {t.key.split(':', 2)[2]!r} was used for another transfer")
        self._record_outcome(t.key, result)         # a pending document (proposed again) gets its outcome
        return _transfer_view(self.transfer_state(t.key) or _outcome(t, result))

    def _store_pending(self, tx_id: str, src: str, dst: str, amount: int, by: str, now: int, capped: bool) -> None:
        if self._doc_state(tx_id) is not None:
            return
        if capped and sum(t.startswith(f"tx:{src}:") for t in self._pending) >= self.pending_per_account_max:
            # Each pending transfer is a document every node keeps until a coordinator settles it.
            raise LedgerError(429, "too_many_pending", f"account {src} already has {self.pending_per_account_max} "
                              "transfers waiting for the coordinator (transfers_pending_per_account_max)",
                              retry_after_s=RETRY_AFTER_S)
        self._docs.put(TRANSFER_TYPE, tx_id, {"id": tx_id, "from": src, "to": dst, "amount": amount,
                                              "by": by, "at_ms": now, "state": "pending", "node": self.node_id})
        self.stats["stored_pending"] += 1

    async def hold(self, task_id: str, account: str, amount: int) -> dict:
        """Escrow a task's price (before the task is accepted); LedgerError if it cannot be held now."""
        if self.view.account(account) is None:
            raise LedgerError(404, "no_account", f"no account {account!r} to pay the price from")
        result = await self._submit(Hold(f"hold:{task_id}", task_id, account, amount, self._clock.wall_ms()))
        return _raise_rejected(result)

    async def _propose(self, tx_id: str) -> None:
        if tx_id in self._inflight:
            return
        t = self._doc_state(tx_id)
        if t is None or t.get("state") != "pending":
            return
        self._inflight.add(tx_id)
        try:
            result = await self._submit(Transfer(tx_id, t["from"], t["to"], t["amount"], t["by"], t["at_ms"]))
        except LedgerError:
            return                       # no coordinator now: it stays pending, the sweep retries
        finally:
            self._inflight.discard(tx_id)
        self._record_outcome(tx_id, result)

    def _record_outcome(self, tx_id: str, result: dict) -> None:
        t = self._doc_state(tx_id)
        if t is None or t.get("state") != "pending":
            return
        if result.get("error") == "key_reused":
            return       # another request took this key first: the coordinator's sweep records its outcome
        done = {**t, "state": "settled" if result.get("ok") else "rejected", "seq": result.get("seq")}
        if not result.get("ok"):
            done["reason"] = result.get("message", result.get("error"))
        self._docs.put(TRANSFER_TYPE, tx_id, done)

    def admit(self, n: int = 1) -> None:
        """Refuse ``n`` more commands (503 ``overloaded``, Retry-After, nothing stored) unless
        they fit under ``SUBMITS_IN_FLIGHT_MAX`` with those already waiting (or nothing waits).
        Cheap: the API asks with n=1 before it reads a request's body, so a shed request
        costs no JSON decoding."""
        if self._submitting and self._submitting + n > SUBMITS_IN_FLIGHT_MAX:
            self.stats["shed"] += 1
            raise LedgerError(503, "overloaded", f"{self._submitting} ledger commands are already waiting for the "
                                                 "coordinator on this node; try again", retry_after_s=RETRY_AFTER_S)

    async def _submit(self, cmd: Any) -> dict:
        self.admit()
        self._submitting += 1
        try:
            result = await self._gateway.submit(cmd, SUBMIT_TIMEOUT_MS)
        except CommandError as e:
            status = 503 if e.code in ("no_coordinator", "busy") else 504
            raise LedgerError(status, e.code, e.message) from None
        finally:
            self._submitting -= 1
        self._wake.set()                 # on the coordinator: publish it (the tick thread may be later)
        return result

    async def _submit_many(self, cmds: list[Any]) -> list[dict | LedgerError]:
        """Submit commands together (one or few Raft entries): each one's result or
        LedgerError.  Admitted whole when its commands fit under ``SUBMITS_IN_FLIGHT_MAX`` with
        those of this node already waiting (or none waits), refused whole with 503
        ``overloaded`` otherwise (nothing appended)."""
        self.admit(len(cmds))
        self._submitting += len(cmds)
        try:
            try:
                results = await self._gateway.submit_many(cmds, SUBMIT_TIMEOUT_MS)
            except CommandError as e:      # nothing of it was queued, or the forward failed as a whole
                results = [e] * len(cmds)
        finally:
            self._submitting -= len(cmds)
        self._wake.set()
        return [LedgerError(503 if r.code in ("no_coordinator", "busy") else 504, r.code, r.message)
                if isinstance(r, CommandError) else r for r in results]

    async def _caught_up_to(self, result: dict) -> None:
        """Let this node's view show what it just did (bounded wait for the published entry)."""
        seq = result.get("seq") or 0
        if self.view.seq >= seq:
            return
        try:
            self._advance()           # a voter: its own log has it already
        except Exception as exc:      # diverged: stop the node, as the loop would
            log.exception("ledger service failed")
            self._on_fatal(exc)
            raise
        if self.view.seq >= seq:
            return
        self._wake.set()
        if len(self._seq_waiters) >= SEQ_WAITERS_MAX:
            # the view is stuck (a gap): drop the waits that timed out already
            self._seq_waiters = [w for w in self._seq_waiters if not w[2].done()]
            heapq.heapify(self._seq_waiters)
            if len(self._seq_waiters) >= SEQ_WAITERS_MAX:
                return
        self._waiter_n += 1
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._seq_waiters, (seq, self._waiter_n, fut))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, CAUGHT_UP_WAIT_MS / 1000)

    # ------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        next_publish_ms = 0
        while not self._stopping:
            self._wake.clear()
            pause_ms = 0
            try:
                self._advance()
                coordinator = self._coordinator()
                if coordinator is not None and coordinator.caught_up():
                    commands = coordinator.commands
                    machine = commands.machine(Transfer)
                    now_ms = self._clock.now_ms()
                    if now_ms >= next_publish_ms:
                        complete_index = commands.complete_index      # before the entries (ranges_after)
                        if self._publish(machine, complete_index):
                            # the next ranges wait a little: one commit and one rumour frame
                            # for all of them, on this node and on every receiver
                            next_publish_ms = now_ms + PUBLISH_INTERVAL_MS
                    elif len(machine.applied) > self._published_seq:
                        pause_ms = next_publish_ms - now_ms
                    self._bootstrap_admin(machine)
                    if self._sweep_due or now_ms >= self._next_sweep_ms:
                        self._sweep_due = False
                        self._next_sweep_ms = now_ms + SWEEP_INTERVAL_MS
                        self._sweep(machine)
            except Exception as exc:
                log.exception("ledger service failed")
                self._on_fatal(exc)
                return
            if pause_ms > 0:
                await asyncio.sleep(pause_ms / 1000)      # wakes meanwhile would only spin
                continue
            try:
                await asyncio.wait_for(self._wake.wait(), LOOP_INTERVAL_MS / 1000)
            except TimeoutError:
                pass

    def _advance(self) -> None:
        """Apply published ranges to the view, in contiguous seq order (spread.py), then what
        this node's own Raft machines applied beyond them (a voter: the same log, cut into the
        same ranges), then answer the requests waiting to read their writes."""
        def published(seq: int) -> Any:
            doc = self.replica.get(ENTRY_TYPE, entry_key(seq))
            return None if doc is None else doc.value
        self.stats["applied_from_gossip"] += spread.apply_published(self.view, published)
        commands = getattr(self._coordinator(), "commands", None)
        if commands is not None:
            complete_index = commands.complete_index          # before the entries (ranges_after)
            machine = commands.machine(Transfer)
            if len(machine.applied) > self.view.seq:
                self.stats["applied_from_raft"] += spread.apply_local(self.view, machine.applied, complete_index,
                                                                      PUBLISH_ENTRIES_MAX)
        while self._to_check:
            first, value = self._to_check.popleft()
            spread.check_applied(self.view, first, value)
        waiters = self._seq_waiters
        while waiters and (waiters[0][0] <= self.view.seq or waiters[0][2].done()):
            fut = heapq.heappop(waiters)[2]
            if not fut.done():
                fut.set_result(None)

    def _published_end(self) -> int:
        """The end of the contiguous ranges published from seq 1 (a cursor that only moves on)."""
        while True:
            first = self._published_seq + 1
            doc = self.replica.get(ENTRY_TYPE, entry_key(first))
            try:
                entries = spread.range_entries(doc.value, first) if doc is not None else None
            except spread.Diverged:        # not a range: applying it says so
                entries = None
            if not entries:
                return self._published_seq
            self._published_seq += len(entries)

    def _publish(self, machine: Ledger, complete_index: int) -> int:
        """Publish the ranges of wholly applied Raft entries past the published ones (which
        end at a range's end); how many were new."""
        new = 0
        for first, value in spread.ranges_after(machine.applied, self._published_end(), complete_index,
                                                PUBLISH_ENTRIES_MAX):
            self._docs.put(ENTRY_TYPE, entry_key(first), value, durable=False)
            self.stats["published"] += len(spread.range_entries(value, first))
            self.stats["ranges_published"] += 1
            new += 1
        self._advance()
        return new

    def _bootstrap_admin(self, machine: Ledger) -> None:
        if machine.accounts or machine.seq or self._admin_task_started:
            return
        self._admin_task_started = True
        asyncio.create_task(self._open_admin())

    _admin_task_started = False

    async def _open_admin(self) -> None:
        password = self._admin_password or secrets.token_urlsafe(12)
        try:
            await self.open_account(ADMIN, password, "admin", self.node_id)
        except (LedgerError, ValueError) as e:
            log.warning("could not open the admin account: %s", e)
            self._admin_task_started = False
            return
        if not self._admin_password:
            # Printed once, to the terminal only (never to the log): the user must keep it.
            print(f"galaxy: new mesh: the admin account's password is {password}\n"
                  "        sign in with `galaxy login admin`; it is not shown again", file=sys.stdout, flush=True)
        log.info("opened the admin account of this new mesh", extra={"event": "ledger"})

    def _sweep(self, machine: Ledger) -> None:
        for tx_id in [t for t in self._pending if t not in self._inflight][:SWEEP_BATCH_MAX]:
            known = machine.result_of(tx_id)
            if known is not None:
                self._record_outcome(tx_id, known)
            else:
                asyncio.create_task(self._propose(tx_id))
            self.stats["swept"] += 1
        self._check_outcomes(machine)
        if SETTLE_KEY in self._inflight:
            return
        outcomes = []
        for task_id, node_id, owner, succeeded in self.settled_tasks()[:SWEEP_BATCH_MAX]:
            if machine.is_settled(task_id):
                self.forget_task(task_id)
            else:
                outcomes.append(TaskOutcome(task_id, node_id, owner, succeeded))
        if outcomes:
            self._inflight.add(SETTLE_KEY)
            asyncio.create_task(self._settle(outcomes))

    def _check_outcomes(self, machine: Ledger) -> None:
        """The ledger is the truth: an outcome it does not hold (written by a node that was cut
        off, or a bug) is corrected, or sent back to pending to be sequenced for real."""
        for tx_id in list(self._verify)[:SWEEP_BATCH_MAX]:
            self._verify.discard(tx_id)
            t = self._doc_state(tx_id)
            if t is None or t.get("state") == "pending":
                continue
            known = machine.result_of(tx_id)
            truth = None if known is None else "settled" if known.get("ok") else "rejected"
            if truth == t["state"]:
                continue
            log.warning("transfer %s says %s but the ledger says %s: corrected", tx_id, t["state"],
                        truth or "never sequenced", extra={"event": "ledger"})
            fixed = {k: v for k, v in t.items() if k not in ("seq", "reason")}
            self._docs.put(TRANSFER_TYPE, tx_id, {**fixed, "state": "pending"})
            if known is not None:
                self._record_outcome(tx_id, known)

    async def _settle(self, outcomes: list[TaskOutcome]) -> None:
        """Settle ended tasks in one entry (pay or refund their holds, move credit)."""
        now = self._clock.wall_ms()
        try:
            await self._submit(TaskSettleBatch(f"settle:{self.node_id}:{now}:{secrets.token_hex(4)}",
                                               tuple(outcomes), now))
            self.stats["settlements"] += len(outcomes)
        except LedgerError:
            pass                          # the next sweep proposes them again (each settles once)
        finally:
            self._inflight.discard(SETTLE_KEY)


def _outcome(entry: Transfer, result: dict) -> dict:
    """A sequenced transfer as ``transfer_state`` shows it, from its entry and the ledger's result."""
    out = {"id": entry.key, "from": entry.src, "to": entry.dst, "amount": entry.amount, "by": entry.by,
           "at_ms": entry.at_ms, "state": "settled" if result.get("ok") else "rejected", "seq": result.get("seq")}
    if not result.get("ok"):
        out["reason"] = result.get("message", result.get("error"))
    return out


def _refused(tx_id: str, src: str, dst: str, amount: int, code: str, reason: str) -> dict:
    """A batch item this node did not take: nothing was stored or appended for it."""
    return {"id": tx_id, "state": "refused", "from": src, "to": dst, "amount": amount, "error": code,
            "reason": reason}


def _transfer_view(t: dict) -> dict:
    out = {"id": t["id"], "state": t["state"], "from": t["from"], "to": t["to"], "amount": t["amount"]}
    if t.get("seq") is not None:
        out["seq"] = t["seq"]
    if t.get("reason"):
        out["reason"] = t["reason"]
    return out


def check_amount(value: Any, name: str = "amount") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= AMOUNT_MAX:
        raise ValueError(f"{name}: a whole number from 1 to {AMOUNT_MAX}")
    return value
