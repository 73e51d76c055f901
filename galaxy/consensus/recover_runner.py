"""The node's side of ``galaxy recover``: report its facts, check and carry out an order.

Theory of operation: thin, over ``recover.py`` (pure).  ``facts(node)`` reads what the
node knows right now — its Raft log position and term (``Coordinator.raft_facts``), the
highest term it heard of (gossip and the task fence, which the new group's term must
exceed), the ledger entry its own log applied last and the one its view shows
(published to the mesh), its task count, and whether it sees a live coordinator.
``apply(node, order)`` gates the order with ``recover.check_order`` against fresh facts
and, when it says APPLY, runs ``Coordinator.reform`` off the event loop.  One order at a
time per node (a lock), so two calls cannot interleave their stop/rewrite/start.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

from galaxy.consensus import recover as recovery
from galaxy.messages import ALIVE, Transfer

_locks: weakref.WeakKeyDictionary[Any, asyncio.Lock] = weakref.WeakKeyDictionary()

RAFT_INDEX_STRIDE = 1000            # a machine sees raft_index * 1000 + position (docs/consensus.md)


def _point(applied: list) -> recovery.Point:
    """The last applied ledger entry's place (a Ledger's seq is len(applied))."""
    if not applied:
        return recovery.Point()
    index, term, _entry, _result = applied[-1]
    return recovery.Point(seq=len(applied), index=index // RAFT_INDEX_STRIDE, term=term)


def live_coordinator(node: Any) -> str:
    """The coordinator this node knows, if it is alive right now ("" if none)."""
    coordinator = node.coordinator
    if coordinator.is_coordinator():
        return node.node_id
    leader = node.leader()["leader"]
    if not leader or leader == node.node_id:
        return ""
    member = node.membership.get(leader)
    return leader if member is not None and member.state == ALIVE else ""


def facts(node: Any) -> recovery.Facts:
    coordinator = node.coordinator
    raft = coordinator.raft_facts()
    machines = coordinator.commands
    ledger = recovery.Point()
    if machines is not None:
        try:
            ledger = _point(machines.machine(Transfer).applied)
        except KeyError:
            pass
    view = node.ledger.view
    leader = live_coordinator(node)
    known = max(node._known_term(), node.tasks.fence.highest_term, raft["term"])
    return recovery.Facts(
        node_id=node.node_id, raft_addr=raft["raft_addr"], voter=raft["voter"], epoch=raft["epoch"],
        plan_id=raft["plan_id"], voters=tuple(raft["voters"]), term=raft["term"],
        last_log_term=raft["last_log_term"], last_log_index=raft["last_log_index"],
        commit_index=raft["commit_index"], known_term=known, ledger=ledger, published=_point(view.applied),
        ledger_hash=str(view.hash), tasks=sum(node.tasks.counts().values()),
        has_coordinator=bool(leader), coordinator=leader)


async def apply(node: Any, order: recovery.Order, *, force: bool, dry_run: bool) -> dict:
    """Check ``order`` here and carry it out (unless ``dry_run``); recover.Refused if refused."""
    lock = _locks.setdefault(node, asyncio.Lock())
    if lock.locked():
        raise recovery.Refused("another recovery order is being applied on this node; retry in a moment")
    async with lock:
        coordinator = node.coordinator
        me = facts(node)
        verdict = recovery.check_order(order, me, current_epoch=coordinator.epoch,
                                       current_plan=coordinator.plan_id, force=force)
        answer = {"node": node.node_id, "plan_id": order.plan_id, "epoch": order.epoch,
                  "role": "keep" if order.chosen == node.node_id else "discard"}
        if verdict == recovery.DONE:
            return {**answer, "result": "already applied"}
        if dry_run:
            return {**answer, "result": "would apply"}
        await asyncio.get_running_loop().run_in_executor(None, coordinator.reform, order)
        return {**answer, "result": "applied"}
