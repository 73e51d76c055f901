"""SWIM membership between real `galaxy up` nodes on five hosts (network namespaces).

One run, three phases, each bounded:
* 10 % of every host's inbound packets dropped for LOSS_RUN_S: nobody is declared dead
  (suspicions may come and go; each is refuted).
* One host cut off (its bridge port down): every other node holds it suspect, then dead.
* While it is cut off, a document is written through the KV API on it and another on the
  majority side (the same key on both, too: concurrent writes).
* Healed: it is alive again everywhere, with a higher incarnation (it refuted), and every
  host serves both documents, and the same versions of the key written on both sides.
What each node judged is read from its JSON log (`member` events), so a short-lived
suspicion is not missed between two polls.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from galaxy import auth, wire
from galaxy.config import Config
from galaxy.gossip.membership import detection_bound_ms
from tests.cluster import Cluster, Proc

pytestmark = [pytest.mark.netns, pytest.mark.timeout(420)]

HOSTS = 5
LOSS_RUN_S = 30


def lab_node(cluster: Cluster, lab, i: int, join: list[str]) -> Proc:
    return cluster.add_in_lab(lab, i, f"h{i}", join=join, extra=["--cpu", "1", "--memory", "512M"])


# PUT a JSON body from inside a host's namespace (the root namespace cannot reach the lab),
# as the mesh's admin (a token signed with the cluster key: sign-in is out of the root's reach).
_PUT = ("import sys, urllib.request; r = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), "
        "method='PUT', headers={'Content-Type': 'application/json', 'Authorization': 'Bearer ' + sys.argv[3]}); "
        "print(urllib.request.urlopen(r, timeout=5).read().decode())")


def admin_token(key: str) -> str:
    return auth.issue_token(wire.derive_secret(wire.parse_key(key), "tokens"), "admin", int(time.time() * 1000),
                            os.urandom(8))[0]


def kv_put(lab, i: int, p: Proc, key: str, value, token: str) -> dict:
    out = lab.run(i, [sys.executable, "-c", _PUT, f"{p.url}/v1/kv/{key}", json.dumps(value), token], timeout=20)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def kv_view(p: Proc, key: str) -> tuple | None:
    """(value, versions) a node serves for a key; None if it serves none."""
    doc = p.try_get(f"/v1/kv/{key}")
    return None if doc is None else (json.dumps(doc["value"], sort_keys=True), doc["versions"])


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

        # Documents written on both sides of the cut (and one key on both: siblings).
        token = admin_token(cluster.key)
        kv_put(lab, HOSTS, victim, "cut/minority", {"from": victim.name}, token)
        kv_put(lab, HOSTS, victim, "cut/both", "minority", token)
        kv_put(lab, 1, others[0], "cut/majority", {"from": others[0].name}, token)
        kv_put(lab, 1, others[0], "cut/both", "majority", token)
        assert victim.get("/v1/kv/cut/minority")["value"] == {"from": victim.name}
        assert others[-1].try_get("/v1/kv/cut/minority") is None       # it cannot have crossed

        # 3. Heal: alive again everywhere, at a higher incarnation.
        lab.heal(HOSTS)
        healed_at = time.monotonic()
        for p in procs:
            cluster.wait(lambda p=p: cluster.members_view(p) == dict.fromkeys(names, "alive") or None,
                         cfg.seed_retry_max_ms / 1000 + bound_s + 10, f"{p.name} sees {victim.name} back")
        rejoined_s = time.monotonic() - healed_at
        for p in others:
            after = {m["id"]: m["incarnation"] for m in p.get("/v1/members")["members"]}[victim.name]
            assert after > before, (p.name, before, after)

        # ... and every host serves both documents, and the same two versions of cut/both
        # (at the latest after one anti-entropy period).
        want = {"cut/minority": (json.dumps({"from": victim.name}), 1),
                "cut/majority": (json.dumps({"from": others[0].name}), 1)}
        for p in procs:
            cluster.wait(lambda p=p: all(kv_view(p, k) == v for k, v in want.items()) or None,
                         cfg.push_pull_interval_ms / 1000 + 10, f"{p.name} serves both documents", poll_s=0.2)
        for p in procs:
            cluster.wait(lambda p=p: (kv_view(p, "cut/both") or (None, 0))[1] == 2 or None,
                         cfg.push_pull_interval_ms / 1000 + 10, f"{p.name} holds both versions of cut/both",
                         poll_s=0.2)
        both = {p.name: kv_view(p, "cut/both") for p in procs}
        assert len(set(both.values())) == 1, both          # one winner, everywhere
        print(f"after the heal: alive everywhere in {rejoined_s:.1f} s, documents written during the cut "
              f"on all {HOSTS} hosts in {time.monotonic() - healed_at:.1f} s")
