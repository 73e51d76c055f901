"""Election safety and voter replacement with real processes and kill -9.

`test_one_leader_per_term` kills random nodes (the leader, a follower, or two in a row
while an election runs) for GALAXY_SAFETY_ROUNDS rounds (default 30), restarts them, and
checks two things from every node's logged (term, leader) observations: no term ever had
two different leaders, and the survivors always re-elected.  With
`_GALAXY_TEST_UNSAFE_RAFT=1` in the nodes' environment (stock pysyncobj: in-memory
term/vote, no pre-vote) the same test is expected to fail; see docs/consensus.md.
"""

from __future__ import annotations

import collections
import os
import random

import pytest

from tests.cluster import Cluster

ROUNDS = int(os.environ.get("GALAXY_SAFETY_ROUNDS", "30"))
SEED = int(os.environ.get("GALAXY_SAFETY_SEED", "7"))


def leaders_by_term(observations: list[dict]) -> dict[int, set[str]]:
    terms: dict[int, set[str]] = collections.defaultdict(set)
    for o in observations:
        if o["leader"]:
            terms[o["term"]].add(o["leader"])
    return terms


def test_leaders_by_term_detects_two_leaders():
    obs = [{"term": 3, "leader": "a"}, {"term": 3, "leader": "b"}, {"term": 4, "leader": "a"}]
    assert {t for t, ls in leaders_by_term(obs).items() if len(ls) > 1} == {3}


def test_one_leader_per_term_under_kill9_rounds():
    env = {"_GALAXY_TEST_UNSAFE_RAFT": os.environ.get("_GALAXY_TEST_UNSAFE_RAFT", "0")}
    rng = random.Random(SEED)
    with Cluster(env=env) as cluster:
        a = cluster.add("a")
        cluster.add("b", join=[a.gossip_addr])
        cluster.add("c", join=[cluster.procs["b"].gossip_addr, a.gossip_addr])
        for n in "abc":
            cluster.start(n)
        leader, term = cluster.wait_leader(timeout_s=30)
        cluster.wait(lambda: all(len((p.try_get("/v1/status") or {}).get("voters", [])) == 3
                                 for p in cluster.running()) or None, 30, "3 voters")
        kinds = collections.Counter()
        for round_ in range(ROUNDS):
            kind = rng.choice(["leader", "follower", "two"])
            kinds[kind] += 1
            if kind == "leader":
                victims = [leader]
            elif kind == "follower":
                victims = [rng.choice([n for n in "abc" if n != leader])]
            else:
                victims = [leader, rng.choice([n for n in "abc" if n != leader])]
            cluster.kill9(victims[0])
            if kind == "leader":
                leader, term = cluster.wait_leader(timeout_s=20, exclude=victims[0], min_term=term + 1)
            elif kind == "two":
                # the second kill lands while the survivors are electing
                cluster.wait(lambda: any(v and v[1] > term for v in cluster.leaders().values()), 20,
                             "an election to start")
                cluster.kill9(victims[1])
            for v in victims:
                cluster.start(v)
            leader, term = cluster.wait(
                lambda: cluster.agreed_leader() if len(cluster.running()) == 3 else None, 30,
                f"round {round_} ({kind} {victims}): all three agree on a leader")
        terms = leaders_by_term(cluster.observations())
        doubled = {t: sorted(ls) for t, ls in terms.items() if len(ls) > 1}
        assert not doubled, f"terms with two leaders: {doubled} (rounds: {dict(kinds)})"
        assert len(terms) >= 2


@pytest.mark.parametrize("replace_after_ms", [3000])
def test_dead_voter_is_replaced_by_a_spare_and_quorum_survives_a_second_kill(replace_after_ms):
    env = {"GALAXY_VOTER_REPLACE_AFTER_MS": str(replace_after_ms)}
    with Cluster(env=env) as cluster:
        a = cluster.add("a")
        for n in "bcd":
            cluster.add(n, join=[a.gossip_addr])
        cluster.start("a")
        cluster.wait_leader(timeout_s=20)
        for n in "bcd":
            cluster.start(n)

        def voters():
            views = [(p.try_get("/v1/status") or {}).get("voters") for p in cluster.running()]
            return views[0] if views and all(v == views[0] for v in views) and len(views[0]) == 3 else None
        first = cluster.wait(voters, 40, "3 agreed voters among 4 nodes")
        spare = next(n for n in "abcd" if n not in first)
        leader, term = cluster.wait_leader(timeout_s=20)
        victim = next(v for v in first if v != leader)
        cluster.kill9(victim)
        second = cluster.wait(lambda: (v := voters()) and victim not in v and spare in v and v, 60,
                              f"spare {spare} replaces dead voter {victim}")
        assert len(second) == 3
        another = next(v for v in second if v != spare)
        cluster.kill9(another)
        survivors = cluster.running()
        assert len(survivors) == 2
        cluster.wait_leader(timeout_s=30, procs=survivors)
