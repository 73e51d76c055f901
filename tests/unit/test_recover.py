"""The pure recovery planner (galaxy/consensus/recover.py): choice, losses, refusals, order gate."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest

from galaxy.consensus import recover as r
from galaxy.consensus import voters as planner
from galaxy.messages import RaftView

VOTERS = ("a", "b", "c", "d", "e")


def facts(node_id: str, log: tuple[int, int], *, ledger=(0, 0, 0), published=(0, 0, 0), term: int | None = None,
          epoch: int = 0, voter: bool = True, coordinator: str = "", known_term: int = 0) -> r.Facts:
    return r.Facts(node_id=node_id, raft_addr=f"10.0.0.{ord(node_id) - 96}:7947", voter=voter, epoch=epoch,
                   plan_id="", voters=VOTERS, term=log[0] if term is None else term, last_log_term=log[0],
                   last_log_index=log[1], commit_index=log[1], known_term=known_term, ledger=r.Point(*ledger),
                   published=r.Point(*published), ledger_hash="h", tasks=0, has_coordinator=bool(coordinator),
                   coordinator=coordinator)


def test_most_complete_is_the_highest_term_then_index() -> None:
    d = facts("d", (3, 40))
    e = facts("e", (4, 30))          # a later term beats a longer log
    assert r.propose([d, e]).order.chosen == "e"
    assert r.propose([facts("d", (4, 31)), e]).order.chosen == "d"
    assert r.propose([facts("e", (4, 30)), facts("d", (4, 30))]).order.chosen == "d"    # tie: smaller id


def test_losses_count_log_entries_and_ledger_seqs() -> None:
    d = facts("d", (2, 50), ledger=(20, 48, 2), published=(20, 48, 2))
    e = facts("e", (2, 45), ledger=(17, 44, 2), published=(19, 46, 2))
    p = r.propose([d, e])
    assert p.order.chosen == "d"
    loss = {x.node_id: x for x in p.losses}
    assert loss["d"].describe() == "nothing"
    assert (loss["e"].log_entries, loss["e"].ledger_from, loss["e"].ledger_to) == (5, 18, 20)
    assert loss["e"].describe() == "5 log entries / ledger seqs 18..20"
    assert p.losses[0].node_id == "d"


def test_order_epoch_and_term_are_above_every_survivor() -> None:
    p = r.propose([facts("d", (3, 10), term=5, epoch=1), facts("e", (3, 9), known_term=7, epoch=2)])
    assert p.order.epoch == 3 and p.order.term == 8
    assert p.order.voters == (("d", "10.0.0.4:7947"), ("e", "10.0.0.5:7947"))


def test_refuses_when_a_coordinator_exists_unless_forced() -> None:
    live = [facts("d", (3, 10), coordinator="a"), facts("e", (3, 9))]
    with pytest.raises(r.Refused, match="nothing to recover"):
        r.propose(live)
    assert r.propose(live, force=True).order.chosen == "d"


def test_refuses_when_the_survivors_are_a_majority() -> None:
    three = [facts(n, (3, 10)) for n in "cde"]
    with pytest.raises(r.Refused, match="majority"):
        r.propose(three)
    assert r.propose(three, force=True).order.epoch == 1


def test_refuses_a_ledger_fork() -> None:
    # seq 25 was published (committed at index 60, term 3) but no survivor's log reaches it
    d = facts("d", (3, 55), ledger=(22, 54, 3))
    e = facts("e", (2, 70), published=(25, 60, 3))
    with pytest.raises(r.Refused, match="ledger seqs 23..25"):
        r.propose([d, e])
    # a later term at a later index holds it (Leader Completeness)
    assert r.propose([facts("d", (4, 61)), e]).order.chosen == "d"


def test_refuses_choosing_a_less_complete_log_unless_forced() -> None:
    d, e = facts("d", (3, 10)), facts("e", (3, 8))
    with pytest.raises(r.Refused, match="behind"):
        r.propose([d, e], chosen="e")
    assert r.propose([d, e], chosen="e", force=True).order.chosen == "e"
    with pytest.raises(r.Refused, match="not among"):
        r.propose([d, e], chosen="zz")


def test_refuses_duplicates_and_logless_survivors() -> None:
    with pytest.raises(r.Refused, match="twice"):
        r.propose([facts("d", (1, 2)), facts("d", (1, 2))])
    with pytest.raises(r.Refused, match="no survivor holds"):
        r.propose([facts("d", (0, 0), voter=False)])
    p = r.propose([facts("d", (1, 5)), facts("w", (0, 0), voter=False)])
    assert [i for i, _ in p.order.voters] == ["d"] and p.excluded[0][0] == "w"


def test_check_order_gate() -> None:
    d, e = facts("d", (3, 10), term=4), facts("e", (3, 8), term=4)
    order = r.propose([d, e]).order
    assert r.check_order(order, d, current_epoch=0, current_plan="", force=False) == r.APPLY
    assert r.check_order(order, e, current_epoch=0, current_plan="", force=False) == r.APPLY
    # idempotent, and a mixed plan for the same epoch is refused
    assert r.check_order(order, d, current_epoch=1, current_plan=order.plan_id, force=False) == r.DONE
    with pytest.raises(r.Refused, match="another plan"):
        r.check_order(order, d, current_epoch=1, current_plan="0123456789abcdef", force=False)
    with pytest.raises(r.Refused, match="stale"):
        r.check_order(order, d, current_epoch=2, current_plan="x", force=False)
    # the chosen log moved since the plan; a more complete discarded log; a stale term
    with pytest.raises(r.Refused, match="moved"):
        r.check_order(order, dataclasses.replace(d, last_log_index=11), current_epoch=0, current_plan="", force=False)
    with pytest.raises(r.Refused, match="more complete"):
        r.check_order(order, dataclasses.replace(e, last_log_index=12), current_epoch=0, current_plan="", force=False)
    with pytest.raises(r.Refused, match="term"):
        r.check_order(order, dataclasses.replace(e, term=order.term), current_epoch=0, current_plan="", force=False)
    with pytest.raises(r.Refused, match="not one of"):
        r.check_order(order, facts("x", (3, 8)), current_epoch=0, current_plan="", force=False)


def test_order_json_round_trip_and_validation() -> None:
    order = r.propose([facts("d", (3, 10)), facts("e", (3, 8))]).order
    assert r.Order.from_json(order.to_json()) == order
    assert r.Order.from_json(order.to_json()).plan_id == order.plan_id
    bad = [None, {}, {**order.to_json(), "extra": 1}, {**order.to_json(), "chosen": "zz"},
           {**order.to_json(), "voters": [["d", "x"], ["d", "y"]]}, {**order.to_json(), "epoch": -1},
           {**order.to_json(), "chosen_log": [1]}, {**order.to_json(), "voters": "d"}]
    for doc in bad:
        with pytest.raises(ValueError):
            r.Order.from_json(doc)
    f = facts("d", (3, 10))
    assert r.Facts.from_json(f.to_json()) == f
    with pytest.raises(ValueError):
        r.Facts.from_json({**f.to_json(), "term": "3"})


def test_planner_older_epoch_forgets_its_state_and_rejoins() -> None:
    def local(**kw) -> planner.Local:
        base = dict(id="a", role="auto", raft_addr="10.0.0.1:7947", running=False, member=True, is_leader=False,
                    term=9, config=("10.0.0.1:7947", "10.0.0.2:7947"), change_pending=False, uptime_ms=10_000,
                    has_seeds=False, seen_group=True, epoch=0)
        return planner.Local(**{**base, **kw})
    leader = planner.PeerInfo(id="d", state="alive", role="auto", raft_addr="10.0.0.4:7947",
                              raft=RaftView(term=3, leader="d", voters=("d", "e"), raft_state="leader", epoch=1,
                                            invited=("a",)), silent_ms=0)
    kw = dict(voters=5, bootstrap_window_ms=1000, voter_replace_after_ms=30_000)
    # a lost voter back with its old state: forget it (even with a higher old term)
    assert isinstance(planner.plan(local(), [leader], **kw)[0], planner.Retire)
    assert isinstance(planner.plan(local(running=True), [leader], **kw)[0], planner.Retire)
    # then, invited as a new spare, it starts in the leader's epoch
    assert planner.plan(local(member=False, config=()), [leader], **kw) == [planner.Start(("10.0.0.4:7947",), 1)]
    # a node of a newer epoch never joins an older group's leader
    old = dataclasses.replace(leader, raft=dataclasses.replace(leader.raft, epoch=0))
    assert planner.plan(local(member=False, config=(), epoch=1), [old], **kw) == []


def test_neutralize_membership_keeps_indices_and_terms() -> None:
    from pysyncobj.journal import FileJournal

    from galaxy.consensus.raft import neutralize_membership, write_vote
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "journal")
        j = FileJournal(path)
        entries = [(b"\x01", 1, 0), (b"\x02membership", 2, 1), (b"\x00command", 3, 1), (b"\x02again", 4, 2)]
        for e in entries:
            j.add(*e)
        j._destroy()
        assert neutralize_membership(path) == 2
        assert neutralize_membership(path) == 0          # idempotent
        j = FileJournal(path)
        got = [j[i] for i in range(len(j))]
        j._destroy()
        assert got == [(b"\x01", 1, 0), (b"\x01", 2, 1), (b"\x00command", 3, 1), (b"\x01", 4, 2)]
        write_vote(path, 7)
        write_vote(path, 5)                              # never lowers the term
        with open(path + ".vote") as f:
            assert '"term": 7' in f.read()


def test_reform_keeps_the_chosen_log_and_finishes_after_an_interrupted_stop(tmp_path) -> None:
    """Real pysyncobj in one process: three voters, two lost; the survivor re-forms alone."""
    import asyncio
    import json
    import time

    from galaxy.consensus.coordinator import Coordinator
    from galaxy.messages import ConfigSet
    from tests.unit.test_raft_commands import CFG, SECRET, Group, settings_of, wait_for

    g = Group(str(tmp_path))
    try:
        for name in g.names:
            g.start(name)
        leader = g.leader()
        done = asyncio.run(g.coords[leader].submit(ConfigSet(values={"gossip_fanout": "5"}), 5000))
        assert done["ok"]
        survivor = next(n for n in g.names if n != leader)
        wait_for(lambda: settings_of(g.coords[survivor])["settings"] == {"gossip_fanout": 5}, what="replicated")
        for name in g.names:
            if name != survivor:
                g.stop(name)
        c = g.coords[survivor]
        term, last = c.raft_facts()["term"], c._obj.log_position()
        order = r.Order(epoch=1, term=term + 1, chosen=survivor, voters=((survivor, g.addr(survivor)),),
                        chosen_log=last)
        c.reform(order)
        assert c.epoch == 1 and c.plan_id == order.plan_id
        wait_for(lambda: c.is_coordinator(), what="the survivor leads its group of one")
        assert c.term > term and c._obj.config_addrs() == [g.addr(survivor)]
        assert settings_of(c)["settings"] == {"gossip_fanout": 5}

        # a stop between storing the order and starting Raft: finished at the next start
        g.stop(survivor)
        store = g.stores[survivor]
        order2 = dataclasses.replace(order, epoch=2, term=c.term + 5)
        store.put("raft.recover", json.dumps({"order": order2.to_json(), "done": False}))
        c2 = Coordinator(cfg=CFG, node_id=survivor, raft_host="127.0.0.1", raft_port=int(g.addr(survivor).split(":")[1]),
                         data_dir=os.path.join(str(tmp_path), survivor), secret=SECRET, store=store,
                         machines=g.machines)
        g.coords[survivor] = c2
        assert not c2.running
        c2.step(int(time.monotonic() * 1000), [], False)
        assert c2.running and c2.epoch == 2 and json.loads(store.get("raft.recover"))["done"]
        wait_for(lambda: c2.is_coordinator(), what="leader after the interrupted order")
        assert c2.term > order2.term - 1 and settings_of(c2)["settings"] == {"gossip_fanout": 5}
    finally:
        g.close()
