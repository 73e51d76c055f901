"""Hostile datagrams at the broadcast-beacon port of real hosts (network namespaces).

The loopback campaigns (tests/proc/test_hostile.py) cannot reach the beacon port: there
the nodes run without broadcast, since the root namespace must never see any.  Here three
hosts run a mesh with broadcast and mDNS on, and a fourth host on the same bridge plays
the attacker for a bounded time: random bytes, real beacons it overheard replayed, real
frames with bytes flipped or cut, and beacons of another cluster key — sent both to the
subnet's broadcast address and to each host.  Afterwards every node is alive and ready,
the three agree on one coordinator and see each other alive (and nobody else), the
ledger hash is unchanged everywhere, no log has a traceback, and the drops are counted.
"""

from __future__ import annotations

import sys

import pytest

from tests.cluster import Cluster
from tests.netns.test_mesh_netns import lab_node
from tests.proc.test_hostile import LOG_BAD

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]
CAMPAIGN_S = 4.0

# Runs on the attacker host: argv = port, broadcast address, seconds, seed, own address, host addresses...
ATTACK = r"""
import os, random, socket, sys, time
from galaxy import wire
from galaxy.messages import Beacon

port, bcast, seconds, seed, me = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
hosts = sys.argv[6:]
rng = random.Random(seed)
listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listen.bind(("0.0.0.0", port))
listen.settimeout(5.0)
heard = [listen.recv(65535)]             # a real beacon of the mesh, to replay and mutate
listen.settimeout(0.0)


def overhear():
    data, (src, _) = listen.recvfrom(65535)
    if src != me and data:              # not our own junk coming back from the broadcast
        heard.append(data)
        del heard[:-20]

out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
out.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
foreign = wire.Codec("galaxy", [wire.parse_key(wire.generate_key())], "mallory")
sent, deadline = 0, time.monotonic() + seconds
while time.monotonic() < deadline:
    try:
        overhear()
    except BlockingIOError:
        pass
    kind = rng.randrange(5)
    if kind == 0:
        data = rng.randbytes(rng.choice((0, 1, 3, 40, 500, 1400, rng.randrange(1, 65000))))
    elif kind == 1:
        data = rng.choice(heard)                                  # replayed
    elif kind == 2:
        frame = bytearray(rng.choice(heard))
        frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
        data = bytes(frame)                                       # one bit flipped
    elif kind == 3:
        frame = rng.choice(heard)
        data = frame[:rng.randrange(len(frame))]                  # cut
    else:                                                         # a beacon under another key
        data = foreign.encode(Beacon(cluster="galaxy", node_id="mallory", host=rng.choice(hosts),
                                     gossip_port=7946), int(time.time() * 1000))
    for target in (bcast, rng.choice(hosts)):
        try:
            out.sendto(data, (target, port))
            sent += 1
        except OSError:
            pass
    if sent % 200 == 0:
        time.sleep(0.001)
print(sent)
"""


def test_hostile_datagrams_at_the_beacon_port(netlab):
    lab = netlab(4)
    with Cluster() as cluster:
        procs = [lab_node(cluster, lab, i, f"h{i}", []) for i in (1, 2, 3)]
        for p in procs:
            cluster.start(p.name)
        leader, _ = cluster.wait_leader(timeout_s=60, procs=procs)
        for p in procs:
            cluster.wait(lambda p=p: cluster.members_view(p) == {q.name: "alive" for q in procs} or None, 30,
                         f"{p.name} sees the 3 hosts alive")
        # the ledger opens the admin account after the first election: wait for it, then keep its hash
        def one_ledger() -> str | None:
            views = [(p.try_get("/v1/status") or {}).get("ledger") or {} for p in procs]
            hashes = {v.get("hash") for v in views}
            return hashes.pop() if all(v.get("applied_seq") for v in views) and len(hashes) == 1 else None
        ledger = cluster.wait(one_ledger, 30, "the admin account opened and one ledger hash everywhere")
        before = {p.name: dict(p.get("/v1/status")["wire"]) for p in procs}

        port = "37021"                                 # the default broadcast port every lab node uses
        out = lab.run(4, [sys.executable, "-c", ATTACK, port, lab.broadcast_ip, str(CAMPAIGN_S), "7",
                          lab.host_ip(4), *(lab.host_ip(i) for i in (1, 2, 3))],
                      capture_output=True, text=True, timeout=CAMPAIGN_S + 30, env=cluster.env)
        assert out.returncode == 0, out.stderr[-2000:]
        sent = int(out.stdout.strip())
        assert sent > 500, sent

        for p in procs:
            assert p.alive(), f"{p.name} died:\n{p.log_text()[-3000:]}"
            cluster.wait(lambda p=p: (p.try_get("/readyz", timeout_s=3.0) or {}).get("ready") or None, 30,
                         f"{p.name} ready after the campaign")
            cluster.wait(lambda p=p: cluster.members_view(p) == {q.name: "alive" for q in procs} or None, 30,
                         f"{p.name} still sees exactly the 3 hosts alive")
        assert cluster.wait_leader(timeout_s=30, procs=procs)[0] is not None
        assert {p.get("/v1/status")["ledger"]["hash"] for p in procs} == {ledger}, "the ledger is unchanged"
        dropped = 0
        for p in procs:
            after = p.get("/v1/status")["wire"]
            dropped += sum(v - before[p.name].get(k, 0) for k, v in after.items()
                           if k not in ("ok", "decoded", "encoded") and isinstance(v, int))
            text = p.log_text()
            for bad in LOG_BAD:
                assert bad not in text, f"{p.name}'s log has {bad!r}:\n" + \
                    "\n".join(line for line in text.splitlines() if bad in line)[-3000:]
        print(f"{sent} hostile datagrams sent, {dropped} drops counted")
        assert dropped > sent // 4, f"hostile datagrams counted as dropped: {dropped} of {sent} sent"
