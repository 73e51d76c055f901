"""Group commit, the pure half: a ``CommandBatch`` entry applies its commands in order, each as
if it were its own entry, with one result per command; batching never changes an outcome."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from galaxy import wire
from galaxy.consensus.commands import (BATCH_COMMANDS_MAX, BATCH_PACK_BYTES_MAX, COMMAND_INDEX_STRIDE, CommandError,
                                       InvariantError, Replicated, batch_cut, command_index, encode, encode_batch,
                                       ok)
from galaxy.ledger.core import Ledger
from galaxy.messages import CommandBatch, ConfigSet, Mint, OpenAccount, Transfer

pytestmark = pytest.mark.timeout(60)


class Echo:
    commands = (ConfigSet,)

    def __init__(self):
        self.seen = []

    def apply(self, index, term, cmd):
        self.seen.append((index, cmd.by))
        return ok(n=len(self.seen), by=cmd.by)

    def snapshot(self):
        return {"n": len(self.seen)}


def cs(by: str) -> bytes:
    return encode(ConfigSet(by=by))


def test_a_batch_applies_in_order_with_one_result_per_command():
    m = Echo()
    r = Replicated([m])
    assert r.apply_bytes(4, 2, cs("solo")) == {"ok": True, "n": 1, "by": "solo"}
    got = r.apply_bytes(5, 2, encode_batch([cs("a"), cs("b"), cs("c")]))
    assert got == {"ok": True, "results": [{"ok": True, "n": 2, "by": "a"}, {"ok": True, "n": 3, "by": "b"},
                                           {"ok": True, "n": 4, "by": "c"}]}
    # each command has its own index, strictly increasing, and the entry is index // stride
    assert m.seen == [(4000, "solo"), (5000, "a"), (5001, "b"), (5002, "c")]
    assert [i // COMMAND_INDEX_STRIDE for i, _ in m.seen] == [4, 5, 5, 5]
    assert (r.applied_index, r.applied_command_index, r.applied_total, r.batches_total) == (5, 5002, 4, 1)


def test_a_bad_member_is_rejected_alone_and_the_others_apply():
    m = Echo()
    r = Replicated([m])
    nested = encode(CommandBatch((cs("inner"),)))
    got = r.apply_bytes(7, 1, encode(CommandBatch((cs("a"), b"garbage", nested, cs("d")))))
    results = got["results"]
    assert got["ok"] and len(results) == 4
    assert results[0]["by"] == "a" and results[3]["by"] == "d" and results[3]["n"] == 2
    assert results[1]["error"] == results[2]["error"] == "undecodable"
    assert "batch inside a batch" in results[2]["message"]
    assert m.seen == [(7000, "a"), (7003, "d")]
    assert (r.applied_total, r.rejected_total) == (4, 2)


def test_bounds():
    # batch_cut: count and bytes, oldest first, always at least one
    assert batch_cut([]) == 0
    assert batch_cut([10] * 5, count_max=3) == 3
    assert batch_cut([100] * 50, bytes_max=1000) == 9        # 16 + 9 * 103 <= 1000 < 16 + 10 * 103
    assert batch_cut([BATCH_PACK_BYTES_MAX * 2, 10]) == 1      # too big alone: still sent, alone
    assert batch_cut([10, BATCH_PACK_BYTES_MAX]) == 1
    sizes = [len(cs("x" * 40))] * 5000
    n = batch_cut(sizes)
    assert 1 < n <= BATCH_COMMANDS_MAX
    assert len(encode_batch([cs("x" * 40)] * n)) <= BATCH_PACK_BYTES_MAX     # the estimate is an upper bound
    # encode_batch: a lone command is sent as itself; the count is bounded
    assert encode_batch([cs("a")]) == cs("a")
    with pytest.raises(CommandError) as err:
        encode_batch([])
    assert err.value.code == "invalid"
    with pytest.raises(CommandError):
        encode_batch([cs("a")] * (BATCH_COMMANDS_MAX + 1))
    # an entry batching more than the stride allows is refused whole (its indices would run
    # into the next entry's), deterministically
    m = Echo()
    r = Replicated([m])
    too_many = wire.encode_command(CommandBatch((cs("a"),) * (BATCH_COMMANDS_MAX + 1)))
    got = r.apply_bytes(3, 1, too_many)
    assert not got["ok"] and got["error"] == "undecodable" and m.seen == []
    assert r.apply_bytes(4, 1, cs("after"))["ok"]


def test_only_the_dispatcher_applies_batches():
    class Greedy(Echo):
        commands = (ConfigSet, CommandBatch)

    with pytest.raises(TypeError):
        Replicated([Greedy()])
    with pytest.raises(InvariantError):
        r = Replicated([Echo()])
        r.apply(2, 1, ConfigSet())
        r.apply(2, 1, CommandBatch((cs("again"),)))            # an entry applied twice
    assert command_index(12, 3) == 12003


ACCOUNTS = ("ann", "bob", "cy")
transfers = st.lists(st.tuples(st.sampled_from(ACCOUNTS), st.sampled_from(ACCOUNTS), st.integers(1, 40)),
                     max_size=60)


@settings(max_examples=60, deadline=None)
@given(txs=transfers, cuts=st.lists(st.integers(1, 7), min_size=1, max_size=60))
def test_batching_never_changes_an_outcome_and_replays_identically(txs, cuts):
    """The same commands, one entry each or cut into random batches: the same results, the
    same ledger; and replaying the batched log into a fresh machine gives the same again."""
    cmds = [encode(OpenAccount(f"open-{a}", a, "user", "", 0)) for a in ACCOUNTS]
    cmds += [encode(Mint(f"mint-{a}", a, 50, "admin", 0)) for a in ACCOUNTS]
    cmds += [encode(Transfer(f"tx-{i % 45}", s, d, n, "admin", 0)) for i, (s, d, n) in enumerate(txs)]

    lone = Replicated([Ledger()])
    lone_results = [lone.apply_bytes(i + 1, 1, c) for i, c in enumerate(cmds)]

    entries, i, k = [], 0, 0
    while i < len(cmds):
        n = cuts[k % len(cuts)]
        entries.append(encode_batch(cmds[i:i + n]))
        i, k = i + n, k + 1

    def run() -> tuple[Replicated, list[dict]]:
        r = Replicated([Ledger()])
        out: list[dict] = []
        for index, data in enumerate(entries, start=1):
            got = r.apply_bytes(index, 1, data)
            out.extend(got["results"] if "results" in got else [got])
        return r, out

    batched, batched_results = run()
    assert batched_results == lone_results
    ledger = batched.machine(Transfer)
    assert (ledger.seq, ledger.hash) == (lone.machine(Transfer).seq, lone.machine(Transfer).hash)
    replayed, replayed_results = run()
    assert replayed_results == batched_results and replayed.snapshot() == batched.snapshot()
