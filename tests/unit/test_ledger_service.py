"""The ledger service over a real replica and store, with an in-process sequencer standing in for Raft."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random

import pytest

from galaxy import auth, wire
from galaxy.clock import SystemClock
from galaxy.config import Config
from galaxy.consensus.commands import CommandError, Replicated
from galaxy.gossip.docs import DocGossip
from galaxy.gossip.docs_runner import DocsRunner
from galaxy.gossip.replica import Replica
from galaxy.ledger.core import Ledger
from galaxy.ledger.runner import TRANSFER_RESOLVER, TRANSFER_TYPE, LedgerError, LedgerService
from galaxy.messages import CommandBatch, Transfer
from galaxy.store import Store


class Sequencer:
    """Raft's place: applies each command to the state machines at the next index, when 'up'."""

    def __init__(self) -> None:
        self.commands = Replicated([Ledger()])
        self.index = itertools.count(1)
        self.up = True

    def caught_up(self) -> bool:
        return self.up

    async def submit(self, cmd, timeout_ms: int) -> dict:
        if not self.up:
            raise CommandError("no_coordinator", "no coordinator (test)")
        await asyncio.sleep(0)
        return self.commands.apply(next(self.index), 1, cmd)

    async def submit_many(self, cmds, timeout_ms: int) -> list:
        """Group commit: all of them in one log entry (a CommandBatch), as the coordinator does."""
        if not self.up:
            raise CommandError("no_coordinator", "no coordinator (test)")
        await asyncio.sleep(0)
        if len(cmds) == 1:
            return [self.commands.apply(next(self.index), 1, cmds[0])]
        batch = CommandBatch(tuple(wire.encode_command(c) for c in cmds))
        return self.commands.apply(next(self.index), 1, batch)["results"]


@contextlib.asynccontextmanager
async def ledger_node(path, node_id: str, seq: Sequencer, raft):
    """A node's LedgerService over a real replica and store in ``path``, submitting to ``seq``;
    its view also follows ``raft``'s machines (a voter), or only published ranges (None)."""
    cfg = Config.sim()
    clock = SystemClock()
    codec = wire.Codec("galaxy", [wire.parse_key(wire.generate_key())], node_id)
    store = Store(str(path))
    docs = DocsRunner(replica=Replica(node_id, {TRANSFER_TYPE: TRANSFER_RESOLVER}),
                      core=DocGossip(node_id, cfg, random.Random(1), clock.now_ms()), store=store, udp_codec=codec,
                      tcp_codec=codec, clock=clock, send_udp=lambda *a: None, live_peers=lambda: [],
                      cluster="galaxy", frame_max_bytes=cfg.frame_max_bytes)
    failures: list = []
    svc = LedgerService(node_id=node_id, clock=clock, docs=docs, gateway=seq, coordinator=lambda: raft,
                        token_secret=b"t" * 32, admin_password="admin-password", on_fatal=failures.append)
    await docs.start("127.0.0.1", 0)
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()
        await docs.stop()
        store.close()
    assert not failures


@pytest.fixture
async def service(tmp_path):
    seq = Sequencer()
    async with ledger_node(tmp_path, "me", seq, seq) as svc:
        yield svc, seq


async def until(cond, timeout_s: float = 10.0):
    async with asyncio.timeout(timeout_s):
        while not (got := cond()):
            await asyncio.sleep(0.01)
        return got


async def test_admin_is_opened_then_accounts_mint_and_transfers_show_on_the_view(service):
    svc, seq = service
    await until(lambda: svc.account("admin"))
    token, _ = await svc.login("admin", "admin-password")
    assert svc.authenticate(token) == ("admin", "admin")
    await svc.open_account("alice", "alice-password", "user", "admin")
    await svc.open_account("bob", "bob-password", "user", "admin")
    await svc.mint("alice", 100, "admin")
    r = await svc.transfer("alice", "bob", 30, "k1", "alice", wait=True)
    assert r["state"] == "settled" and r["seq"] == 5
    again = await svc.transfer("alice", "bob", 30, "k1", "alice", wait=True)
    assert again["state"] == "settled" and again["seq"] == 5
    assert svc.account("alice")["balance"] == 70 and svc.account("bob")["balance"] == 30
    poor = await svc.transfer("alice", "bob", 1000, "k2", "alice", wait=True)
    assert poor["state"] == "rejected" and "has 70" in poor["reason"]
    machine = seq.commands.machine(Transfer)
    assert (svc.view.seq, svc.view.hash) == (machine.seq, machine.hash)
    assert svc.summary()["total_supply"] == 100 and [h["kind"] for h in svc.history("alice")][:2] == [
        "transfer out", "mint"]
    with pytest.raises(LedgerError) as e:
        await svc.open_account("alice", "another-password", "user", "admin")
    assert e.value.status == 409


async def test_a_transfer_without_a_coordinator_stays_pending_then_settles_once(service):
    svc, seq = service
    await until(lambda: svc.account("admin"))
    await svc.open_account("alice", "alice-password", "user", "admin")
    await svc.open_account("bob", "bob-password", "user", "admin")
    await svc.mint("alice", 50, "admin")
    seq.up = False
    r = await svc.transfer("alice", "bob", 20, "offline", "alice")
    assert r["state"] == "pending" and svc.summary()["pending"] == 1
    retry = await svc.transfer("alice", "bob", 20, "offline", "alice")
    assert retry["state"] == "pending"
    seq.up = True
    svc.wake()
    await until(lambda: svc.transfer_state(r["id"])["state"] == "settled")
    await until(lambda: svc.account("bob")["balance"] == 20)
    assert svc.account("alice")["balance"] == 30 and svc.summary()["pending"] == 0


async def test_sign_in_wrong_password_revocation_and_unknown_accounts(service):
    svc, seq = service
    await until(lambda: svc.account("admin"))
    await svc.open_account("alice", "alice-password", "user", "admin")
    with pytest.raises(auth.AuthError):
        await svc.login("alice", "wrong-password")
    with pytest.raises(auth.AuthError) as unknown:
        await svc.login("nobody", "whatever-pass")
    assert unknown.value.message == "wrong name or password"
    token, _ = await svc.login("alice", "alice-password")
    assert svc.authenticate(token) == ("alice", "user")
    await asyncio.sleep(0.005)
    await svc.revoke("alice")
    with pytest.raises(auth.AuthError, match="revoked"):
        svc.authenticate(token)
    await asyncio.sleep(0.005)
    fresh, _ = await svc.login("alice", "alice-password")
    assert svc.authenticate(fresh)[0] == "alice"
    with pytest.raises(ValueError):
        await svc.open_account("carol", "short", "user", "admin")


async def test_an_outcome_the_ledger_does_not_hold_is_corrected(service):
    svc, seq = service
    await until(lambda: svc.account("admin"))
    await svc.open_account("alice", "alice-password", "user", "admin")
    await svc.open_account("bob", "bob-password", "user", "admin")
    await svc.mint("alice", 50, "admin")
    # a node cut off from the coordinator wrote a verdict of its own
    svc._docs.put(TRANSFER_TYPE, "tx:alice:rogue", {"id": "tx:alice:rogue", "from": "alice", "to": "bob",
                                                    "amount": 20, "by": "alice", "at_ms": 1, "state": "rejected",
                                                    "node": "n-x", "reason": "no account"})
    svc.wake()
    await until(lambda: svc.transfer_state("tx:alice:rogue")["state"] == "settled")
    await until(lambda: svc.account("bob")["balance"] == 20)


async def funded(svc, amount: int = 50) -> None:
    await until(lambda: svc.account("admin"))
    await svc.open_account("alice", "alice-password", "user", "admin")
    await svc.open_account("bob", "bob-password", "user", "admin")
    await svc.mint("alice", amount, "admin")


async def test_a_transfer_the_coordinator_answers_writes_no_document_and_reads_from_the_view(service):
    svc, seq = service
    await funded(svc)
    r = await svc.transfer("alice", "bob", 20, "fast", "alice")
    assert r["state"] == "settled" and r["seq"] == svc.view.seq
    assert svc.replica.get(TRANSFER_TYPE, r["id"]) is None and svc.stats["stored_pending"] == 0
    got = svc.transfer_state(r["id"])
    assert (got["state"], got["from"], got["to"], got["amount"], got["seq"]) == ("settled", "alice", "bob", 20,
                                                                                 r["seq"])
    poor = await svc.transfer("alice", "bob", 500, "poor", "alice")
    assert poor["state"] == "rejected" and svc.transfer_state(poor["id"])["reason"] == poor["reason"]
    with pytest.raises(LedgerError) as e:       # the same key asking another thing
        await svc.transfer("alice", "bob", 21, "fast", "alice")
    assert (e.value.status, e.value.code) == (409, "key_reused")
    assert svc.account("bob")["balance"] == 20 and svc.summary()["pending"] == 0


async def test_an_unknown_outcome_is_stored_pending_and_settles_exactly_once(service):
    svc, seq = service
    await funded(svc)
    real = seq.submit

    async def appended_then_lost(cmd, timeout_ms):
        await real(cmd, timeout_ms)             # in the log...
        raise CommandError("timeout", "no answer in time (test)")   # ...but the answer is lost
    seq.submit = appended_then_lost
    r = await svc.transfer("alice", "bob", 20, "lost", "alice")
    seq.submit = real
    # 202 pending only once the pending document is committed; the view may already know better
    doc = svc.replica.get(TRANSFER_TYPE, r["id"])
    assert doc is not None and doc.value["state"] == "pending" and svc.stats["stored_pending"] == 1
    svc.wake()
    await until(lambda: svc.replica.get(TRANSFER_TYPE, r["id"]).value["state"] == "settled")
    await until(lambda: svc.summary()["pending"] == 0)
    assert svc.account("alice")["balance"] == 30 and svc.account("bob")["balance"] == 20


async def test_past_the_in_flight_bound_a_request_is_refused_at_once_and_nothing_is_stored(service, monkeypatch):
    svc, seq = service
    await funded(svc)
    from galaxy.ledger import runner
    monkeypatch.setattr(runner, "SUBMITS_IN_FLIGHT_MAX", 3)
    gate = asyncio.Event()
    real = seq.submit

    async def slow(cmd, timeout_ms):
        await gate.wait()
        return await real(cmd, timeout_ms)
    seq.submit = slow
    waiting = [asyncio.create_task(svc.transfer("alice", "bob", 1, f"k{i}", "alice")) for i in range(3)]
    await until(lambda: svc._submitting == 3)
    with pytest.raises(LedgerError) as e:
        await svc.transfer("alice", "bob", 1, "one-too-many", "alice")
    assert (e.value.status, e.value.code, e.value.retry_after_s) == (503, "overloaded", runner.RETRY_AFTER_S)
    assert svc.transfer_state("tx:alice:one-too-many") is None and svc.stats["shed"] == 1
    gate.set()
    assert [r["state"] for r in await asyncio.gather(*waiting)] == ["settled"] * 3
    assert svc._submitting == 0
    seq.submit = real
    assert (await svc.transfer("alice", "bob", 1, "one-too-many", "alice"))["state"] == "settled"


async def test_a_voter_view_follows_its_own_log_before_anything_is_published(service):
    svc, seq = service
    await funded(svc)
    seq.caught_up = lambda: False             # not the coordinator: it publishes nothing
    before = svc.stats["ranges_published"]
    r = await svc.transfer("alice", "bob", 5, "own-log", "alice")
    assert r["state"] == "settled" and svc.view.seq == r["seq"] and svc.account("bob")["balance"] == 5
    assert svc.stats["ranges_published"] == before and svc.stats["applied_from_raft"] > 0
    seq.caught_up = lambda: True              # coordinator again: publishes the same ranges, which check out
    svc.wake()
    await until(lambda: svc._published_end() >= r["seq"])
    await until(lambda: not svc._to_check)
