"""Handing leadership over (Raft TimeoutNow) with pre-vote and stickiness on: real pysyncobj
voters in one process (the ``Group`` of test_raft_commands).

Stock pysyncobj's transfer sent TimeoutNow, but the target then asked for pre-votes, which
the leader (fresh by definition) refused, and the leader dropped its vote request: a leader
could never hand over.  With two voters that left the survivor without a quorum once the
leader had gone."""

from __future__ import annotations

import pytest

from tests.unit.test_raft_commands import Group, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("n", [2, 3])
def test_the_leader_hands_over_to_a_follower_in_a_new_term(tmp_path, n):
    g = Group(str(tmp_path), n=n)
    try:
        for name in g.names:
            g.start(name)
        old = g.leader()
        term = g.coords[old].term
        # every follower holds the whole log (pysyncobj denies a transfer to a lagging one)
        wait_for(lambda: all(c._obj.raftLastApplied >= g.coords[old]._obj.raftCommitIndex > 0
                             for c in g.coords.values()), 10, "followers caught up")
        g.coords[old]._obj.hand_over()
        new = wait_for(lambda: next((name for name, c in g.coords.items() if name != old and c.is_coordinator()),
                                    None), 3, "another voter leads")
        assert g.coords[new].term > term
        # (the group runs without gossip: voters know each other by address only)
        assert wait_for(lambda: g.coords[old].leader()[0] == g.addr(new), 3, "the old leader follows the new one")
    finally:
        g.close()
