"""SWIM membership between real `galaxy up` nodes on five hosts (network namespaces).

One run, three phases, each bounded:
* 10 % of every host's inbound packets dropped for LOSS_RUN_S: nobody is declared dead
  (suspicions may come and go; each is refuted).
* One host cut off (its bridge port down): every other node holds it suspect, then dead.
* Healed: it is alive again everywhere, with a higher incarnation (it refuted).
What each node judged is read from its JSON log (`member` events), so a short-lived
suspicion is not missed between two polls.
"""

from __future__ import annotations

import json
import time

import pytest

from galaxy.config import Config
from galaxy.gossip.membership import detection_bound_ms
from tests.cluster import Cluster, Proc

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

HOSTS = 5
LOSS_RUN_S = 30


def lab_node(cluster: Cluster, lab, i: int, join: list[str]) -> Proc:
    return cluster.add_in_lab(lab, i, f"h{i}", join=join, extra=["--cpu", "1", "--memory", "512M"])


def member_events(p: Proc) -> list[tuple[float, str, str, str]]:
    """(ts, member, old, new) from the node's JSON log, in order."""
    out = []
    for line in p.log_text().splitlines():
        if '"event": "member"' not in line:
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        out.append((doc["ts"], doc["member"], doc["old"], doc["new"]))
    return out


def test_five_hosts_ride_out_loss_detect_a_cut_and_take_it_back(netlab) -> None:
    lab = netlab(HOSTS)
    cfg = Config.local()      # tests.cluster's profile for the nodes it starts
    with Cluster() as cluster:
        seed = f"{lab.host_ip(1)}:7946"
        procs = [lab_node(cluster, lab, i, [] if i == 1 else [seed]) for i in lab.hosts]
        for p in procs:
            cluster.start(p.name)
        names = {p.name for p in procs}
        for p in procs:
            cluster.wait(lambda p=p: cluster.members_view(p) == dict.fromkeys(names, "alive") or None, 60,
                         f"{p.name} sees {HOSTS} alive members")

        # 1. Loss everywhere: suspicions may come and go, nobody dies.
        for i in lab.hosts:
            lab.loss(i, 10)
        started = time.time()
        deadline = time.monotonic() + LOSS_RUN_S
        while time.monotonic() < deadline:
            for p in procs:
                assert p.alive(), p.log_text()[-2000:]
            time.sleep(1)
        for i in lab.hosts:
            lab.unloss(i)
        during = {p.name: [e for e in member_events(p) if e[0] >= started] for p in procs}
        dead = {n: [e for e in evs if e[3] == "dead"] for n, evs in during.items() if any(e[3] == "dead" for e in evs)}
        assert not dead, f"false deaths under 10 % loss: {dead}"
        for p in procs:
            cluster.wait(lambda p=p: cluster.members_view(p) == dict.fromkeys(names, "alive") or None, 30,
                         f"{p.name} sees everyone alive after the loss")

        # 2. Cut one host off: suspect, then dead, on every other node.
        victim = procs[-1]
        others = procs[:-1]
        before = {m["id"]: m["incarnation"] for m in others[0].get("/v1/members")["members"]}[victim.name]
        cut_at = time.time()
        lab.cut(HOSTS)
        bound_s = detection_bound_ms(cfg, HOSTS) / 1000
        for p in others:
            cluster.wait(lambda p=p: cluster.members_view(p).get(victim.name) == "dead" or None, bound_s + 10,
                         f"{p.name} holds {victim.name} dead")
        took_s = time.time() - cut_at
        for p in others:
            seen = [(old, new) for ts, member, old, new in member_events(p) if ts >= cut_at and member == victim.name]
            assert seen[:2] == [("alive", "suspect"), ("suspect", "dead")], (p.name, seen)
        assert took_s < bound_s, took_s
        print(f"cut -> dead everywhere in {took_s:.1f} s; suspicions under loss: "
              f"{sum(e[3] == 'suspect' for evs in during.values() for e in evs)}")

        # 3. Heal: alive again everywhere, at a higher incarnation.
        lab.heal(HOSTS)
        for p in procs:
            cluster.wait(lambda p=p: cluster.members_view(p) == dict.fromkeys(names, "alive") or None,
                         cfg.seed_retry_max_ms / 1000 + bound_s + 10, f"{p.name} sees {victim.name} back")
        for p in others:
            after = {m["id"]: m["incarnation"] for m in p.get("/v1/members")["members"]}[victim.name]
            assert after > before, (p.name, before, after)
