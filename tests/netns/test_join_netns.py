"""Join with a one-time token across real hosts (network namespaces), with nothing else.

Three hosts form a mesh on the default ports; a member makes a token with the real CLI.
A fourth host runs ``galaxy up --token TOKEN`` with no key, no seed and no other setting:
it redeems the token with a member named in it and joins.  On the way, an expired and an
altered token are refused on that host, and afterwards the same token is refused as used
on a fifth host.  Every refusal exits with code 2 and a clear reason.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

from galaxy import join, wire
from tests.cluster import REPO, Cluster
from tests.netns.test_mesh_netns import lab_node
from tests.proc.test_join_token import admin_token

pytestmark = [pytest.mark.netns, pytest.mark.timeout(240)]


def newcomer(cluster: Cluster, lab, i: int, name: str, token: str):
    p = lab_node(cluster, lab, i, name, ["--token", token, "--role", "auto"])
    p.env.pop("GALAXY_CLUSTER_KEY")           # nothing but the token
    return cluster.start(name)


def refused(cluster: Cluster, lab, i: int, name: str, token: str, reason: str) -> str:
    """The refused newcomer's log (it is no longer one of the cluster's nodes)."""
    p = newcomer(cluster, lab, i, name, token)
    assert p.popen.wait(timeout=60) == 2, p.log_text()[-2000:]
    assert reason in p.log_text(), p.log_text()[-2000:]
    assert not os.path.exists(os.path.join(p.data_dir, "cluster.key"))
    del cluster.procs[name]
    return p.log_text()


def test_join_with_only_a_token_across_hosts(netlab):
    lab = netlab(5)
    with Cluster() as cluster:
        members = [lab_node(cluster, lab, i, f"h{i}", []) for i in (1, 2, 3)]
        for p in members:
            cluster.start(p.name)
        cluster.wait_leader(timeout_s=60, procs=members)
        h1 = members[0]
        env = {**os.environ, "PYTHONPATH": REPO, "NO_COLOR": "1", "GALAXY_API_TOKEN": admin_token(cluster.key)}
        env.pop("GALAXY_ADDR", None)

        def create() -> str | None:
            out = lab.run(1, [sys.executable, "-m", "galaxy", "token", "create", "--ttl", "3m", "--role", "worker",
                              "--addr", h1.url], capture_output=True, text=True, timeout=30, env=env)
            return out.stdout.strip().splitlines()[-1] if out.returncode == 0 else None
        token = cluster.wait(create, 60, "a member makes a token (the admin account exists)")
        seeds = join.parse(token).seeds
        assert {s.host for s in seeds} == {lab.host_ip(i) for i in (1, 2, 3)}, seeds

        key = wire.parse_key(cluster.key)
        now_ms = int(time.time() * 1000)
        expired = join.make(key, "galaxy", os.urandom(16), now_ms - 1000, "worker", seeds)
        logs = [refused(cluster, lab, 4, "late", expired, "expired")]
        raw = join._unb64(token[len(join.TOKEN_PREFIX):])
        logs.append(refused(cluster, lab, 4, "tampered", join.TOKEN_PREFIX + join._b64(raw[:-1] + bytes([raw[-1] ^ 1])),
                "altered"))

        h4 = newcomer(cluster, lab, 4, "h4", token)
        cluster.wait(lambda: all(len(cluster.members_view(p)) == 4 and set(cluster.members_view(p).values()) ==
                                 {"alive"} for p in (h1, h4)) or None, 60, "h4 joined with the token alone")
        with open(os.path.join(h4.data_dir, "cluster.key")) as f:
            assert f.read().strip() == cluster.key
        assert h4.get("/v1/status")["node"]["role"] == "worker"       # capped by the token

        logs.append(refused(cluster, lab, 5, "again", token, "already used"))
        counts: dict[str, int] = {}
        for p in members:
            for reason, n in p.get("/v1/status")["join"]["refused"].items():
                counts[reason] = counts.get(reason, 0) + n
        assert counts["expired"] >= 1 and counts["altered"] >= 1 and counts["used"] >= 1, counts
        logs += [p.log_text() for p in cluster.procs.values()]
        for secret in (cluster.key, token, expired):
            assert all(secret not in text for text in logs)
