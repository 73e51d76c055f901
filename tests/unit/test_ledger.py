"""The pure ledger state machine (galaxy/ledger/core.py): rules, idempotency, escrow, credit, hash."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from galaxy.ledger.core import (AMOUNT_MAX, CHECK_VISITS, CREDIT_DEFAULT, CREDIT_FAILURE, CREDIT_SUCCESS, Account, Ledger,
                                trust)
from galaxy.messages import Burn, Hold, Mint, OpenAccount, SetAccount, TaskSettle, Transfer


class Log:
    """Feeds entries to a ledger at increasing Raft indices."""

    def __init__(self) -> None:
        self.ledger = Ledger()
        self.index = itertools.count(1)
        self.entries: list = []

    def __call__(self, entry) -> dict:
        self.entries.append(entry)
        return self.ledger.apply(next(self.index), 1, entry)


def funded(*names: str, amount: int = 100) -> Log:
    log = Log()
    for n in names:
        assert log(OpenAccount(f"open:{n}", n, "user", "h", 0))["ok"]
        assert log(Mint(f"mint:{n}", n, amount, "admin", 0))["ok"]
    return log


def test_transfer_moves_money_and_refuses_overdraft_unknown_accounts_and_bad_amounts():
    log = funded("alice", "bob")
    r = log(Transfer("k1", "alice", "bob", 30, "alice", 5))
    assert r["ok"] and r["balance"] == 70 and log.ledger.account("bob").balance == 130
    for entry, error, key in [
        (Transfer("k2", "alice", "bob", 71, "alice", 5), "insufficient_funds", "amount"),
        (Transfer("k3", "alice", "carol", 1, "alice", 5), "no_account", "to"),
        (Transfer("k4", "zed", "bob", 1, "zed", 5), "no_account", "from"),
        (Transfer("k5", "alice", "bob", 0, "alice", 5), "invalid", "amount"),
        (Transfer("k6", "alice", "bob", -5, "alice", 5), "invalid", "amount"),
        (Transfer("k7", "alice", "alice", 5, "alice", 5), "invalid", "to"),
        (Transfer("k8", "alice", "bob", AMOUNT_MAX + 1, "alice", 5), "invalid", "amount"),
    ]:
        r = log(entry)
        assert not r["ok"] and r["error"] == error and r["key"] == key, (entry, r)
    assert log.ledger.account("alice").balance == 70 and log.ledger.total_supply == 200


def test_the_same_key_never_moves_money_twice_and_a_reused_key_is_refused():
    log = funded("alice", "bob")
    first = log(Transfer("same", "alice", "bob", 10, "alice", 5))
    again = log(Transfer("same", "alice", "bob", 10, "alice", 5))
    assert again["duplicate"] and again["seq"] == first["seq"] and again["ok"]
    assert log.ledger.account("alice").balance == 90
    other = log(Transfer("same", "alice", "bob", 99, "alice", 5))
    assert not other["ok"] and other["error"] == "key_reused"
    assert log.ledger.result_of("same")["seq"] == first["seq"]
    # a rejection is final too: retrying after a top-up does not apply it
    poor = log(Transfer("big", "alice", "bob", 1000, "alice", 5))
    log(Mint("topup", "alice", 5000, "admin", 6))
    assert log(Transfer("big", "alice", "bob", 1000, "alice", 5))["error"] == "insufficient_funds"


def test_escrow_pays_the_node_owner_on_success_and_refunds_otherwise():
    log = funded("alice", "owner")
    assert log(Hold("hold:t1", "t1", "alice", 40, 1))["ok"]
    a = log.ledger.account("alice")
    assert (a.balance, a.held) == (60, 40)
    r = log(TaskSettle("settle:t1", "t1", "n-1", "owner", True, 2))
    assert r["paid"] == 40 and log.ledger.account("owner").balance == 140 and a.held == 0
    assert log.ledger.credit_of_node("n-1") == CREDIT_DEFAULT + CREDIT_SUCCESS
    assert log(Hold("hold:t2", "t2", "alice", 50, 3))["ok"]
    r = log(TaskSettle("settle:t2", "t2", "n-1", "owner", False, 4))
    assert r["refunded"] == 50 and a.balance == 60
    assert log.ledger.credit_of_node("n-1") == CREDIT_DEFAULT + CREDIT_SUCCESS - CREDIT_FAILURE
    assert log.ledger.account("owner").credit == CREDIT_DEFAULT + CREDIT_SUCCESS - CREDIT_FAILURE
    assert log(Hold("hold:t3", "t3", "alice", 500, 5))["error"] == "insufficient_funds"
    assert log(Hold("hold:t4", "t4", "alice", 10, 5))["ok"]
    r = log(TaskSettle("settle:t4", "t4", "n-2", "", True, 6))        # no owner: refund
    assert r["refunded"] == 10 and log.ledger.total_supply == 200


def test_accounts_names_roles_and_revocation():
    log = Log()
    assert log(OpenAccount("o1", "alice", "user", "h1", 0))["ok"]
    assert log(OpenAccount("o2", "alice", "user", "h1", 0))["error"] == "exists"
    assert log(OpenAccount("o3", "Alice!", "user", "h", 0))["key"] == "name"
    assert log(OpenAccount("o4", "bob", "root", "h", 0))["key"] == "role"
    assert log(SetAccount("s1", "alice", role="operator", tokens_valid_after_ms=50))["ok"]
    a = log.ledger.account("alice")
    assert a.role == "operator" and a.tokens_valid_after_ms == 50 and a.password_hash == "h1"
    assert log(SetAccount("s2", "alice", tokens_valid_after_ms=10))["ok"]
    assert a.tokens_valid_after_ms == 50                    # revocation never goes back


def test_burn_and_supply():
    log = funded("alice")
    assert log(Burn("b1", "alice", 30, "admin", 1))["ok"]
    assert log.ledger.total_supply == 70 and log.ledger.burned == 30
    assert log(Burn("b2", "alice", 71, "admin", 1))["error"] == "insufficient_funds"


def test_trust_levels_follow_credit_and_isolation():
    assert [trust(c) for c in (0, 49, 50, 99, 100, 200)] == ["low", "low", "medium", "medium", "high", "high"]
    assert trust(200, isolated=False) == "low"


def test_two_ledgers_fed_the_same_log_agree_on_seq_and_hash_and_a_difference_shows():
    log = funded("alice", "bob")
    log(Transfer("t", "alice", "bob", 5, "alice", 1))
    replay = Ledger()
    for i, e in enumerate(log.entries, 1):
        replay.apply(i, 1, e)
    assert (replay.seq, replay.hash) == (log.ledger.seq, log.ledger.hash)
    other = Ledger()
    for i, e in enumerate(log.entries[:-1] + [Transfer("t", "alice", "bob", 6, "alice", 1)], 1):
        other.apply(i, 1, e)
    assert other.seq == log.ledger.seq and other.hash != log.ledger.hash


def test_entries_must_come_in_log_order():
    log = funded("alice")
    with pytest.raises(AssertionError):
        log.ledger.apply(1, 1, Mint("late", "alice", 1, "admin", 0))


NAMES = ["a", "b", "c", "d"]


class LedgerMachine(RuleBasedStateMachine):
    """Random interleavings of every entry kind, resent keys and 'leader changes' (the same
    entries proposed again by a new coordinator at later indices): the rules always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.log = Log()
        self.sent: list = []
        self.tasks = 0
        for n in NAMES:
            self.log(OpenAccount(f"open:{n}", n, "user", "h", 0))

    def _send(self, entry) -> dict:
        self.sent.append(entry)
        return self.log(entry)

    @rule(to=st.sampled_from(NAMES), amount=st.integers(1, 1000))
    def mint(self, to, amount):
        self._send(Mint(f"m{len(self.sent)}", to, amount, "admin", 0))

    @rule(src=st.sampled_from(NAMES), dst=st.sampled_from(NAMES), amount=st.integers(-5, 600))
    def transfer(self, src, dst, amount):
        before = self.log.ledger.account(src).balance
        r = self._send(Transfer(f"t{len(self.sent)}", src, dst, amount, src, 0))
        if r["ok"]:
            assert self.log.ledger.account(src).balance == before - amount
        else:
            assert self.log.ledger.account(src).balance == before

    @rule(account=st.sampled_from(NAMES), amount=st.integers(1, 600))
    def hold(self, account, amount):
        self.tasks += 1
        self._send(Hold(f"h:{self.tasks}", f"t{self.tasks}", account, amount, 0))

    @precondition(lambda self: self.tasks > 0)
    @rule(data=st.data(), owner=st.sampled_from(NAMES + [""]), ok=st.booleans())
    def settle(self, data, owner, ok):
        task = data.draw(st.integers(1, self.tasks))
        self._send(TaskSettle(f"s:{task}", f"t{task}", "n-1", owner, ok, 0))

    @rule(account=st.sampled_from(NAMES), amount=st.integers(1, 300))
    def burn(self, account, amount):
        self._send(Burn(f"b{len(self.sent)}", account, amount, "admin", 0))

    @precondition(lambda self: self.sent)
    @rule(data=st.data())
    def resend(self, data):
        """A client retry, or a new coordinator proposing an entry again."""
        entry = data.draw(st.sampled_from(self.sent))
        supply, balances = self.log.ledger.total_supply, {n: self.log.ledger.account(n).balance for n in NAMES}
        r = self.log(entry)
        assert (r.get("duplicate") or r.get("error") == "key_reused") and self.log.ledger.total_supply == supply
        assert {n: self.log.ledger.account(n).balance for n in NAMES} == balances

    @invariant()
    def rules_hold(self):
        led = self.log.ledger
        led._check()
        assert all(led.account(n).balance >= 0 and led.account(n).held >= 0 for n in NAMES)

    def teardown(self):
        replay = Ledger()
        for i, e in enumerate(self.log.entries, 1):
            replay.apply(i, 1, e)
        assert (replay.seq, replay.hash, replay.total_supply) == (
            self.log.ledger.seq, self.log.ledger.hash, self.log.ledger.total_supply)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_a_settlement_batch_settles_each_task_once_whatever_else_settled_it():
    from galaxy.messages import TaskOutcome, TaskSettleBatch
    log = funded("alice", "owner")
    log(Hold("hold:t1", "t1", "alice", 10, 1))
    log(Hold("hold:t2", "t2", "alice", 10, 1))
    log(TaskSettle("settle:t1", "t1", "n-1", "owner", True, 2))
    r = log(TaskSettleBatch("batch-1", (TaskOutcome("t1", "n-1", "owner", True), TaskOutcome("t2", "n-1", "owner",
                                                                                             False),
                                        TaskOutcome("t3", "n-2", "", True)), 3))
    assert r["ok"] and r["settled"] == 2 and r["refunded"] == 10 and r["paid"] == 0
    assert log.ledger.account("owner").balance == 110 and log.ledger.account("alice").balance == 90
    assert log.ledger.credit_of_node("n-1") == CREDIT_DEFAULT + CREDIT_SUCCESS - CREDIT_FAILURE
    again = log(TaskSettleBatch("batch-2", (TaskOutcome("t2", "n-1", "owner", True),), 4))
    assert again["settled"] == 0 and log.ledger.is_settled("t3")


def test_a_retry_through_another_node_is_the_same_request():
    log = funded("alice", "bob")
    first = log(Transfer("retry", "alice", "bob", 10, "n-1", 5))
    again = log(Transfer("retry", "alice", "bob", 10, "n-2", 9))       # other node, other time
    assert again["duplicate"] and again["seq"] == first["seq"] and log.ledger.account("bob").balance == 110
    assert log(Transfer("retry", "alice", "bob", 11, "n-2", 9))["error"] == "key_reused"


def test_the_fast_astuple_is_dataclasses_astuple() -> None:
    """The hash and the idempotency digest read entries through core._astuple: the same
    value as dataclasses.astuple for every kind of entry, nested ones included."""
    from dataclasses import astuple

    from galaxy.ledger import core
    from galaxy.messages import TaskOutcome, TaskSettleBatch
    entries = [Transfer("tx:a:k", "a", "b", 5, "a", 1), Mint("m", "a", AMOUNT_MAX, "admin", 2),
               Burn("b", "a", 1, "admin", 3), OpenAccount("o", "a", "user", "scrypt$x", 4),
               SetAccount("s", "a", tokens_valid_after_ms=9, at_ms=5), Hold("h", "t1", "a", 3, 8),
               TaskSettle("ts", "t1", "n1", "a", True, 6),
               TaskSettleBatch("tb", (TaskOutcome("t1", "n1", "a", True), TaskOutcome("t2", "n2", "", False)), 7)]
    for e in entries:
        assert core._astuple(e) == astuple(e), e
        assert core._canonical(e) == core.msgpack.packb([e.TAG, *astuple(e)], use_bin_type=True)


def test_the_invariant_check_runs_every_entry_while_small_and_amortized_when_large(monkeypatch):
    log = funded("alice", "bob")
    calls = []
    check = Ledger._check
    monkeypatch.setattr(Ledger, "_check", lambda self: (calls.append(self.seq), check(self))[1])
    for i in range(5):
        log(Transfer(f"t{i}", "alice", "bob", 1, "alice", 0))
    assert len(calls) == 5                       # small: after every entry
    log.ledger.account("bob").balance += 1       # a bug that creates money...
    with pytest.raises(AssertionError):
        log(Transfer("t-next", "alice", "bob", 1, "alice", 0))      # ...is caught at the next entry

    big = Log()
    for i in range(CHECK_VISITS * 100):          # 6,400 accounts: a check every 100 entries
        big.ledger.accounts[f"u{i}"] = Account(f"u{i}", "user", "h")
    calls.clear()
    for i in range(300):
        big(Mint(f"m{i}", "u1", 1, "admin", 0))
    assert 2 <= len(calls) <= 4 and big.ledger.account("u1").balance == 300
