"""Batch transfers (POST /v1/transfers/batch, ``LedgerService.transfer_batch``).

The HTTP half runs the routes over the stand-in service (tests/unit/ledger_fake.py): strict
validation naming the item and field, permission for every ``from``, rate limits counting
items, the answer's shape.  The service half runs the real ``LedgerService`` over a real
replica and store, with an in-process sequencer in Raft's place that applies a batch as one
``CommandBatch`` log entry (tests/unit/test_ledger_service.py): per-item outcomes, keys
repeated inside a batch and across batches, partial rejections, pending items stored
durably, admission, and a whole batch replayed at another node.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from galaxy import wire
from galaxy.consensus.commands import CommandError
from galaxy.ledger import runner
from galaxy.ledger.runner import TRANSFER_TYPE, LedgerError
from galaxy.messages import Transfer
from tests.unit.test_ledger_api import Api, _api, api, people  # noqa: F401  (fixtures)
from tests.unit.test_ledger_service import funded, ledger_node, service, until  # noqa: F401  (fixtures)

BATCH = "/v1/transfers/batch"


def item(i: int, src: str = "alice", dst: str = "bob", amount: int = 1, key: str | None = None) -> dict:
    return {"from": src, "to": dst, "amount": amount, "idempotency_key": key or f"k{i}"}


# ---------------------------------------------------------------- HTTP

@pytest.mark.parametrize("body, status, needle", [
    ({"transfers": []}, 400, "transfers: a list of 1 to 1000"),
    ({"transfers": {"from": "alice"}}, 400, "transfers: a list"),
    ({"transfers": [item(i) for i in range(1001)]}, 400, "transfers: a list of 1 to 1000"),
    ({"transfers": [item(0)], "memo": "x"}, 400, "unknown field(s) 'memo'"),
    ({}, 400, "missing field(s): transfers"),
    ({"transfers": [item(0), 7]}, 400, "transfers[1]: must be a JSON object"),
    ({"transfers": [item(0), {**item(1), "memo": "hi"}]}, 400, "transfers[1]: unknown field(s) 'memo'"),
    ({"transfers": [item(0), {"from": "alice", "to": "bob", "amount": 1}]}, 400,
     "transfers[1]: missing field(s): idempotency_key"),
    ({"transfers": [item(0), item(1), {**item(2), "amount": True}]}, 400, "transfers[2].amount: must be"),
    ({"transfers": [item(0), {**item(1), "amount": 1.0}]}, 400, "transfers[1].amount"),
    ({"transfers": [{**item(0), "to": "Bob"}]}, 400, "transfers[0].to: an account name"),
    ({"transfers": [{**item(0), "from": ""}]}, 400, "transfers[0].from: an account name"),
    ({"transfers": [item(0), {**item(1), "idempotency_key": "a\nb"}]}, 400, "transfers[1].idempotency_key: 1 to 128"),
    ({"transfers": [item(0), item(1, src="bob")]}, 403, "transfers[1].from: moving money of another account"),
])
async def test_a_batch_is_validated_strictly_and_nothing_moves_on_a_bad_item(api: Api, people: dict[str, str],
                                                                            body: Any, status: int,
                                                                            needle: str) -> None:
    got, answer, _ = await api.call("POST", BATCH, body, people["alice"])
    assert got == status and needle in answer["message"], answer
    assert not [c for c in api.node.ledger.calls if c[0].startswith("transfer")]


async def test_every_from_must_be_the_callers_own_or_the_caller_an_admin(api: Api, people: dict[str, str]) -> None:
    mixed = {"transfers": [item(0), item(1, src="bob", dst="alice")]}
    for who in ("bob", "oper"):          # bob owns item 1 only; an operator moves nobody's money
        status, answer, _ = await api.call("POST", BATCH, mixed, people[who])
        assert status == 403 and "transfers[0].from" in answer["message"], (who, answer)
    assert (await api.call("POST", BATCH, mixed, None))[0] == 401
    assert not [c for c in api.node.ledger.calls if c[0] == "transfer_batch"]
    await api.call("POST", "/v1/mint", {"to": "bob", "amount": 5}, people["admin"])
    status, answer, _ = await api.call("POST", BATCH, mixed, people["admin"])
    assert status == 202 and [t["state"] for t in answer["transfers"]] == ["settled", "settled"], answer
    assert api.node.ledger.calls[-1][2] == "admin"


async def test_one_answer_per_item_in_order_with_counts(api: Api, people: dict[str, str]) -> None:
    body = {"transfers": [item(0, amount=30), item(1, amount=500), item(2, amount=20),
                          item(3, amount=31, key="k0")]}
    status, answer, _ = await api.call("POST", f"{BATCH}?wait=1", body, people["alice"])
    assert status == 202, answer
    assert [t["state"] for t in answer["transfers"]] == ["settled", "rejected", "settled", "refused"]
    assert "needs 500" in answer["transfers"][1]["reason"]
    assert answer["transfers"][3]["error"] == "key_reused"
    assert {k: answer[k] for k in ("settled", "rejected", "pending", "refused")} == \
        {"settled": 2, "rejected": 1, "pending": 0, "refused": 1}
    assert api.node.ledger.calls[-1][2:] == ("alice", True)
    assert api.node.ledger.account("alice")["balance"] == 50
    assert (await api.call("POST", f"{BATCH}?wait=2", body, people["alice"]))[0] == 400
    # without a coordinator, items are pending (stored), each with its id
    api.node.ledger.coordinator = False
    status, answer, _ = await api.call("POST", BATCH, {"transfers": [item(9), item(10)]}, people["alice"])
    assert status == 202 and answer["pending"] == 2 and all(t["id"] for t in answer["transfers"])


async def test_an_overloaded_node_refuses_the_whole_batch(api: Api, people: dict[str, str]) -> None:
    api.node.ledger.overloaded = True
    status, answer, headers = await api.call("POST", BATCH, {"transfers": [item(0)]}, people["alice"])
    assert (status, answer["error"], headers.get("Retry-After")) == (503, "overloaded", "1")
    assert not [c for c in api.node.ledger.calls if c[0] == "transfer_batch"]


async def test_an_overloaded_node_sheds_before_it_reads_the_body(api: Api, people: dict[str, str]) -> None:
    # a shed request must cost little: refused before its body is decoded (a broken body
    # would be a 400 otherwise), and only after the token is checked (401 first)
    api.node.ledger.overloaded = True
    for path in (BATCH, "/v1/transfers"):
        status, answer, headers = await api.call("POST", path, token=people["alice"], raw=b"{not json")
        assert (status, answer["error"], headers.get("Retry-After")) == (503, "overloaded", "1"), path
        assert (await api.call("POST", path, raw=b"{not json"))[0] == 401
    api.node.ledger.overloaded = False
    assert (await api.call("POST", BATCH, token=people["alice"], raw=b"{not json"))[0] == 400


async def test_rate_limits_count_each_item_and_a_batch_over_the_burst_is_refused() -> None:
    api, client = await _api(transfer_rate_per_s=0.01, transfer_burst=5)
    try:
        admin = await api.login("admin", "initial-admin-pw")
        api.node.ledger.add_account("alice")
        api.node.ledger.add_account("bob")
        await api.call("POST", "/v1/mint", {"to": "alice", "amount": 100}, admin)
        alice = api.node.ledger.token("alice")
        three = {"transfers": [item(i) for i in range(3)]}
        assert (await api.call("POST", BATCH, three, alice))[0] == 202
        status, answer, headers = await api.call("POST", BATCH, {"transfers": [item(i) for i in range(3, 6)]}, alice)
        assert status == 429 and "transfers by alice" in answer["message"] and "Retry-After" in headers
        status, answer, _ = await api.call("POST", BATCH, {"transfers": [item(i) for i in range(3, 5)]}, alice)
        assert status == 202, answer                     # 2 left of 5: a batch of 2 fits
        status, answer, _ = await api.call("POST", BATCH, {"transfers": [item(i) for i in range(10, 16)]}, alice)
        assert status == 400 and "burst of 5" in answer["message"]
        # the single route shares the bucket: it is empty now
        assert (await api.call("POST", "/v1/transfers", item(20), alice))[0] == 429
        status, _, _ = await api.call("POST", BATCH, {"transfers": [item(i) for i in range(30, 36)]}, admin)
        assert status == 202                              # admins are not limited
    finally:
        await client.close()


async def test_the_per_address_limit_counts_each_item_too() -> None:
    """transfer_addr_rate_per_s / transfer_addr_burst (the per-address limit of single
    transfers) limit batches item by item as well."""
    api, client = await _api(transfer_addr_rate_per_s=0.01, transfer_addr_burst=4)
    try:
        for name in ("alice", "bob", "carol"):
            api.node.ledger.add_account(name)
        await api.call("POST", "/v1/mint", {"to": "alice", "amount": 100}, api.node.ledger.token("admin"))
        await api.call("POST", "/v1/mint", {"to": "carol", "amount": 100}, api.node.ledger.token("admin"))
        alice, carol = api.node.ledger.token("alice"), api.node.ledger.token("carol")
        assert (await api.call("POST", BATCH, {"transfers": [item(i) for i in range(3)]}, alice))[0] == 202
        status, answer, headers = await api.call("POST", BATCH, {"transfers": [item(i, src="carol")
                                                                               for i in range(2)]}, carol)
        assert status == 429 and "transfers from 127.0.0.1" in answer["message"] and "Retry-After" in headers
        assert (await api.call("POST", BATCH, {"transfers": [item(9, src="carol")]}, carol))[0] == 202
    finally:
        await client.close()


async def test_a_batch_larger_than_the_body_limit_is_413() -> None:
    api, client = await _api(http_body_max_bytes=2048)
    try:
        admin = api.node.ledger.token("admin")
        status, answer, _ = await api.call("POST", BATCH, {"transfers": [item(i, src="admin") for i in range(40)]},
                                           admin)
        assert status == 413, answer
        assert not [c for c in api.node.ledger.calls if c[0] == "transfer_batch"]
    finally:
        await client.close()


# ---------------------------------------------------------------- the service

def states(answers: list[dict]) -> list[str]:
    return [a["state"] for a in answers]


async def test_a_batch_goes_in_one_entry_with_per_item_outcomes(service) -> None:
    svc, seq = service
    await funded(svc, 50)
    before = seq.commands.batches_total
    items = [("alice", "bob", 20, "p1"), ("alice", "bob", 40, "p2"), ("alice", "bob", 20, "p3"),
             ("alice", "bob", 20, "p1"),          # the same transfer again: the same answer
             ("alice", "bob", 21, "p3")]          # the same key asking another thing: refused
    got = await svc.transfer_batch(items, "alice")
    assert states(got) == ["settled", "rejected", "settled", "settled", "refused"], got
    assert seq.commands.batches_total == before + 1          # p1, p2, p3: one Raft entry
    assert "has 30" in got[1]["reason"] and got[3] == got[0] and got[4]["error"] == "key_reused"
    assert got[0]["id"] == "tx:alice:p1" and got[0]["seq"] < got[2]["seq"]
    assert svc.account("alice")["balance"] == 10 and svc.account("bob")["balance"] == 40
    assert svc.stats["stored_pending"] == 0 and svc.replica.get(TRANSFER_TYPE, "tx:alice:p1") is None
    # across batches: known keys answer as before and move nothing; a new one settles
    again = await svc.transfer_batch([("alice", "bob", 20, "p1"), ("alice", "bob", 40, "p2"),
                                      ("alice", "bob", 10, "p4"), ("alice", "bob", 5, "p3")], "alice")
    assert states(again) == ["settled", "rejected", "settled", "refused"]
    assert again[0] == got[0] and again[1]["seq"] == got[1]["seq"]
    assert svc.account("alice")["balance"] == 0 and svc.account("bob")["balance"] == 50
    assert svc.summary()["total_supply"] == 50
    # a single transfer with a key a batch used is the same transfer
    assert (await svc.transfer("alice", "bob", 10, "p4", "alice"))["seq"] == again[2]["seq"]


async def test_items_without_a_coordinator_are_stored_pending_then_settle_once(service) -> None:
    svc, seq = service
    await funded(svc, 50)
    svc.pending_per_account_max = 3
    seq.up = False
    items = [("alice", "bob", 10, f"o{i}") for i in range(4)]
    got = await svc.transfer_batch(items, "alice")
    assert states(got) == ["pending"] * 3 + ["refused"] and got[3]["error"] == "too_many_pending"
    for a in got[:3]:      # stored durably before the answer
        assert svc.replica.get(TRANSFER_TYPE, a["id"]).value["state"] == "pending"
    assert svc.replica.get(TRANSFER_TYPE, got[3]["id"]) is None
    # the whole batch again while still cut off: the same answers, nothing new stored
    assert states(await svc.transfer_batch(items[:3], "alice")) == ["pending"] * 3
    seq.up = True
    svc.wake()
    await until(lambda: svc.summary()["pending"] == 0)
    await until(lambda: svc.account("bob")["balance"] == 30)
    # and again now: settled, from the ledger, money moved once; the refused one goes now
    final = await svc.transfer_batch(items, "alice", wait=True)
    assert states(final) == ["settled"] * 4
    assert svc.account("alice")["balance"] == 10 and svc.account("bob")["balance"] == 40


async def test_an_unknown_outcome_is_stored_pending_first(service) -> None:
    svc, seq = service
    await funded(svc, 50)
    real = seq.submit_many

    async def appended_then_lost(cmds, timeout_ms):
        await real(cmds, timeout_ms)
        return [CommandError("timeout", "no answer in time (test)")] * len(cmds)
    seq.submit_many = appended_then_lost
    got = await svc.transfer_batch([("alice", "bob", 5, "l1"), ("alice", "bob", 6, "l2")], "alice")
    seq.submit_many = real
    assert svc.stats["stored_pending"] == 2
    for a in got:
        assert svc.replica.get(TRANSFER_TYPE, a["id"]) is not None
    svc.wake()
    await until(lambda: all(svc.replica.get(TRANSFER_TYPE, a["id"]).value["state"] == "settled" for a in got))
    assert svc.account("bob")["balance"] == 11


async def test_admission_counts_items_and_refuses_the_whole_batch(service, monkeypatch) -> None:
    svc, seq = service
    await funded(svc, 100)
    monkeypatch.setattr(runner, "SUBMITS_IN_FLIGHT_MAX", 4)
    gate = asyncio.Event()
    real = seq.submit_many

    async def slow(cmds, timeout_ms):
        await gate.wait()
        return await real(cmds, timeout_ms)
    seq.submit_many = slow
    # nothing waits: a batch is admitted whole, however large
    first = asyncio.create_task(svc.transfer_batch([("alice", "bob", 1, f"a{i}") for i in range(10)], "alice"))
    await until(lambda: svc._submitting == 10)
    with pytest.raises(LedgerError) as e:
        await svc.transfer_batch([("alice", "bob", 1, "c0")], "alice")
    assert (e.value.status, e.value.code, e.value.retry_after_s) == (503, "overloaded", runner.RETRY_AFTER_S)
    with pytest.raises(LedgerError):
        await svc.transfer("alice", "bob", 1, "c1", "alice")
    assert svc.transfer_state("tx:alice:c0") is None and svc.stats["stored_pending"] == 0
    gate.set()
    assert states(await first) == ["settled"] * 10
    # while some wait, the items are counted: 2 waiting + 3 > 4 is refused whole, 2 + 2 fits
    gate.clear()
    second = asyncio.create_task(svc.transfer_batch([("alice", "bob", 1, f"b{i}") for i in range(2)], "alice"))
    await until(lambda: svc._submitting == 2)
    with pytest.raises(LedgerError) as e:
        await svc.transfer_batch([("alice", "bob", 1, f"d{i}") for i in range(3)], "alice")
    assert e.value.code == "overloaded" and all(svc.transfer_state(f"tx:alice:d{i}") is None for i in range(3))
    third = asyncio.create_task(svc.transfer_batch([("alice", "bob", 1, f"e{i}") for i in range(2)], "alice"))
    await until(lambda: svc._submitting == 4)
    gate.set()
    assert states(await second) == ["settled"] * 2 and states(await third) == ["settled"] * 2
    assert svc._submitting == 0
    seq.submit_many = real
    assert states(await svc.transfer_batch([("alice", "bob", 1, "c0")], "alice")) == ["settled"]


async def test_a_whole_batch_replayed_at_another_node_answers_the_same_and_moves_nothing(service, tmp_path,
                                                                                        monkeypatch) -> None:
    svc, seq = service
    await funded(svc, 30)
    items = [("alice", "bob", 10, f"r{i}") for i in range(4)]        # the 4th finds alice empty
    first = await svc.transfer_batch(items, "alice")
    assert states(first) == ["settled"] * 3 + ["rejected"]
    machine = seq.commands.machine(Transfer)
    seq_before = machine.seq
    monkeypatch.setattr(runner, "CAUGHT_UP_WAIT_MS", 50)
    # a node whose view knows nothing yet: every item goes to Raft again, as a duplicate
    async with ledger_node(tmp_path / "a", "n2", seq, None) as n2:
        again = await n2.transfer_batch(items, "admin")
        assert [(a["state"], a["seq"], a.get("reason")) for a in again] == \
            [(a["state"], a["seq"], a.get("reason")) for a in first]
        assert machine.seq == seq_before + 4            # four duplicates sequenced, nothing moved
    assert (machine.account("alice").balance, machine.account("bob").balance) == (0, 30)
    # a node (a voter) whose view follows the log: answers from its view, nothing proposed
    async with ledger_node(tmp_path / "b", "n3", seq, seq) as n3:
        again = await n3.transfer_batch(items, "alice")
        assert [(a["state"], a["seq"]) for a in again] == [(a["state"], a["seq"]) for a in first]
        assert machine.seq == seq_before + 4
        assert (n3.view.seq, n3.view.hash) == (machine.seq, machine.hash)
        assert n3.account("alice")["balance"] == 0 and n3.summary()["total_supply"] == 30
    assert svc.account("bob")["balance"] == 30


async def test_a_node_that_does_not_vote_forwards_a_batch_in_one_signed_request() -> None:
    """gateway.submit_many on a worker: one POST /v1/internal/commands whose body is a
    CommandBatch; the coordinator answers one outcome per member (results or errors)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from galaxy.api import internal
    from galaxy.api.app import NODE_KEY
    from galaxy.clock import SystemClock
    from galaxy.config import Config
    from galaxy.consensus.gateway import CommandGateway
    from galaxy.ledger.core import Ledger
    from galaxy.messages import CommandBatch, Mint, OpenAccount

    secret = wire.derive_secret(bytes(32), "http-internal")
    ledger = Ledger()
    seen: list[int] = []

    class Commands:                     # the coordinator's gateway: its own Raft, here a Ledger
        async def submit_many_here(self, cmds, timeout_ms):
            seen.append(len(cmds))
            out: list = []
            for cmd in cmds:
                if isinstance(cmd, Mint) and cmd.amount == 13:
                    out.append(CommandError("timeout", "unlucky (test)"))
                else:
                    out.append(ledger.apply(ledger.seq + 1, 1, cmd))
            return out

    class Node:
        node_id = "coord"
        clock = SystemClock()
        internal_auth = internal.InternalAuth(secret, 30_000)
        commands = Commands()
        cfg = Config.sim()

    app = web.Application()
    app[NODE_KEY] = Node()
    internal.add_routes(app)
    server = TestServer(app)
    await server.start_server()
    try:
        gateway = CommandGateway(node_id="worker", coordinator=None, leader_http=lambda: str(server.make_url("")),
                                 auth=internal.InternalAuth(secret, 30_000), clock=SystemClock(),
                                 ssl_for=lambda url: None)
        cmds = [OpenAccount("o", "alice", "user", "", 0), Mint("m1", "alice", 5, "admin", 0),
                Mint("m2", "alice", 13, "admin", 0), Mint("m1", "alice", 5, "admin", 0)]
        got = await gateway.submit_many(cmds, 5000)
        assert seen == [4] and gateway.stats["forwarded"] == 1
        assert got[0]["ok"] and got[1]["ok"] and got[3] == {**got[1], "duplicate": True}
        assert isinstance(got[2], CommandError) and got[2].code == "timeout"
        assert ledger.account("alice").balance == 5
        # a batch inside a batch, or an empty one, is refused whole
        with pytest.raises(CommandError):
            await gateway.submit_many([CommandBatch((wire.encode_command(cmds[0]),))], 2000)
        assert seen == [4]
    finally:
        await server.close()
