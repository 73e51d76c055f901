"""The token ledger: accounts, balances, transfers, task escrow and credit — a pure state machine.

Theory of operation
-------------------
Every change to the ledger is an *entry* (``messages.LEDGER_TYPES``) sequenced by the
coordinator through the Raft log; every node applies the same entries in the same order
to its own ``Ledger`` (voters from the log, the others from the entries the coordinator
spreads by gossip), so every node holds the same balances at the same sequence number.
``apply(index, term, entry)`` is deterministic: it reads only its state and the entry —
times come inside entries, stamped by the node that accepted the request.

*Idempotency.*  Every entry carries a ``key``.  The first entry with a key is applied (or
rejected, which is also final); a later entry with the same key and the same request gets
the first one's result back with ``duplicate: true`` and changes nothing (the time and the
node it came through, ``at_ms`` and ``by``, may differ: a retry through another node is
the same request); the same key with another request is rejected (``key_reused``).  So a client may resend a transfer to any
node, any number of times, and money moves at most once.  Keys are kept for the life of
the ledger (``keys`` in ``snapshot()`` counts them).

*Escrow.*  ``Hold`` moves a task's price from the submitter's balance to ``held``;
``TaskSettle`` releases it: to the owner of the node that ran the successful attempt, or
back to the submitter when the task did not succeed or the node has no (known) owner.
Settlement also moves credit: the node's and its owner's credit go up by
``CREDIT_SUCCESS`` on success, down by ``CREDIT_FAILURE`` otherwise, within
``0..CREDIT_MAX``.  Trust follows credit (``trust()``).

*Sequence and hash.*  ``seq`` counts the entries applied, rejected ones included (a
rejection is a deterministic outcome too).  ``hash`` chains them:
``hash = sha256(hash || canonical(entry) || outcome)``, so two nodes with the same
``(seq, hash)`` applied the same entries with the same outcomes.

Invariants (``_check()``; it visits every account and hold, so it runs after every entry
while the ledger is small and after every ``size / CHECK_VISITS`` entries beyond: about
``CHECK_VISITS`` visits per entry, never a scan of 10,000 accounts per transfer):
1. Every balance and held amount is an integer >= 0 and <= ``AMOUNT_MAX``.
2. sum(balances) + sum(held) == minted - burned == ``total_supply``.
3. Each account's ``held`` equals the sum of the open holds it funds.
4. ``seq`` counts the keys seen plus the duplicates applied.
"""

from __future__ import annotations

import copy
import hashlib
import re
from collections import deque
from dataclasses import astuple, dataclass, field, fields, is_dataclass
from typing import Any

import msgpack

from galaxy.messages import Burn, Hold, Mint, OpenAccount, SetAccount, TaskSettle, TaskSettleBatch, Transfer

ROLES = ("admin", "operator", "user")
AMOUNT_MAX = (1 << 62) - 1             # bounded int64 with room for sums of two
CREDIT_DEFAULT = 100
CREDIT_MAX = 200
CREDIT_SUCCESS = 1                     # slow to earn...
CREDIT_FAILURE = 5                     # ...quick to lose: a flaky node drops below "high" in one failure
HISTORY_MAX = 1000                     # entries kept per account for `galaxy history`
CHECK_VISITS = 64                      # accounts and holds the invariant check visits per entry, amortized
ACCOUNT_NAME = re.compile(r"[a-z][a-z0-9_.-]{0,31}\Z")
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
KEY_CHARS_MAX = 200


def trust(credit: int, isolated: bool = True) -> str:
    """The seeds' trust levels: no isolation (container runtime) -> low; then by credit."""
    if not isolated:
        return "low"
    return "high" if credit >= 100 else "medium" if credit >= 50 else "low"


@dataclass(slots=True)
class Account:
    name: str
    role: str
    password_hash: str
    balance: int = 0
    held: int = 0
    credit: int = CREDIT_DEFAULT
    tokens_valid_after_ms: int = 0      # tokens issued before this are revoked
    opened_seq: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY_MAX))

    def view(self) -> dict:
        return {"name": self.name, "role": self.role, "balance": self.balance, "held": self.held,
                "credit": self.credit, "trust": trust(self.credit)}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_IDENTITY_MASK: dict[type, tuple[bool, ...]] = {}
_SCALARS = frozenset((str, int, bool, bytes, float, type(None)))
_BY_TAG = {cls.TAG: cls for cls in (OpenAccount, Mint, Burn, Transfer, Hold, TaskSettle, SetAccount, TaskSettleBatch)}


def _names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
        _IDENTITY_MASK[cls] = tuple(n not in _CIRCUMSTANCE for n in names)
    return names


def _scalars(entry: Any) -> tuple | None:
    """The entry's field values when every one is a scalar (a Transfer), else None."""
    values = tuple(getattr(entry, n) for n in _names(type(entry)))
    return values if all(type(v) in _SCALARS for v in values) else None


def _astuple(entry: Any) -> tuple:
    """``dataclasses.astuple(entry)``, fast when every field is a scalar (a Transfer: 10x
    faster; the two run for every entry on every voter, twice); the same value always."""
    values = _scalars(entry)
    return values if values is not None else _plain(entry)


def _plain(v: Any) -> Any:
    """``dataclasses.astuple``'s conversion without its deepcopy of every leaf (a batch of
    200 task settlements: 0.56 -> 0.15 ms): dataclasses become tuples, lists and tuples and dicts
    are rebuilt, scalars are themselves (deepcopy returns them unchanged), anything else is
    deep-copied as astuple does."""
    t = type(v)
    if t in _SCALARS:
        return v
    if is_dataclass(v):
        return tuple(_plain(getattr(v, n)) for n in _names(t))
    if t is list or t is tuple:
        return t(_plain(x) for x in v)
    if t is dict:
        return {_plain(k): _plain(x) for k, x in v.items()}
    return copy.deepcopy(v)


def _canonical(entry: Any) -> bytes:
    return msgpack.packb([entry.TAG, *_astuple(entry)], use_bin_type=True)


# Fields that say when and through whom a request came, not what it asks: a retry of the
# same request through another node carries other values, and is still the same request.
_CIRCUMSTANCE = frozenset(("at_ms", "by"))


def _identity(entry: Any, request: tuple | None = None) -> bytes:
    if request is None:
        request = _astuple(entry)
    _names(type(entry))
    mask = _IDENTITY_MASK[type(entry)]
    return hashlib.sha256(msgpack.packb(
        [entry.TAG, *(v for keep, v in zip(mask, request) if keep)], use_bin_type=True)).digest()


class Applied:
    """The ``(index, term, entry, result)`` of every applied entry, in seq order: a list to
    its readers, kept compact.  The ledger never forgets an entry, so millions of them stay
    in memory for the life of the node, and each one stored as a dataclass in a tuple would
    be two objects the garbage collector tracks: a full collection visits every tracked
    object, and grew to stop the whole process (the Raft thread too) for hundreds of ms.  An
    entry whose fields are all scalars (a transfer) is stored as one flat tuple of scalars,
    which the collector stops tracking; it is rebuilt (equal, not identical) when read."""

    __slots__ = ("_rows",)

    def __init__(self) -> None:
        self._rows: list[tuple] = []

    def append(self, item: tuple[int, int, Any, dict]) -> None:
        index, term, entry, result = item
        values = _scalars(entry)
        # Flat: (index, term, n, k1, v1, ..., kn, vn, TAG, *fields).  A dict in a tuple keeps
        # the tuple tracked, and so does a nested tuple until a collection has untracked it
        # first: a row would stay tracked until a collection of an older generation saw it
        # again (gen1 collections of 450k such rows took 170 ms).  A flat tuple of scalars is
        # untracked by the first young collection that sees it.
        self._rows.append((index, term, *_flat(result), entry.TAG, *values) if values is not None
                          else (index, term, *_flat(result), None, entry))

    @staticmethod
    def _item(row: tuple) -> tuple[int, int, Any, dict]:
        result, end = _unflat(row, 2)
        if row[end] is None:
            return row[0], row[1], row[end + 1], result
        return row[0], row[1], _BY_TAG[row[end]](*row[end + 1:]), result

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self._item(r) for r in self._rows[i]]
        return self._item(self._rows[i])

    def __iter__(self) -> Any:
        return (self._item(r) for r in self._rows)

    def position(self, i: int) -> tuple[int, int, dict]:
        """``(index, term, result)`` of item ``i``, without rebuilding its entry."""
        row = self._rows[i]
        return row[0], row[1], _unflat(row, 2)[0]


def _flat(result: dict) -> tuple:
    """``(n, k1, v1, ..., kn, vn)`` of a result dict (see ``Applied.append``)."""
    return (len(result), *(x for kv in result.items() for x in kv))


def _unflat(row: tuple, at: int) -> tuple[dict, int]:
    """The result dict flattened at ``row[at]``, and where the row goes on after it."""
    n = row[at]
    kv = row[at + 1:at + 1 + 2 * n]
    return dict(zip(kv[0::2], kv[1::2])), at + 1 + 2 * n


class Ledger:
    commands = (OpenAccount, Mint, Burn, Transfer, Hold, TaskSettle, SetAccount, TaskSettleBatch)

    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        self.holds: dict[str, tuple[str, int]] = {}      # task id -> (funding account, amount)
        self.node_credit: dict[str, int] = {}
        self._settled: set[str] = set()                    # task ids settled (each at most once)
        self.minted = 0
        self.burned = 0
        self.seq = 0
        self._hash = hashlib.sha256(b"galaxy-ledger").digest()
        self.applied_index = 0
        # key -> (entry digest, *the first result flattened): a tuple of scalars, untracked (``Applied``)
        self._keys: dict[str, tuple] = {}
        self._duplicates = 0
        # (index, term, entry, result) of every entry, seq order: what the coordinator
        # publishes to the nodes that do not vote (the log is never compacted either).
        self.applied = Applied()

    # ---------------------------------------------------------------- reading
    @property
    def hash(self) -> str:
        """The chained hash of every entry applied (hex), equal on every node at the same seq."""
        return self._hash.hex()

    @property
    def total_supply(self) -> int:
        return self.minted - self.burned

    def account(self, name: str) -> Account | None:
        return self.accounts.get(name)

    def credit_of_node(self, node_id: str) -> int:
        return self.node_credit.get(node_id, CREDIT_DEFAULT)

    def result_of(self, key: str) -> dict | None:
        """The outcome of the entry with this key, if it was applied here."""
        got = self._keys.get(key)
        return None if got is None else _unflat(got, 1)[0]

    def snapshot(self) -> dict:
        return {"applied_seq": self.seq, "hash": self.hash, "total_supply": self.total_supply,
                "minted": self.minted, "burned": self.burned, "accounts": len(self.accounts),
                "held": sum(a for _, a in self.holds.values()), "open_holds": len(self.holds),
                "keys": len(self._keys)}

    # ---------------------------------------------------------------- applying
    def apply(self, index: int, term: int, entry: Any) -> dict:
        """Apply one entry in log order; the result is plain data (``ok`` true or false)."""
        if index <= self.applied_index:
            raise AssertionError(f"ledger entry at index {index} after {self.applied_index}")
        self.applied_index = index
        request = _astuple(entry)
        digest = hashlib.sha256(msgpack.packb([entry.TAG, *request], use_bin_type=True)).digest()
        identity = _identity(entry, request)
        seen = self._keys.get(entry.key)
        if seen is not None:
            self._duplicates += 1
            if seen[0] == identity:
                result = {**_unflat(seen, 1)[0], "duplicate": True}  # the first outcome, and its seq
            else:
                result = _rejected("key_reused", f"idempotency key {entry.key!r} was used for another request")
            self.seq += 1
        else:
            result = self._apply(entry)
            self.seq += 1
            result = {**result, "seq": self.seq}
            self._keys[entry.key] = (identity, *_flat(result))      # flat: untracked (Applied.append)
        self._hash = hashlib.sha256(self._hash + digest + msgpack.packb(
            [result["ok"], result.get("error")], use_bin_type=True)).digest()
        self.applied.append((index, term, entry, result))
        if self.seq % max(1, (len(self.accounts) + len(self.holds)) // CHECK_VISITS) == 0:
            self._check()
        return result

    def _apply(self, e: Any) -> dict:
        if not isinstance(e.key, str) or not 0 < len(e.key) <= KEY_CHARS_MAX:
            return _rejected("invalid", f"key must be 1..{KEY_CHARS_MAX} characters", "key")
        match e:
            case OpenAccount():
                return self._open(e)
            case SetAccount():
                return self._set(e)
            case Mint():
                return self._mint(e)
            case Burn():
                return self._burn(e)
            case Transfer():
                return self._transfer(e)
            case Hold():
                return self._hold(e)
            case TaskSettle():
                return self._settle(e.task_id, e.node_id, e.node_owner, e.succeeded, e.at_ms)
            case TaskSettleBatch():
                paid = refunded = settled = 0
                for o in e.outcomes:
                    r = self._settle(o.task_id, o.node_id, o.node_owner, o.succeeded, e.at_ms)
                    if r["ok"] and not r.get("already"):
                        settled += 1
                        paid += r["paid"]
                        refunded += r["refunded"]
                return _ok(settled=settled, paid=paid, refunded=refunded)
        return _rejected("invalid", f"not a ledger entry: {type(e).__name__}")

    def _open(self, e: OpenAccount) -> dict:
        if not ACCOUNT_NAME.match(e.name):
            return _rejected("invalid", "name: 1-32 characters, a lower-case letter then letters, digits, _ . -",
                             "name")
        if e.role not in ROLES:
            return _rejected("invalid", f"role: one of {', '.join(ROLES)}", "role")
        if e.name in self.accounts:
            return _rejected("exists", f"account {e.name} already exists", "name")
        self.accounts[e.name] = Account(e.name, e.role, e.password_hash, opened_seq=self.seq + 1)
        return _ok(account=e.name)

    def _set(self, e: SetAccount) -> dict:
        a = self.accounts.get(e.name)
        if a is None:
            return _no_account(e.name, "name")
        if e.role and e.role not in ROLES:
            return _rejected("invalid", f"role: one of {', '.join(ROLES)}", "role")
        if e.role:
            a.role = e.role
        if e.password_hash:
            a.password_hash = e.password_hash
        if e.tokens_valid_after_ms:
            a.tokens_valid_after_ms = max(a.tokens_valid_after_ms, e.tokens_valid_after_ms)
        return _ok(account=e.name)

    def _amount(self, amount: Any) -> dict | None:
        if isinstance(amount, bool) or not isinstance(amount, int) or not 0 < amount <= AMOUNT_MAX:
            return _rejected("invalid", f"amount must be a whole number from 1 to {AMOUNT_MAX}", "amount")
        return None

    def _mint(self, e: Mint) -> dict:
        a, refused = self._account_for(e.to, e.amount, "to")
        if refused:
            return refused
        if a.balance + e.amount > AMOUNT_MAX:
            return _rejected("overflow", f"the balance of {e.to} would exceed {AMOUNT_MAX}", "amount")
        a.balance += e.amount
        self.minted += e.amount
        self._note(a, "mint", e.amount, e.by, e.at_ms)
        return _ok(balance=a.balance)

    def _account_for(self, name: str, amount: Any, field_name: str) -> tuple[Account | None, dict | None]:
        """(the account, None) if ``amount`` is valid and the account exists, else (None, the rejection)."""
        bad = self._amount(amount)
        if bad:
            return None, bad
        a = self.accounts.get(name)
        return (a, None) if a is not None else (None, _no_account(name, field_name))

    def _burn(self, e: Burn) -> dict:
        a, refused = self._account_for(e.account, e.amount, "account")
        if refused:
            return refused
        if a.balance < e.amount:
            return _rejected("insufficient_funds", f"{e.account} has {a.balance}, cannot burn {e.amount}", "amount")
        a.balance -= e.amount
        self.burned += e.amount
        self._note(a, "burn", -e.amount, e.by, e.at_ms)
        return _ok(balance=a.balance)

    def _transfer(self, e: Transfer) -> dict:
        bad = self._amount(e.amount)
        if bad:
            return bad
        src, dst = self.accounts.get(e.src), self.accounts.get(e.dst)
        if src is None:
            return _no_account(e.src, "from")
        if dst is None:
            return _no_account(e.dst, "to")
        if e.src == e.dst:
            return _rejected("invalid", "from and to are the same account", "to")
        if src.balance < e.amount:
            return _rejected("insufficient_funds", f"{e.src} has {src.balance}, needs {e.amount}", "amount")
        if dst.balance + e.amount > AMOUNT_MAX:
            return _rejected("overflow", f"the balance of {e.dst} would exceed {AMOUNT_MAX}", "amount")
        src.balance -= e.amount
        dst.balance += e.amount
        self._note(src, "transfer out", -e.amount, e.dst, e.at_ms)
        self._note(dst, "transfer in", e.amount, e.src, e.at_ms)
        return _ok(balance=src.balance)

    def _hold(self, e: Hold) -> dict:
        a, refused = self._account_for(e.account, e.amount, "account")
        if refused:
            return refused
        if e.task_id in self.holds:
            return _rejected("exists", f"task {e.task_id} already has a hold", "task_id")
        if a.balance < e.amount:
            return _rejected("insufficient_funds", f"{e.account} has {a.balance}, the task's price is {e.amount}",
                             "price")
        a.balance -= e.amount
        a.held += e.amount
        self.holds[e.task_id] = (e.account, e.amount)
        self._note(a, "hold", -e.amount, e.task_id, e.at_ms)
        return _ok(held=e.amount)

    def is_settled(self, task_id: str) -> bool:
        return task_id in self._settled

    def _settle(self, task_id: str, node_id: str, node_owner: str, succeeded: bool, at_ms: int) -> dict:
        if task_id in self._settled:
            return _ok(paid=0, refunded=0, already=True)
        if not NODE_ID.match(node_id):
            return _rejected("invalid", "node_id: not a node id", "node_id")
        self._settled.add(task_id)
        owner = self.accounts.get(node_owner) if node_owner else None
        step = CREDIT_SUCCESS if succeeded else -CREDIT_FAILURE
        self.node_credit[node_id] = _clamp(self.credit_of_node(node_id) + step)
        if owner is not None:
            owner.credit = _clamp(owner.credit + step)
        hold = self.holds.pop(task_id, None)
        if hold is None:
            return _ok(paid=0, refunded=0)
        funder = self.accounts[hold[0]]
        amount = hold[1]
        funder.held -= amount
        if succeeded and owner is not None and owner.name != funder.name:
            owner.balance += amount
            self._note(funder, "paid", 0, task_id, at_ms)
            self._note(owner, "earned", amount, task_id, at_ms)
            return _ok(paid=amount, refunded=0, to=owner.name)
        funder.balance += amount
        self._note(funder, "refund", amount, task_id, at_ms)
        return _ok(paid=0, refunded=amount)

    def _note(self, a: Account, kind: str, amount: int, other: str, at_ms: int) -> None:
        a.history.append({"seq": self.seq + 1, "kind": kind, "amount": amount, "other": other, "at_ms": at_ms,
                          "balance": a.balance})

    def _check(self) -> None:
        held_by: dict[str, int] = {}
        for funder, amount in self.holds.values():
            held_by[funder] = held_by.get(funder, 0) + amount
        total = 0
        for a in self.accounts.values():
            assert isinstance(a.balance, int) and 0 <= a.balance <= AMOUNT_MAX, (a.name, a.balance)
            assert 0 <= a.held and a.held == held_by.get(a.name, 0), (a.name, a.held, held_by.get(a.name))
            total += a.balance + a.held
        assert total == self.minted - self.burned, (total, self.minted, self.burned)
        assert self.seq == len(self._keys) + self._duplicates


def _clamp(credit: int) -> int:
    return max(0, min(CREDIT_MAX, credit))


def _ok(**fields: Any) -> dict:
    return {"ok": True, **fields}


def _rejected(error: str, message: str, key: str | None = None) -> dict:
    return {"ok": False, "error": error, "message": message, "key": key}


def _no_account(name: str, key: str) -> dict:
    return _rejected("no_account", f"no account {name!r}", key)
