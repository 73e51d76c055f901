"""The replicated-command layer over real pysyncobj: three hardened voters in one process.

Each voter is a real ``Coordinator`` with its own journal, store and tick thread, talking
over loopback TCP.  The planner is bypassed (the group is started with its partners
directly) because what is under test is the command path: submit on the leader, submit
on a follower (pysyncobj forwards it), the clear error without a coordinator, and the
state rebuilt from the journal after every voter restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time

import pytest

from galaxy import wire
from galaxy.config import Config
from galaxy.consensus.commands import CommandError
from galaxy.consensus.coordinator import Coordinator
from galaxy.messages import ConfigSet
from galaxy.settings import ClusterSettings
from galaxy.store import Store
from tests.cluster import free_ports

pytestmark = pytest.mark.timeout(60)

CFG = dataclasses.replace(Config.local(), bind="127.0.0.1", raft_min_timeout_ms=300, raft_max_timeout_ms=600)
SECRET = wire.derive_secret(bytes(32), "raft")


class Group:
    def __init__(self, root: str, n: int = 3, machines=lambda: [ClusterSettings()]) -> None:
        self.root = root
        self.machines = machines
        self.ports = free_ports(n)
        self.names = [f"v{i}" for i in range(n)]
        self.stores: dict[str, Store] = {}
        self.coords: dict[str, Coordinator] = {}

    def addr(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[self.names.index(name)]}"

    def start(self, name: str) -> Coordinator:
        data = os.path.join(self.root, name)
        store = self.stores.get(name) or Store(data)
        self.stores[name] = store
        store.put("raft.member", "1")          # a confirmed voter: may campaign at once
        c = Coordinator(cfg=CFG, node_id=name, raft_host="127.0.0.1", raft_port=self.ports[self.names.index(name)],
                        data_dir=data, secret=SECRET, store=store, machines=self.machines)
        c._start(tuple(self.addr(o) for o in self.names if o != name))
        self.coords[name] = c
        return c

    def stop(self, name: str) -> None:
        self.coords.pop(name).stop()

    def leader(self, timeout_s: float = 15.0) -> str:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            leaders = [n for n, c in self.coords.items() if c.is_coordinator()]
            if len(leaders) == 1:
                return leaders[0]
            time.sleep(0.02)
        raise AssertionError("no single leader")

    def close(self) -> None:
        for name in list(self.coords):
            self.stop(name)
        for s in self.stores.values():
            s.close()


@pytest.fixture
def group(tmp_path):
    g = Group(str(tmp_path))
    yield g
    g.close()


def settings_of(c: Coordinator) -> dict:
    return c.commands.machine(ConfigSet).snapshot()


def wait_for(cond, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_submit_on_leader_and_follower_applies_everywhere_and_survives_restart(group):
    for name in group.names:
        group.start(name)
    leader = group.leader()
    follower = next(n for n in group.names if n != leader)

    r1 = asyncio.run(group.coords[leader].submit(ConfigSet(values={"gossip_fanout": "5"}), 5000))
    assert r1["ok"] and r1["changed"] and r1["settings"] == {"gossip_fanout": 5}
    # On a follower, pysyncobj forwards the call to the leader and answers once applied here.
    r2 = asyncio.run(group.coords[follower].submit(ConfigSet(values={"scheduler_policy": "binpack"}), 5000))
    assert r2["ok"] and r2["version"] > r1["version"]
    assert settings_of(group.coords[follower]) == {"version": r2["version"],
                                                   "settings": {"gossip_fanout": 5, "scheduler_policy": "binpack"}}
    # A bad value is applied as a rejection, the same on every voter; the state is unchanged.
    bad = asyncio.run(group.coords[follower].submit(ConfigSet(values={"probe_timeout_ms": "5000"}), 5000))
    assert not bad["ok"] and bad["error"] == "invalid_setting" and bad["key"] == "probe_timeout_ms"
    assert "probe_interval_ms" in bad["message"]
    wait_for(lambda: all(settings_of(c) == settings_of(group.coords[follower]) for c in group.coords.values()),
             what="every voter at the same state")
    wait_for(lambda: group.coords[leader].caught_up(), what="leader caught up")

    # Every voter restarts: the journal is replayed into fresh machines.
    expected = settings_of(group.coords[leader])
    applied = {n: c.commands.applied_index for n, c in group.coords.items()}
    for name in group.names:
        group.stop(name)
    for name in group.names:
        group.start(name)
    wait_for(lambda: all(settings_of(c) == expected for c in group.coords.values()), what="state rebuilt by replay")
    assert all(group.coords[n].commands.applied_index >= applied[n] for n in group.names)
    # ... and the group goes on appending after the replay.
    group.leader()
    r3 = asyncio.run(group.coords[follower].submit(ConfigSet(unset=("gossip_fanout",)), 5000))
    assert r3["ok"] and r3["settings"] == {"scheduler_policy": "binpack"} and r3["version"] > r2["version"]


def test_no_coordinator_is_a_clear_error(group):
    c = group.start("v0")          # alone, its partners never start: no quorum, no leader
    t0 = time.monotonic()
    with pytest.raises(CommandError) as err:
        asyncio.run(c.submit(ConfigSet(values={"gossip_fanout": "4"}), 600))
    assert err.value.code == "no_coordinator"
    assert time.monotonic() - t0 < 3
