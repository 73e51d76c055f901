"""Group commit over real pysyncobj: three hardened voters in one process (as in
test_raft_commands.py), each a real ``Coordinator`` with its own journal and tick thread.

1,000 concurrent transfers, half submitted on the leader and half on a follower (whose
batches pysyncobj forwards), must each get the result the ledger recorded for *its* key;
far fewer log entries than commands must have been used; every voter must hold the same
ledger; and after every voter restarts, replaying the journal must rebuild it exactly.
A batch that cannot commit fails each of its members with the right error.
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from galaxy.consensus import coordinator as coordinator_mod
from galaxy.consensus.commands import CommandError
from galaxy.consensus.coordinator import Coordinator
from galaxy.consensus.raft import LEADER
from galaxy.ledger.core import Ledger
from galaxy.messages import CommandBatch, ConfigSet, Mint, OpenAccount, Transfer
from galaxy.settings import ClusterSettings
from tests.unit.test_raft_commands import Group, wait_for

pytestmark = pytest.mark.timeout(120)

ACCOUNTS = [f"acct{i:02d}" for i in range(20)]


@pytest.fixture
def group(tmp_path):
    # voters that run the ledger next to the settings, like a node does
    g = Group(str(tmp_path), machines=lambda: [ClusterSettings(), Ledger()])
    yield g
    g.close()


def ledger_of(c: Coordinator) -> Ledger:
    return c.commands.machine(Transfer)


async def concurrent_transfers(leader: Coordinator, follower: Coordinator, n: int) -> list[tuple[Transfer, dict]]:
    for i, name in enumerate(ACCOUNTS):
        assert (await leader.submit(OpenAccount(f"open-{name}", name, "user", "", 0), 5000))["ok"]
        # small, uneven balances: many transfers are refused (insufficient funds), in log order
        assert (await leader.submit(Mint(f"mint-{name}", name, 5 + i, "admin", 0), 5000))["ok"]
    rng = random.Random(5)
    txs = []
    for k in range(n):
        src, dst = rng.sample(ACCOUNTS, 2)
        txs.append(Transfer(f"tx-{k}", src, dst, rng.randint(1, 4), "admin", k))
    # a settings change rides in the same batches: another machine, same entries
    txs_and_more: list = [*txs[:500], ConfigSet(values={"gossip_fanout": "4"}), *txs[500:]]
    got = await asyncio.gather(*((leader if k % 2 else follower).submit(cmd, 20_000)
                                 for k, cmd in enumerate(txs_and_more)))
    assert got[500]["ok"] and got[500]["settings"] == {"gossip_fanout": 4}
    return list(zip(txs, got[:500] + got[501:]))


def test_a_thousand_concurrent_submits_each_get_their_own_result_and_replay_rebuilds_them(group):
    for name in group.names:
        group.start(name)
    leader_name = group.leader()
    follower_name = next(n for n in group.names if n != leader_name)
    leader, follower = group.coords[leader_name], group.coords[follower_name]

    pairs = asyncio.run(concurrent_transfers(leader, follower, 1000))

    machine = ledger_of(leader)
    # A follower's submit returns once the follower applied it; the leader committed it
    # first but may apply it a tick later (it applies for a bounded time per tick).
    last = max(r["seq"] for _, r in pairs)
    wait_for(lambda: machine.seq >= last, what=f"the leader applied up to seq {last}")
    outcomes = {"ok": 0, "refused": 0}
    for tx, result in pairs:
        # the ledger keeps the first result of every key: the submitter got exactly that one
        assert result == machine.result_of(tx.key), tx.key
        outcomes["ok" if result["ok"] else "refused"] += 1
    assert outcomes["ok"] > 50 and outcomes["refused"] > 50, outcomes
    seqs = sorted(r["seq"] for _, r in pairs)
    assert len(set(seqs)) == 1000                      # each its own place in the sequence
    assert sum(a.balance for a in machine.accounts.values()) == machine.total_supply == sum(5 + i for i in range(20))

    # group commit happened: far fewer entries than commands, on both submitting nodes
    for c in (leader, follower):
        s = c.status()["submit"]
        assert s["entries"] < s["commands"] / 4, s
        assert s["largest_batch"] > 10, s
    assert leader.commands.batches_total > 0

    def same_everywhere() -> bool:
        views = {(ledger_of(c).seq, ledger_of(c).hash) for c in group.coords.values()}
        return len(views) == 1
    wait_for(same_everywhere, what="every voter at the same ledger")
    wait_for(lambda: leader.caught_up(), what="leader caught up")
    expected = (machine.seq, machine.hash, machine.snapshot())
    settings = leader.commands.machine(ConfigSet).snapshot()

    # every voter restarts: the journal replays the same batches into fresh machines
    for name in group.names:
        group.stop(name)
    for name in group.names:
        group.start(name)
    wait_for(lambda: all((ledger_of(c).seq, ledger_of(c).hash, ledger_of(c).snapshot()) == expected
                         for c in group.coords.values()), timeout_s=30, what="ledger rebuilt by replay")
    for c in group.coords.values():
        replayed = ledger_of(c)
        assert all(replayed.result_of(tx.key) == r for tx, r in pairs)
        assert c.commands.machine(ConfigSet).snapshot() == settings


def test_a_batch_that_cannot_commit_fails_every_member(group, monkeypatch):
    for name in group.names:
        group.start(name)
    leader_name = group.leader()
    leader = group.coords[leader_name]
    assert asyncio.run(leader.submit(ConfigSet(values={"gossip_fanout": "5"}), 5000))["ok"]
    with pytest.raises(CommandError) as err:
        asyncio.run(leader.submit(CommandBatch(()), 1000))
    assert err.value.code == "invalid"

    # Both followers gone: the leader still believes it leads (for one election timeout) and
    # appends, but nothing commits, so every member's outcome is unknown: "timeout".
    for name in group.names:
        if name != leader_name:
            group.stop(name)

    async def many(n: int, timeout_ms: int) -> list:
        return await asyncio.gather(*(leader.submit(ConfigSet(values={"gossip_fanout": str(3 + k % 3)}), timeout_ms)
                                      for k in range(n)), return_exceptions=True)

    got = asyncio.run(many(40, 300))
    assert all(isinstance(e, CommandError) and e.code == "timeout" for e in got), got

    # Then it steps down: nothing is sent while no leader is known, so members fail as
    # "no_coordinator" (safe to retry) ...
    wait_for(lambda: leader._obj.raft_state != LEADER and leader._obj.leader_addr() is None,
             what="the lone leader stepping down")
    t0 = time.monotonic()
    got = asyncio.run(many(40, 300))
    assert all(isinstance(e, CommandError) and e.code == "no_coordinator" for e in got), got
    assert time.monotonic() - t0 < 2
    # ... and a full submit queue refuses at once with "busy" (bounded, never silent).
    monkeypatch.setattr(coordinator_mod, "SUBMIT_QUEUE_MAX", 10)
    got = asyncio.run(many(40, 300))
    codes = [e.code for e in got]
    assert codes.count("no_coordinator") == 10 and codes.count("busy") == 30, codes


def test_submit_many_queues_a_request_s_commands_together_and_answers_each(group, monkeypatch):
    """A batch of transfers from one request (Coordinator.submit_many): adjacent in the queue,
    so a few entries carry them all, each with its own result; failures per member."""
    for name in group.names:
        group.start(name)
    leader_name = group.leader()
    leader = group.coords[leader_name]
    follower = group.coords[next(n for n in group.names if n != leader_name)]

    async def go() -> tuple[list, list]:
        for name in ACCOUNTS[:3]:
            assert (await leader.submit(OpenAccount(f"open-{name}", name, "user", "", 0), 5000))["ok"]
            assert (await leader.submit(Mint(f"mint-{name}", name, 200, "admin", 0), 5000))["ok"]
        # from two accounts into a third: they run dry part way, so later ones are refused
        txs = [Transfer(f"many-{k}", ACCOUNTS[k % 2], ACCOUNTS[2], 1 + k % 3, "admin", k) for k in range(600)]
        entries = follower.status()["submit"].get("entries", 0)
        got = await follower.submit_many(txs, 20_000)
        assert follower.status()["submit"]["entries"] - entries <= 4, follower.status()["submit"]
        again = await leader.submit_many(txs[:10], 5000)           # the same keys: their first outcomes
        return list(zip(txs, got)), again
    pairs, again = asyncio.run(go())
    machine = ledger_of(leader)
    for tx, result in pairs:
        assert isinstance(result, dict) and result == machine.result_of(tx.key), tx.key
    assert [r["seq"] for r in again] == [r["seq"] for _, r in pairs[:10]]
    assert all(r.get("duplicate") for r in again)
    assert sum(r["ok"] for _, r in pairs) > 50 and sum(not r["ok"] for _, r in pairs) > 50
    with pytest.raises(CommandError) as err:
        asyncio.run(leader.submit_many([CommandBatch(())], 1000))
    assert err.value.code == "invalid"

    for name in group.names:
        if name != leader_name:
            group.stop(name)
    cmds = [ConfigSet(values={"gossip_fanout": str(3 + k % 3)}) for k in range(30)]
    got = asyncio.run(leader.submit_many(cmds, 300))
    assert all(isinstance(e, CommandError) and e.code == "timeout" for e in got), got
    wait_for(lambda: leader._obj.raft_state != LEADER and leader._obj.leader_addr() is None,
             what="the lone leader stepping down")
    got = asyncio.run(leader.submit_many(cmds, 300))
    assert all(isinstance(e, CommandError) and e.code == "no_coordinator" for e in got), got
    monkeypatch.setattr(coordinator_mod, "SUBMIT_QUEUE_MAX", 10)
    with pytest.raises(CommandError) as err:                     # not all fit: none is queued
        asyncio.run(leader.submit_many(cmds, 300))
    assert err.value.code == "busy"
